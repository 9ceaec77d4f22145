// Communicator: the collectives lmforge's data parallelism needs, over an existing engine.
//   LocalCommunicator   one process (size 1; every collective is a copy or nothing)
//   MpiCommunicator     CPU tensors over MPI (Debian's OpenMPI), launched by mpirun or srun
//   NcclCommunicator    GPU tensors over NCCL (dist/nccl.h; compiled when the toolkit has NCCL)
// Every collective is asynchronous and returns a Work handle; wait() blocks until it completes
// or fails the whole job after the timeout (dist.timeout) with one line naming this rank, the
// operation and, where it can tell, the ranks that never arrived.
//
//   std::unique_ptr<Communicator> world = init_world({.timeout_s = 600});  // from the env
//   WorkPtr w = world->all_reduce(grads, n);   // sum over ranks, in place
//   ... compute ...
//   w->wait();
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace lmforge::dist {

// A pending collective.
class Work {
 public:
  virtual ~Work() = default;
  virtual bool test() = 0;  // drives progress; true once complete
  virtual void wait() = 0;  // blocks until complete (or fails the job after the timeout)
};
using WorkPtr = std::unique_ptr<Work>;

// A collective that completed before it was returned (one rank; staged host data).
struct CompletedWork final : Work {
  bool test() override { return true; }
  void wait() override {}
};

// Where this process sits: from mpirun/srun/torchrun environment variables (see detect_launch).
struct RankInfo {
  int rank = 0, size = 1;
  int local_rank = 0, local_size = 1;  // within this node
  int node = 0, nodes = 1;
  std::string launcher = "none";  // none | mpirun | srun | torchrun
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }
  virtual std::string backend() const = 0;

  // Sum over ranks, in place.
  virtual WorkPtr all_reduce(float* data, int64_t n) = 0;
  virtual WorkPtr all_reduce(double* data, int64_t n) = 0;
  // in holds sum(counts) elements, rank r's block at offset counts[0] + ... + counts[r-1]; out
  // (counts[rank()] elements) receives the sum over ranks of this rank's block.
  virtual WorkPtr reduce_scatter(const float* in, float* out,
                                 const std::vector<int64_t>& counts) = 0;
  // out (sum(counts) elements) receives every rank's block in rank order; rank r contributes
  // counts[r] elements from in, or, when in == nullptr, from its own place in out (in place).
  virtual WorkPtr all_gather(const float* in, float* out, const std::vector<int64_t>& counts) = 0;
  // The same for 2-byte elements (bf16 master weights; the bits are copied, never combined).
  virtual WorkPtr all_gather(const uint16_t* in, uint16_t* out,
                             const std::vector<int64_t>& counts) = 0;
  virtual WorkPtr broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // The ranks passing the same color, ordered by key (e.g. the ranks of one node).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

 protected:
  int rank_ = 0, size_ = 1;
};

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator() = default;
  std::string backend() const override { return "local"; }
  WorkPtr all_reduce(float*, int64_t) override;
  WorkPtr all_reduce(double*, int64_t) override;
  WorkPtr reduce_scatter(const float* in, float* out, const std::vector<int64_t>& c) override;
  WorkPtr all_gather(const float* in, float* out, const std::vector<int64_t>& c) override;
  WorkPtr all_gather(const uint16_t* in, uint16_t* out, const std::vector<int64_t>& c) override;
  WorkPtr broadcast(void*, int64_t, int) override;
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override;
};

// What the collectives issued through a CountingCommunicator moved, per rank. bus_bytes counts
// what a ring algorithm sends from each rank (NCCL's "bus" convention, the volume the backends'
// large-message algorithms move): an all-reduce of B bytes 2(N-1)/N B, a reduce-scatter or
// all-gather of B bytes in all (N-1)/N B, a broadcast B. payload_bytes is the buffers' size (B).
// The double all-reduces (loss sums, counts: a few numbers each) are counted apart as scalars.
struct CommStats {
  int64_t calls = 0, scalar_calls = 0;
  double payload_bytes = 0, bus_bytes = 0;
  CommStats& operator-=(const CommStats& o);
};

