// lmforge launch: N ranks of the real binary's train through mpirun. A run that succeeds on every
// rank succeeds; one that fails, or ranks stopped by a signal or --timeout, give a non-zero exit;
// bad arguments, a config mistake, another command and a missing mpirun are one clear line.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>

#include "e2e/crash_resume.h"
#include "testing/errors.h"
#include "testing/process.h"

namespace lmforge {

using testing::run_lmforge;

namespace {

using testing::expect_one_line_error;

// lmforge ARGS started in the background with its stdin a pipe this test holds open (so that a
// rank reading stdin waits), stdout/stderr into dir/.stdout, dir/.stderr.
struct Background {
  pid_t pid = -1;
  int stdin_fd = -1;
};

Background spawn_lmforge(const std::vector<std::string>& args, const std::string& dir) {
  int p[2];
  EXPECT_EQ(pipe2(p, O_CLOEXEC), 0);
  std::string bin = testing::lmforge_bin();
  std::string out = dir + "/.stdout", err = dir + "/.stderr";
  pid_t pid = fork();
  if (pid == 0) {
    dup2(p[0], 0);
    int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(o, 1);
    dup2(e, 2);
    if (chdir(dir.c_str()) != 0) _exit(126);
    signal(SIGINT, SIG_DFL);  // (as at a terminal: see spawn_lmforge in crash_resume.h)
    signal(SIGTERM, SIG_DFL);
    std::vector<char*> argv{const_cast<char*>(bin.c_str())};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  close(p[0]);
  return {pid, p[1]};
}

// The exit code (128+signal when killed), or -1 when it has not exited within `limit` (then it
// is killed).
int wait_exit(pid_t pid, std::chrono::seconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// A tiny train of `steps` steps on the byte tokenizer, writing run/, as a command line.
std::string tiny_train(long steps) {
  return "train --set model.n_layer=1 --set model.vocab_size=257 --set model.max_seq_len=32 "
         "--set data.text=demo:kjv --set data.tokenizer=byte --set train.steps=" +
         std::to_string(steps) +
         " --set train.batch_size=2 --set train.seq_len=16 --set sample.prompt= --set "
         "run.dir=run ";
}

// The processes whose parent is `pid` (from /proc/<p>/stat).
std::vector<pid_t> children(pid_t pid) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    std::istringstream stat(testing::slurp(it->path().string() + "/stat"));
    std::string comm_end;
    pid_t p = 0, parent = 0;
    char state = 0;
    std::string line = stat.str();
    const size_t close = line.rfind(')');  // (the command name may hold spaces)
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 1));
    if (!(std::istringstream(line) >> p) || !(rest >> state >> parent)) continue;
    if (parent == pid) out.push_back(p);
  }
  return out;
}

std::vector<std::string> words(const std::string& line) {
  std::vector<std::string> out;
  std::istringstream in(line);
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

}  // namespace

