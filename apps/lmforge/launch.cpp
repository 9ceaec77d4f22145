// lmforge launch --nproc N [--ranks-per-node K] [--timeout S] -- train ARGS...
// Runs N ranks of `lmforge train` on this node (its config checked here first, so that a mistake
// is said once and not by every rank). lmforge's CPU collectives are MPI, so the ranks are
// started by OpenMPI's mpirun (Debian's openmpi-bin):
//   mpirun -np N --oversubscribe --bind-to none [--allow-run-as-root, as root]
//          -x OMP_NUM_THREADS=<max(1, cores/N), or as set> [-x LMFORGE_RANKS_PER_NODE=K]
//          /proc/self/exe train ARGS...
// SIGINT/SIGTERM sent to launch (a Ctrl-C at the terminal included: mpirun runs in a process
// group of its own) are passed to the ranks as SIGTERM, never to mpirun: they finish the step,
// save a checkpoint of it together and exit 0 (trainer.cpp); a second signal kills them. launch
// exits with mpirun's status: 0 when every rank succeeded, 128 + the signal when one stopped the
// job and every rank saved, non-zero when a rank failed or was killed, 124 when --timeout passed
// (like timeout(1); the ranks are stopped the same way, killed 10 s later). It prints nothing of
// its own on success.
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "lmforge/core/error.h"

namespace lmforge::app {

namespace {

volatile sig_atomic_t g_signal = 0;   // the first SIGINT or SIGTERM launch got
volatile sig_atomic_t g_signals = 0;  // how many

// Noted here, passed to the ranks by run_mpirun's loop: never to mpirun, whose job abort sends
// the ranks SIGTERM and 1 s later SIGKILL (odls_base_sigkill_timeout), with the ranks' runtime
// torn down under them, so that a model whose step and save take longer saved nothing. mpirun
// runs in a process group of its own, so a Ctrl-C at the terminal reaches launch alone.
void note_signal(int sig) {
  if (g_signal == 0) g_signal = sig;
  g_signals = g_signals + 1;
}

std::string find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    std::string cand = (dir.empty() ? "." : dir) + "/" + name;
    if (access(cand.c_str(), X_OK) == 0) return cand;
    start = end + 1;
  }
  return "";
}

int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// The processes whose parent is `parent`: mpirun's ranks, or the ones this (subreaper) process
// adopted when their mpirun died before them.
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> out;
  std::error_code ec;
  const std::string self = std::to_string(parent);
  for (auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::FILE* f = std::fopen((e.path() / "stat").c_str(), "r");
    if (!f) continue;
    char buf[512];
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    // pid (comm) state ppid ...: comm may hold spaces and parentheses, so parse after the last ')'
    const char* close = std::strrchr(buf, ')');
    char state = 0;
    int ppid = 0;
    if (close && std::sscanf(close + 1, " %c %d", &state, &ppid) == 2 &&
        std::to_string(ppid) == self)
      out.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return out;
}

// After mpirun has exited: a rank it left behind (SIGSTOPped, or mpirun itself killed by the
// --timeout escalation) was re-parented to launch, the subreaper; kill and reap it.
void kill_orphaned_ranks() {
  for (int round = 0; round < 50; ++round) {
    std::vector<pid_t> left = children_of(getpid());
    if (left.empty()) return;
    for (pid_t p : left) kill(p, SIGKILL);
    for (pid_t p : left) waitpid(p, nullptr, 0);
  }
}

struct LaunchOptions {
  int nproc = 0;
  int ranks_per_node = 0;
  double timeout_s = 0;
  std::vector<std::string> command;
  std::string interrupted_file;  // where rank 0 says which signal stopped the job (train.cpp)
};

