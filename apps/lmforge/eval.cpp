// lmforge eval --checkpoint PATH --hellaswag FILE [--limit N] [--scores OUT.jsonl]
#include <fmt/core.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "lmforge/eval/choices.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/train/checkpoint.h"
#include "lmforge/train/progress.h"

namespace lmforge::app {

void add_eval(CLI::App& app) {
  struct Opts {
    std::string checkpoint, hellaswag, scores;
    int64_t limit = 0;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "eval",
      "Multiple-choice accuracy of a checkpoint (HellaSwag, as nanoGPT and llm.c score it)");
  cmd->add_option("--checkpoint", o->checkpoint,
                  "Checkpoint directory, a run directory, or hf:DIR (a Hugging Face model "
                  "directory, read as convert reads it)")
      ->required();
  cmd->add_option("--hellaswag", o->hellaswag,
                  "HellaSwag JSONL (e.g. hellaswag_val.jsonl: ctx, endings, label per line)")
      ->required();
  cmd->add_option("--limit", o->limit, "Score the first N examples only; 0 = all")
      ->capture_default_str();
  cmd->add_option("--scores", o->scores,
                  "Write each example's per-ending log-likelihoods and token counts here (JSONL)");
  cmd->callback([o] {
    if (o->limit < 0) fail("--limit: must be >= 0, got {}", o->limit);
    const std::vector<ChoiceItem> items = read_hellaswag(o->hellaswag, o->limit);
    if (!o->scores.empty())  // before the scoring, not after it
      check_output_file(o->scores, "--scores", "scores.jsonl");
    SamplingOptions unused;  // (eval samples nothing)
    Loaded l = load_for_sampling(o->checkpoint, "fp32", unused);
    Transformer& model = *l.model;
    const Tokenizer* tok = l.tok.get();
    const auto t0 = std::chrono::steady_clock::now();
    const bool tty = Progress::stdout_is_tty();  // a live count on a terminal
    ChoiceResult r;
    try {
      r = score_choices(model, *tok, items, [&](const ChoiceResult& so_far) {
        const size_t done = so_far.scores.size();
        if (tty && (done % 10 == 0 || done == items.size())) {
          fmt::print("\rhellaswag {}/{} | acc {:.4f} | acc_norm {:.4f}", done, items.size(),
                     so_far.acc(), so_far.acc_norm());
          std::fflush(stdout);
        }
      });
    } catch (const Error& e) {  // (an item's: name the file)
      fail("{}: {}", o->hellaswag, e.what());
    }
    if (tty) fmt::print("\n");
    if (!o->scores.empty()) {
      std::string lines;
      for (size_t i = 0; i < items.size(); ++i) {
        const ChoiceScore& s = r.scores[i];
        lines += nlohmann::json({{"label", items[i].label},
                                 {"logp", s.logp},
                                 {"tokens", s.tokens},
                                 {"pred", s.pred},
                                 {"pred_norm", s.pred_norm}})
                     .dump() +
                 "\n";
      }
      write_file_atomic(o->scores, lines);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("hellaswag: {} examples, acc {:.4f}, acc_norm {:.4f} ({:.1f} s; {})\n", items.size(),
               r.acc(), r.acc_norm(), s, o->hellaswag);
  });
}

}  // namespace lmforge::app
