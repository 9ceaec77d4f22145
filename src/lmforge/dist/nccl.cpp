// NcclCommunicator (see nccl.h) and its two bootstraps: through another communicator (MPI) or a
// TCP rendezvous at MASTER_ADDR:MASTER_PORT.
#include "lmforge/dist/nccl.h"

#include <arpa/inet.h>
#include <cuda_runtime.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <nccl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/error.h"

namespace lmforge::dist {

namespace {

using Clock = std::chrono::steady_clock;

// Setup and enqueue failures (no GPU, a bad pointer, NCCL missing) are thrown as one line naming
// the call; failures of a collective in flight end the job in NcclWork::wait().
void cuda_check(cudaError_t e, const char* call) {
  if (e != cudaSuccess)
    fail("{}: CUDA error {} ({})", call, cudaGetErrorName(e), cudaGetErrorString(e));
}
void nccl_check(ncclResult_t r, const char* call) {
  if (r != ncclSuccess && r != ncclInProgress)
    fail("{}: NCCL error {} ({})", call, ncclGetErrorString(r), ncclGetLastError(nullptr));
}
#define LMF_CUDA_CHECK(call) cuda_check((call), #call)
#define LMF_NCCL_CHECK(call) nccl_check((call), #call)

const char* const kOpNames[] = {"all_reduce", "reduce_scatter", "all_gather", "broadcast",
                                "barrier"};
enum OpKind : int { kAllReduce, kReduceScatter, kAllGather, kBroadcast, kBarrier };

int64_t g_seq = 0;                   // this process's NCCL collectives, named in error lines
std::atomic<bool> g_aborted{false};  // a communicator was aborted: destructors touch nothing

size_t checked_count(int64_t n) {
  LMF_CHECK(n >= 0, "negative element count {}", n);
  return static_cast<size_t>(n);
}

class NcclWork final : public Work {
 public:
  NcclWork(ncclComm_t comm, cudaStream_t stream, OpKind op, int64_t elems, double timeout_s,
           int world_rank)
      : comm_(comm), op_(op), elems_(elems), timeout_s_(timeout_s), world_rank_(world_rank) {
    seq_ = ++g_seq;
    LMF_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    LMF_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  ~NcclWork() override {
    if (!done_ && !g_aborted) wait();
    if (!g_aborted) cudaEventDestroy(event_);
  }

  bool test() override {
    if (done_) return true;
    cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) {
      // Not an error, but the runtime may record it as the thread's last error, which the next
      // kernel launch's cudaGetLastError check would then report against that kernel.
      (void)cudaGetLastError();
      return false;
    }
    if (e != cudaSuccess)
      stop(fmt::format("failed on the GPU: CUDA error {} ({})", cudaGetErrorName(e),
                       cudaGetErrorString(e)));
    done_ = true;
    return true;
  }

  // Polls the event like MpiWork::wait polls its request, and NCCL's asynchronous error too: a
  // peer that died shows up there (or as the timeout) instead of as a hang.
  void wait() override {
    auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s_);
    for (int spins = 0; !test(); ++spins) {
      if (spins > 200) std::this_thread::sleep_for(std::chrono::microseconds(50));
      if ((spins & 255) != 0) continue;
      ncclResult_t async = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) async = r;
      if (async != ncclSuccess && async != ncclInProgress)
        stop(fmt::format("failed: NCCL error {} ({})", ncclGetErrorString(async),
                         ncclGetLastError(comm_)));
      if (Clock::now() > deadline)
        stop(fmt::format(
            "did not complete within {:g} s (dist.timeout): a rank never joined it (died or "
            "hangs) or a GPU stalled",
            timeout_s_));
    }
  }

 private:
  [[noreturn]] void stop(const std::string& why) {
    std::string line = fmt::format(
        "lmforge: rank {}: NCCL {} #{} ({} elements{}) {}; stopping all ranks", world_rank_,
        kOpNames[op_], seq_, elems_, context().empty() ? "" : ", " + context(), why);
    g_aborted = true;
    ncclCommAbort(comm_);  // unblocks this rank's kernels and frees the peers' connections
    abort_job(line);
  }

  ncclComm_t comm_;
  cudaEvent_t event_ = nullptr;
  OpKind op_;
  int64_t elems_;
  double timeout_s_;
  int world_rank_;
  int64_t seq_ = 0;
  bool done_ = false;
};