// Forwards every collective to `inner` and counts it in stats() (and, for split() children, in
// the same stats). What DataParallel talks through, so that it can report a step's traffic.
class CountingCommunicator final : public Communicator {
 public:
  explicit CountingCommunicator(Communicator& inner);
  std::string backend() const override { return inner_->backend(); }
  WorkPtr all_reduce(float* data, int64_t n) override;
  WorkPtr all_reduce(double* data, int64_t n) override;
  WorkPtr reduce_scatter(const float* in, float* out, const std::vector<int64_t>& c) override;
  WorkPtr all_gather(const float* in, float* out, const std::vector<int64_t>& c) override;
  WorkPtr all_gather(const uint16_t* in, uint16_t* out, const std::vector<int64_t>& c) override;
  WorkPtr broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override { inner_->barrier(); }
  // The child counts into this communicator's stats.
  std::unique_ptr<Communicator> split(int color, int key) override;
  const CommStats& stats() const { return *stats_; }

 private:
  CountingCommunicator(std::unique_ptr<Communicator> owned, std::shared_ptr<CommStats> stats);
  WorkPtr count(WorkPtr w, double payload, double bus_share);
  std::unique_ptr<Communicator> owned_;
  Communicator* inner_;
  std::shared_ptr<CommStats> stats_;
};

struct WorldOptions {
  double timeout_s = 600;        // dist.timeout: a collective that takes longer fails the job
  int ranks_per_node = 0;        // dist.ranks_per_node: 0 = as launched; >0 declares nodes
  std::string backend = "auto";  // auto | mpi | local | nccl (the host world is then as auto)
  // The world of a launch without MPI (torchrun's variables): the trainer passes the NCCL world
  // by TCP rendezvous when the model is on GPUs. Called with this process's place (node from
  // ranks_per_node) for several ranks, or for one with backend nccl. Unset: such launches fail.
  std::function<std::unique_ptr<Communicator>(const RankInfo&)> rendezvous_world;
};

// Throws naming dist.backend unless it is auto, mpi, nccl or local.
void check_backend(const std::string& backend);

// Reads the launcher's environment: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE} (mpirun),
// PMI_RANK/PMI_SIZE (MPICH, Intel MPI), SLURM_{PROCID,NTASKS,LOCALID,NTASKS_PER_NODE,NNODES} (srun;
// nodes hold consecutive ranks), RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (torchrun's
// convention).
RankInfo detect_launch();

// The world communicator: MPI when launched with more than one rank by mpirun or srun (MPI is
// initialized here and finalized at exit), opt.rendezvous_world's when launched by torchrun,
// else LocalCommunicator. Throws Error when launched as several ranks in a way lmforge cannot
// join (torchrun's variables without a rendezvous world: CPU training communicates over MPI).
std::unique_ptr<Communicator> init_world(const WorldOptions& opt);
// This process's place as the world communicator was created (node from ranks_per_node).
const RankInfo& rank_info();

// What the job is doing (e.g. "step 12"), named in timeout messages.
void set_context(std::string what);
const std::string& context();

// Stops every rank of the job (MPI_Abort under MPI) after printing `line` on stderr; for fatal
// errors on one rank that the others would otherwise wait for. Without MPI (torchrun's NCCL
// world) only this process exits: the launcher stops its siblings, and the other ranks' next
// collective fails within dist.timeout naming the operation.
[[noreturn]] void abort_job(const std::string& line, int code = 1);

// Bounds a blocking call that has no timeout of its own (NCCL's communicator set-up, which waits
// for every rank): unless destroyed within timeout_s, it prints `line` on stderr and ends this
// process from its own thread with status 1 (no destructors run: the blocked thread still holds
// what they would free); mpirun, torchrun or srun --kill-on-bad-exit then stop the other ranks.
//   { Watchdog w(timeout_s, "lmforge: rank 3: ncclCommInitRank ... did not return"); call(); }
class Watchdog {
 public:
  Watchdog(double timeout_s, std::string line);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace lmforge::dist
