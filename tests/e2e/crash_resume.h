// Kill -9 a training run at random moments, most of them while a checkpoint is being written, and
// continue it with --resume each time; then its metrics must equal an uninterrupted run's bit for
// bit. Shared by the e2e test (3 kills) and the slow one (20 kills).
#pragma once

#include <fcntl.h>
#include <fmt/core.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lmforge/io/sha256.h"
#include "testing/metrics.h"

namespace lmforge::testing {

// A small run that checkpoints every 2 steps (keeping 2 plus the best) and evaluates every 5, on
// one thread: a step takes ~25 ms and a checkpoint ~50 ms here, so kills land in every phase.
inline std::string crash_run_args(int64_t steps) {
  return "train --set model.preset=gpt2-tiny --set model.vocab_size=257 "
         "--set model.max_seq_len=64 --set data.text=demo:kjv --set data.tokenizer=byte "
         "--set train.batch_size=4 --set train.seq_len=32 --set train.steps=" +
         std::to_string(steps) +
         " --set train.checkpoint_every=2 --set train.keep_last=2 --set train.eval_every=5 "
         "--set train.eval_batches=2 --set train.log_every=10 --set sample.prompt=";
}
constexpr int64_t kCrashCheckpointEvery = 2;

// Starts the lmforge binary with `args` (split at spaces) in `cwd`, stdout and stderr to
// out_path / err_path, OMP_NUM_THREADS=1, SIGINT ignored when `ignore_sigint` (as `lmforge &`
// from a script). Everything the child needs is built before fork().
inline pid_t spawn_lmforge(const std::string& args, const std::string& cwd,
                           const std::string& out_path, const std::string& err_path,
                           bool ignore_sigint = false) {
  std::vector<std::string> argv_s{lmforge_bin()}, env_s;
  std::istringstream in(args);
  for (std::string a; in >> a;) argv_s.push_back(a);
  for (char** e = environ; *e; ++e)
    if (!std::string(*e).starts_with("OMP_NUM_THREADS=")) env_s.push_back(*e);
  env_s.push_back("OMP_NUM_THREADS=1");
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  for (auto& e : env_s) envp.push_back(e.data());
  argv.push_back(nullptr);
  envp.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || ::chdir(cwd.c_str()) != 0) ::_exit(126);
    ::dup2(o, 1);
    ::dup2(e, 2);
    // Signals as at a terminal (a test run started with `&` from a script ignores SIGINT).
    ::signal(SIGINT, ignore_sigint ? SIG_IGN : SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}

struct CheckpointListing {
  std::map<int64_t, std::string> complete;  // step -> name: step-N directories with a manifest
  std::vector<std::string> tmp;             // step-*.tmp: an interrupted save or removal
};

inline CheckpointListing list_checkpoint_dir(const std::string& run_dir) {
  namespace fs = std::filesystem;
  CheckpointListing l;
  std::error_code ec;
  for (auto it = fs::directory_iterator(run_dir + "/checkpoints", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string n = it->path().filename().string();
    if (n.starts_with("step-") && n.ends_with(".tmp")) l.tmp.push_back(n);
    if (std::regex_match(n, std::regex("step-[0-9]+")) &&
        fs::exists(it->path() / "manifest.json", ec))
      l.complete[std::stoll(n.substr(5))] = n;
  }
  return l;
}

// Checks a checkpoint against its manifest.json independently of lmforge's verify_checkpoint:
// "" or what is wrong.
inline std::string check_against_manifest(const std::string& dir) {
  namespace fs = std::filesystem;
  nlohmann::json m = nlohmann::json::parse(slurp(dir + "/manifest.json"), nullptr, false);
  if (m.is_discarded() || !m.contains("files")) return "manifest.json unreadable";
  if (m["files"].size() < 4) return "manifest.json lists " + m["files"].dump();
  for (auto& f : m["files"]) {
    std::string p = dir + "/" + f["path"].get<std::string>();
    std::error_code ec;
    if (fs::file_size(p, ec) != f["bytes"].get<uint64_t>() || ec) return p + ": size";
    if (sha256_file(p) != f["sha256"].get<std::string>()) return p + ": sha256";
  }
  return "";
}

// step -> the record's raw JSON text of `key`, for records carrying it: compared as text, the
// doubles must be identical to the last bit.
inline std::map<int64_t, std::string> metric_by_step(const std::string& run_dir,
                                                     const std::string& key,
                                                     std::vector<std::string>* dups = nullptr) {
  std::map<int64_t, std::string> out;
  for (auto& j : records_of(run_dir + "/metrics.jsonl", key)) {
    int64_t step = j["step"].get<int64_t>();
    if (out.count(step) && dups) dups->push_back(key + " at step " + std::to_string(step));
    out[step] = j[key].dump();
  }
  return out;
}

// Runs crash_run_args(steps) uninterrupted in dir/ref, then in dir/run killed `kills` times
// (seeded by `seed`; the plan and what each kill hit are printed) and resumed with --resume after
// each kill. Checks: every complete checkpoint left by a kill matches its manifest; each resume
// loads the newest complete one, without warnings; the losses, validation losses and final
// weights equal the uninterrupted run's.
inline void crash_and_resume(const std::string& dir, int64_t steps, int kills, uint64_t seed) {
  namespace fs = std::filesystem;
  using Clock = std::chrono::steady_clock;
  const std::string args = crash_run_args(steps);
  const int64_t every = kCrashCheckpointEvery;

  auto t0 = Clock::now();
  pid_t ref = spawn_lmforge(args + " --set run.dir=ref", dir, dir + "/ref.out", dir + "/ref.err");
  int status = 0;
  ::waitpid(ref, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << slurp(dir + "/ref.err");
  double ref_s = std::chrono::duration<double>(Clock::now() - t0).count();

  // The plan, in turn: "write", 0-30 ms after a step-N.tmp directory appears (a save takes
  // ~50 ms), N at least two checkpoints past the one resumed from so that every kill leaves
  // progress behind; "any", 0-150 ms after the first new checkpoint; "manifest", 0-0.5 ms after
  // the manifest of a step-N.tmp appears (it is renamed to step-N after one more fsync).
  enum Kind { kWrite, kAny, kManifest };
  const char* kind_names[] = {"write", "any", "manifest"};
  struct Kill {
    Kind kind;
    int delay_us;
  };
  std::mt19937_64 rng(seed);
  std::vector<Kill> plan;
  std::cout << "kill plan (seed " << seed << "), uninterrupted run " << ref_s << " s:";
  for (int k = 0; k < kills; ++k) {
    Kind kind = static_cast<Kind>(k % 3);
    int range = kind == kWrite ? 30000 : kind == kAny ? 150000 : 500;
    plan.push_back({kind, static_cast<int>(rng() % range)});
    std::cout << " " << kind_names[kind] << "+" << plan.back().delay_us << "us";
  }
  std::cout << std::endl;

  const std::string run = dir + "/run";
  int64_t base = 0;  // the step the current process started from
  int mid_write = 0;
  for (int k = 0; k <= kills; ++k) {
    bool last = k == kills;
    std::string out = dir + "/run" + std::to_string(k) + ".out",
                err = dir + "/run" + std::to_string(k) + ".err";
    pid_t pid = spawn_lmforge(args + " --set run.dir=run" + (k ? " --resume" : ""), dir, out, err);
    bool exited = false, killed = false;
    std::string trigger;
    auto started = Clock::now();
    while (!exited && !killed) {
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      if (std::chrono::duration<double>(Clock::now() - started).count() > 300) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        FAIL() << "run " << k << " took over 300 s; stderr: " << slurp(err);
      }
      if (!last) {
        CheckpointListing l = list_checkpoint_dir(run);
        if (plan[k].kind != kAny) {
          for (const std::string& t : l.tmp) {
            std::smatch m;
            if (!std::regex_match(t, m, std::regex("step-([0-9]+)\\.tmp")) ||
                std::stoll(m[1]) < base + 2 * every)
              continue;
            std::string mf = run + "/checkpoints/" + t + "/manifest.json";
            if (plan[k].kind == kWrite)
              trigger = t + " appeared";
            else if (fs::exists(mf))
              trigger = t + "/manifest.json appeared";
          }
        } else if (!l.complete.empty() && l.complete.rbegin()->first >= base + every) {
          trigger = l.complete.rbegin()->second + " completed";
        }
        if (!trigger.empty()) {
          std::this_thread::sleep_for(std::chrono::microseconds(plan[k].delay_us));
          ::kill(pid, SIGKILL);
          ::waitpid(pid, &status, 0);
          killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
          exited = !killed;
          break;
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    std::string so = slurp(out), se = slurp(err);
    if (k > 0) {  // it resumed from the newest complete checkpoint, and verified it silently
      std::smatch m;
      ASSERT_TRUE(std::regex_search(so, m, std::regex("resumed from (\\S+) at step ([0-9]+)")))
          << "run " << k << ":\n"
          << so << se;
      EXPECT_EQ(std::stoll(m[2]), base) << m[1];
      EXPECT_EQ(fs::path(m[1].str()).filename().string(), fmt::format("step-{:08d}", base));
      EXPECT_EQ(se.find("warning"), std::string::npos) << se;
    }
    if (exited) {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "run " << k << ": " << se;
      if (!last) std::cout << "kill " << k + 1 << ": the run finished before it" << std::endl;
      break;
    }
    // What the kill left: no complete checkpoint may be damaged.
    CheckpointListing l = list_checkpoint_dir(run);
    ASSERT_FALSE(l.complete.empty());
    for (auto& [step, name] : l.complete)
      EXPECT_EQ(check_against_manifest(run + "/checkpoints/" + name), "")
          << "kill " << k + 1 << " left a damaged complete checkpoint " << name;
    std::string left;
    for (const std::string& t : l.tmp) {
      std::string mf = run + "/checkpoints/" + t + "/manifest.json";
      left += " " + t + (fs::exists(mf) ? " (manifest written)" : " (no manifest)");
    }
    mid_write += !l.tmp.empty();
    base = l.complete.rbegin()->first;
    std::cout << "kill " << k + 1 << "/" << kills << " (" << kind_names[plan[k].kind]
              << "): " << trigger << ", +" << plan[k].delay_us << " us; left"
              << (left.empty() ? " no .tmp" : left) << "; newest complete "
              << l.complete.rbegin()->second << std::endl;
  }
  std::cout << mid_write << " of " << kills << " kills left a half-written or half-removed "
            << "checkpoint behind" << std::endl;

  std::vector<std::string> dups;
  auto a = metric_by_step(dir + "/ref", "loss"), b = metric_by_step(run, "loss", &dups);
  EXPECT_TRUE(dups.empty()) << dups.front();
  ASSERT_EQ(a.size(), static_cast<size_t>(steps));
  ASSERT_EQ(b.size(), static_cast<size_t>(steps));
  for (auto& [step, loss] : a) EXPECT_EQ(loss, b[step]) << "loss at step " << step;
  EXPECT_EQ(metric_by_step(dir + "/ref", "val_loss"), metric_by_step(run, "val_loss"));
  std::string last = fmt::format("/checkpoints/step-{:08d}/model.safetensors", steps);
  EXPECT_EQ(slurp(dir + "/ref" + last), slurp(run + last));
  EXPECT_TRUE(list_checkpoint_dir(run).tmp.empty());
}

}  // namespace lmforge::testing