// Makes `device` current, with an error that says what is visible when it cannot.
void select_device(int device) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  if (e != cudaSuccess || n == 0)
    fail("NCCL: no CUDA GPU is visible ({}{}); NCCL needs one GPU per rank",
         e != cudaSuccess ? cudaGetErrorString(e) : "0 devices",
         visible ? fmt::format(", CUDA_VISIBLE_DEVICES={}", visible) : "");
  if (device < 0 || device >= n)
    fail("NCCL: GPU {} does not exist: {} visible{}; start at most one rank per GPU per node",
         device, n, visible ? fmt::format(" (CUDA_VISIBLE_DEVICES={})", visible) : "");
  LMF_CUDA_CHECK(cudaSetDevice(device));
}

// The line a rank prints when NCCL's set-up of a communicator (which waits for all its ranks)
// has not returned within dist.timeout.
std::string set_up_timeout(const char* call, int rank, int size, int device, double timeout_s) {
  return fmt::format(
      "lmforge: rank {}: {} ({} ranks, GPU {}) did not return within {:g} s (dist.timeout): a "
      "rank never joined (it died or hangs) or cannot reach this one (NCCL_DEBUG=INFO and "
      "NCCL_SOCKET_IFNAME); stopping",
      rank, call, size, device, timeout_s);
}

std::unique_ptr<Communicator> init_comm(const ncclUniqueId& id, int rank, int size, int device,
                                        double timeout_s) {
  ncclComm_t comm = nullptr;
  ncclResult_t r;
  {
    Watchdog w(timeout_s, set_up_timeout("ncclCommInitRank", rank, size, device, timeout_s));
    r = ncclCommInitRank(&comm, size, id, rank);
  }
  if (r != ncclSuccess)
    fail("ncclCommInitRank (rank {} of {}, GPU {}): NCCL error {} ({}); NCCL_DEBUG=WARN says more",
         rank, size, device, ncclGetErrorString(r), ncclGetLastError(nullptr));
  return std::make_unique<NcclCommunicator>(comm, device, timeout_s, rank);
}

// ---- TCP rendezvous -------------------------------------------------------------------------

constexpr char kMagic[8] = {'L', 'M', 'F', 'N', 'C', 'C', 'L', '1'};

struct Hello {  // what a rank sends rank 0; integers in network byte order
  char magic[8];
  uint32_t rank, size, bytes;
};

Clock::time_point deadline_in(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

int ms_left(Clock::time_point deadline, int cap_ms = 1 << 30) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(ms, 0, cap_ms));
}

// Reads exactly `n` bytes before `deadline`; false (with `err`) on timeout, EOF or an error.
bool read_all(int fd, void* buf, size_t n, Clock::time_point deadline, std::string& err) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    int ready = poll(&pfd, 1, ms_left(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      err = ready == 0 ? "timed out reading" : std::strerror(errno);
      return false;
    }
    ssize_t got = recv(fd, p, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      err = got == 0 ? "connection closed early" : std::strerror(errno);
      return false;
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

bool write_all(int fd, const void* buf, size_t n, std::string& err) {
  const auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t put = send(fd, p, n, MSG_NOSIGNAL);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) {
      err = std::strerror(errno);
      return false;
    }
    p += put;
    n -= static_cast<size_t>(put);
  }
  return true;
}

// A listening socket on `port` of every interface (IPv6 dual-stack, else IPv4).
int listen_any(int port, const std::string& where) {
  int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int on = 1, off = 0;
  sockaddr_storage ss{};
  socklen_t len = 0;
  if (fd >= 0) {
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_any;
    a->sin6_port = htons(static_cast<uint16_t>(port));
    len = sizeof(sockaddr_in6);
  } else {
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fail("NCCL rendezvous: socket(): {}", std::strerror(errno));
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_ANY);
    a->sin_port = htons(static_cast<uint16_t>(port));
    len = sizeof(sockaddr_in);
  }
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || listen(fd, 128) != 0) {
    int e = errno;
    close(fd);
    fail("NCCL rendezvous: rank 0 cannot listen on port {} ({}): {}; {}", port, where,
         std::strerror(e),
         e == EADDRINUSE ? "another process holds it: set LMFORGE_NCCL_PORT to a free port for "
                           "every rank"
                         : "choose another MASTER_PORT or LMFORGE_NCCL_PORT");
  }
  return fd;
}

