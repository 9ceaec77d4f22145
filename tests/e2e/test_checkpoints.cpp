// Checkpoints through the real binary: kill -9 at random moments (3 kills here, 20 in
// test_checkpoints_slow.cpp), damaged checkpoints skipped with a warning, --reset-optimizer and
// --start-step; a run's resolved config.yaml runs it again.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "e2e/crash_resume.h"
#include "testing/errors.h"
#include "testing/metrics.h"

namespace lmforge {

namespace fs = std::filesystem;
using testing::metric_by_step;
using testing::run_lmforge;
using testing::slurp;

namespace {

// 12 steps of a 2-layer model, a checkpoint (and a validation loss) every 4, all kept.
const char* kRun =
    "train --set model.preset=gpt2-tiny --set model.n_layer=2 --set model.vocab_size=257 "
    "--set model.max_seq_len=64 --set data.text=demo:kjv --set data.tokenizer=byte "
    "--set train.batch_size=4 --set train.seq_len=32 --set train.steps=12 "
    "--set train.checkpoint_every=4 --set train.keep_last=0 --set train.eval_every=4 "
    "--set train.eval_batches=2 --set sample.prompt= ";

std::string ckpt(const std::string& run, int64_t step) {
  return run + fmt::format("/checkpoints/step-{:08d}", step);
}

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

// Losses, validation losses and final weights of `run` equal those of the saved reference.
void expect_same_as(const std::string& dir, const std::string& run) {
  auto a = metric_by_step(dir + "/ref", "loss"), b = metric_by_step(dir + "/" + run, "loss");
  ASSERT_EQ(a.size(), 12u);
  EXPECT_EQ(a, b);
  EXPECT_EQ(metric_by_step(dir + "/ref", "val_loss"), metric_by_step(dir + "/" + run, "val_loss"));
  EXPECT_EQ(slurp(ckpt(dir + "/ref", 12) + "/model.safetensors"),
            slurp(ckpt(dir + "/" + run, 12) + "/model.safetensors"));
}

// A child process of `pid` (from /proc/*/stat's parent pid), or 0.
pid_t child_of(pid_t pid) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = slurp(e.path().string() + "/stat");
    const size_t close = stat.rfind(')');  // "pid (comm) state ppid ..."
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 1));
    std::string state;
    pid_t ppid = 0;
    if (rest >> state >> ppid && ppid == pid) return std::stoi(name);
  }
  return 0;
}

pid_t g_interrupted = 0;  // the process interrupt_when runs (for its `ready`)

// Whether process `pid` has a handler for SIGINT (train's from its first line: core/interrupt.h).
bool catches_sigint(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);)
    if (line.starts_with("SigCgt:"))
      return std::stoull(line.substr(7), nullptr, 16) >> (SIGINT - 1) & 1;
  return false;
}

// Runs lmforge `args` in dir (its output in out.txt and err.txt), sends it SIGINT once ready()
// holds (polled every 200 us; *sent says whether it went) and returns its wait status when it
// ends (killed after 120 s). ignore_sigint: it starts with SIGINT ignored.
int interrupt_when(const std::string& args, const std::string& dir,
                   const std::function<bool()>& ready, bool* sent, bool ignore_sigint = false) {
  const pid_t pid =
      testing::spawn_lmforge(args, dir, dir + "/out.txt", dir + "/err.txt", ignore_sigint);
  g_interrupted = pid;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  int status = 0;
  *sent = false;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      ADD_FAILURE() << args << ": still running after 120 s";
      break;
    }
    if (!*sent && ready()) {
      ::kill(pid, SIGINT);
      *sent = true;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return status;
}

}  // namespace

TEST(CheckpointCrash, ThreeKillsThenResumeIsBitExact) {
  testing::crash_and_resume(testing::temp_dir("crash3"), /*steps=*/40, /*kills=*/3, /*seed=*/3);
}

