// MpiCommunicator: non-blocking MPI collectives (MPI_Iallreduce, MPI_Ireduce_scatter,
// MPI_Iallgatherv, MPI_Ibcast) waited on with a deadline.
//
// Naming the rank that never arrived: the ranks of a node share a small MPI window (a "board")
// where each writes the sequence number and kind of the collective it is entering. A rank whose
// collective times out reads the board and names the ranks of its node that are behind it; a
// rank on another node is reported as such.
#include <fmt/core.h>
#include <mpi.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <limits>
#include <thread>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/dist/mpi_world.h"

namespace lmforge::dist {

namespace {

using Clock = std::chrono::steady_clock;

struct Slot {
  std::atomic<int64_t> seq;
  std::atomic<int32_t> op;
  int32_t world_rank;
};

const char* const kOpNames[] = {"all_reduce", "reduce_scatter", "all_gather", "broadcast",
                                "barrier"};
enum OpKind : int32_t { kAllReduce, kReduceScatter, kAllGather, kBroadcast, kBarrier };

// Process-wide: the node board and this rank's collective counter (over all communicators).
struct Board {
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Win win = MPI_WIN_NULL;
  std::vector<Slot*> slots;  // per rank of the node
  Slot* mine = nullptr;
  int64_t seq = 0;
  int world_rank = 0, world_size = 1;
  double timeout_s = 600;
};
Board g_board;

int checked_count(int64_t n, const char* op) {
  if (n < 0 || n > std::numeric_limits<int>::max())
    fail("{}: {} elements exceed MPI's int count; lower dist.bucket_mb or use more ranks", op, n);
  return static_cast<int>(n);
}

class MpiWork final : public Work {
 public:
  MpiWork(OpKind op, int64_t elems, MPI_Comm comm) : op_(op), elems_(elems), comm_(comm) {
    seq_ = ++g_board.seq;
    if (g_board.mine) {
      g_board.mine->op.store(op, std::memory_order_relaxed);
      g_board.mine->seq.store(seq_, std::memory_order_release);
    }
  }
  ~MpiWork() override {
    if (!done_) wait();
  }
  std::vector<int> counts, displs;  // must outlive the request
  MPI_Request req = MPI_REQUEST_NULL;
  std::vector<MPI_Request> more;  // further requests of one collective (a broadcast in pieces)

  bool test() override {
    if (done_) return true;
    int flag = 0;
    MPI_Test(&req, &flag, MPI_STATUS_IGNORE);
    if (flag && !more.empty())
      MPI_Testall(static_cast<int>(more.size()), more.data(), &flag, MPI_STATUSES_IGNORE);
    done_ = flag != 0;
    return done_;
  }

  void wait() override {
    auto deadline = Clock::now() + std::chrono::duration<double>(g_board.timeout_s);
    for (int spins = 0; !test(); ++spins) {
      if (spins > 200) std::this_thread::sleep_for(std::chrono::microseconds(50));
      if ((spins & 255) == 0 && Clock::now() > deadline) timed_out();
    }
  }

 private:
  [[noreturn]] void timed_out() {
    std::string behind;
    bool all_local_arrived = true;
    for (Slot* s : g_board.slots) {
      if (s == g_board.mine) continue;
      int64_t q = s->seq.load(std::memory_order_acquire);
      if (q < seq_) {
        all_local_arrived = false;
        behind += fmt::format("{}rank {} (at collective #{})", behind.empty() ? "" : ", ",
                              s->world_rank, q);
      }
    }
    if (all_local_arrived)
      behind = g_board.slots.size() < static_cast<size_t>(g_board.world_size)
                   ? "a rank on another node"
                   : "a rank";
    std::string line = fmt::format(
        "lmforge: rank {}: {} #{} ({} elements{}) did not complete within {:g} s (dist.timeout): "
        "{} never joined it (died or hangs); stopping all ranks",
        g_board.world_rank, kOpNames[op_], seq_, elems_, context().empty() ? "" : ", " + context(),
        g_board.timeout_s, behind);
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    std::abort();
  }

  OpKind op_;
  int64_t elems_;
  MPI_Comm comm_;
  int64_t seq_ = 0;
  bool done_ = false;
};

// MPI_Ibarrier waited on with dist.timeout: before a blocking collective (communicator splits,
// the node board's set-up), so that a rank that died first stops the others instead of hanging
// them there.
void timed_barrier(MPI_Comm comm) {
  MpiWork w(kBarrier, 0, comm);
  MPI_Ibarrier(comm, &w.req);
  w.wait();
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_WORLD && mpi_active()) MPI_Comm_free(&comm_);
  }
  std::string backend() const override { return "mpi"; }

  WorkPtr all_reduce(float* data, int64_t n) override { return reduce(data, n, MPI_FLOAT); }
  WorkPtr all_reduce(double* data, int64_t n) override { return reduce(data, n, MPI_DOUBLE); }

  WorkPtr reduce_scatter(const float* in, float* out, const std::vector<int64_t>& c) override {
    auto w = std::make_unique<MpiWork>(kReduceScatter, total(c), comm_);
    w->counts = ints(c, "reduce_scatter");
    MPI_Ireduce_scatter(in, out, w->counts.data(), MPI_FLOAT, MPI_SUM, comm_, &w->req);
    return w;
  }

