// The world a rank joins, from its launcher's environment (detect_launch, init_world): which
// variables are read, and which launches are refused or handed to the rendezvous world (the
// trainer's NCCL world by TCP for torchrun launches of a model on GPUs). No MPI is initialized:
// only launches that do not need it are exercised here (the MPI ones: test_launch, test_srun).
// Also the Watchdog that bounds NCCL's communicator set-up.
#include <fmt/core.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/dist/communicator.h"

namespace lmforge::dist {
namespace {

// Clears every launcher's variables for one test and restores them after it.
class WorldTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* n : kVars)
      if (const char* v = std::getenv(n)) saved_.emplace_back(n, v);
    for (const char* n : kVars) unsetenv(n);
  }
  void TearDown() override {
    for (const char* n : kVars) unsetenv(n);
    for (auto& [n, v] : saved_) setenv(n.c_str(), v.c_str(), 1);
  }
  static void torchrun(int rank, int size, int local_rank, int local_size) {
    setenv("RANK", std::to_string(rank).c_str(), 1);
    setenv("WORLD_SIZE", std::to_string(size).c_str(), 1);
    setenv("LOCAL_RANK", std::to_string(local_rank).c_str(), 1);
    setenv("LOCAL_WORLD_SIZE", std::to_string(local_size).c_str(), 1);
  }

 private:
  static constexpr const char* kVars[] = {"OMPI_COMM_WORLD_SIZE",
                                          "OMPI_COMM_WORLD_RANK",
                                          "OMPI_COMM_WORLD_LOCAL_RANK",
                                          "OMPI_COMM_WORLD_LOCAL_SIZE",
                                          "SLURM_PROCID",
                                          "SLURM_NTASKS",
                                          "SLURM_LOCALID",
                                          "SLURM_NTASKS_PER_NODE",
                                          "SLURM_NNODES",
                                          "SLURM_STEP_NUM_TASKS",
                                          "SLURM_STEP_NUM_NODES",
                                          "SLURM_STEP_TASKS_PER_NODE",
                                          "SLURM_NODEID",
                                          "PMI_SIZE",
                                          "PMI_RANK",
                                          "MPI_LOCALRANKID",
                                          "MPI_LOCALNRANKS",
                                          "WORLD_SIZE",
                                          "RANK",
                                          "LOCAL_RANK",
                                          "LOCAL_WORLD_SIZE",
                                          "TORCHELASTIC_RUN_ID",
                                          "LMFORGE_RANKS_PER_NODE"};
  std::vector<std::pair<std::string, std::string>> saved_;
};

// Stands in for the NCCL world: the rank and size it was made for.
class FakeWorld final : public Communicator {
 public:
  explicit FakeWorld(const RankInfo& ri) { rank_ = ri.rank, size_ = ri.size; }
  std::string backend() const override { return "fake"; }
  WorkPtr all_reduce(float*, int64_t) override { return nullptr; }
  WorkPtr all_reduce(double*, int64_t) override { return nullptr; }
  WorkPtr reduce_scatter(const float*, float*, const std::vector<int64_t>&) override {
    return nullptr;
  }
  WorkPtr all_gather(const float*, float*, const std::vector<int64_t>&) override { return nullptr; }
  WorkPtr all_gather(const uint16_t*, uint16_t*, const std::vector<int64_t>&) override {
    return nullptr;
  }
  WorkPtr broadcast(void*, int64_t, int) override { return nullptr; }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override { return nullptr; }
};

