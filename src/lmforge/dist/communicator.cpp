#include "lmforge/dist/communicator.h"

#include <fmt/core.h>

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <thread>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/error.h"
#include "lmforge/dist/mpi_world.h"

namespace lmforge::dist {

namespace {

RankInfo g_info;

// An integer environment variable, or `fallback` when unset.
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0) fail("environment variable {}=\"{}\": expected an integer", name, v);
  return static_cast<int>(x);
}

// Slurm's tasks-per-node list ("3,2", "2(x3),1"): the count on node `node`, or 0 when the list
// is missing, malformed or shorter.
int slurm_tasks_on_node(const char* list, int node) {
  if (!list) return 0;
  std::string_view rest(list);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    int count = 0, repeat = 1;
    auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), count);
    if (ec != std::errc() || count < 1) return 0;
    std::string_view tail(p, item.data() + item.size() - p);
    if (!tail.empty()) {  // "(xM)"
      if (tail.size() < 4 || tail.substr(0, 2) != "(x" || tail.back() != ')') return 0;
      auto [q, ec2] = std::from_chars(tail.data() + 2, tail.data() + tail.size() - 1, repeat);
      if (ec2 != std::errc() || q != tail.data() + tail.size() - 1 || repeat < 1) return 0;
    }
    if (node < repeat) return count;
    node -= repeat;
  }
  return 0;
}

}  // namespace

WorkPtr LocalCommunicator::all_reduce(float*, int64_t) { return std::make_unique<CompletedWork>(); }
WorkPtr LocalCommunicator::all_reduce(double*, int64_t) {
  return std::make_unique<CompletedWork>();
}
namespace {
// One rank's reduce-scatter and all-gather are copies, on the host or on the GPU (a model on
// train.device: cuda keeps its shards there), ordered with the GPU's other work.
template <typename T>
void copy_floats(T* out, const T* in, int64_t n) {
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  if (cuda::is_device_pointer(out) || cuda::is_device_pointer(in))
    cuda::memcpy(out, in, bytes, cuda::Copy::kDeviceToDevice);
  else
    std::memcpy(out, in, bytes);
}
}  // namespace

WorkPtr LocalCommunicator::reduce_scatter(const float* in, float* out,
                                          const std::vector<int64_t>& c) {
  if (in != out) copy_floats(out, in, c.at(0));
  return std::make_unique<CompletedWork>();
}
WorkPtr LocalCommunicator::all_gather(const float* in, float* out, const std::vector<int64_t>& c) {
  if (in && in != out) copy_floats(out, in, c.at(0));
  return std::make_unique<CompletedWork>();
}
WorkPtr LocalCommunicator::all_gather(const uint16_t* in, uint16_t* out,
                                      const std::vector<int64_t>& c) {
  if (in && in != out) copy_floats(out, in, c.at(0));
  return std::make_unique<CompletedWork>();
}
WorkPtr LocalCommunicator::broadcast(void*, int64_t, int) {
  return std::make_unique<CompletedWork>();
}
std::unique_ptr<Communicator> LocalCommunicator::split(int, int) {
  return std::make_unique<LocalCommunicator>();
}

CommStats& CommStats::operator-=(const CommStats& o) {
  calls -= o.calls;
  scalar_calls -= o.scalar_calls;
  payload_bytes -= o.payload_bytes;
  bus_bytes -= o.bus_bytes;
  return *this;
}

namespace {
double total(const std::vector<int64_t>& counts) {
  int64_t n = 0;
  for (int64_t c : counts) n += c;
  return static_cast<double>(n);
}
}  // namespace

CountingCommunicator::CountingCommunicator(Communicator& inner)
    : inner_(&inner), stats_(std::make_shared<CommStats>()) {
  rank_ = inner.rank();
  size_ = inner.size();
}

CountingCommunicator::CountingCommunicator(std::unique_ptr<Communicator> owned,
                                           std::shared_ptr<CommStats> stats)
    : owned_(std::move(owned)), inner_(owned_.get()), stats_(std::move(stats)) {
  rank_ = inner_->rank();
  size_ = inner_->size();
}