std::vector<std::string> mpirun_argv(const std::string& mpirun, const LaunchOptions& o) {
  std::vector<std::string> a = {mpirun,      "-np", std::to_string(o.nproc), "--oversubscribe",
                                "--bind-to", "none"};
  if (geteuid() == 0) a.push_back("--allow-run-as-root");
  a.push_back("-x");
  if (const char* t = std::getenv("OMP_NUM_THREADS"); t && *t)
    a.push_back("OMP_NUM_THREADS");  // as set: forwarded
  else
    a.push_back("OMP_NUM_THREADS=" + std::to_string(std::max(1, usable_cores() / o.nproc)));
  if (o.ranks_per_node > 0) {
    a.push_back("-x");
    a.push_back("LMFORGE_RANKS_PER_NODE=" + std::to_string(o.ranks_per_node));
  }
  // (the ranks' stdout is mpirun's pseudo-terminal: a progress bar only where launch's is one)
  a.push_back("-x");
  a.push_back(std::string("LMFORGE_STDOUT_TTY=") + (isatty(STDOUT_FILENO) == 1 ? "1" : "0"));
  // (stopped by a signal, the ranks exit 0 after their save, a non-zero one would have mpirun
  // abort the others, and rank 0 writes the signal's number here for launch's exit status)
  a.push_back("-x");
  a.push_back("LMFORGE_INTERRUPTED_FILE=" + o.interrupted_file);
  // (mpirun in its own process group: no terminal stdin to forward; train reads none)
  a.push_back("--stdin");
  a.push_back("none");
  std::error_code ec;
  std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec) fail("launch: cannot find this executable (/proc/self/exe): {}", ec.message());
  a.push_back(self);
  a.insert(a.end(), o.command.begin(), o.command.end());
  return a;
}