  WorkPtr all_gather(const float* in, float* out, const std::vector<int64_t>& c) override {
    return gather(in, out, c, MPI_FLOAT);
  }
  WorkPtr all_gather(const uint16_t* in, uint16_t* out, const std::vector<int64_t>& c) override {
    return gather(in, out, c, MPI_UINT16_T);
  }

  WorkPtr broadcast(void* data, int64_t bytes, int root) override {
    // In pieces of at most 1 GiB: MPI counts are ints, and the initial weights of a model past
    // half a billion fp32 parameters are more bytes than that.
    constexpr int64_t kPiece = int64_t{1} << 30;
    auto w = std::make_unique<MpiWork>(kBroadcast, bytes, comm_);
    auto* p = static_cast<char*>(data);
    const int64_t first = std::min(bytes, kPiece);
    MPI_Ibcast(p, checked_count(first, "broadcast"), MPI_BYTE, root, comm_, &w->req);
    w->more.reserve(static_cast<size_t>((bytes - first + kPiece - 1) / kPiece));
    for (int64_t off = first; off < bytes; off += kPiece) {
      w->more.push_back(MPI_REQUEST_NULL);
      MPI_Ibcast(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, root, comm_,
                 &w->more.back());
    }
    return w;
  }

  void barrier() override { timed_barrier(comm_); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    timed_barrier(comm_);
    MPI_Comm sub = MPI_COMM_NULL;
    MPI_Comm_split(comm_, color, key, &sub);
    return std::make_unique<MpiCommunicator>(sub);
  }

 private:
  WorkPtr gather(const void* in, void* out, const std::vector<int64_t>& c, MPI_Datatype type) {
    auto w = std::make_unique<MpiWork>(kAllGather, total(c), comm_);
    w->counts = ints(c, "all_gather");
    w->displs.resize(c.size());
    int64_t off = 0;
    for (size_t r = 0; r < c.size(); ++r) {
      w->displs[r] = checked_count(off, "all_gather");
      off += c[r];
    }
    MPI_Iallgatherv(in ? in : MPI_IN_PLACE, w->counts[rank_], type, out, w->counts.data(),
                    w->displs.data(), type, comm_, &w->req);
    return w;
  }
  WorkPtr reduce(void* data, int64_t n, MPI_Datatype type) {
    auto w = std::make_unique<MpiWork>(kAllReduce, n, comm_);
    MPI_Iallreduce(MPI_IN_PLACE, data, checked_count(n, "all_reduce"), type, MPI_SUM, comm_,
                   &w->req);
    return w;
  }
  int64_t total(const std::vector<int64_t>& c) const {
    LMF_CHECK(static_cast<int>(c.size()) == size_, "{} counts for {} ranks", c.size(), size_);
    int64_t t = 0;
    for (int64_t x : c) t += x;
    return t;
  }
  static std::vector<int> ints(const std::vector<int64_t>& c, const char* op) {
    std::vector<int> out;
    for (int64_t x : c) out.push_back(checked_count(x, op));
    return out;
  }
  MPI_Comm comm_;
};

void finalize_at_exit() {
  int fin = 0;
  MPI_Finalized(&fin);
  if (fin) return;
  if (g_board.win != MPI_WIN_NULL) MPI_Win_free(&g_board.win);
  if (g_board.node != MPI_COMM_NULL) MPI_Comm_free(&g_board.node);
  MPI_Finalize();
}

}  // namespace

bool mpi_active() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void mpi_abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

std::unique_ptr<Communicator> make_mpi_world(const RankInfo& info, double timeout_s) {
  int provided = 0;
  // The threads MPI starts (progress, PMIx) never take SIGINT or SIGTERM: they inherit this mask
  // (core/interrupt.h: one thread of lmforge's takes them).
  sigset_t stop_signals, before;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &before);
  const int init_rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (init_rc != MPI_SUCCESS)
    fail("MPI_Init failed ({} launch of {} ranks); check the MPI installation", info.launcher,
         info.size);
  std::atexit(finalize_at_exit);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  g_board.timeout_s = timeout_s;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_board.world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_board.world_size);
  if (g_board.world_size != info.size)
    fail("MPI reports {} ranks but the launcher's environment says {}", g_board.world_size,
         info.size);

  // The node's board (really shared memory: the ranks of one host).
  timed_barrier(MPI_COMM_WORLD);
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_board.world_rank, MPI_INFO_NULL,
                      &g_board.node);
  int nrank = 0, nsize = 1;
  MPI_Comm_rank(g_board.node, &nrank);
  MPI_Comm_size(g_board.node, &nsize);
  Slot* base = nullptr;
  timed_barrier(g_board.node);
  MPI_Win_allocate_shared(sizeof(Slot), sizeof(Slot), MPI_INFO_NULL, g_board.node, &base,
                          &g_board.win);
  g_board.mine = new (base) Slot{};
  g_board.mine->world_rank = g_board.world_rank;
  timed_barrier(g_board.node);
  for (int r = 0; r < nsize; ++r) {
    MPI_Aint size = 0;
    int disp = 0;
    Slot* s = nullptr;
    MPI_Win_shared_query(g_board.win, r, &size, &disp, &s);
    g_board.slots.push_back(s);
  }
  timed_barrier(MPI_COMM_WORLD);
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
}

}  // namespace lmforge::dist
