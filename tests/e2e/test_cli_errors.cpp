// Bad input through the real binary: one clear line on stderr naming the file/key, exit code 1,
// no crash, nothing half-written.
#include <fmt/core.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/data/shard.h"
#include "testing/errors.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

namespace fs = std::filesystem;
using testing::run_lmforge;

namespace {

// A tiny, fast run configuration over a synthetic shard.
std::string tiny_config(const std::string& dir) {
  std::vector<uint32_t> toks(4000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = (i * 7 + i / 13) % 257;
  write_shard(dir + "/train.bin", toks);
  std::ofstream(dir + "/tiny.yaml")
      << "model:\n  preset: gpt2-tiny\n  n_layer: 1\n  vocab_size: 257\n"
         "data:\n  train: train.bin\n"
         "train:\n  steps: 2\n  batch_size: 2\n  seq_len: 16\n"
         "  eval_every: 0\n  checkpoint_every: 0\n"
         "run:\n  dir: run\n";
  return dir + "/tiny.yaml";
}

using testing::expect_one_line_error;

void expect_no_tmp_files(const std::string& dir) {
  for (auto& e : fs::recursive_directory_iterator(dir))
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
}

}  // namespace

TEST(CliErrors, ConfigProblemsNameTheFileAndKey) {
  std::string dir = testing::temp_dir("cli-config");
  tiny_config(dir);
  std::ofstream(dir + "/typo.yaml") << "train:\n  stepz: 3\n";
  expect_one_line_error(run_lmforge("train typo.yaml", dir), {"typo.yaml", "train.stepz"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.lr=fast", dir),
                        {"--set", "train.lr", "expected a number", "fast"});
  expect_one_line_error(run_lmforge("train missing.yaml", dir), {"missing.yaml", "cannot open"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.preset=gpt9", dir),
                        {"unknown preset", "gpt9"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.n_head=3", dir),
                        {"model.n_embd", "n_head=3"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.precision=fp8", dir),
                        {"train.precision"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.master_weights=bf16", dir),
                        {"train.master_weights", "train.precision: bf16"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.master_weights=fp16", dir),
                        {"train.master_weights", "fp16"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.cuda_graphs=true", dir),
                        {"train.cuda_graphs", "CPU", "train.cuda_graphs: false"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.device=tpu", dir),
                        {"train.device", "tpu"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set dist.backend=nccl", dir),
                        {"dist.backend", "nccl", "train.device"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set dist.backend=gloo", dir),
                        {"dist.backend", "gloo"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.profile_steps=-1", dir),
                        {"train.profile_steps", ">= 0"});
  // Sampling and evaluation options are checked before training, not after it.
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set sample.prompt=In --set sample.max_tokens=-5", dir),
      {"sample.max_tokens", ">= 0"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set sample.prompt=In --set sample.temperature=-1", dir),
      {"sample.temperature"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.eval_every=1 --set train.eval_batches=0", dir),
      {"train.eval_batches", "positive"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set sample.prompt=" + std::string(300, 'x'), dir),
      {"sample.prompt", "300 tokens", "model.max_seq_len"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.spike_window=10", dir),
                        {"train.spike_window", "at least 20", "train.spike_zscore: 0"});
  // An empty tokenizer means init_from's; without one it names what to set.
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.tokenizer=", dir),
                        {"data.tokenizer: not set", "init_from", "bpe:N"});
  // bpe:N takes digits alone (std::stoll read "2048abc" as 2048), in train and in plan.
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.tokenizer=bpe:2048abc", dir),
                        {"data.tokenizer", "bpe:2048abc", "bpe:N"});
  // plan refuses what train refuses (a batch of 0 divided by zero in it), and a NaN peak.
  for (const std::string set :
       {"train.batch_size=0", "train.seq_len=-5", "train.grad_accum=0", "dist.strategy=bogus"})
    expect_one_line_error(run_lmforge("plan tiny.yaml --set " + set, dir),
                          {set.substr(0, set.find('='))});
  expect_one_line_error(run_lmforge("plan tiny.yaml --tflops nan", dir), {"--tflops"});
  // A step's micro-batches that cannot all be held name train.grad_accum (was: out of memory,
  // reduce train.batch_size).
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.grad_accum=99999999999", dir),
                        {"train.grad_accum's 99999999999 micro-batches", "lower train.grad_accum"});
  expect_one_line_error(
      run_lmforge("plan tiny.yaml --set model.vocab_size=0 --set data.tokenizer=bpe:2048abc", dir),
      {"data.tokenizer", "bpe:2048abc"});
  // train.hellaswag is scored at evaluations.
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.hellaswag=hs.jsonl --set train.eval_every=0", dir),
      {"train.hellaswag", "train.eval_every is 0"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.hellaswag_limit=-1", dir),
                        {"train.hellaswag_limit", ">= 0"});
  // Early stopping counts validation losses: never evaluated, or nothing to evaluate on, it
  // would never fire.
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.patience=2", dir),
                        {"train.patience", "train.eval_every is 0"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.patience=2 --set train.eval_every=1", dir),
      {"train.patience", "no validation data", "data.val"});
  // Muon: its keys, and what it cannot run with.
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.optimizer=sgd", dir),
                        {"train.optimizer", "adamw or muon", "sgd"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.optimizer=muon --set train.muon_ns_steps=0", dir),
      {"train.muon_ns_steps", "[1, 100)"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.optimizer=muon --set train.muon_adjust_lr=x", dir),
      {"train.muon_adjust_lr", "match_rms_adamw or original"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.optimizer=muon --set dist.strategy=zero1 --set "
                  "dist.offload=true",
                  dir),
      {"dist.offload", "muon"});
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set train.optimizer=muon --set model.lora_rank=4", dir),
      {"train.optimizer", "LoRA", "adamw"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.optimizer=muon --set "
                                    "train.precision=bf16 --set train.master_weights=bf16",
                                    dir),
                        {"train.master_weights", "fp32"});
  // torchrun's variables: its ranks can join only an NCCL world (a model on GPUs).
  expect_one_line_error(
      run_lmforge("train tiny.yaml", dir,
                  "env -u OMPI_COMM_WORLD_SIZE -u SLURM_PROCID -u PMI_SIZE WORLD_SIZE=2 "
                  "RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2"),
      {"torchrun", "WORLD_SIZE=2", "mpirun -np N", "train.device: cuda"});
  if (!cuda::available())  // a GPU asked for where there is none (built with CUDA or not)
    expect_one_line_error(run_lmforge("train tiny.yaml --set train.device=cuda", dir),
                          {"train.device: cuda", "no CUDA GPU is visible"});
  else  // what the CUDA backend cannot run is refused before anything is written
    expect_one_line_error(
        run_lmforge(
            "train tiny.yaml --set train.device=cuda --set model.n_embd=256 --set model.n_head=1",
            dir),
        {"head size", "train.device: cpu"});
  EXPECT_FALSE(fs::exists(dir + "/run/checkpoints"));
}

TEST(CliErrors, DataProblemsNameTheShard) {
  std::string dir = testing::temp_dir("cli-data");
  tiny_config(dir);
  std::ofstream(dir + "/junk.bin") << std::string(1000, 'x');
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train=junk.bin", dir),
                        {"junk.bin", "bad magic"});
  fs::copy_file(dir + "/train.bin", dir + "/cut.bin");
  fs::resize_file(dir + "/cut.bin", fs::file_size(dir + "/cut.bin") - 100);
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train=cut.bin", dir),
                        {"cut.bin", "truncated"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train=nope.bin", dir),
                        {"data.train", "nope.bin"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.vocab_size=100", dir),
                        {"model.vocab_size", "tokenizer's 257"});
  write_shard(dir + "/big.bin", std::vector<uint32_t>(100, 1000));  // ids of another tokenizer
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train=big.bin", dir),
                        {"big.bin", "model.vocab_size", "tokenizer"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.tokenizer=nope.json", dir),
                        {"data.tokenizer", "nope.json"});
  // Shards prepared with one tokenizer, training told another: refused, naming both.
  std::ofstream(dir + "/doc.txt") << "In the beginning God created the heaven and the earth.\n";
  auto p = run_lmforge("prepare --input doc.txt --output prep", dir);
  ASSERT_EQ(p.exit_code, 0) << p.err;
  std::string gpt2 = testing::shared_tokenizers_dir() + "/gpt2.tiktoken";
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set data.train=prep/data --set data.tokenizer=" + gpt2 +
                      " --set model.vocab_size=0",
                  dir),
      {"prep/data/train-00000.bin", "byte", "gpt2.tiktoken", "fingerprint"});
}

TEST(CliErrors, ResumeAndCheckpointProblems) {
  std::string dir = testing::temp_dir("cli-resume");
  tiny_config(dir);
  expect_one_line_error(run_lmforge("train tiny.yaml --resume", dir),
                        {"--resume", "no checkpoint"});
  // The config after --resume is its optional value: said so, with the order that works.
  expect_one_line_error(run_lmforge("train --resume tiny.yaml", dir),
                        {"--resume tiny.yaml: a config file", "train tiny.yaml --resume"});
  auto ok = run_lmforge("train tiny.yaml", dir);
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  // Sampling options out of range are refused by generate as by train.
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompt hi --max-tokens -3", dir),
                        {"--max-tokens", ">= 0"});
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompt hi --top-p 0", dir),
                        {"--top-p", "(0, 1]"});
  // --prompts: a line that is not a prompt, an empty prompt, or both --prompt and --prompts.
  std::ofstream(dir + "/p.jsonl") << "{\"prompt\": \"hi\"}\n{\"text\": \"hi\"}\n";
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompts p.jsonl", dir),
                        {"p.jsonl:2", "\"prompt\""});
  std::ofstream(dir + "/e.jsonl") << "{\"prompt\": \"hi\"}\n{\"prompt\": \"\"}\n";
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompts e.jsonl", dir),
                        {"e.jsonl", "prompt 2", "empty"});
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompt hi --prompts p.jsonl", dir),
                        {"--prompt", "--prompts"});
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompts missing.jsonl", dir),
                        {"missing.jsonl", "cannot open"});
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompt hi --num-samples 0", dir),
                        {"--num-samples", "at least 1", "got 0"});
  expect_one_line_error(  // (each a sequence held to its end: it ran out of memory)
      run_lmforge("generate --checkpoint run --prompt hi --num-samples 3000000000", dir),
      {"--num-samples 3000000000", "more than 10000000 sequences"});
  // A diverged model (its logits NaN): greedy decoding and HellaSwag refuse it (NaN compares
  // false: they would print id 0 and always pick the first ending).
  {
    auto d = run_lmforge("train tiny.yaml --set train.lr=1e30 --set run.dir=nan", dir);
    ASSERT_EQ(d.exit_code, 0) << d.err;
    EXPECT_NE(d.err.find("warning: the run ended with its last 1 step(s) skipped"),
              std::string::npos)
        << d.err;
  }
  std::ofstream(dir + "/hs.jsonl") << "{\"ctx\": \"In the\", \"endings\": [\"beginning\", "
                                      "\"end\"], \"label\": 0}\n";
  expect_one_line_error(run_lmforge("eval --checkpoint nan --hellaswag hs.jsonl", dir),
                        {"hs.jsonl", "item 1", "diverged"});
  expect_one_line_error(
      run_lmforge("generate --checkpoint nan --prompt hi --temperature 0 --max-tokens 4", dir),
      {"NaN", "diverged"});
  std::ofstream(dir + "/hs-empty.jsonl")
      << "{\"ctx\": \"In the\", \"endings\": [\"beginning\", \"\"], \"label\": 0}\n";
  expect_one_line_error(run_lmforge("eval --checkpoint run --hellaswag hs-empty.jsonl", dir),
                        {"hs-empty.jsonl:1", "an empty ending"});
  // A reply that cannot reach --max-tokens within the context: said, not silently cut.
  {
    auto g = run_lmforge("generate --checkpoint run --prompt hi --max-tokens 1000", dir);
    EXPECT_EQ(g.exit_code, 0) << g.err;
    EXPECT_NE(g.err.find("not --max-tokens 1000"), std::string::npos) << g.err;
  }
  // chat's template is checked before the first turn is read.
  expect_one_line_error(run_lmforge("chat --checkpoint run --chat-template foo", dir),
                        {"--chat-template", "\"foo\""});
  // export --force replaces its target: never the run, its checkpoint or the working directory.
  for (std::string to : {"run", ".", "run/checkpoints"})
    expect_one_line_error(run_lmforge("export --checkpoint run --to-hf " + to + " --force", dir),
                          {"--to-hf", "--force would delete"});
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000002/state.json"));
  // ... nor a file, nor a directory with files an export does not write.
  std::ofstream(dir + "/file.txt") << "mine\n";
  expect_one_line_error(run_lmforge("export --checkpoint run --to-hf file.txt --force", dir),
                        {"--to-hf", "file.txt", "not a directory"});
  fs::create_directories(dir + "/mine");
  std::ofstream(dir + "/mine/config.json") << "{}\n";
  std::ofstream(dir + "/mine/notes.txt") << "mine\n";
  expect_one_line_error(run_lmforge("export --checkpoint run --to-hf mine --force", dir),
                        {"--to-hf", "notes.txt", "--force would delete"});
  EXPECT_EQ(testing::slurp(dir + "/file.txt"), "mine\n");
  EXPECT_EQ(testing::slurp(dir + "/mine/notes.txt"), "mine\n");
  // Missing parents are made (as convert's --out); one that cannot be is named.
  expect_one_line_error(run_lmforge("export --checkpoint run --to-hf file.txt/a/hf", dir),
                        {"--to-hf", "cannot create file.txt/a"});
  ASSERT_EQ(run_lmforge("export --checkpoint run --to-hf new/a/hf", dir).exit_code, 0);
  EXPECT_TRUE(fs::exists(dir + "/new/a/hf/config.json"));
  // Its temporary is its own: a user's DIR.tmp beside the target is left alone, as is one named
  // like a temporary of a process that is gone (pid 999999999 is above any pid_max).
  for (const char* d : {"/out.tmp", "/out.999999999.0.tmp"}) {
    fs::create_directories(dir + d);
    std::ofstream(dir + d + "/precious.txt") << "mine\n";
  }
  for (const char* size : {"1.5.3KB", "5Gb", "KB", "0MB", "5TB"})
    expect_one_line_error(
        run_lmforge(fmt::format("export --checkpoint run --to-hf out --max-shard-size {}", size),
                    dir),
        {"--max-shard-size", size});
  EXPECT_FALSE(fs::exists(dir + "/out"));
  ASSERT_EQ(run_lmforge("export --checkpoint run --to-hf out --max-shard-size 1kib", dir).exit_code,
            0);
  for (const char* d : {"/out.tmp", "/out.999999999.0.tmp"}) {
    EXPECT_EQ(testing::slurp(dir + d + "/precious.txt"), "mine\n") << d;
    fs::remove_all(dir + d);  // (the user's: no temporary of lmforge's is left, below)
  }
  EXPECT_TRUE(fs::exists(dir + "/out/model.safetensors.index.json"));  // 1,024-byte shards
  // Training again into the same run.dir without --resume would mix two runs.
  expect_one_line_error(run_lmforge("train tiny.yaml", dir), {"run.dir", "--resume"});
  // A checkpoint from another architecture.
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set model.n_layer=2 --set train.steps=4 --resume", dir),
      {"model.n_layer", "checkpoint"});
  // ... or another tokenizer of the same size (the ids would mean other text).
  {
    std::ofstream f(dir + "/words.txt");
    for (int i = 0; i < 300; ++i) f << "the words of line " << i << " and more words\n";
  }
  ASSERT_EQ(run_lmforge("tokenizer train --vocab-size 257 --out tok257 words.txt", dir).exit_code,
            0);
  // (a tokenizer there is replaced only with --force: data made with it would no longer match)
  const std::string tok257 = testing::slurp(dir + "/tok257/tokenizer.json");
  expect_one_line_error(run_lmforge("tokenizer train --vocab-size 258 --out tok257 words.txt", dir),
                        {"--out: tok257/tokenizer.json exists", "--force"});
  EXPECT_EQ(testing::slurp(dir + "/tok257/tokenizer.json"), tok257);
  ASSERT_EQ(
      run_lmforge("tokenizer train --vocab-size 258 --out tok257 words.txt --force", dir).exit_code,
      0);
  EXPECT_NE(testing::slurp(dir + "/tok257/tokenizer.json"), tok257);
  ASSERT_EQ(
      run_lmforge("tokenizer train --vocab-size 257 --out tok257 words.txt --force", dir).exit_code,
      0);
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train= --set data.text=words.txt "
                                    "--set data.tokenizer=tok257 --set train.steps=4 --resume",
                                    dir),
                        {"trained with tokenizer byte", "data.tokenizer"});
  // Corrupt weights file.
  std::string ckpt = dir + "/run/checkpoints/step-00000002";
  fs::resize_file(ckpt + "/model.safetensors", 100);
  expect_one_line_error(run_lmforge("generate --checkpoint run --prompt hi", dir),
                        {"model.safetensors"});
  expect_one_line_error(run_lmforge("generate --checkpoint nowhere --prompt hi", dir),
                        {"nowhere", "no checkpoint"});
  expect_no_tmp_files(dir);
}