std::string error_of(const WorldOptions& o) {
  try {
    init_world(o);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// What detect_launch() says, as one comparable line.
std::string place(const RankInfo& r) {
  return fmt::format("{} rank {} of {}, local {} of {}, node {} of {}", r.launcher, r.rank, r.size,
                     r.local_rank, r.local_size, r.node, r.nodes);
}

TEST_F(WorldTest, TorchrunVariablesGiveTheRankAndNode) {
  torchrun(5, 8, 1, 4);
  EXPECT_EQ(place(detect_launch()), "torchrun rank 5 of 8, local 1 of 4, node 1 of 2");
  torchrun(4, 4, 0, 4);  // rank past the world
  try {
    detect_launch();
    ADD_FAILURE() << "rank 4 of 4 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("torchrun"), std::string::npos) << e.what();
  }
}

// torchrun started by srun (or inside an sbatch script, or under mpirun): its workers inherit
// the outer launcher's variables, and torchrun's ranks (marked by TORCHELASTIC_RUN_ID) win.
TEST_F(WorldTest, TorchrunWorkersInsideSrunOrMpirunTakeTorchrunsRanks) {
  setenv("SLURM_PROCID", "1", 1);
  setenv("SLURM_NTASKS", "2", 1);
  setenv("SLURM_STEP_NUM_TASKS", "2", 1);
  setenv("SLURM_LOCALID", "0", 1);
  setenv("SLURM_NTASKS_PER_NODE", "1", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  setenv("OMPI_COMM_WORLD_RANK", "1", 1);
  torchrun(6, 8, 2, 4);
  EXPECT_EQ(detect_launch().launcher, "mpirun");  // WORLD_SIZE alone: could be anyone's
  setenv("TORCHELASTIC_RUN_ID", "job42", 1);
  EXPECT_EQ(place(detect_launch()), "torchrun rank 6 of 8, local 2 of 4, node 1 of 2");
}

// srun names each task's node and how many tasks each node holds, which may differ (srun -N2 -n5
// places 3 and 2, also written "3(x1),2"); a node of ranks need not be a block of ranks (srun -m
// cyclic).
TEST_F(WorldTest, SrunNodesMayHoldDifferentNumbersOfTasks) {
  auto srun = [](int rank, int local, int node, const char* per_node) {
    setenv("SLURM_PROCID", std::to_string(rank).c_str(), 1);
    setenv("SLURM_NTASKS", "5", 1);
    setenv("SLURM_STEP_NUM_TASKS", "5", 1);
    setenv("SLURM_STEP_NUM_NODES", "2", 1);
    setenv("SLURM_NNODES", "2", 1);
    setenv("SLURM_LOCALID", std::to_string(local).c_str(), 1);
    setenv("SLURM_NODEID", std::to_string(node).c_str(), 1);
    setenv("SLURM_STEP_TASKS_PER_NODE", per_node, 1);
  };
  srun(2, 2, 0, "3,2");
  EXPECT_EQ(place(detect_launch()), "srun rank 2 of 5, local 2 of 3, node 0 of 2");
  srun(4, 1, 1, "3(x1),2");
  EXPECT_EQ(place(detect_launch()), "srun rank 4 of 5, local 1 of 2, node 1 of 2");
  srun(1, 0, 1, "3,2");  // cyclic: rank 1 is the first task of node 1
  EXPECT_EQ(place(detect_launch()), "srun rank 1 of 5, local 0 of 2, node 1 of 2");
  srun(5, 1, 2, "2(x3)");
  setenv("SLURM_STEP_NUM_TASKS", "6", 1);
  setenv("SLURM_STEP_NUM_NODES", "3", 1);
  EXPECT_EQ(place(detect_launch()), "srun rank 5 of 6, local 1 of 2, node 2 of 3");
}

// The shell of an sbatch script has SLURM_PROCID=0 and the job's SLURM_NTASKS, but a process it
// starts without srun is one process, not rank 0 of an srun step.
TEST_F(WorldTest, AProcessInAnSbatchScriptWithoutSrunIsOneProcess) {
  setenv("SLURM_PROCID", "0", 1);
  setenv("SLURM_NTASKS", "4", 1);
  setenv("SLURM_NNODES", "2", 1);
  setenv("SLURM_NODEID", "0", 1);
  EXPECT_EQ(place(detect_launch()), "none rank 0 of 1, local 0 of 1, node 0 of 1");
}

TEST_F(WorldTest, TorchrunWithoutARendezvousWorldIsRefusedNamingTheLaunchers) {
  torchrun(1, 2, 1, 2);
  std::string e = error_of({});
  EXPECT_NE(e.find("torchrun"), std::string::npos) << e;
  EXPECT_NE(e.find("mpirun -np N"), std::string::npos) << e;
  EXPECT_NE(e.find("train.device: cuda"), std::string::npos) << e;
}

TEST_F(WorldTest, TorchrunHandsSeveralRanksToTheRendezvousWorld) {
  torchrun(3, 4, 1, 2);
  int calls = 0;
  RankInfo seen;
  WorldOptions o;
  o.ranks_per_node = 1;  // declared nodes win over LOCAL_WORLD_SIZE
  o.rendezvous_world = [&](const RankInfo& ri) -> std::unique_ptr<Communicator> {
    ++calls;
    seen = ri;
    return std::make_unique<FakeWorld>(ri);
  };
  auto w = init_world(o);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(w->backend(), "fake");
  EXPECT_EQ(w->rank(), 3);
  EXPECT_EQ(w->size(), 4);
  EXPECT_EQ(seen.node, 3);
  EXPECT_EQ(seen.nodes, 4);
  EXPECT_EQ(rank_info().node, 3);  // what the trainer reads later

  o.backend = "mpi";  // MPI cannot be joined from torchrun's variables
  std::string e = error_of(o);
  EXPECT_NE(e.find("dist.backend: mpi"), std::string::npos) << e;
  EXPECT_NE(e.find("torchrun"), std::string::npos) << e;
  o.backend = "local";
  e = error_of(o);
  EXPECT_NE(e.find("dist.backend: local"), std::string::npos) << e;
  EXPECT_EQ(calls, 1);
}

TEST_F(WorldTest, OneTorchrunRankIsLocalUnlessNcclIsAskedFor) {
  torchrun(0, 1, 0, 1);
  int calls = 0;
  WorldOptions o;
  o.rendezvous_world = [&](const RankInfo& ri) -> std::unique_ptr<Communicator> {
    ++calls;
    return std::make_unique<FakeWorld>(ri);
  };
  EXPECT_EQ(init_world(o)->backend(), "local");
  EXPECT_EQ(calls, 0);
  o.backend = "nccl";  // an NCCL world of one, as dist.backend: nccl asks for under mpirun
  EXPECT_EQ(init_world(o)->backend(), "fake");
  EXPECT_EQ(calls, 1);
  // Without a launcher the rendezvous world is never asked for.
  unsetenv("WORLD_SIZE");
  EXPECT_EQ(init_world(o)->backend(), "local");
  EXPECT_EQ(calls, 1);
}

// A call that never returns (a rank that never joins NCCL's set-up) ends the process within the
// watchdog's timeout, with its line and status 1.
TEST(Watchdog, EndsAProcessWhoseCallNeverReturns) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EXIT(
      {
        Watchdog w(0.2, "lmforge: rank 0: ncclCommInitRank (2 ranks, GPU 0) did not return");
        std::this_thread::sleep_for(std::chrono::seconds(10));  // "never"
        std::exit(0);
      },
      ::testing::ExitedWithCode(1), "rank 0: ncclCommInitRank \\(2 ranks, GPU 0\\) did not return");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
}

// A call that returns in time disarms it: nothing is printed and the process goes on.
TEST(Watchdog, StaysQuietWhenTheCallReturns) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        { Watchdog w(0.2, "lmforge: must not be printed"); }
        std::this_thread::sleep_for(std::chrono::milliseconds(600));
        std::fprintf(stderr, "went on\n");
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "^went on\n$");
}

}  // namespace
}  // namespace lmforge::dist
