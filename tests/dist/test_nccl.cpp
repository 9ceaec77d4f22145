// NcclCommunicator on one GPU (a 1-rank NCCL world bootstrapped by LocalCommunicator): every
// collective on device buffers gives the expected values. Without a GPU these tests skip. The TCP
// rendezvous (make_nccl_world_tcp's bootstrap) needs no GPU and is tested with threads as ranks.
#include <arpa/inet.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/dist/nccl.h"
#include "testing/errors.h"

namespace lmforge::dist {

namespace {

using testing::error_of;

// Empty when a GPU is visible, else why not.
std::string no_gpu_reason() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
  if (n == 0) return "cudaGetDeviceCount: 0 devices";
  return "";
}

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(p_); }
  T* get() { return p_; }
  void upload(const std::vector<T>& v) {
    ASSERT_EQ(v.size(), n_);
    ASSERT_EQ(cudaMemcpy(p_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> download() {
    std::vector<T> v(n_);
    EXPECT_EQ(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }

 private:
  T* p_ = nullptr;
  size_t n_;
};

template <typename T>
std::vector<T> ramp(size_t n, T start) {
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + static_cast<T>(i) * T(0.5);
  return v;
}

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = no_gpu_reason(); !why.empty())
      GTEST_SKIP() << "no CUDA GPU (" << why << "): the NCCL tests need one";
    world_ = make_nccl_world(boot_, /*device=*/0, /*timeout_s=*/60);
  }
  LocalCommunicator boot_;
  std::unique_ptr<Communicator> world_;
};

}  // namespace

TEST_F(Nccl, WorldOfOneRank) {
  EXPECT_EQ(world_->backend(), "nccl");
  EXPECT_EQ(world_->rank(), 0);
  EXPECT_EQ(world_->size(), 1);
}

// One rank: the sum over ranks is the input (float and double).
TEST_F(Nccl, AllReduce) {
  const size_t n = 1000;
  DeviceBuffer<float> f(n);
  DeviceBuffer<double> d(n);
  f.upload(ramp<float>(n, -3.0f));
  d.upload(ramp<double>(n, 7.0));
  WorkPtr wf = world_->all_reduce(f.get(), n);
  WorkPtr wd = world_->all_reduce(d.get(), n);
  wf->wait();
  wd->wait();
  EXPECT_TRUE(wf->test());
  EXPECT_EQ(f.download(), ramp<float>(n, -3.0f));
  EXPECT_EQ(d.download(), ramp<double>(n, 7.0));
}

TEST_F(Nccl, ReduceScatterOutOfPlaceAndInPlace) {
  const size_t n = 513;
  DeviceBuffer<float> in(n), out(n);
  in.upload(ramp<float>(n, 1.0f));
  world_->reduce_scatter(in.get(), out.get(), {static_cast<int64_t>(n)})->wait();
  EXPECT_EQ(out.download(), ramp<float>(n, 1.0f));
  world_->reduce_scatter(in.get(), in.get(), {static_cast<int64_t>(n)})->wait();
  EXPECT_EQ(in.download(), ramp<float>(n, 1.0f));
}

TEST_F(Nccl, AllGatherOutOfPlaceAndInPlace) {
  const size_t n = 300;
  DeviceBuffer<float> in(n), out(n);
  in.upload(ramp<float>(n, 2.0f));
  out.upload(std::vector<float>(n, 0.0f));
  world_->all_gather(in.get(), out.get(), {static_cast<int64_t>(n)})->wait();
  EXPECT_EQ(out.download(), ramp<float>(n, 2.0f));
  out.upload(ramp<float>(n, -1.0f));
  world_->all_gather(nullptr, out.get(), {static_cast<int64_t>(n)})->wait();
  EXPECT_EQ(out.download(), ramp<float>(n, -1.0f));
}

// 2-byte elements (bf16 master weights): the bits arrive as they were, NaN patterns included.
TEST_F(Nccl, AllGatherTwoByteElements) {
  const size_t n = 301;
  std::vector<uint16_t> bits(n);
  for (size_t i = 0; i < n; ++i) bits[i] = static_cast<uint16_t>(i * 2654435761u >> 7);
  bits[5] = 0x7fc1;  // a NaN payload
  DeviceBuffer<uint16_t> in(n), out(n);
  in.upload(bits);
  out.upload(std::vector<uint16_t>(n, 0));
  world_->all_gather(in.get(), out.get(), {static_cast<int64_t>(n)})->wait();
  EXPECT_EQ(out.download(), bits);
  world_->all_gather(nullptr, out.get(), {static_cast<int64_t>(n)})->wait();
  EXPECT_EQ(out.download(), bits);
}