// Runs mpirun and returns the exit code launch should exit with.
int run_mpirun(const std::vector<std::string>& args, const LaunchOptions& o) {
  std::vector<char*> argv;
  for (const std::string& s : args) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);

  // Ranks outliving mpirun become launch's children instead of init's, to be stopped below.
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  // Signals stay blocked from before fork until the child is in its own group, so none is lost.
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  sigprocmask(SIG_BLOCK, &block, &old);
  struct sigaction sa {};
  sa.sa_handler = note_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM}) {  // (one ignored when launch started stays ignored)
    struct sigaction was {};
    if (sigaction(sig, nullptr, &was) != 0 || was.sa_handler != SIG_IGN)
      sigaction(sig, &sa, nullptr);
  }

  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) fail("launch: fork: {}", std::strerror(errno));
  if (pid == 0) {
    setpgid(0, 0);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigprocmask(SIG_SETMASK, &old, nullptr);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "lmforge: launch: cannot run %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  setpgid(pid, pid);  // (also here: whichever runs first)
  sigprocmask(SIG_SETMASK, &old, nullptr);

  using Clock = std::chrono::steady_clock;
  auto deadline = Clock::now() + std::chrono::duration<double>(o.timeout_s);
  auto kill_at = Clock::time_point::max();
  bool timed_out = false, stopping = false;
  std::vector<pid_t> stopped;  // ranks sent SIGTERM
  int killed_at_signals = 0;
  int status = 0;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail("launch: waitpid: {}", std::strerror(errno));
    auto now = Clock::now();
    if (o.timeout_s > 0 && !timed_out && now > deadline) {
      std::fprintf(stderr,
                   "lmforge: launch: the job did not finish within %g s (--timeout); stopping its "
                   "%d ranks\n",
                   o.timeout_s, o.nproc);
      timed_out = stopping = true;
      kill_at = now + std::chrono::seconds(10);
    }
    if (!stopping && g_signal != 0)  // the ranks get SIGTERM: rank 0 says the one launch got
      if (std::FILE* f = std::fopen((o.interrupted_file + ".launch").c_str(), "w")) {
        std::fprintf(f, "%d\n", static_cast<int>(g_signal));
        std::fclose(f);
      }
    stopping = stopping || g_signal != 0;
    // SIGTERM to each rank (those mpirun has started so far, and any it starts later): they
    // finish the step, agree on it, save and exit. A second signal kills them.
    if (stopping)
      for (pid_t rank : children_of(pid))
        if (std::find(stopped.begin(), stopped.end(), rank) == stopped.end()) {
          kill(rank, SIGTERM);
          stopped.push_back(rank);
        }
    if (g_signals > 1 && killed_at_signals != g_signals) {
      killed_at_signals = g_signals;
      kill_at = now;
    }
    if (now > kill_at) {
      for (pid_t rank : children_of(pid)) kill(rank, SIGKILL);
      kill(pid, SIGKILL);
      kill_at = Clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill_orphaned_ranks();
  if (timed_out) return 124;
  // Stopped by a signal (launch's, or one a rank had), every rank saved its last step and exited
  // 0: 128 + it, as a one-process train exits. (A failure on the way: mpirun's status below.)
  int stopped_by = 0;
  if (std::FILE* f = std::fopen(o.interrupted_file.c_str(), "r")) {
    if (std::fscanf(f, "%d", &stopped_by) != 1) stopped_by = 0;
    std::fclose(f);
    std::remove(o.interrupted_file.c_str());
  }
  std::remove((o.interrupted_file + ".launch").c_str());
  if (stopped_by > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) return 128 + stopped_by;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace

void add_launch(CLI::App& app) {
  auto o = std::make_shared<LaunchOptions>();
  CLI::App* cmd = app.add_subcommand("launch",
                                     "Run N ranks of lmforge on this node through mpirun, e.g. "
                                     "lmforge launch --nproc 4 -- train config.yaml");
  cmd->add_option("--nproc", o->nproc, "Number of ranks")->required()->type_name("N");
  cmd->add_option("--ranks-per-node", o->ranks_per_node,
                  "Declare nodes of K ranks each (dist.ranks_per_node), for hybrid parallelism "
                  "on one machine")
      ->type_name("K");
  cmd->add_option("--timeout", o->timeout_s,
                  "Stop every rank and exit 124 when the job runs longer than S seconds")
      ->type_name("S");
  cmd->add_option("command", o->command, "The lmforge subcommand each rank runs, after --")
      ->required();
  cmd->callback([o] {
    if (o->nproc < 1) fail("launch: --nproc {}: expected at least 1 rank", o->nproc);
    if (o->nproc > 4096)  // one node; beyond, a typo (mpirun would try to start them all)
      fail("launch: --nproc {}: at most 4096 ranks on one node; use mpirun or srun for more",
           o->nproc);
    if (o->ranks_per_node < 0 || (o->ranks_per_node > 0 && o->nproc % o->ranks_per_node != 0))
      fail("launch: --ranks-per-node {} does not divide --nproc {}", o->ranks_per_node, o->nproc);
    if (!(o->timeout_s >= 0 && o->timeout_s <= 1e7))  // NaN and inf too (deadline arithmetic)
      fail("launch: --timeout {}: expected seconds from 0 (none) to 1e7", o->timeout_s);
    if (o->command.front() != "train")  // the only command whose ranks work together
      fail("launch: only train runs on several ranks; run `lmforge {}` directly",
           o->command.front());
    if (!check_train_command({o->command.begin() + 1, o->command.end()}, o->nproc)) return;
    std::string mpirun = find_on_path("mpirun");
    if (mpirun.empty())
      fail(
          "launch: mpirun not found on PATH; lmforge's ranks are started by OpenMPI: install "
          "Debian's openmpi-bin (apt-get install openmpi-bin)");
    o->interrupted_file = (std::filesystem::temp_directory_path() /
                           ("lmforge-launch-" + std::to_string(getpid()) + ".interrupted"))
                              .string();
    std::remove(o->interrupted_file.c_str());  // (stale: an earlier launch of the same pid)
    std::remove((o->interrupted_file + ".launch").c_str());
    int code = run_mpirun(mpirun_argv(mpirun, *o), *o);
    if (code != 0) throw CLI::RuntimeError(code);  // main() exits with it, printing nothing
  });
}

}  // namespace lmforge::app
