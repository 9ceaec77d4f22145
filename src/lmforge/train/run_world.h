// The ranks' communicators of a training run (train()): the host world (MPI, or torchrun's NCCL
// rendezvous for a model on GPUs), the NCCL world over it for GPU collectives, and what every rank
// must agree on before training (its config).
#pragma once

#include <memory>
#include <string>

#include "lmforge/dist/communicator.h"
#include "lmforge/io/config.h"

namespace lmforge {

// The world of the ranks: over MPI (mpirun, srun, lmforge launch) or, for a model on GPUs
// launched by torchrun's variables, the NCCL world by TCP rendezvous at MASTER_ADDR.
std::unique_ptr<dist::Communicator> make_world(const Config& cfg, bool on_gpu);
// The NCCL world for a model on GPUs (dist.backend auto with several ranks, or nccl) over the
// host world, after selecting this rank's GPU; null when the collectives stay on the host world
// (CPU training, one GPU without dist.backend: nccl, or a world that is NCCL already).
std::unique_ptr<dist::Communicator> make_gpu_world(dist::Communicator& world, const Config& cfg);
// Rank 0's string on every rank.
std::string broadcast_string(dist::Communicator& world, std::string s);
// Every rank runs rank 0's config: a stale copy on one node would train apart, or fail inside a
// collective of other sizes. Fails on a rank whose resolved config differs (its SHA-256).
void check_same_config(dist::Communicator& world, Config& cfg);

}  // namespace lmforge
