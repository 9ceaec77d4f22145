// NcclCommunicator: the Communicator collectives on GPU (device) pointers, over NCCL. Compiled
// only when CMake finds the CUDA toolkit with nccl.h and libnccl (LMFORGE_HAVE_NCCL=1); this
// header keeps <nccl.h> and <cuda_runtime.h> out of its users.
//
// Ordering: each communicator enqueues on its own CUDA stream (stream()), which first waits
// (cudaStreamWaitEvent) for everything already queued on lmforge's compute stream
// (cuda::stream()), so a collective reads the gradients the backward has produced so far; the
// compute work queued after it overlaps with it, and consumers wait() on the host first.
// Host memory: all_reduce(double*), broadcast() and all_gather() also take host pointers (the
// loss and token counts, the checkpoint's scalars, KTO's gathered token ids): those are staged
// through device memory and complete before the call returns. A Work completes when its
// cudaEvent, recorded after the collective, has fired; wait() fails the whole job with one line
// (and ncclCommAbort) when NCCL reports an asynchronous error or the timeout passes.
//
// Variable counts (reduce_scatter, all_gather): NCCL's collectives take one count for every
// rank. Equal counts use ncclReduceScatter / ncclAllGather; otherwise the collective is one NCCL
// group of per-rank ncclReduce (root r receives block r) or ncclBroadcast (root r sends block r)
// calls: no scratch buffer and no padding copies, and the same bytes on the wire as the ring.
//
//   dist::LocalCommunicator boot;                        // or the MPI world communicator
//   auto world = dist::make_nccl_world(boot, /*device=*/0);
//   dist::WorkPtr w = world->all_reduce(d_grads, n);      // d_grads: device memory
//   w->wait();
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "lmforge/dist/communicator.h"

struct ncclComm;     // ncclComm_t
struct CUstream_st;  // cudaStream_t

namespace lmforge::dist {

class NcclCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (initialized for `device`). world_rank names this process in error
  // lines; timeout_s bounds every wait().
  NcclCommunicator(ncclComm* comm, int device, double timeout_s, int world_rank);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  std::string backend() const override { return "nccl"; }
  int device() const { return device_; }
  CUstream_st* stream() const { return stream_; }  // where the collectives run

  WorkPtr all_reduce(float* data, int64_t n) override;
  WorkPtr all_reduce(double* data, int64_t n) override;
  // out must not overlap in, except as exactly this rank's block of it (in place).
  WorkPtr reduce_scatter(const float* in, float* out, const std::vector<int64_t>& counts) override;
  WorkPtr all_gather(const float* in, float* out, const std::vector<int64_t>& counts) override;
  WorkPtr all_gather(const uint16_t* in, uint16_t* out,
                     const std::vector<int64_t>& counts) override;
  WorkPtr broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override;
  // ncclCommSplit; color must be >= 0.
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  WorkPtr finish(int op, int64_t elems);  // a Work for what was just enqueued
  // all_gather of esize-byte elements of NCCL type `type` (an ncclDataType_t).
  WorkPtr gather(const void* in, void* out, const std::vector<int64_t>& counts, size_t esize,
                 int type);
  int64_t total(const std::vector<int64_t>& counts) const;

  ncclComm* comm_ = nullptr;
  CUstream_st* stream_ = nullptr;
  float* scratch_ = nullptr;  // one device float for barrier()
  void* staging_ = nullptr;   // device bytes for host data (grown on demand)
  size_t staging_bytes_ = 0;
  void* ready_ = nullptr;     // cudaEvent_t: the compute stream's work so far
  void after_compute();       // stream() waits for the compute stream's queued work
  void* stage(size_t bytes);  // staging_ with at least `bytes`
  int device_ = 0;
  double timeout_s_ = 600;
  int world_rank_ = 0;
};

// The NCCL world over an existing communicator (the MPI world): rank 0 creates the ncclUniqueId
// and broadcasts it through `bootstrap`; rank and size are bootstrap's. `device` is this rank's
// GPU (usually rank_info().local_rank). Throws Error when the GPU or NCCL cannot be initialized.
std::unique_ptr<Communicator> make_nccl_world(Communicator& bootstrap, int device,
                                              double timeout_s = 600);

// The NCCL world without MPI (torchrun's convention): rank 0 listens on rendezvous_address()'s
// port and sends the ncclUniqueId to each other rank, which connects to it, retrying until
// timeout_s. Throws Error naming the address and port when the rendezvous fails.
std::unique_ptr<Communicator> make_nccl_world_tcp(const RankInfo& info, int device,
                                                  double timeout_s = 600);

// Where make_nccl_world_tcp meets: MASTER_ADDR and MASTER_PORT, or LMFORGE_NCCL_PORT when set;
// under torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True: the agent listens on
// MASTER_PORT itself) the port after MASTER_PORT. `where` names them in errors. Throws Error
// when MASTER_ADDR or MASTER_PORT is missing or a port is not a number.
struct RendezvousAddress {
  std::string addr;
  int port = 0;
  std::string where;
};
RendezvousAddress rendezvous_address(const RankInfo& info);

// The rendezvous make_nccl_world_tcp uses, on any bytes: rank 0 (of `size`) listens on `port`
// and sends `id` to every other rank; the others connect to addr:port and receive it into `id`.
// `where` names the address in errors (e.g. "MASTER_ADDR:MASTER_PORT=node0:29500").
void tcp_rendezvous(const std::string& addr, int port, int rank, int size, void* id, size_t bytes,
                    double timeout_s, const std::string& where);

}  // namespace lmforge::dist