WorkPtr CountingCommunicator::count(WorkPtr w, double payload, double bus_share) {
  stats_->calls += 1;
  stats_->payload_bytes += payload;
  stats_->bus_bytes += payload * bus_share;
  return w;
}

WorkPtr CountingCommunicator::all_reduce(float* data, int64_t n) {
  const double N = size_;
  return count(inner_->all_reduce(data, n), 4.0 * static_cast<double>(n), 2 * (N - 1) / N);
}
WorkPtr CountingCommunicator::all_reduce(double* data, int64_t n) {
  stats_->scalar_calls += 1;
  return inner_->all_reduce(data, n);
}
WorkPtr CountingCommunicator::reduce_scatter(const float* in, float* out,
                                             const std::vector<int64_t>& c) {
  const double N = size_;
  return count(inner_->reduce_scatter(in, out, c), 4.0 * total(c), (N - 1) / N);
}
WorkPtr CountingCommunicator::all_gather(const float* in, float* out,
                                         const std::vector<int64_t>& c) {
  const double N = size_;
  return count(inner_->all_gather(in, out, c), 4.0 * total(c), (N - 1) / N);
}
WorkPtr CountingCommunicator::all_gather(const uint16_t* in, uint16_t* out,
                                         const std::vector<int64_t>& c) {
  const double N = size_;
  return count(inner_->all_gather(in, out, c), 2.0 * total(c), (N - 1) / N);
}
WorkPtr CountingCommunicator::broadcast(void* data, int64_t bytes, int root) {
  return count(inner_->broadcast(data, bytes, root), static_cast<double>(bytes),
               size_ > 1 ? 1.0 : 0.0);
}
std::unique_ptr<Communicator> CountingCommunicator::split(int color, int key) {
  return std::unique_ptr<Communicator>(new CountingCommunicator(inner_->split(color, key), stats_));
}

void check_backend(const std::string& backend) {
  if (backend != "auto" && backend != "mpi" && backend != "local" && backend != "nccl")
    fail("dist.backend: expected auto, mpi, nccl or local, got \"{}\"", backend);
}