// One connection to addr:port, or -1 with `err` (connect waits at most `cap_ms`).
int connect_to(const std::string& addr, int port, int cap_ms, std::string& err) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string service = std::to_string(port);
  if (int rc = getaddrinfo(addr.c_str(), service.c_str(), &hints, &res); rc != 0) {
    err = fmt::format("cannot resolve {}: {}", addr, gai_strerror(rc));
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    // Non-blocking, so that an unreachable host costs cap_ms rather than the kernel's SYN
    // retries (minutes).
    int rc = connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd pfd{fd, POLLOUT, 0};
      int soerr = 0;
      socklen_t len = sizeof soerr;
      if (poll(&pfd, 1, cap_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 &&
          soerr == 0)
        rc = 0;
      else
        errno = soerr ? soerr : ETIMEDOUT;
    }
    if (rc != 0) {
      err = std::strerror(errno);
      close(fd);
      fd = -1;
      continue;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  }
  freeaddrinfo(res);
  return fd;
}

void serve_id(int port, int size, const void* id, size_t bytes, double timeout_s,
              const std::string& where) {
  Clock::time_point deadline = deadline_in(timeout_s);
  int fd = listen_any(port, where);
  std::vector<bool> served(static_cast<size_t>(size), false);
  int left = size - 1;
  while (left > 0) {
    pollfd pfd{fd, POLLIN, 0};
    int ready = poll(&pfd, 1, ms_left(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      close(fd);
      std::string missing;
      for (int r = 1; r < size; ++r)
        if (!served[static_cast<size_t>(r)])
          missing += fmt::format("{}{}", missing.empty() ? "" : ", ", r);
      fail(
          "NCCL rendezvous: rank 0, listening on port {} ({}), heard from {} of the other {} "
          "ranks within {:g} s; missing ranks {}: check that they started and can reach this "
          "host at MASTER_ADDR",
          port, where, size - 1 - left, size - 1, timeout_s, missing);
    }
    int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    Hello h{};
    std::string err;
    // A connection that does not introduce itself in time is a stray (a port scan), not a rank.
    auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(10));
    bool ok = read_all(c, &h, sizeof h, hello_deadline, err) &&
              std::memcmp(h.magic, kMagic, sizeof kMagic) == 0;
    int rank = static_cast<int>(ntohl(h.rank));
    if (ok && (static_cast<int>(ntohl(h.size)) != size || ntohl(h.bytes) != bytes)) {
      close(c);
      close(fd);
      fail("NCCL rendezvous ({}): rank {} was launched as one of {} ranks, rank 0 as one of {}",
           where, rank, ntohl(h.size), size);
    }
    if (ok && rank > 0 && rank < size && !served[static_cast<size_t>(rank)] &&
        write_all(c, id, bytes, err)) {
      served[static_cast<size_t>(rank)] = true;
      --left;
    }
    close(c);
  }
  close(fd);
}

void fetch_id(const std::string& addr, int port, int rank, int size, void* id, size_t bytes,
              double timeout_s, const std::string& where) {
  Clock::time_point deadline = deadline_in(timeout_s);
  Hello h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.rank = htonl(static_cast<uint32_t>(rank));
  h.size = htonl(static_cast<uint32_t>(size));
  h.bytes = htonl(static_cast<uint32_t>(bytes));
  std::string err = "no attempt";
  for (int attempt = 0;; ++attempt) {
    int c = connect_to(addr, port, std::max(1, ms_left(deadline, 5000)), err);
    if (c >= 0) {
      bool ok = write_all(c, &h, sizeof h, err) && read_all(c, id, bytes, deadline, err);
      close(c);
      if (ok) return;
    }
    if (Clock::now() >= deadline)
      fail(
          "NCCL rendezvous: rank {} could not get the NCCL id from rank 0 at {} within {:g} s "
          "(last error: {}); check that rank 0 started, runs on MASTER_ADDR, and that the port "
          "is reachable from this host",
          rank, where, timeout_s, err);
    // Rank 0 may start later than this rank: retry, backing off to 1 s.
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::min(1000, 50 << std::min(attempt, 5))));
  }
}