TEST_F(Nccl, BroadcastBytes) {
  const size_t n = 77;
  DeviceBuffer<float> b(n);
  b.upload(ramp<float>(n, 5.0f));
  world_->broadcast(b.get(), static_cast<int64_t>(n * sizeof(float)), 0)->wait();
  EXPECT_EQ(b.download(), ramp<float>(n, 5.0f));
}

TEST_F(Nccl, ZeroElementsComplete) {
  DeviceBuffer<float> b(1);
  world_->all_reduce(b.get(), 0)->wait();
  world_->reduce_scatter(b.get(), b.get(), {0})->wait();
  world_->all_gather(nullptr, b.get(), {0})->wait();
}

TEST_F(Nccl, BarrierAndSplit) {
  world_->barrier();
  std::unique_ptr<Communicator> node = world_->split(/*color=*/0, /*key=*/0);
  EXPECT_EQ(node->backend(), "nccl");
  EXPECT_EQ(node->size(), 1);
  EXPECT_EQ(node->rank(), 0);
  const size_t n = 64;
  DeviceBuffer<float> b(n);
  b.upload(ramp<float>(n, 4.0f));
  node->all_reduce(b.get(), n)->wait();
  node->barrier();
  EXPECT_EQ(b.download(), ramp<float>(n, 4.0f));
}

// One rank needs no rendezvous, so no MASTER_ADDR either.
TEST_F(Nccl, TcpWorldOfOneRank) {
  RankInfo info;
  auto w = make_nccl_world_tcp(info, /*device=*/0, /*timeout_s=*/60);
  EXPECT_EQ(w->size(), 1);
  const size_t n = 10;
  DeviceBuffer<float> b(n);
  b.upload(ramp<float>(n, 0.0f));
  w->all_reduce(b.get(), n)->wait();
  EXPECT_EQ(b.download(), ramp<float>(n, 0.0f));
}

// ---- TCP rendezvous: threads play the ranks ------------------------------------------------

namespace {

// Sets (or, for nullptr, unsets) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_.c_str(), old_.c_str(), 1);
    else
      unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

// A port nothing listens on right now (the kernel's pick for port 0).
int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), len), 0);
  EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  close(fd);
  return ntohs(a.sin_port);
}

}  // namespace

