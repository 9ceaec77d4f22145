// Subcommands of the lmforge CLI, one file each; main.cpp wires them into CLI11.
#pragma once

#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lmforge/eval/generate.h"
#include "lmforge/io/config.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge::app {

// A numeric option's range [lo, hi) (hi: none when infinite), refused in one line naming it:
// "--batch: must be at least 1, got 0" (CLI11's own ranges print DBL_MAX in full).
inline CLI::Validator in_range(double lo, double hi = HUGE_VAL) {
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (end == s.c_str() || *end != '\0' || !(v >= lo && v < hi))
          return hi == HUGE_VAL ? fmt::format("must be at least {}, got {}", lo, s)
                                : fmt::format("must be in [{}, {}), got {}", lo, hi, s);
        return "";
      },
      "");
}

// An unsigned 64-bit option (a seed): digits only, at most 2^64 - 1, refused in one line otherwise
// (CLI11 itself wraps -1 and 2^64 around to 2^64 - 1).
inline CLI::Validator unsigned_64() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        uint64_t v = 0;
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (s.empty() || ec != std::errc() || end != s.data() + s.size())
          return fmt::format("expected an integer from 0 to 18446744073709551615, got {}", s);
        return "";
      },
      "");
}

// What an out-of-memory error suggests (set_oom_hint, core/tensor.h) in training and generation.
inline constexpr const char* kTrainingOomHint =
    "reduce train.batch_size (train.grad_accum keeps the global batch) or train.seq_len, set "
    "train.activation_checkpointing: full, or choose a smaller model (lmforge plan shows what "
    "fits)";
inline constexpr const char* kGenerationOomHint =
    "lower --max-tokens or --batch, or use --precision bf16";
inline constexpr const char* kPrepareOomHint =
    "lower the source's max_document_bytes (default 64 MiB: larger documents are skipped), or run "
    "with fewer threads (OMP_NUM_THREADS=1)";
inline constexpr const char* kTokenizerTrainOomHint =
    "train on less text or with a smaller --vocab-size (the distinct words and pairs it counts "
    "grow with both)";

extern const char* const kDefaultConfigYaml;

// The config `lmforge train [FILE] [--set K=V]...` runs: FILE, or the embedded default as the
// base, then the --set assignments (train.cpp).
lmforge::Config load_run_config(const std::string& file, const std::vector<std::string>& sets);

// train's command line (train.cpp).
struct TrainArgs {
  std::string config;
  std::vector<std::string> sets;
  std::string resume;
  int64_t start_step = -1;
  bool reset_optimizer = false;
};
void add_train_args(CLI::App* cmd, TrainArgs& o);
// Parses train's arguments (after "train") as the command would, loads their config and checks
// its values (validate_train_config) and `ranks`, the number launch starts, so that launch says a
// mistake once instead of once per rank; false when they asked for --help (printed).
bool check_train_command(const std::vector<std::string>& args, int ranks);
void add_train(CLI::App& app);
void add_generate(CLI::App& app);
void add_chat(CLI::App& app);  // generate.cpp
void add_eval(CLI::App& app);
void add_plan(CLI::App& app);  // memory, traffic and time per strategy  // multiple-choice accuracy
                               // (HellaSwag)
void add_bench(CLI::App& app);
void add_tokenizer(CLI::App& app);
void add_prepare(CLI::App& app);
void add_hf(CLI::App& app);  // convert, export, info
// A Hugging Face model directory's tokenizer, checked against its config.json's vocabulary (hf.cpp;
// convert, and generate/chat with hf:DIR).
std::unique_ptr<lmforge::Tokenizer> hf_dir_tokenizer(const std::string& dir,
                                                     const lmforge::ModelConfig& model);
// A checkpoint's model and tokenizer (generate.cpp): CHECKPOINT is a checkpoint or run directory
// (a LoRA checkpoint's adapters folded into the weights), or hf:DIR, a Hugging Face model
// directory read as convert reads it; precision fp32 or bf16 (the weights held in bf16). The
// sampling options get the tokenizer's stop tokens (and hf:DIR's generation_config ones) and
// vocabulary limit. (generate, chat, eval)
struct Loaded {
  std::unique_ptr<lmforge::Transformer> model;
  std::unique_ptr<lmforge::Tokenizer> tok;
};
Loaded load_for_sampling(const std::string& checkpoint, const std::string& precision,
                         lmforge::SamplingOptions& s);
// Calls fn with string field `field` of each line of a JSONL file (blank lines skipped); one
// error naming the file and line for a line without it (tokenizer.cpp; tokenizer encode --jsonl,
// generate --prompts).
void for_each_jsonl_string(const std::string& path, const std::string& field,
                           const std::function<void(std::string)>& fn);
void add_plot(CLI::App& app);
void add_lr_find(CLI::App& app);
void add_launch(CLI::App& app);  // N ranks of lmforge through mpirun

}  // namespace lmforge::app