int env_port(const char* name, const char* v) {
  char* end = nullptr;
  long p = std::strtol(v, &end, 10);
  if (!*v || *end != '\0' || p < 1 || p > 65535)
    fail("{}=\"{}\": expected a TCP port number (1-65535)", name, v);
  return static_cast<int>(p);
}

}  // namespace

// ---- NcclCommunicator -----------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(ncclComm* comm, int device, double timeout_s, int world_rank)
    : comm_(comm), device_(device), timeout_s_(timeout_s), world_rank_(world_rank) {
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  LMF_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  LMF_NCCL_CHECK(ncclCommCount(comm_, &size_));
  // Blocking (not cudaStreamNonBlocking): orders after the legacy default stream's work.
  LMF_CUDA_CHECK(cudaStreamCreate(&stream_));
  LMF_CUDA_CHECK(cudaMalloc(&scratch_, sizeof(float)));
  LMF_CUDA_CHECK(cudaMemsetAsync(scratch_, 0, sizeof(float), stream_));
  cudaEvent_t ev = nullptr;
  LMF_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  ready_ = ev;
}

void NcclCommunicator::after_compute() {
  auto ev = static_cast<cudaEvent_t>(ready_);
  LMF_CUDA_CHECK(cudaEventRecord(ev, static_cast<cudaStream_t>(cuda::stream())));
  LMF_CUDA_CHECK(cudaStreamWaitEvent(stream_, ev, 0));
}

void* NcclCommunicator::stage(size_t bytes) {
  if (bytes > staging_bytes_) {
    LMF_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the old buffer may be in use
    cudaFree(staging_);
    staging_ = nullptr;
    LMF_CUDA_CHECK(cudaMalloc(&staging_, bytes));
    staging_bytes_ = bytes;
  }
  return staging_;
}

NcclCommunicator::~NcclCommunicator() {
  if (g_aborted) return;  // the job is ending; the aborted communicator must not be destroyed
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  if (comm_) ncclCommDestroy(comm_);
  cudaFree(scratch_);
  cudaFree(staging_);
  if (ready_) cudaEventDestroy(static_cast<cudaEvent_t>(ready_));
  if (stream_) cudaStreamDestroy(stream_);
}

WorkPtr NcclCommunicator::finish(int op, int64_t elems) {
  return std::make_unique<NcclWork>(comm_, stream_, static_cast<OpKind>(op), elems, timeout_s_,
                                    world_rank_);
}

int64_t NcclCommunicator::total(const std::vector<int64_t>& c) const {
  LMF_CHECK(static_cast<int>(c.size()) == size_, "{} counts for {} ranks", c.size(), size_);
  int64_t t = 0;
  for (int64_t x : c) t += static_cast<int64_t>(checked_count(x));
  return t;
}

WorkPtr NcclCommunicator::all_reduce(float* data, int64_t n) {
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  LMF_CHECK(n == 0 || cuda::is_device_pointer(data), "NCCL all_reduce of floats: device memory");
  after_compute();
  LMF_NCCL_CHECK(ncclAllReduce(data, data, checked_count(n), ncclFloat, ncclSum, comm_, stream_));
  return finish(kAllReduce, n);
}

WorkPtr NcclCommunicator::all_reduce(double* data, int64_t n) {
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  // Host scalars: staged, complete on return, and not ordered after the queued compute (which
  // they do not read: waiting for it would stall the host on the whole step).
  if (n > 0 && !cuda::is_device_pointer(data)) {
    const size_t bytes = checked_count(n) * sizeof(double);
    auto* d = static_cast<double*>(stage(bytes));
    LMF_CUDA_CHECK(cudaMemcpyAsync(d, data, bytes, cudaMemcpyHostToDevice, stream_));
    LMF_NCCL_CHECK(ncclAllReduce(d, d, checked_count(n), ncclDouble, ncclSum, comm_, stream_));
    finish(kAllReduce, n)->wait();  // bounded by dist.timeout, unlike a blocking copy
    LMF_CUDA_CHECK(cudaMemcpyAsync(data, d, bytes, cudaMemcpyDeviceToHost, stream_));
    LMF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return std::make_unique<CompletedWork>();
  }
  after_compute();
  LMF_NCCL_CHECK(ncclAllReduce(data, data, checked_count(n), ncclDouble, ncclSum, comm_, stream_));
  return finish(kAllReduce, n);
}

