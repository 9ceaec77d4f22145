// Multiple-choice evaluation by log-likelihood, as nanoGPT's and llm.c's HellaSwag eval runs it:
// each choice is the context followed by the ending (" " + ending, tokenized apart from the
// context), and the model scores each ending's tokens given everything before them. The predicted
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

// Scores every item with the model (which this plans for the largest item and runs forwards
// only: it cannot train afterwards). A choice longer than the model's context keeps its last
// max_seq_len + 1 tokens (the context is cut from the left; an ending that alone does not fit is
// an Error naming the item). progress(so_far) after each item, if given.
ChoiceResult score_choices(Transformer& model, const Tokenizer& tok,
                           const std::vector<ChoiceItem>& items,
                           const std::function<void(const ChoiceResult&)>& progress = {});

}  // namespace lmforge