// Standard output that cannot be written (a full disk: /dev/full) is an error, not exit 0 with
// the output cut short: what the loops print, and what a command prints last.
TEST(CliErrors, StdoutWriteFailuresAreErrors) {
  std::string dir = testing::temp_dir("cli-stdout");
  tiny_config(dir);
  ASSERT_EQ(run_lmforge("train tiny.yaml", dir).exit_code, 0);
  std::ofstream(dir + "/full.sh") << "exec \"$@\" > /dev/full\n";
  {
    std::ofstream big(dir + "/big.txt");
    for (int i = 0; i < 20000; ++i)
      big << "In the beginning God created the heaven and the earth.\n";
    std::ofstream(dir + "/ids.txt") << "72 101 108 108 111\n";
  }
  for (const std::string args :
       {"tokenizer encode --tokenizer byte big.txt", "tokenizer decode --tokenizer byte ids.txt",
        "tokenizer info --tokenizer byte", "info run",
        "generate --checkpoint run --prompt Hi --max-tokens 4"}) {
    const testing::RunResult r = run_lmforge(args, dir, "sh full.sh");
    expect_one_line_error(r, {"standard output: write failed"});
  }
  // train whose reader went away (`train | head`, SIGPIPE ended it unsaved): the run goes on,
  // saves, and says so.
  std::ofstream(dir + "/head.sh") << "set -o pipefail\n\"$@\" | head -c 1 > /dev/null\n";
  const testing::RunResult t = run_lmforge(
      "train tiny.yaml --set train.steps=30 --set train.log_every=1 --set run.dir=piped", dir,
      "bash head.sh");
  expect_one_line_error(t, {"standard output: write failed (Broken pipe)", "reading it ended"});
  EXPECT_TRUE(fs::exists(dir + "/piped/checkpoints/step-00000030/manifest.json"));
}