WorkPtr NcclCommunicator::reduce_scatter(const float* in, float* out,
                                         const std::vector<int64_t>& c) {
  int64_t n = total(c);
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  after_compute();
  if (std::all_of(c.begin(), c.end(), [&](int64_t x) { return x == c[0]; })) {
    LMF_NCCL_CHECK(
        ncclReduceScatter(in, out, checked_count(c[0]), ncclFloat, ncclSum, comm_, stream_));
  } else {
    // Block r is reduced onto rank r; recvbuff is read on the root only.
    LMF_NCCL_CHECK(ncclGroupStart());
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      if (c[r] > 0)
        LMF_NCCL_CHECK(
            ncclReduce(in + off, out, checked_count(c[r]), ncclFloat, ncclSum, r, comm_, stream_));
      off += c[r];
    }
    LMF_NCCL_CHECK(ncclGroupEnd());
  }
  return finish(kReduceScatter, n);
}

WorkPtr NcclCommunicator::all_gather(const float* in, float* out, const std::vector<int64_t>& c) {
  return gather(in, out, c, sizeof(float), ncclFloat);
}

WorkPtr NcclCommunicator::all_gather(const uint16_t* in, uint16_t* out,
                                     const std::vector<int64_t>& c) {
  return gather(in, out, c, sizeof(uint16_t), ncclBfloat16);  // copied, so any 2-byte type
}

WorkPtr NcclCommunicator::gather(const void* in, void* out, const std::vector<int64_t>& c,
                                 size_t esize, int type) {
  const auto dtype = static_cast<ncclDataType_t>(type);
  auto at = [&](const void* base, int64_t elems) {
    return static_cast<char*>(const_cast<void*>(base)) + static_cast<size_t>(elems) * esize;
  };
  int64_t n = total(c);
  int64_t mine_off = 0;
  for (int r = 0; r < rank_; ++r) mine_off += c[r];
  const void* mine = in ? in : at(out, mine_off);
  // Every rank's block into `into` (device memory) from `send` (this rank's).
  auto queue = [&](const void* send, void* into) {
    if (std::all_of(c.begin(), c.end(), [&](int64_t x) { return x == c[0]; })) {
      LMF_NCCL_CHECK(ncclAllGather(send, into, checked_count(c[0]), dtype, comm_, stream_));
      return;
    }
    // Rank r broadcasts its block into place; sendbuff is read on the root only.
    LMF_NCCL_CHECK(ncclGroupStart());
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      if (c[r] > 0)
        LMF_NCCL_CHECK(ncclBroadcast(r == rank_ ? send : at(into, off), at(into, off),
                                     checked_count(c[r]), dtype, r, comm_, stream_));
      off += c[r];
    }
    LMF_NCCL_CHECK(ncclGroupEnd());
  };
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  if (n > 0 && !cuda::is_device_pointer(out)) {
    // Host rows (a KTO group's token ids): staged, complete on return, and not ordered after the
    // queued compute (as all_reduce's scalars).
    LMF_CHECK(!cuda::is_device_pointer(mine), "NCCL all_gather: device input, host output");
    void* d = stage(checked_count(n) * esize);
    LMF_CUDA_CHECK(cudaMemcpyAsync(at(d, mine_off), mine, checked_count(c[rank_]) * esize,
                                   cudaMemcpyHostToDevice, stream_));
    queue(at(d, mine_off), d);  // in place
    finish(kAllGather, n)->wait();
    LMF_CUDA_CHECK(
        cudaMemcpyAsync(out, d, checked_count(n) * esize, cudaMemcpyDeviceToHost, stream_));
    LMF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return std::make_unique<CompletedWork>();
  }
  after_compute();
  queue(mine, out);
  return finish(kAllGather, n);
}