// The newest checkpoint has a truncated file and a flipped bit: --resume says which file, falls
// back to the one before, and the run ends as if nothing had happened.
TEST(CheckpointCorruption, ResumeSkipsDamagedCheckpointsWithAWarning) {
  std::string dir = testing::temp_dir("ckpt-corrupt");
  ASSERT_EQ(run_lmforge(std::string(kRun) + "--set run.dir=ref", dir).exit_code, 0);
  fs::copy(dir + "/ref", dir + "/run", fs::copy_options::recursive);
  std::string run = dir + "/run";
  EXPECT_EQ(slurp(run + "/checkpoints/best"), "step-00000012\n");
  EXPECT_EQ(nlohmann::json::parse(slurp(ckpt(run, 8) + "/state.json"))["val_loss"].dump(),
            metric_by_step(run, "val_loss")[8]);

  uint64_t opt_size = fs::file_size(ckpt(run, 12) + "/optimizer.safetensors");
  fs::resize_file(ckpt(run, 12) + "/optimizer.safetensors", opt_size - 1000);
  testing::flip_bit(ckpt(run, 12) + "/model.safetensors",
                    fs::file_size(ckpt(run, 12) + "/model.safetensors") - 3);
  auto r = run_lmforge(std::string(kRun) + "--set run.dir=run --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The damaged step 12, past the resumed step 8, is moved aside (nothing is deleted).
  EXPECT_EQ(
      lines(r.err),
      (std::vector<std::string>{
          fmt::format("warning: run/checkpoints/step-00000012/optimizer.safetensors: {} bytes, "
                      "manifest.json says {}; skipping checkpoint step-00000012; using "
                      "step-00000008 instead",
                      opt_size - 1000, opt_size),
          "warning: run/checkpoints/step-00000012 is from a continuation this run "
          "abandoned (it went back to step 8); moved to "
          "run/checkpoints/abandoned/step-00000012"}));
  EXPECT_NE(r.out.find("resumed from run/checkpoints/step-00000008 at step 8"), std::string::npos)
      << r.out;
  expect_same_as(dir, "run");

  // Two damaged in a row: a flipped bit the size check cannot see, then a truncated file.
  testing::flip_bit(ckpt(run, 12) + "/model.safetensors", 100);
  fs::resize_file(ckpt(run, 8) + "/state.json", 10);
  // generate takes the newest valid one too.
  auto g = run_lmforge("generate --checkpoint run --prompt 'And God' --max-tokens 4", dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(lines(g.err).size(), 2u) << g.err;
  EXPECT_NE(g.err.find("using step-00000004"), std::string::npos) << g.err;
  r = run_lmforge(std::string(kRun) + "--set run.dir=run --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(lines(r.err).size(), 4u) << r.err;  // then steps 8 and 12 moved aside at the resume
  EXPECT_EQ(lines(r.err)[2].rfind("warning: run/checkpoints/step-00000008 is from a continuation "
                                  "this run abandoned",
                                  0),
            0u)
      << r.err;
  EXPECT_EQ(lines(r.err)[3].rfind("warning: run/checkpoints/step-00000012 is from a continuation "
                                  "this run abandoned",
                                  0),
            0u)
      << r.err;
  EXPECT_EQ(lines(r.err)[0].rfind("warning: run/checkpoints/step-00000012/model.safetensors: "
                                  "contents differ from manifest.json (SHA-256 mismatch)",
                                  0),
            0u)
      << r.err;
  EXPECT_EQ(lines(r.err)[1].rfind("warning: run/checkpoints/step-00000008/state.json: 10 bytes", 0),
            0u)
      << r.err;
  EXPECT_NE(r.out.find("resumed from run/checkpoints/step-00000004 at step 4"), std::string::npos);
  expect_same_as(dir, "run");

  // A damaged checkpoint named explicitly is an error naming the file.
  fs::resize_file(ckpt(run, 12) + "/config.yaml", 5);
  r = run_lmforge(std::string(kRun) + "--set run.dir=run --resume=run/checkpoints/step-00000012",
                  dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(lines(r.err).size(), 1u) << r.err;
  EXPECT_NE(r.err.find("run/checkpoints/step-00000012/config.yaml: 5 bytes"), std::string::npos)
      << r.err;
  // None left valid: one clear error.
  fs::remove(ckpt(run, 8) + "/model.safetensors");
  fs::resize_file(ckpt(run, 4) + "/model.safetensors", 8);
  r = run_lmforge(std::string(kRun) + "--set run.dir=run --resume", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(lines(r.err).size(), 1u) << r.err;
  EXPECT_NE(r.err.find("step-00000012/config.yaml"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("no valid checkpoint in run/checkpoints (3 damaged)"), std::string::npos)
      << r.err;
}

// --reset-optimizer: the weights, step and data position from the checkpoint, AdamW from scratch.
// --start-step N: the step counter (and so the schedule) from N, the data position from the
// checkpoint.
TEST(CheckpointResume, ResetOptimizerAndStartStep) {
  std::string dir = testing::temp_dir("ckpt-resume-options");
  ASSERT_EQ(run_lmforge(std::string(kRun) + "--set run.dir=ref", dir).exit_code, 0);
  auto ref_loss = metric_by_step(dir + "/ref", "loss"), ref_lr = metric_by_step(dir + "/ref", "lr");

  fs::copy(dir + "/ref", dir + "/reset", fs::copy_options::recursive);
  auto r = run_lmforge(std::string(kRun) +
                           "--set run.dir=reset --resume=reset/checkpoints/step-00000008 "
                           "--reset-optimizer",
                       dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("at step 8; optimizer state reset"), std::string::npos) << r.out;
  auto loss = metric_by_step(dir + "/reset", "loss");
  ASSERT_EQ(loss.size(), 12u);
  EXPECT_EQ(loss[9], ref_loss[9]);  // the same weights and batch; the update differs
  EXPECT_NE(loss[10], ref_loss[10]);
  EXPECT_EQ(metric_by_step(dir + "/reset", "lr"), ref_lr);
  auto state = nlohmann::json::parse(slurp(ckpt(dir + "/reset", 12) + "/state.json"));
  EXPECT_EQ(state["step"], 12);
  EXPECT_EQ(state["optimizer_steps"], 4);

  fs::copy(dir + "/ref", dir + "/start", fs::copy_options::recursive);
  r = run_lmforge(std::string(kRun) +
                      "--set run.dir=start --resume=start/checkpoints/step-00000008 "
                      "--start-step 4",
                  dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("at step 8, continuing as if 4 steps were done"), std::string::npos)
      << r.out;
  loss = metric_by_step(dir + "/start", "loss");
  auto lr = metric_by_step(dir + "/start", "lr");
  ASSERT_EQ(loss.size(), 12u);
  for (int64_t s = 1; s <= 4; ++s) EXPECT_EQ(loss[s], ref_loss[s]) << s;  // kept records
  EXPECT_EQ(loss[5], ref_loss[9]);  // step 8's weights on the batch after step 8's
  EXPECT_EQ(lr, ref_lr);            // the schedule follows the step counter
  state = nlohmann::json::parse(slurp(ckpt(dir + "/start", 12) + "/state.json"));
  EXPECT_EQ(state["optimizer_steps"], 16);
  auto listing = testing::list_checkpoint_dir(dir + "/start");
  EXPECT_EQ(listing.complete.size(), 3u);  // step 4 as it was; 8 and 12 written anew
  // The old step 12 (past the resumed step 8) is moved aside, not deleted; the old step 8 is
  // replaced.
  EXPECT_TRUE(fs::exists(dir + "/start/checkpoints/abandoned/step-00000012/state.json"));
  EXPECT_EQ(nlohmann::json::parse(slurp(dir + "/start/checkpoints/abandoned/step-00000012/"
                                              "state.json"))["optimizer_steps"],
            12);
  EXPECT_NE(r.err.find("step-00000012 is from a continuation this run abandoned (it went back to "
                       "step 8); moved to"),
            std::string::npos)
      << r.err;

  // Both need --resume; --start-step stays within train.steps.
  r = run_lmforge(std::string(kRun) + "--set run.dir=x --start-step 3", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--start-step: only with --resume"), std::string::npos) << r.err;
  r = run_lmforge(std::string(kRun) + "--set run.dir=x --reset-optimizer", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--reset-optimizer: only with --resume"), std::string::npos) << r.err;
  r = run_lmforge(std::string(kRun) + "--set run.dir=start --resume --start-step 13", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--start-step: 13 is past train.steps (12)"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir + "/x"));
}

// metrics.jsonl's tokens and elapsed_s count across resumes, also when the resumed run takes
// bigger steps (here grad_accum 1 -> 2): not today's step size times the step number.
TEST(CheckpointResume, TokensAndElapsedCountAcrossResumes) {
  std::string dir = testing::temp_dir("ckpt-resume-tokens");
  const std::string run = std::string(kRun) + "--set train.steps=8 --set run.dir=a ";
  ASSERT_EQ(run_lmforge(run, dir).exit_code, 0);
  auto r = run_lmforge(run + "--set train.grad_accum=2 --resume=a/checkpoints/step-00000004", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto tokens = metric_by_step(dir + "/a", "tokens");
  auto elapsed = metric_by_step(dir + "/a", "elapsed_s");
  ASSERT_EQ(tokens.size(), 8u);
  const int64_t step_tokens = 4 * 32;  // batch_size x seq_len
  EXPECT_EQ(std::stoll(tokens[4]), 4 * step_tokens);
  EXPECT_EQ(std::stoll(tokens[5]), 4 * step_tokens + 2 * step_tokens);
  EXPECT_EQ(std::stoll(tokens[8]), 4 * step_tokens + 4 * 2 * step_tokens);
  for (int64_t s = 2; s <= 8; ++s)
    EXPECT_GE(std::stod(elapsed[s]), std::stod(elapsed[s - 1])) << "step " << s;
  auto state = nlohmann::json::parse(slurp(ckpt(dir + "/a", 8) + "/state.json"));
  EXPECT_EQ(state["tokens"], 4 * step_tokens + 4 * 2 * step_tokens);
}

// Going back to an earlier checkpoint abandons the later ones at once: a crash before the next
// save (here a kill in step 6) leaves --resume the checkpoint the new continuation started from,
// not the abandoned run's newest.
TEST(CheckpointResume, GoingBackThenCrashingResumesWhereTheContinuationStarted) {
  std::string dir = testing::temp_dir("ckpt-go-back");
  ASSERT_EQ(run_lmforge(std::string(kRun) + "--set run.dir=a", dir).exit_code, 0);
  const std::string other = std::string(kRun) + "--set run.dir=a --set train.lr=1e-3 ";
  auto r = run_lmforge(
      other + "--set train.inject_fault=kill@6 --resume=a/checkpoints/step-00000004", dir);
  ASSERT_NE(r.exit_code, 0) << r.err;
  auto listing = testing::list_checkpoint_dir(dir + "/a");
  EXPECT_EQ(listing.complete.size(), 1u);
  EXPECT_TRUE(listing.complete.count(4));
  EXPECT_TRUE(fs::exists(dir + "/a/checkpoints/abandoned/step-00000008/state.json"));
  EXPECT_TRUE(fs::exists(dir + "/a/checkpoints/abandoned/step-00000012/state.json"));
  r = run_lmforge(other + "--resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from a/checkpoints/step-00000004 at step 4"), std::string::npos)
      << r.out;
  EXPECT_EQ(metric_by_step(dir + "/a", "loss").size(), 12u);  // steps 1-12, one record each
  EXPECT_EQ(nlohmann::json::parse(slurp(ckpt(dir + "/a", 12) + "/state.json"))["optimizer_steps"],
            12);
}

// A run that stopped early, resumed with the same command (a requeued job), trains nothing, as a
// finished run resumed; a larger train.patience lets it go on.
TEST(CheckpointResume, AnEarlyStoppedRunStaysStopped) {
  std::string dir = testing::temp_dir("ckpt-early-stop");
  // Evaluations at 4 and 8: no loss improves on the first by 100, so the run stops at step 8.
  const std::string run =
      std::string(kRun) + "--set run.dir=a --set train.patience=1 --set train.min_delta=100 ";
  auto r = run_lmforge(run, dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_NE(r.out.find("early stopping at step 8"), std::string::npos) << r.out;
  // The best the log names is checkpoints/best's (the lowest loss; min_delta counts for early
  // stopping alone): it named step 4 while checkpoints/best named step 8.
  const auto val = testing::records_of(dir + "/a/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 2u);
  const int64_t lowest =
      val[1]["val_loss"].get<double>() < val[0]["val_loss"].get<double>() ? 8 : 4;
  EXPECT_EQ(slurp(dir + "/a/checkpoints/best"), fmt::format("step-{:08d}\n", lowest));
  EXPECT_NE(r.out.find(fmt::format("at step {})", lowest)), std::string::npos) << r.out;
  const std::string weights = slurp(ckpt(dir + "/a", 8) + "/model.safetensors");
  const std::string metrics = slurp(dir + "/a/metrics.jsonl");
  r = run_lmforge(run + "--resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("nothing to train"), std::string::npos) << r.out;
  EXPECT_EQ(slurp(ckpt(dir + "/a", 8) + "/model.safetensors"), weights);
  EXPECT_EQ(slurp(dir + "/a/metrics.jsonl"), metrics);
  EXPECT_FALSE(fs::exists(ckpt(dir + "/a", 12)));
  r = run_lmforge(run + "--set train.patience=3 --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(ckpt(dir + "/a", 12)));
}

// train.seed draws each epoch's data order: resuming with another would reorder the epoch under
// the saved position (samples twice, others never), so it is refused.
TEST(CheckpointResume, AnotherSeedIsRefused) {
  std::string dir = testing::temp_dir("ckpt-seed");
  const std::string run = std::string(kRun) + "--set run.dir=a --set train.steps=4 ";
  ASSERT_EQ(run_lmforge(run, dir).exit_code, 0);
  const std::string config = slurp(dir + "/a/config.yaml");
  testing::expect_one_line_error(
      run_lmforge(run + "--set train.steps=8 --set train.seed=7 --resume", dir),
      {"step-00000004/state.json", "train.seed 1337 but train.seed is 7", "--set train.seed=1337"});
  EXPECT_FALSE(fs::exists(ckpt(dir + "/a", 8)));
  // A refused resume leaves the run's config.yaml as it was (it held seed 7 and steps 8, which
  // a later plain `train a/config.yaml --resume` then took).
  testing::expect_one_line_error(run_lmforge(run + "--set train.steps=2 --resume", dir),
                                 {"past train.steps (2)"});
  EXPECT_EQ(slurp(dir + "/a/config.yaml"), config);
}

// A run resumed with a config that leaves train.min_lr unset keeps the min_lr it was trained
// toward (its config.yaml's), so its schedule goes on as it was: the same lr at every step.
TEST(CheckpointResume, UnsetMinLrKeepsTheRunsSchedule) {
  std::string dir = testing::temp_dir("ckpt-min-lr");
  const std::string run = std::string(kRun) + "--set train.steps=8 --set train.warmup=0 ";
  ASSERT_EQ(run_lmforge(run + "--set run.dir=ref --set train.min_lr=1e-5", dir).exit_code, 0);
  // Killed in step 6, after the checkpoint of step 4; resumed without the key.
  ASSERT_NE(
      run_lmforge(run + "--set run.dir=a --set train.min_lr=1e-5 --set train.inject_fault=kill@6",
                  dir)
          .exit_code,
      0);
  auto r = run_lmforge(run + "--set run.dir=a --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("note: train.min_lr 1e-05 as"), std::string::npos) << r.out;
  EXPECT_EQ(metric_by_step(dir + "/a", "lr"), metric_by_step(dir + "/ref", "lr"));
  // A train.lr below the min_lr kept is refused (it was noted as kept while the schedule decayed
  // to the new lr / 10, and config.yaml then held a pair no run accepts).
  testing::expect_one_line_error(
      run_lmforge(run + "--set run.dir=a --set train.steps=10 --set train.lr=5e-6 --resume", dir),
      {"train.lr 5e-06 is below the train.min_lr 1e-05", "--set train.min_lr="});
}

// A new best validation loss is saved at its step even between train.checkpoint_every's, so that
// checkpoints/best names the step the log marks best (it named the best of the saved ones).
TEST(CheckpointResume, ANewBestIsSaved) {
  std::string dir = testing::temp_dir("ckpt-new-best");
  auto r =
      run_lmforge(std::string(kRun) +
                      "--set run.dir=a --set train.eval_every=2 --set train.checkpoint_every=100",
                  dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto val = testing::records_of(dir + "/a/metrics.jsonl", "val_loss");
  ASSERT_EQ(val.size(), 6u);
  int64_t lowest = 0;
  double best = INFINITY;
  std::set<int64_t> bests{12};  // the last step is always saved
  for (const auto& v : val)
    if (v["val_loss"].get<double>() < best) {
      best = v["val_loss"].get<double>();
      lowest = v["step"].get<int64_t>();
      bests.insert(lowest);
      // the log marks it
      const size_t at =
          r.out.find(fmt::format("step {:>6}/12 | val loss {:.4f} | ppl", lowest, best));
      ASSERT_NE(at, std::string::npos) << r.out;
      EXPECT_TRUE(r.out.substr(at, r.out.find('\n', at) - at).ends_with("| best")) << r.out;
    }
  // Saved: each new best (the first evaluation's at least) and the last step, nothing else.
  std::set<int64_t> saved;
  for (const auto& [step, name] : testing::list_checkpoint_dir(dir + "/a").complete)
    saved.insert(step);
  EXPECT_EQ(saved, bests);
  EXPECT_EQ(slurp(dir + "/a/checkpoints/best"), fmt::format("step-{:08d}\n", lowest));
  EXPECT_EQ(nlohmann::json::parse(slurp(ckpt(dir + "/a", lowest) + "/state.json"))["val_loss"],
            best);
  // train.save_best: false: the regular saves alone (here the last step's).
  r = run_lmforge(std::string(kRun) +
                      "--set run.dir=b --set train.eval_every=2 --set train.checkpoint_every=100 "
                      "--set train.save_best=false",
                  dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  saved.clear();
  for (const auto& [step, name] : testing::list_checkpoint_dir(dir + "/b").complete)
    saved.insert(step);
  EXPECT_EQ(saved, std::set<int64_t>{12});
}

// A fine-tuning run started without a config file (the embedded default's data.text and
// data.tokenizer stay unset by the user) from a Hugging Face directory (so no model.preset):
// its data is data.train alone (no validation on the default's demo corpus), and its resolved
// config.yaml runs it again, the same losses and weights, and continues it with --resume.
TEST(ResolvedConfig, ReproducesAFineTuningRunStartedWithoutAConfigFile) {
  std::string dir = testing::temp_dir("resolved-config");
  ASSERT_EQ(
      run_lmforge(std::string(kRun) + "--set train.steps=4 --set run.dir=base", dir).exit_code, 0);
  auto r = run_lmforge("export --checkpoint base --to-hf hf", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  {
    std::ofstream f(dir + "/ft.txt");
    for (int i = 0; i < 200; ++i) f << "Fine-tuning text, line " << i << ", of the new task.\n";
  }
  r = run_lmforge(
      "prepare --input ft.txt --output shards --tokenizer hf/tokenizer.json --val-fraction 0", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string ft =
      "train --set init_from=hf:hf --set data.train=shards/data --set train.batch_size=4 "
      "--set train.seq_len=32 --set train.steps=6 --set train.eval_every=3 "
      "--set train.checkpoint_every=3 --set sample.prompt= ";
  r = run_lmforge(ft + "--set run.dir=ft", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(metric_by_step(dir + "/ft", "val_loss").empty()) << "validated on the demo corpus";
  const std::string saved = slurp(dir + "/ft/config.yaml");
  EXPECT_NE(saved.find("preset: \"\""), std::string::npos) << saved;
  EXPECT_NE(saved.find("tokenizer: \"\""), std::string::npos) << saved;

  r = run_lmforge("train ft/config.yaml --set run.dir=again", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto loss = metric_by_step(dir + "/ft", "loss");
  ASSERT_EQ(loss.size(), 6u);
  EXPECT_EQ(metric_by_step(dir + "/again", "loss"), loss);
  EXPECT_EQ(slurp(ckpt(dir + "/ft", 6) + "/model.safetensors"),
            slurp(ckpt(dir + "/again", 6) + "/model.safetensors"));
  // Resumed from its step 3 (into another directory, to compare): steps 4 to 6 as before.
  r = run_lmforge("train ft/config.yaml --resume=" + ckpt("ft", 3) + " --set run.dir=cont", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto cont = metric_by_step(dir + "/cont", "loss");
  ASSERT_EQ(cont.size(), 3u);
  for (auto& [step, l] : cont) EXPECT_EQ(l, loss.at(step)) << step;
  EXPECT_EQ(slurp(ckpt(dir + "/ft", 6) + "/model.safetensors"),
            slurp(ckpt(dir + "/cont", 6) + "/model.safetensors"));
}

// One trainer per run directory: a --resume started while the run still trains (a requeued job
// whose first copy lives on) is refused before it touches anything (it moved the first's
// checkpoints aside and then failed in the first's save), and goes on once the first has ended.
TEST(DirLock, ASecondTrainerOnTheSameRunDirIsRefused) {
  std::string dir = testing::temp_dir("run-dir-lock");
  const std::string args = std::string(testing::kByteDemoTrain) +
                           "--set train.steps=100000 --set train.checkpoint_every=5 "
                           "--set run.dir=run";
  pid_t pid = testing::spawn_lmforge(args, dir, dir + "/out.txt", dir + "/err.txt");
  bool saved = false;
  for (int i = 0; i < 6000 && !saved; ++i) {
    saved = !testing::list_checkpoint_dir(dir + "/run").complete.empty();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(saved) << slurp(dir + "/err.txt");
  auto second = run_lmforge(args + " --resume", dir);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  const auto listing = testing::list_checkpoint_dir(dir + "/run");
  EXPECT_EQ(second.exit_code, 1);
  EXPECT_NE(second.err.find("run.dir: run is in use by another lmforge train, convert or prepare"),
            std::string::npos)
      << second.err;
  EXPECT_FALSE(fs::exists(dir + "/run/abandoned"));
  // After the first ended (killed: the kernel drops its lock), the resume goes on.
  const std::string to_end =
      " --resume --set train.steps=" + std::to_string(listing.complete.rbegin()->first + 1);
  auto again = run_lmforge(args + to_end, dir);
  EXPECT_EQ(again.exit_code, 0) << again.err;
  // Resumed once more, finished: it says there is nothing to train.
  auto done = run_lmforge(args + to_end, dir);
  EXPECT_EQ(done.exit_code, 0) << done.err;
  EXPECT_NE(done.out.find("nothing to train: the run finished at step"), std::string::npos)
      << done.out;
}

// Ctrl-C (SIGINT) during a run: the step finishes, a checkpoint of it is saved (none was due),
// the run says so in one line and exits 130; --resume continues from that step to the end.
TEST(Interrupt, CtrlCSavesACheckpointAndResumeContinues) {
  std::string dir = testing::temp_dir("interrupt");
  const std::string args =
      "train --set model.preset=gpt2-tiny --set model.n_layer=2 --set model.vocab_size=257 "
      "--set model.max_seq_len=64 --set data.text=demo:kjv --set data.tokenizer=byte "
      "--set train.batch_size=4 --set train.seq_len=32 --set train.steps=300 "
      "--set train.checkpoint_every=1000 --set train.eval_every=0 --set sample.prompt= "
      "--set run.dir=run";
  bool sent = false;
  const int status = interrupt_when(
      args, dir,
      [&] {
        const std::string m = slurp(dir + "/run/metrics.jsonl");  // complete lines: written steps
        return std::count(m.begin(), m.end(), '\n') >= 5;
      },
      &sent);
  ASSERT_TRUE(sent) << slurp(dir + "/err.txt");
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 130);
  const auto listing = testing::list_checkpoint_dir(dir + "/run");
  ASSERT_EQ(listing.complete.size(), 1u);
  EXPECT_TRUE(listing.tmp.empty());
  const int64_t step = listing.complete.begin()->first;
  EXPECT_LT(step, 300);
  EXPECT_EQ(metric_by_step(dir + "/run", "loss").rbegin()->first, step);
  const std::string err = slurp(dir + "/err.txt");
  EXPECT_NE(err.find(fmt::format("lmforge: interrupted (Ctrl-C) after step {}; saved {}", step,
                                 "run/checkpoints/" + listing.complete.begin()->second)),
            std::string::npos)
      << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_NE(slurp(dir + "/run/dashboard.html")
                .find(fmt::format("step {} of 300 &middot; interrupted", step)),
            std::string::npos);
  auto r = run_lmforge(args + " --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find(fmt::format("at step {}", step)), std::string::npos) << r.out;
  EXPECT_EQ(metric_by_step(dir + "/run", "loss").size(), 300u);
}

// Ctrl-C to a command that writes files ends it as usual, but first removes what it was writing:
// no temporary file or directory and no directory it made is left (a shard's temporary and the
// directories prepare made were; an export's directory of the whole model's weights), and the
// rerun finishes as an uninterrupted run does.
TEST(Interrupt, CommandsThatWriteRemoveWhatTheyWereWriting) {
  std::string dir = testing::temp_dir("interrupt-writers");
  {
    std::ofstream big(dir + "/big.txt");
    const std::string para =
        "And God said, Let there be light: and there was light. And God saw the light, that it "
        "was good: and God divided the light from the darkness.\n\n";
    for (int i = 0; i < 60000; ++i) big << i << ' ' << para;
  }
  // Sends SIGINT once `ready` holds; returns the signal that ended the process (0: it exited).
  auto signal_ending = [&](const std::string& args, const std::function<bool()>& ready) {
    bool sent = false;
    const int status = interrupt_when(args, dir, ready, &sent);
    EXPECT_TRUE(sent) << slurp(dir + "/err.txt");
    return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  };
  auto temporaries = [](const fs::path& under) {
    std::vector<std::string> found;
    std::error_code ec;
    for (fs::recursive_directory_iterator it(under, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().string().ends_with(".tmp")) found.push_back(it->path().string());
    return found;
  };
  const std::string tok = testing::shared_tokenizers_dir() + "/gpt2.tiktoken";
  const std::string prep = "prepare --input big.txt --text-mode blank_line --tokenizer " + tok +
                           " --shard-tokens 20000 --val-docs 10 --output ";
  // prepare, while it writes its first shard: nothing of it left (the output directory it made
  // included); then after some shards: those stay (the rerun goes on from them), no temporary.
  EXPECT_EQ(signal_ending(prep + "p1", [&] { return !temporaries(dir + "/p1").empty(); }), SIGINT);
  EXPECT_FALSE(fs::exists(dir + "/p1")) << fs::exists(dir + "/p1/data");
  EXPECT_NE(slurp(dir + "/err.txt")
                .find("lmforge: interrupted (Ctrl-C); removed what it was "
                      "writing"),
            std::string::npos)
      << slurp(dir + "/err.txt");
  auto shards = [&](const std::string& out) {
    int n = 0;
    std::error_code ec;
    for (fs::directory_iterator it(dir + "/" + out + "/data", ec), end; !ec && it != end;
         it.increment(ec))
      n += it->path().extension() == ".bin";
    return n;
  };
  EXPECT_EQ(signal_ending(prep + "p2", [&] { return shards("p2") >= 3; }), SIGINT);
  EXPECT_EQ(temporaries(dir + "/p2"), std::vector<std::string>{});
  ASSERT_EQ(run_lmforge(prep + "p2", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge(prep + "whole", dir).exit_code, 0);
  for (const auto& e : fs::directory_iterator(dir + "/whole/data"))
    EXPECT_EQ(slurp(e.path().string()), slurp(dir + "/p2/data/" + e.path().filename().string()))
        << e.path();
  // export, while it writes the weights: no directory of them left beside the target.
  ASSERT_EQ(run_lmforge("train --set model.preset=gpt2-tiny --set model.n_layer=8 "
                        "--set model.n_embd=512 --set model.n_head=8 --set model.vocab_size=257 "
                        "--set data.text=big.txt --set data.tokenizer=byte --set "
                        "train.batch_size=1 --set train.seq_len=16 --set train.steps=1 "
                        "--set train.eval_every=0 --set sample.prompt= --set run.dir=run",
                        dir)
                .exit_code,
            0);
  auto export_temp = [&] {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().filename().string().starts_with("hf.lmforge-export.")) return true;
    return false;
  };
  EXPECT_EQ(signal_ending("export --checkpoint run --to-hf hf", export_temp), SIGINT);
  EXPECT_FALSE(export_temp());
  EXPECT_FALSE(fs::exists(dir + "/hf"));
}

// Ctrl-C during the set-up (the run directory written, the model made, the data read) is noted
// too: the run stops before its first step, saying so, with a checkpoint --resume continues from
// and no temporary file left (it ended the process silently, leaving config.yaml's temporary).
// A run of 3 steps whose set-up (a 4-block C=512 model) takes a while after config.yaml.
const char* const kSetUpRun =
    "train --set model.preset=gpt2-tiny --set model.n_layer=4 --set model.n_embd=512 "
    "--set model.n_head=8 --set model.vocab_size=257 --set model.max_seq_len=64 "
    "--set data.text=demo:kjv --set data.tokenizer=byte --set train.batch_size=2 "
    "--set train.seq_len=32 --set train.steps=3 --set train.checkpoint_every=0 "
    "--set train.eval_every=0 --set sample.prompt= --set run.dir=run";

TEST(Interrupt, CtrlCDuringTheSetUpStopsBeforeTheFirstStep) {
  std::string dir = testing::temp_dir("interrupt-setup");
  const std::string args = kSetUpRun;
  bool sent = false;  // (once it catches SIGINT: before it builds the model and reads the data)
  const int status = interrupt_when(
      args, dir, [&] { return catches_sigint(g_interrupted); }, &sent);
  ASSERT_TRUE(sent) << slurp(dir + "/err.txt");
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 130);
  const auto listing = testing::list_checkpoint_dir(dir + "/run");
  ASSERT_EQ(listing.complete.size(), 1u);
  EXPECT_EQ(listing.complete.begin()->first, 0);  // no step was run
  const std::string err = slurp(dir + "/err.txt");
  EXPECT_NE(err.find("lmforge: interrupted (Ctrl-C) after step 0"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir + "/run/metrics.jsonl") &&
               !metric_by_step(dir + "/run", "loss").empty());
  for (const auto& e : fs::recursive_directory_iterator(dir + "/run"))
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
  // Likewise in a resume's set-up: the checkpoint it resumed from is not saved over (with
  // --reset-optimizer that would replace its optimizer state).
  struct stat before {
  }, after{};
  const std::string step0 = dir + "/run/checkpoints/" + listing.complete.begin()->second;
  ASSERT_EQ(::stat(step0.c_str(), &before), 0);
  const int again = interrupt_when(
      args + " --resume --reset-optimizer", dir, [&] { return catches_sigint(g_interrupted); },
      &sent);
  ASSERT_TRUE(WIFEXITED(again)) << "killed by signal " << WTERMSIG(again);
  EXPECT_EQ(WEXITSTATUS(again), 130) << slurp(dir + "/err.txt");
  ASSERT_EQ(::stat(step0.c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);
  EXPECT_EQ(testing::list_checkpoint_dir(dir + "/run").complete.size(), 1u);
  auto r = run_lmforge(args + " --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(metric_by_step(dir + "/run", "loss").size(), 3u);
}

// Started with SIGINT ignored (`lmforge train ... &` from a script), a run keeps it ignored: a
// Ctrl-C meant for the script does not stop it.
TEST(Interrupt, AnIgnoredSigintStaysIgnored) {
  std::string dir = testing::temp_dir("interrupt-ignored");
  bool sent = false;
  const int status = interrupt_when(
      kSetUpRun, dir, [&] { return fs::exists(dir + "/run/config.yaml"); }, &sent,
      /*ignore_sigint=*/true);
  ASSERT_TRUE(sent) << slurp(dir + "/err.txt");
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << slurp(dir + "/err.txt");
  EXPECT_EQ(metric_by_step(dir + "/run", "loss").size(), 3u);
}

// Ctrl-C at the terminal while the demo corpus is being written (`bible`, on a fresh cache)
// reaches `bible` too: it ends, and the run with one line saying so, the half-written corpus
// removed. Without `bible` on PATH: one line naming its package, nothing left.
TEST(Interrupt, CtrlCDuringTheDemoCorpusLeavesNoPartOfIt) {
  std::string dir = testing::temp_dir("interrupt-demo");
  const std::string cache = dir + "/cache";
  auto tmps = [&] {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(cache + "/demo", ec))
      if (e.path().string().ends_with(".tmp")) out.push_back(e.path().string());
    return out;
  };
  const std::string args = std::string(testing::kByteDemoTrain) + "--set train.steps=2";
  const char* was = std::getenv("LMFORGE_CACHE");
  const std::string saved = was ? was : "";
  ::setenv("LMFORGE_CACHE", cache.c_str(), 1);
  const pid_t pid = testing::spawn_lmforge(args, dir, dir + "/out.txt", dir + "/err.txt");
  if (was)
    ::setenv("LMFORGE_CACHE", saved.c_str(), 1);
  else
    ::unsetenv("LMFORGE_CACHE");
  // `bible`, lmforge's child, once it writes; then the terminal's Ctrl-C: both get SIGINT.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  pid_t bible = 0;
  while (bible == 0 && std::chrono::steady_clock::now() < deadline) {
    if (!tmps().empty()) bible = child_of(pid);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ASSERT_GT(bible, 0) << slurp(dir + "/err.txt");
  ::kill(bible, SIGINT);
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  if (WEXITSTATUS(status) == 130 && fs::exists(cache + "/demo/kjv.txt"))
    GTEST_SKIP() << "bible had finished before the signal";
  EXPECT_EQ(WEXITSTATUS(status), 1);
  testing::expect_one_line_error({1, slurp(dir + "/out.txt"), slurp(dir + "/err.txt")},
                                 {"demo corpus: `bible` was ended by Ctrl-C", "run again"});
  EXPECT_EQ(tmps(), std::vector<std::string>{});
  EXPECT_FALSE(fs::exists(cache + "/demo/kjv.txt"));

  auto r = run_lmforge(args, dir, "env PATH=/nonexistent LMFORGE_CACHE='" + cache + "'");
  testing::expect_one_line_error(r, {"demo corpus: the `bible` program", "bible-kjv"});
  EXPECT_EQ(tmps(), std::vector<std::string>{});
}

}  // namespace lmforge
