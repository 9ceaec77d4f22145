// srun: ranks placed by Slurm (SLURM_PROCID/NTASKS/LOCALID) and connected through Slurm's PMIx
// train like one process with the same global batch, and a hung rank stops the job naming it.
// Needs a Slurm cluster (scripts/slurm-local.sh makes a one-node one); skips where `sinfo` finds
// none, as on CI machines.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "dist/tiny_run.h"
#include "testing/metrics.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using testing::RunResult;

const char* const kTrain = testing::kTinyTrain;

bool have_slurm() { return std::system("timeout 10 sinfo -h >/dev/null 2>&1") == 0; }

class SrunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_slurm())
      GTEST_SKIP() << "no Slurm cluster (sinfo failed); see scripts/slurm-local.sh";
    setenv("OMP_NUM_THREADS", "1", 1);  // ranks oversubscribe the cores: one thread each
    dir_ = testing::temp_dir("srun");
  }
  // n = 1: a plain process; otherwise n tasks under srun (-O: more tasks than cores is fine).
  RunResult run(const std::string& name, int n, const std::string& extra) {
    std::string launcher =
        n > 1 ? "srun -n " + std::to_string(n) + " -O --mpi=pmix --kill-on-bad-exit=1" : "";
    return testing::run_lmforge(
        std::string(kTrain) + "--set run.dir=" + dir_ + "/" + name + " " + extra, dir_, launcher);
  }
  std::vector<double> losses(const std::string& name) {
    std::vector<double> out;
    for (auto& j : testing::records_of(dir_ + "/" + name + "/metrics.jsonl", "loss"))
      out.push_back(j["loss"].get<double>());
    return out;
  }
  std::string dir_;
};

TEST_F(SrunTest, TwoRanksTrainLikeOneProcessWithTheSameGlobalBatch) {
  RunResult ref = run("one", 1, "--set train.batch_size=2 --set train.grad_accum=2");
  ASSERT_EQ(ref.exit_code, 0) << ref.err;
  for (const char* strategy : {"no-shard", "zero1"}) {
    std::string name = std::string("srun-") + strategy;
    RunResult r =
        run(name, 2, std::string("--set train.batch_size=2 --set dist.strategy=") + strategy);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    // Slurm's variables placed the ranks: 2 of them on this one node, connected over MPI.
    EXPECT_NE(r.out.find("dist: 2 ranks (1 node(s) x 2) over mpi"), std::string::npos) << r.out;
    std::vector<double> a = losses("one"), b = losses(name);
    ASSERT_EQ(a.size(), 6u);
    ASSERT_EQ(b.size(), a.size()) << strategy;
    // fp32 with a different summation order (two halves all-reduced): the DataParallel
    // tests' tolerance (relative 1e-6).
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_NEAR(b[i], a[i], 1e-6 * std::abs(a[i])) << strategy << " step " << i + 1;
  }
}

TEST_F(SrunTest, AHungRankStopsTheJobNamingItWithinTheTimeout) {
  testing::expect_hung_rank_named(run("hang", 2, testing::kHangAtStep3));
}

}  // namespace
}  // namespace lmforge