WorkPtr NcclCommunicator::broadcast(void* data, int64_t bytes, int root) {
  LMF_CHECK(root >= 0 && root < size_, "broadcast root {} of {} ranks", root, size_);
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  if (bytes > 0 && !cuda::is_device_pointer(data)) {  // host bytes: staged, as all_reduce's
    const size_t n = checked_count(bytes);
    void* d = stage(n);
    LMF_CUDA_CHECK(cudaMemcpyAsync(d, data, n, cudaMemcpyHostToDevice, stream_));
    LMF_NCCL_CHECK(ncclBroadcast(d, d, n, ncclUint8, root, comm_, stream_));
    finish(kBroadcast, bytes)->wait();
    LMF_CUDA_CHECK(cudaMemcpyAsync(data, d, n, cudaMemcpyDeviceToHost, stream_));
    LMF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return std::make_unique<CompletedWork>();
  }
  after_compute();
  LMF_NCCL_CHECK(ncclBroadcast(data, data, checked_count(bytes), ncclUint8, root, comm_, stream_));
  return finish(kBroadcast, bytes);
}

void NcclCommunicator::barrier() {
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  LMF_NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclFloat, ncclSum, comm_, stream_));
  finish(kBarrier, 1)->wait();
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  LMF_CHECK(color >= 0, "split color {} must be >= 0", color);
  LMF_CUDA_CHECK(cudaSetDevice(device_));
  ncclComm_t sub = nullptr;
  {
    Watchdog w(timeout_s_,
               set_up_timeout("ncclCommSplit", world_rank_, size_, device_, timeout_s_));
    LMF_NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, nullptr));
  }
  return std::make_unique<NcclCommunicator>(sub, device_, timeout_s_, world_rank_);
}

// ---- bootstraps -----------------------------------------------------------------------------

std::unique_ptr<Communicator> make_nccl_world(Communicator& bootstrap, int device,
                                              double timeout_s) {
  select_device(device);
  ncclUniqueId id{};
  if (bootstrap.rank() == 0) LMF_NCCL_CHECK(ncclGetUniqueId(&id));
  bootstrap.broadcast(&id, sizeof id, 0)->wait();
  return init_comm(id, bootstrap.rank(), bootstrap.size(), device, timeout_s);
}

std::unique_ptr<Communicator> make_nccl_world_tcp(const RankInfo& info, int device,
                                                  double timeout_s) {
  select_device(device);
  ncclUniqueId id{};
  if (info.rank == 0) LMF_NCCL_CHECK(ncclGetUniqueId(&id));
  if (info.size > 1) {
    const RendezvousAddress a = rendezvous_address(info);
    tcp_rendezvous(a.addr, a.port, info.rank, info.size, &id, sizeof id, timeout_s, a.where);
  }
  return init_comm(id, info.rank, info.size, device, timeout_s);
}

RendezvousAddress rendezvous_address(const RankInfo& info) {
  const char* addr = std::getenv("MASTER_ADDR");
  const char* port_s = std::getenv("MASTER_PORT");
  if (!addr || !*addr || !port_s || !*port_s)
    fail(
        "NCCL rendezvous: MASTER_ADDR and MASTER_PORT must be set for {} ranks (launched by {}); "
        "torchrun sets them, or export them on every rank",
        info.size, info.launcher);
  RendezvousAddress a{addr, env_port("MASTER_PORT", port_s),
                      fmt::format("MASTER_ADDR:MASTER_PORT={}:{}", addr, port_s)};
  const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  if (const char* p = std::getenv("LMFORGE_NCCL_PORT"); p && *p) {
    a.port = env_port("LMFORGE_NCCL_PORT", p);
    a.where = fmt::format("MASTER_ADDR={}, LMFORGE_NCCL_PORT={}", addr, p);
  } else if (agent_store && std::string(agent_store) == "True") {
    // torchrun's agent keeps its own store on MASTER_PORT: the next port, unless told another.
    a.port = a.port < 65535 ? a.port + 1 : a.port - 1;
    a.where = fmt::format(
        "MASTER_ADDR={}, port {} (MASTER_PORT={} is torchrun's store; LMFORGE_NCCL_PORT chooses "
        "another)",
        addr, a.port, port_s);
  }
  return a;
}

void tcp_rendezvous(const std::string& addr, int port, int rank, int size, void* id, size_t bytes,
                    double timeout_s, const std::string& where) {
  LMF_CHECK(size >= 1 && rank >= 0 && rank < size, "rank {} of {}", rank, size);
  if (size == 1) return;
  if (rank == 0)
    serve_id(port, size, id, bytes, timeout_s, where);
  else
    fetch_id(addr, port, rank, size, id, bytes, timeout_s, where);
}

}  // namespace lmforge::dist