// An output another process is writing (its DIR/.lock held: here by flock(1)) is refused, for
// prepare and convert as for train: two prepares lost one's summary, two converts' results
// replaced each other, each saying it succeeded.
TEST(CliErrors, OutputsInUseAreRefused) {
  std::string dir = testing::temp_dir("cli-in-use");
  tiny_config(dir);
  ASSERT_EQ(run_lmforge("train tiny.yaml", dir).exit_code, 0);
  std::ofstream(dir + "/in.txt") << "In the beginning God created the heaven and the earth.\n";
  for (const std::string out : {"p", "c"}) fs::create_directories(dir + "/" + out);
  const std::string hold = "flock p/.lock flock c/.lock ";  // (the lmforge command inside)
  expect_one_line_error(
      run_lmforge("prepare --input in.txt --tokenizer byte --output p", dir, hold),
      {"--output: p is in use by another lmforge"});
  expect_one_line_error(run_lmforge("convert --from-checkpoint run --out c", dir, hold),
                        {"--out: c is in use by another lmforge"});
  EXPECT_FALSE(fs::exists(dir + "/p/data"));
  EXPECT_FALSE(fs::exists(dir + "/c/checkpoints"));
  // The holder's lock files are not the refused command's to remove.
  EXPECT_TRUE(fs::exists(dir + "/p/.lock"));
  EXPECT_TRUE(fs::exists(dir + "/c/.lock"));
}