RankInfo detect_launch() {
  RankInfo r;
  // torchrun's workers inherit their parent's variables (srun torchrun, torchrun inside an sbatch
  // script or an mpirun): its own TORCHELASTIC_RUN_ID marks them, and its ranks win.
  const bool torchrun = std::getenv("WORLD_SIZE") && std::getenv("TORCHELASTIC_RUN_ID");
  if (torchrun) {
    r.launcher = "torchrun";
  } else if (std::getenv("OMPI_COMM_WORLD_SIZE")) {
    r.launcher = "mpirun";
    r.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    r.size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    r.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    r.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else if (std::getenv("SLURM_PROCID") && env_int("SLURM_STEP_NUM_TASKS", 1) > 1) {
    // srun's step variables: an sbatch script's own shell also has SLURM_PROCID=0 and the job's
    // SLURM_NTASKS, but a process started there without srun is one process.
    r.launcher = "srun";
    r.rank = env_int("SLURM_PROCID", 0);
    r.size = env_int("SLURM_STEP_NUM_TASKS", 1);
    r.local_rank = env_int("SLURM_LOCALID", 0);
    r.nodes = env_int("SLURM_STEP_NUM_NODES", env_int("SLURM_NNODES", 1));
    r.node = env_int("SLURM_NODEID", -1);
    // Nodes may hold different numbers of tasks (srun -N2 -n5 places 3 and 2).
    r.local_size =
        r.node >= 0 ? slurm_tasks_on_node(std::getenv("SLURM_STEP_TASKS_PER_NODE"), r.node) : 0;
    if (r.local_size == 0) r.local_size = env_int("SLURM_NTASKS_PER_NODE", 0);
    if (r.local_size == 0) r.local_size = r.size / std::max(1, r.nodes);
    if (r.node < 0 || r.node >= r.nodes) r.node = -1;
  } else if (std::getenv("PMI_SIZE")) {
    r.launcher = "mpirun";
    r.rank = env_int("PMI_RANK", 0);
    r.size = env_int("PMI_SIZE", 1);
    r.local_rank = env_int("MPI_LOCALRANKID", 0);
    r.local_size = env_int("MPI_LOCALNRANKS", 1);
  } else if (std::getenv("WORLD_SIZE")) {
    r.launcher = "torchrun";
  }
  if (r.launcher == "torchrun") {
    r.rank = env_int("RANK", 0);
    r.size = env_int("WORLD_SIZE", 1);
    r.local_rank = env_int("LOCAL_RANK", 0);
    r.local_size = env_int("LOCAL_WORLD_SIZE", r.size);
  }
  if (r.size < 1 || r.rank >= r.size || r.local_size < 1 || r.local_rank >= r.local_size)
    fail("launcher ({}): rank {} of {} (local {} of {}) is inconsistent", r.launcher, r.rank,
         r.size, r.local_rank, r.local_size);
  if (r.launcher != "srun" || r.node < 0) {  // srun names the node; the others: blocks of ranks
    r.nodes = std::max(1, r.size / r.local_size);
    r.node = r.rank / r.local_size;
  }
  return r;
}

const RankInfo& rank_info() { return g_info; }

namespace {
std::string g_context;
}
void set_context(std::string what) { g_context = std::move(what); }
const std::string& context() { return g_context; }

std::unique_ptr<Communicator> init_world(const WorldOptions& opt) {
  g_info = detect_launch();
  WorldOptions o = opt;
  if (o.ranks_per_node == 0)  // lmforge launch --ranks-per-node
    o.ranks_per_node = env_int("LMFORGE_RANKS_PER_NODE", 0);
  if (o.ranks_per_node > 0) {
    if (g_info.size % o.ranks_per_node != 0)
      fail("dist.ranks_per_node: {} does not divide the {} ranks", o.ranks_per_node, g_info.size);
    g_info.local_size = o.ranks_per_node;
    g_info.local_rank = g_info.rank % o.ranks_per_node;
    g_info.node = g_info.rank / o.ranks_per_node;
    g_info.nodes = g_info.size / o.ranks_per_node;
  }
  check_backend(opt.backend);
  if (opt.backend == "local" && g_info.size > 1)
    fail("dist.backend: local runs one process but the launcher started {}", g_info.size);
  if (g_info.launcher == "torchrun" && opt.rendezvous_world &&
      (g_info.size > 1 || opt.backend == "nccl")) {
    if (opt.backend == "mpi")
      fail(
          "dist.backend: mpi needs mpirun or srun, but this process was launched by "
          "torchrun-style variables (WORLD_SIZE={}); use nccl or auto",
          g_info.size);
    return opt.rendezvous_world(g_info);
  }
  if (g_info.size == 1 || opt.backend == "local") return std::make_unique<LocalCommunicator>();
  if (g_info.launcher == "torchrun")
    fail(
        "launched by torchrun-style variables (WORLD_SIZE={}) but CPU training communicates over "
        "MPI; start it with mpirun -np N, srun, or lmforge launch --nproc N (torchrun is for "
        "train.device: cuda, or auto with GPUs)",
        g_info.size);
  return make_mpi_world(g_info, opt.timeout_s);
}

void abort_job(const std::string& line, int code) {
  // What the run printed before (its set-up lines) comes before the error, not after it.
  std::fflush(stdout);
  if (g_info.size > 1 && mpi_active()) {
    // Give rank 0 the chance to be the one that reports an error every rank hits.
    if (g_info.rank != 0) std::this_thread::sleep_for(std::chrono::seconds(1));
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
    mpi_abort(code);
  }
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  std::exit(code);
}

Watchdog::Watchdog(double timeout_s, std::string line) {
  thread_ = std::thread([this, timeout_s, line = std::move(line)] {
    std::unique_lock<std::mutex> lock(mu_);
    if (cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return done_; }))
      return;
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
    // Not MPI_Abort: MPI may not be called from this thread (MPI_THREAD_FUNNELED at most); mpirun
    // stops the job when a rank exits without MPI_Finalize.
    std::_Exit(1);
  });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

}  // namespace lmforge::dist
