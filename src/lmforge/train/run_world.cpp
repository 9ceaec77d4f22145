#include "lmforge/train/run_world.h"

#include <cstdlib>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/error.h"
#ifdef LMFORGE_HAVE_NCCL
#include "lmforge/dist/nccl.h"
#endif
#include "lmforge/io/sha256.h"
#include "lmforge/train/trainer.h"  // resolve_device

namespace lmforge {

namespace {

// Selects this rank's GPU and returns its index: a rank the launcher bound to one GPU (srun
// --gpus-per-task=1, a per-rank CUDA_VISIBLE_DEVICES) sees it as device 0 whatever its local rank;
// otherwise the local rank's GPU, at most one rank per GPU (two ranks on a one-GPU node without
// binding get the error below, not NCCL's).
int select_gpu(int rank) {
  const bool bound = cuda::device_count() == 1 && std::getenv("CUDA_VISIBLE_DEVICES");
  const int local = bound ? 0 : dist::rank_info().local_rank;
  if (local >= cuda::device_count())
    fail(
        "train.device: cuda: rank {} is local rank {} but this node has {} GPU(s); start at most "
        "one rank per GPU",
        rank, local, cuda::device_count());
  cuda::set_device(local);
  return local;
}

[[noreturn]] [[maybe_unused]] void fail_without_nccl(bool several) {
  fail(
      "dist.backend: NCCL is needed for {} on GPUs but this lmforge was built without it "
      "(nccl.h and libnccl not found); install NCCL and rebuild",
      several ? "several ranks" : "dist.backend: nccl");
}

}  // namespace

std::unique_ptr<dist::Communicator> make_world(const Config& cfg, bool on_gpu) {
  dist::WorldOptions wo;
  wo.timeout_s = cfg.dist.timeout;
  wo.ranks_per_node = static_cast<int>(cfg.dist.ranks_per_node);
  wo.backend = cfg.dist.backend;
  if (on_gpu)
    wo.rendezvous_world = [&cfg](const dist::RankInfo& ri) -> std::unique_ptr<dist::Communicator> {
      const int device = select_gpu(ri.rank);
#ifdef LMFORGE_HAVE_NCCL
      return dist::make_nccl_world_tcp(ri, device, cfg.dist.timeout);
#else
      (void)device;
      fail_without_nccl(ri.size > 1);
#endif
    };
  return dist::init_world(wo);
}

std::unique_ptr<dist::Communicator> make_gpu_world(dist::Communicator& world, const Config& cfg) {
  const std::string& backend = cfg.dist.backend;
  if (resolve_device(cfg.train.device) != Device::kCUDA) {
    if (backend == "nccl")
      fail("dist.backend: nccl carries GPU memory; set train.device: cuda, or use mpi for CPUs");
    return nullptr;
  }
  if (world.backend() == "nccl") return nullptr;  // torchrun's rendezvous world
  const int local = select_gpu(world.rank());
  if (world.size() > 1 && backend == "mpi")
    fail(
        "dist.backend: mpi cannot reduce GPU memory (train.device: cuda with {} ranks); use nccl "
        "or auto",
        world.size());
  if (world.size() == 1 && backend != "nccl") return nullptr;
#ifdef LMFORGE_HAVE_NCCL
  return dist::make_nccl_world(world, local, cfg.dist.timeout);
#else
  fail_without_nccl(world.size() > 1);
#endif
}

std::string broadcast_string(dist::Communicator& world, std::string s) {
  if (world.size() == 1) return s;
  int64_t n = static_cast<int64_t>(s.size());
  world.broadcast(&n, sizeof n, 0)->wait();
  s.resize(static_cast<size_t>(n));
  if (n > 0) world.broadcast(s.data(), n, 0)->wait();
  return s;
}

void check_same_config(dist::Communicator& world, Config& cfg) {
  if (world.size() == 1) return;
  const std::string mine = sha256_hex(config_to_yaml(cfg));
  if (broadcast_string(world, mine) != mine)
    fail(
        "rank {}: its config (file and --set) differs from rank 0's; every rank must run the "
        "same one",
        world.rank());
}

}  // namespace lmforge