TEST(Cli, HelpOnEverySubcommand) {
  std::string dir = testing::temp_dir("cli-help");
  for (std::string cmd : {"--help", "train --help", "generate --help", "bench train --help"}) {
    auto r = run_lmforge(cmd, dir);
    EXPECT_EQ(r.exit_code, 0) << cmd << r.err;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << cmd << r.out;
  }
  expect_one_line_error(run_lmforge("frobnicate", dir),
                        {"unknown command \"frobnicate\"", "train, generate"});
  // bench train's distillation options: a teacher only with it, of the model's vocabulary.
  expect_one_line_error(run_lmforge("bench train --model gpt2-tiny --teacher gpt2", dir),
                        {"--teacher", "only with --objective distill"});
  expect_one_line_error(
      run_lmforge("bench train --model gpt2-tiny --objective distill --teacher llama3-tiny", dir),
      {"--teacher", "llama3-tiny", "vocabulary of 128256"});
}

// Hostile inputs across commands: one line naming the culprit, exit 1, nothing written.
TEST(CliErrors, HostileInputsAreOneLineErrors) {
  std::string dir = testing::temp_dir("cli-hostile");
  tiny_config(dir);
  fs::create_directories(dir + "/adir");
  // A bad option is one "lmforge:" line like every other error.
  expect_one_line_error(run_lmforge("train tiny.yaml --bogus", dir), {"--bogus", "--help"});
  // A directory where a file belongs is named, not read as empty.
  expect_one_line_error(run_lmforge("train adir", dir), {"adir", "is a directory"});
  expect_one_line_error(run_lmforge("tokenizer decode --tokenizer byte adir", dir),
                        {"adir", "is a directory"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train= --set data.text=adir", dir),
                        {"data.text: adir", "not a file", "data.train"});
  std::ofstream(dir + "/empty.txt").flush();
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set data.train= --set data.text=empty.txt", dir),
      {"data.text: empty.txt", "empty"});
  std::ofstream(dir + "/short.txt") << "hello\n";
  expect_one_line_error(
      run_lmforge("train tiny.yaml --set data.train= --set data.text=short.txt", dir),
      {"data.text: short.txt", "no sample"});
  // Mixing weights that would overflow their sum (one source would get every sample).
  expect_one_line_error(run_lmforge("train tiny.yaml --set data.train=train.bin@1e308", dir),
                        {"data.train", "1e308", "below 1e12"});
  expect_one_line_error(run_lmforge("schedule tiny.yaml --out s.svg --set train.lr=0", dir),
                        {"train.lr", "positive"});
  expect_one_line_error(run_lmforge("bench matmul --shape 4x4x4x4", dir), {"--shape", "4x4x4x4"});
  expect_one_line_error(run_lmforge("tokenizer encode --tokenizer byte --field foo", dir),
                        {"--field", "--jsonl"});
  // Nothing to learn from, nothing a log axis can show: refused, not an empty result.
  std::ofstream(dir + "/nothing.txt").flush();
  expect_one_line_error(
      run_lmforge("tokenizer train --vocab-size 300 --out tok-empty nothing.txt", dir),
      {"tokenizer train", "no text in nothing.txt"});
  EXPECT_FALSE(fs::exists(dir + "/tok-empty"));
  std::ofstream(dir + "/neg.jsonl") << "{\"step\": 1, \"loss\": -1}\n{\"step\": 2, \"loss\": 0}\n";
  expect_one_line_error(run_lmforge("plot neg.jsonl --out neg.svg --log-y", dir),
                        {"--log-y", "none of the 2 \"loss\" values is positive"});
  // Ranges YAML and the model take but training cannot.
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.init_std=-1", dir),
                        {"model.init_std", ">= 0"});
  // Values no model or optimizer can take.
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.norm_eps=-1", dir),
                        {"model.norm_eps", "positive"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.n_layer=2000000000", dir),
                        {"model.n_layer", "beyond any model"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.beta1=2", dir),
                        {"train.beta1", "[0, 1)"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.keep_last=-1", dir),
                        {"train.keep_last"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.seed=-1", dir),
                        {"train.seed", "a non-negative integer"});
  // generate --seed: -1 and 2^64 were wrapped to 2^64 - 1 by the parser.
  for (const char* seed : {"-1", "18446744073709551616"})
    expect_one_line_error(
        run_lmforge(std::string("generate --checkpoint run --prompt x --seed ") + seed, dir),
        {"--seed", seed, "18446744073709551615"});
  expect_one_line_error(run_lmforge("train tiny.yaml --set run.dir=", dir), {"run.dir", "empty"});
  expect_one_line_error(run_lmforge("lr-find tiny.yaml --end inf", dir), {"lr-find", "finite"});
  // A flag's validation split replaces the config's (a count for a fraction), as flags override
  // CONFIG's keys; both flags at once are refused.
  std::ofstream(dir + "/split.txt") << "one\n\ntwo\n\nthree\n\nfour\n";
  std::ofstream(dir + "/split.yaml")
      << "sources:\n  s: {inputs: [split.txt], text_mode: blank_line}\nval_fraction: 0.5\n";
  auto split =
      run_lmforge("prepare split.yaml --output split-out --tokenizer byte --val-docs 1", dir);
  EXPECT_EQ(split.exit_code, 0) << split.err;
  // A fraction that draws no document (one file, one document) is said, with the way on.
  std::ofstream(dir + "/one.txt") << "text a\n";
  auto none = run_lmforge(
      "prepare --input one.txt --output frac-out --tokenizer byte --val-fraction 0.01", dir);
  EXPECT_EQ(none.exit_code, 0) << none.err;
  EXPECT_NE(none.err.find("drew none of its 1 documents for validation"), std::string::npos)
      << none.err;
  EXPECT_NE(none.err.find("--val-docs N"), std::string::npos) << none.err;
  expect_one_line_error(
      run_lmforge("prepare split.yaml --output split-2 --tokenizer byte --val-docs 1 "
                  "--val-fraction 0.5",
                  dir),
      {"val_docs", "val_fraction"});
  std::ofstream(dir + "/bad-prepare.yaml") << "output: [1]\n";
  expect_one_line_error(run_lmforge("prepare bad-prepare.yaml", dir),
                        {"bad-prepare.yaml:1", "output", "wrong type"});
  // A model whose training state cannot fit in memory is refused before allocating any of it.
  expect_one_line_error(run_lmforge("train tiny.yaml --set model.n_embd=65536 --set "
                                    "model.n_head=64 --set model.n_layer=64",
                                    dir),
                        {"out of memory", "AdamW state", "GiB is available"});
  // So is a micro-batch whose activations cannot (their arena is mapped untouched: without
  // counting it the run passed the check and was killed by the kernel mid-step).
  expect_one_line_error(run_lmforge("train tiny.yaml --set train.batch_size=200000", dir),
                        {"out of memory", "micro-batch's activations", "lower train.batch_size",
                         "train.activation_checkpointing"});
  // Ids the tokenizer does not have.
  std::ofstream(dir + "/ids.txt") << "300 1 2\n";
  expect_one_line_error(run_lmforge("tokenizer decode --tokenizer byte ids.txt", dir),
                        {"ids.txt:1", "id 300", "outside"});
  std::ofstream(dir + "/gap.txt") << "100257 100261\n";  // cl100k assigns no 100261..100275
  expect_one_line_error(
      run_lmforge("tokenizer decode --tokenizer '" + testing::shared_tokenizers_dir() +
                      "/cl100k_base.tiktoken' gap.txt",
                  dir),
      {"gap.txt:1", "id 100261", "unassigned"});
  // prepare: a source name is one directory under --output; a .gz that is not gzip.
  std::ofstream(dir + "/doc.txt") << "In the beginning God created the heaven and the earth.\n";
  expect_one_line_error(run_lmforge("prepare --input doc.txt --output prep --name ../esc", dir),
                        {"source name", "../esc"});
  EXPECT_FALSE(fs::exists(dir + "/esc"));
  std::ofstream(dir + "/plain.jsonl.gz") << "{\"text\": \"not compressed\"}\n";
  expect_one_line_error(run_lmforge("prepare --input plain.jsonl.gz --output prep2", dir),
                        {"plain.jsonl.gz", "not gzip data"});
  // Every record skipped (a misspelt field): an error, and no empty shards left to train on.
  std::ofstream(dir + "/texts.jsonl") << "{\"text\": \"a b\"}\n{\"text\": \"c\"}\n";
  expect_one_line_error(run_lmforge("prepare --input texts.jsonl --output prep3 --field txt", dir),
                        {"texts.jsonl", "no documents kept", "missing_field", "--field"});
  EXPECT_FALSE(fs::exists(dir + "/prep3"));
  // ... but a source directory that was there before is not removed, nor what it holds.
  fs::create_directories(dir + "/prep4/data");
  std::ofstream(dir + "/prep4/data/mine.txt") << "mine\n";
  expect_one_line_error(run_lmforge("prepare --input texts.jsonl --output prep4 --field txt", dir),
                        {"no documents kept"});
  EXPECT_EQ(testing::slurp(dir + "/prep4/data/mine.txt"), "mine\n");
  expect_one_line_error(
      run_lmforge("prepare --input texts.jsonl --output prep3 --val-fraction -0.5", dir),
      {"--val-fraction", "[0, 1)", "-0.5"});
  expect_one_line_error(run_lmforge("launch --nproc 99999 -- info run", dir),
                        {"--nproc 99999", "4096"});
  // The longest schedule plots in bounded time.
  auto r = run_lmforge("schedule tiny.yaml --set train.steps=9223372036854775807 --out s.svg", dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  expect_no_tmp_files(dir);
}

}  // namespace lmforge
