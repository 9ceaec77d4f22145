// Multiple-choice evaluation by log-likelihood, as nanoGPT's and llm.c's HellaSwag eval runs it:
// each choice is the context, a space and the ending (encoded whole, the ending's tokens those
// after the context's, as lm-eval-harness splits them), and the model scores each ending's tokens
// given everything before them. The predicted
// choice has the highest sum of log-probabilities (acc) or the highest mean per ending token
// (acc_norm: llm.c's, the lowest average loss).
//
//   std::vector<ChoiceItem> items = read_hellaswag("hellaswag_val.jsonl");
//   ChoiceResult r = score_choices(model, *tok, items);
//   fmt::print("acc {:.4f} acc_norm {:.4f}\n", r.acc(), r.acc_norm());
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lmforge/nn/transformer.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

struct ChoiceItem {
  std::string context;
  std::vector<std::string> endings;
  int label = 0;  // the right ending's index
};

// HellaSwag's JSONL (one example per line: "ctx", "endings" (strings), "label" (an integer, or
// a string of one as the Hugging Face copy has it); other fields ignored). Throws Error naming
// the file and line for anything else; at most `limit` items (0 = all).
std::vector<ChoiceItem> read_hellaswag(const std::string& path, int64_t limit = 0);

struct ChoiceScore {
  std::vector<double> logp;     // per ending: the sum of its tokens' log-probabilities
  std::vector<int64_t> tokens;  // per ending: its scored tokens
  int pred = 0, pred_norm = 0;  // argmax of logp, of logp / tokens (first on ties)
};

struct ChoiceResult {
  std::vector<ChoiceScore> scores;  // per item
  int64_t correct = 0, correct_norm = 0;
  double acc() const { return scores.empty() ? 0.0 : double(correct) / scores.size(); }
  double acc_norm() const { return scores.empty() ? 0.0 : double(correct_norm) / scores.size(); }
};

// Whether the choices start with the tokenizer's BOS (its post-processor's, where it has one):
// lm-eval-harness's rule, for Gemma-family models (which score poorly without it); not for the
// others, as nanoGPT's and llm.c's HellaSwag for GPT-2 and lm-eval-harness's default.
bool choices_take_bos(const ModelConfig& c);

// Every item's choices as rows of token ids: [BOS with `bos`] context + " " + ending, the last
// `scored` of them the ending's. A row longer than max_t + 1 keeps its last max_t + 1 tokens (the
// context cut from the left); an ending that alone does not fit, or ids beyond `vocab`, are an
// Error naming the item.
struct ChoiceRows {
  std::vector<std::vector<int32_t>> ids;
  std::vector<int64_t> scored;
  std::vector<size_t> item;  // the item each row belongs to (rows in item, then ending order)
  int64_t longest = 0;       // tokens of the longest row, less one (the positions it needs)
};
ChoiceRows choice_rows(const Tokenizer& tok, const std::vector<ChoiceItem>& items, int64_t max_t,
                       int64_t vocab, bool bos = false);

// Scores the rows with forwards of the model as planned, (B, T) rows at a time (T >= every
// row's positions), and totals the items. The forwards go through Transformer::forward, so a
// model under DataParallel gathers its shards as in evaluation. progress(so_far) after each item.
ChoiceResult score_rows(Transformer& model, const std::vector<ChoiceItem>& items,
                        const ChoiceRows& rows,
                        const std::function<void(const ChoiceResult&)>& progress = {});

// Both for a model of its own: planned for the largest item's choices and forwards only (it
// cannot train afterwards); rows cut to the model's context.
ChoiceResult score_choices(Transformer& model, const Tokenizer& tok,
                           const std::vector<ChoiceItem>& items,
                           const std::function<void(const ChoiceResult&)>& progress = {});

}  // namespace lmforge
