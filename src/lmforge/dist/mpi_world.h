// The MPI backend's entry points, kept out of communicator.h so that only mpi.cpp sees <mpi.h>.
#pragma once

#include <memory>

#include "lmforge/dist/communicator.h"

namespace lmforge::dist {

// MPI_Init_thread (FUNNELED: only the main thread communicates) and the world communicator.
std::unique_ptr<Communicator> make_mpi_world(const RankInfo& info, double timeout_s);
bool mpi_active();                      // initialized and not finalized
[[noreturn]] void mpi_abort(int code);  // MPI_Abort on the world

}  // namespace lmforge::dist