// The other ranks start first (rank 0 is late): they retry until it listens.
TEST(TcpRendezvous, EveryRankGetsRankZerosId) {
  const int size = 4, port = free_port();
  const std::string where = "MASTER_ADDR:MASTER_PORT=127.0.0.1:" + std::to_string(port);
  std::array<char, 128> id0{};
  for (size_t i = 0; i < id0.size(); ++i) id0[i] = static_cast<char>(i * 37 + 11);
  std::vector<std::array<char, 128>> got(size);
  std::vector<std::string> errors(size);
  std::vector<std::thread> ranks;
  for (int r = 1; r < size; ++r)
    ranks.emplace_back([&, r] {
      errors[r] = error_of(
          [&] { tcp_rendezvous("127.0.0.1", port, r, size, got[r].data(), 128, 20, where); });
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  errors[0] = error_of([&] {
    std::array<char, 128> id = id0;
    tcp_rendezvous("127.0.0.1", port, 0, size, id.data(), 128, 20, where);
  });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < size; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  for (int r = 1; r < size; ++r) EXPECT_EQ(got[r], id0) << "rank " << r;
}

TEST(TcpRendezvous, NoRankZeroNamesTheAddress) {
  const int port = free_port();
  const std::string where = "MASTER_ADDR:MASTER_PORT=127.0.0.1:" + std::to_string(port);
  char id[128];
  auto t0 = std::chrono::steady_clock::now();
  std::string err =
      error_of([&] { tcp_rendezvous("127.0.0.1", port, 1, 2, id, sizeof id, 0.5, where); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  EXPECT_NE(err.find("rank 1"), std::string::npos) << err;
  EXPECT_NE(err.find(where), std::string::npos) << err;
  EXPECT_NE(err.find("within 0.5 s"), std::string::npos) << err;
}

TEST(TcpRendezvous, RankZeroNamesTheMissingRanks) {
  const int port = free_port();
  const std::string where = "MASTER_ADDR:MASTER_PORT=127.0.0.1:" + std::to_string(port);
  char id[128] = {};
  std::string err =
      error_of([&] { tcp_rendezvous("127.0.0.1", port, 0, 3, id, sizeof id, 0.5, where); });
  EXPECT_NE(err.find("heard from 0 of the other 2 ranks"), std::string::npos) << err;
  EXPECT_NE(err.find("missing ranks 1, 2"), std::string::npos) << err;
  EXPECT_NE(err.find(where), std::string::npos) << err;
}

// A connection that is not a rank (a port scan) does not count as one.
TEST(TcpRendezvous, StrayConnectionIsIgnored) {
  const int size = 2, port = free_port();
  const std::string where = "MASTER_ADDR:MASTER_PORT=127.0.0.1:" + std::to_string(port);
  std::array<char, 128> id0{}, got{};
  id0.fill('x');
  std::string err0, err1;
  std::thread rank0([&] {
    err0 = error_of([&] {
      std::array<char, 128> id = id0;
      tcp_rendezvous("127.0.0.1", port, 0, size, id.data(), 128, 20, where);
    });
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  // EXPECT, not ASSERT: returning before rank0.join() would end the process (std::terminate).
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  const char junk[] = "GET / HTTP/1.0\r\n\r\n";
  EXPECT_GT(send(fd, junk, sizeof junk, 0), 0);
  close(fd);
  err1 = error_of([&] { tcp_rendezvous("127.0.0.1", port, 1, size, got.data(), 128, 20, where); });
  rank0.join();
  EXPECT_EQ(err0, "");
  EXPECT_EQ(err1, "");
  EXPECT_EQ(got, id0);
}

// The address make_nccl_world_tcp meets at: MASTER_ADDR:MASTER_PORT; LMFORGE_NCCL_PORT wins;
// under torchrun's agent store (which listens on MASTER_PORT) the next port.
TEST(TcpRendezvous, AddressFromTheLaunchersVariables) {
  RankInfo info;
  info.size = 2;
  info.launcher = "torchrun";
  ScopedEnv addr("MASTER_ADDR", "node0"), port("MASTER_PORT", "29500");
  ScopedEnv mine("LMFORGE_NCCL_PORT", nullptr), agent("TORCHELASTIC_USE_AGENT_STORE", nullptr);
  RendezvousAddress a = rendezvous_address(info);
  EXPECT_EQ(a.addr, "node0");
  EXPECT_EQ(a.port, 29500);
  EXPECT_NE(a.where.find("MASTER_ADDR:MASTER_PORT=node0:29500"), std::string::npos) << a.where;
  {
    ScopedEnv store("TORCHELASTIC_USE_AGENT_STORE", "True");
    a = rendezvous_address(info);
    EXPECT_EQ(a.port, 29501);
    EXPECT_NE(a.where.find("torchrun's store"), std::string::npos) << a.where;
    ScopedEnv chosen("LMFORGE_NCCL_PORT", "31000");
    a = rendezvous_address(info);
    EXPECT_EQ(a.port, 31000);
    EXPECT_NE(a.where.find("LMFORGE_NCCL_PORT=31000"), std::string::npos) << a.where;
  }
  {
    ScopedEnv store("TORCHELASTIC_USE_AGENT_STORE", "False");
    EXPECT_EQ(rendezvous_address(info).port, 29500);
  }
  {
    ScopedEnv bad("LMFORGE_NCCL_PORT", "http");
    std::string e = error_of([&] { rendezvous_address(info); });
    EXPECT_NE(e.find("LMFORGE_NCCL_PORT=\"http\""), std::string::npos) << e;
  }
  ScopedEnv none("MASTER_ADDR", nullptr);
  std::string e = error_of([&] { rendezvous_address(info); });
  EXPECT_NE(e.find("MASTER_ADDR and MASTER_PORT must be set for 2 ranks"), std::string::npos) << e;
}

}  // namespace lmforge::dist