TEST(Launch, EveryRankTrains) {
  std::string dir = testing::temp_dir("launch-ok");
  auto r = run_lmforge("launch --nproc 2 -- " + tiny_train(2), dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("dist: 2 ranks"), std::string::npos) << r.out;
  EXPECT_TRUE(std::filesystem::exists(dir + "/run/metrics.jsonl"));
  // launch's stdout is a file: plain step lines, not the terminal's progress bar the ranks drew
  // on mpirun's pseudo-terminal before.
  EXPECT_NE(r.out.find("step      2/2 | loss"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find_first_of("\r\x1b"), std::string::npos) << r.out;
}

TEST(Launch, FailingRankFailsTheJob) {
  std::string dir = testing::temp_dir("launch-fail");
  auto r = run_lmforge("launch --nproc 2 -- " + tiny_train(2) + "--resume nowhere", dir);
  EXPECT_NE(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("nowhere"), std::string::npos) << r.err;
}

// launch reads the config before starting the ranks: its mistakes are one line, not one per rank.
TEST(Launch, ConfigMistakesAreSaidOnce) {
  std::string dir = testing::temp_dir("launch-config");
  expect_one_line_error(run_lmforge("launch --nproc 2 -- train missing.yaml", dir),
                        {"missing.yaml"});
  expect_one_line_error(run_lmforge("launch --nproc 2 -- train --set train.lr=x", dir),
                        {"train.lr"});
  expect_one_line_error(run_lmforge("launch --nproc 2 -- train --no-such-flag", dir),
                        {"--no-such-flag"});
  // Values each rank would refuse, and what the number of ranks launched must satisfy.
  for (const std::string set :
       {"train.batch_size=0", "dist.strategy=zero4", "dist.timeout=0", "dist.backend=foo",
        "dist.backend=local", "dist.bucket_mb=-1", "dist.ranks_per_node=3",
        "dist.tensor_parallel=4", "dist.sequence_parallel=true"}) {
    SCOPED_TRACE(set);
    expect_one_line_error(run_lmforge("launch --nproc 2 -- train --set " + set, dir),
                          {set.substr(0, set.find('='))});
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/run"));
}

// Only train's ranks work together: N copies of another command would race (export) or repeat
// themselves (generate).
TEST(Launch, OtherCommandsAreRefused) {
  std::string dir = testing::temp_dir("launch-other");
  expect_one_line_error(run_lmforge("launch --nproc 2 -- tokenizer info --tokenizer byte", dir),
                        {"only train", "lmforge tokenizer"});
}

TEST(Launch, BadArgumentsAreOneLine) {
  std::string dir = testing::temp_dir("launch-args");
  expect_one_line_error(run_lmforge("launch --nproc 0 -- train", dir), {"--nproc 0", "at least 1"});
  expect_one_line_error(run_lmforge("launch --nproc 4 --ranks-per-node 3 -- train", dir),
                        {"--ranks-per-node 3", "--nproc 4"});
  EXPECT_NE(run_lmforge("launch --nproc 2", dir).exit_code, 0);  // no subcommand
}

TEST(Launch, MissingMpirunNamesThePackage) {
  std::string dir = testing::temp_dir("launch-nompi");
  std::string path = std::getenv("PATH") ? std::getenv("PATH") : "";
  setenv("PATH", dir.c_str(), 1);  // the binary and /bin/sh are run by absolute path
  auto r = run_lmforge("launch --nproc 2 -- train", dir);
  setenv("PATH", path.c_str(), 1);
  expect_one_line_error(r, {"mpirun", "openmpi-bin"});
}

// SIGTERM to launch (a scheduler's preemption) reaches mpirun, which passes it to the ranks
// (training for a long time), each at its own moment of a step: they agree to stop after the same
// step, save a checkpoint of it together, say so once, and the job exits 143 as one process
// does; --resume goes on from that step. The same when the signal reaches one rank alone: the
// other stops after the same step, not in a collective its peer never joins. (Before, the ranks
// died and the steps since the last save were lost; then mpirun, passed the signal, killed them
// 1 s into a save: launch now signals the ranks itself.) Ctrl-C to launch (SIGINT, which it
// passes to the ranks as SIGTERM) exits 130 and says Ctrl-C, as one process does.
TEST(Launch, SigtermSavesTheRanksStepAndResumeContinues) {
  std::string dir = testing::temp_dir("launch-sigterm");
  // (4 blocks of C=768: a save of about a second, past mpirun's 1 s from its SIGTERM to its
  // SIGKILL, and steps long enough for the signal to land mid-step, where under several ranks it
  // corrupted the heap 1 run in 3 before a thread of its own took it: core/interrupt.h)
  const std::string train =
      tiny_train(1000000) +
      "--set train.checkpoint_every=1000000 --set model.n_layer=4 --set model.n_embd=768 "
      "--set model.n_head=12 ";
  // Starts the job (resumed when `resume`), waits for steps past `after` and sends SIGINT to
  // launch or SIGTERM to one rank; returns the step saved.
  auto stop = [&](bool resume, int64_t after, bool one_rank) -> int64_t {
    Background b =
        spawn_lmforge(words("launch --nproc 2 -- " + train + (resume ? "--resume" : "")), dir);
    bool running = false;
    for (int i = 0; i < 1200 && !running; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const std::string m = testing::slurp(dir + "/run/metrics.jsonl");
      running = std::count(m.begin(), m.end(), '\n') >= after + 3;
    }
    EXPECT_TRUE(running) << testing::slurp(dir + "/.stderr");
    pid_t target = b.pid;
    if (one_rank) {
      const std::vector<pid_t> mpirun = children(b.pid);
      const std::vector<pid_t> ranks = mpirun.size() == 1 ? children(mpirun[0]) : mpirun;
      EXPECT_EQ(ranks.size(), 2u);
      if (!ranks.empty()) target = ranks.back();
    }
    const int sig = one_rank ? SIGTERM : SIGINT;
    kill(target, sig);
    int code = wait_exit(b.pid, std::chrono::seconds(60));
    close(b.stdin_fd);
    const std::string err = testing::slurp(dir + "/.stderr");
    EXPECT_EQ(code, 128 + sig) << err;
    const auto listing = testing::list_checkpoint_dir(dir + "/run");
    EXPECT_TRUE(listing.tmp.empty());
    if (listing.complete.empty()) {
      ADD_FAILURE() << "no checkpoint saved: " << err;
      return -1;
    }
    const int64_t step = listing.complete.rbegin()->first;
    EXPECT_GT(step, after) << err;
    EXPECT_NE(err.find(fmt::format("lmforge: interrupted ({}) after step {}; saved {}",
                                   one_rank ? "Terminated" : "Ctrl-C", step,
                                   "run/checkpoints/" + listing.complete.rbegin()->second)),
              std::string::npos)
        << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;  // rank 0's line alone
    return step;
  };
  const int64_t first = stop(false, 0, false);
  ASSERT_GT(first, 0);
  const int64_t second = stop(true, first, true);
  ASSERT_GT(second, first);
  auto r = run_lmforge(
      "launch --nproc 2 -- " + train + "--resume --set train.steps=" + std::to_string(second + 3),
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find(fmt::format("at step {}", second)), std::string::npos) << r.out;
}

TEST(Launch, TimeoutStopsTheJob) {
  std::string dir = testing::temp_dir("launch-timeout");
  Background b =
      spawn_lmforge(words("launch --nproc 1 --timeout 1 -- " + tiny_train(1000000)), dir);
  int code = wait_exit(b.pid, std::chrono::seconds(30));
  close(b.stdin_fd);
  EXPECT_EQ(code, 124) << testing::slurp(dir + "/.stderr");
  EXPECT_NE(testing::slurp(dir + "/.stderr").find("--timeout"), std::string::npos);
}

// Ranks started with different configs (mpirun's MPMD form here; a stale copy on one node
// alike): refused at start-up, naming the rank, before anything is written.
TEST(Launch, RanksWithDifferentConfigsAreRefused) {
  std::string dir = testing::temp_dir("launch-configs");
  const std::string common = tiny_train(2);
  const std::string mpirun = std::string("mpirun -np 1 --oversubscribe --bind-to none ") +
                             (geteuid() == 0 ? "--allow-run-as-root " : "") +
                             "-x OMP_NUM_THREADS=1";
  auto r =
      run_lmforge(common + "--set model.preset=gpt2-tiny : -np 1 -x OMP_NUM_THREADS=1 '" +
                      testing::lmforge_bin() + "' " + common + "--set model.preset=llama3-tiny",
                  dir, mpirun);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("lmforge: rank 1: its config (file and --set) differs from rank 0's"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir + "/run"));
}

}  // namespace lmforge
