#include "lmforge/eval/choices.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"

namespace lmforge {

std::vector<ChoiceItem> read_hellaswag(const std::string& path, int64_t limit) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    fail("{}: is a directory; give a HellaSwag JSONL file", path);
  std::ifstream in(path);
  if (!in) fail("{}: cannot open (a HellaSwag JSONL file: ctx, endings, label per line)", path);
  std::vector<ChoiceItem> items;
  std::string line;
  for (int64_t no = 1; std::getline(in, line); ++no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto bad = [&](const std::string& what) {
      fail("{}:{}: {}; expected HellaSwag's {{\"ctx\": ..., \"endings\": [...], \"label\": N}}",
           path, no, what);
    };
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      bad(fmt::format("not JSON ({})", e.what()));
    }
    if (!j.is_object()) bad("not a JSON object");
    ChoiceItem item;
    if (!j.contains("ctx") || !j["ctx"].is_string()) bad("no string \"ctx\"");
    item.context = j["ctx"].get<std::string>();
    if (item.context.empty()) bad("an empty \"ctx\"");
    if (!j.contains("endings") || !j["endings"].is_array() || j["endings"].size() < 2)
      bad("no \"endings\" array of at least 2 strings");
    for (const auto& e : j["endings"]) {
      if (!e.is_string()) bad("an ending that is not a string");
      if (e.get<std::string>().empty()) bad("an empty ending");
      item.endings.push_back(e.get<std::string>());
    }
    const auto& label = j.contains("label") ? j["label"] : nlohmann::json();
    int64_t l = -1;
    if (label.is_number_integer()) {
      l = label.get<int64_t>();
    } else if (label.is_string() && !label.get<std::string>().empty() &&
               label.get<std::string>().find_first_not_of("0123456789") == std::string::npos &&
               label.get<std::string>().size() < 9) {
      l = std::stoll(label.get<std::string>());
    }
    if (l < 0 || l >= static_cast<int64_t>(item.endings.size()))
      bad(fmt::format("\"label\" must be the index of one of its {} endings, got {}",
                      item.endings.size(), label.dump()));
    item.label = static_cast<int>(l);
    items.push_back(std::move(item));
    if (limit > 0 && static_cast<int64_t>(items.size()) == limit) break;
  }
  if (items.empty()) fail("{}: no examples", path);
  return items;
}

bool choices_take_bos(const ModelConfig& c) { return c.arch.starts_with("gemma"); }

ChoiceRows choice_rows(const Tokenizer& tok, const std::vector<ChoiceItem>& items, int64_t max_t,
                       int64_t vocab, bool bos) {
  ChoiceRows rows;
  for (size_t i = 0; i < items.size(); ++i) {
    const ChoiceItem& it = items[i];
    const std::vector<int32_t> ctx = tok.encode(it.context, false, bos);
    if (ctx.empty()) fail("item {}: its context encodes to no tokens", i + 1);
    for (const std::string& e : it.endings) {
      // The whole text encoded at once, the ending's tokens those after the context's (where a
      // token straddles the two, from the first that differs): as lm-eval-harness splits it,
      // right for tokenizers that mark word starts (SentencePiece's "▁") as for GPT-2's.
      std::vector<int32_t> ids = tok.encode(it.context + " " + e, false, bos);
      const size_t split = static_cast<size_t>(
          std::mismatch(ctx.begin(), ctx.end(), ids.begin(), ids.end()).first - ctx.begin());
      const int64_t end = static_cast<int64_t>(ids.size() - split);
      if (end == 0 || split == 0)
        fail("item {}: the ending \"{}\" encodes to no tokens of its own", i + 1, e);
      if (end > max_t)
        fail("item {}: an ending of {} tokens does not fit the model's context of {}", i + 1, end,
             max_t);
      if (static_cast<int64_t>(ids.size()) > max_t + 1)  // the context cut from the left
        ids.erase(ids.begin(), ids.end() - (max_t + 1));
      for (int32_t id : ids)
        if (id < 0 || id >= vocab)
          fail(
              "item {}: token id {} is outside the model's vocabulary of {}; the tokenizer does "
              "not match the model",
              i + 1, id, vocab);
      rows.longest = std::max<int64_t>(rows.longest, static_cast<int64_t>(ids.size()) - 1);
      rows.ids.push_back(std::move(ids));
      rows.scored.push_back(end);
      rows.item.push_back(i);
    }
  }
  return rows;
}

ChoiceResult score_rows(Transformer& model, const std::vector<ChoiceItem>& items,
                        const ChoiceRows& rows,
                        const std::function<void(const ChoiceResult&)>& progress) {
  const int64_t B = model.planned_batch(), T = model.planned_seq();
  LMF_CHECK(rows.longest <= T, "choice rows of {} positions for a model planned for {}",
            rows.longest, T);
  constexpr int32_t kIgnore = -100;
  Tensor tokens = Tensor::empty({B, T}, DType::kI32), targets = Tensor::empty({B, T}, DType::kI32);
  ChoiceResult out;
  out.scores.reserve(items.size());
  ChoiceScore s;  // the item being totalled
  size_t item = 0;
  auto finish_item = [&] {
    out.correct += s.pred == items[item].label;
    out.correct_norm += s.pred_norm == items[item].label;
    out.scores.push_back(std::move(s));
    s = ChoiceScore();
    ++item;
    if (progress) progress(out);
  };
  std::vector<double> logp;
  const size_t n = rows.ids.size();
  for (size_t r0 = 0; r0 < n; r0 += static_cast<size_t>(B)) {
    int32_t* tk = tokens.data<int32_t>();
    int32_t* tg = targets.data<int32_t>();
    std::fill(tk, tk + B * T, 0);
    std::fill(tg, tg + B * T, kIgnore);
    const size_t rn = std::min(n - r0, static_cast<size_t>(B));
    for (size_t b = 0; b < rn; ++b) {
      const std::vector<int32_t>& ids = rows.ids[r0 + b];
      const int64_t len = static_cast<int64_t>(ids.size()) - 1;  // positions
      for (int64_t t = 0; t < len; ++t) {
        tk[b * T + t] = ids[t];
        if (t >= len - rows.scored[r0 + b]) tg[b * T + t] = ids[t + 1];
      }
    }
    model.forward(tokens, targets, kIgnore);
    model.row_logps(logp);
    for (size_t b = 0; b < rn; ++b) {
      if (!std::isfinite(logp[b]))  // NaN compares false: every item would pick ending 0
        fail("item {}: its log-likelihood is {}; the model's weights have diverged",
             rows.item[r0 + b] + 1, logp[b]);
      while (rows.item[r0 + b] != item) finish_item();
      const size_t c = s.logp.size();
      s.logp.push_back(logp[b]);
      s.tokens.push_back(model.row_targets()[b]);
      const auto norm = [&](size_t k) {
        return s.logp[k] / static_cast<double>(std::max<int64_t>(1, s.tokens[k]));
      };
      if (s.logp[c] > s.logp[s.pred]) s.pred = static_cast<int>(c);
      if (norm(c) > norm(s.pred_norm)) s.pred_norm = static_cast<int>(c);
    }
  }
  if (!s.logp.empty()) finish_item();
  return out;
}

ChoiceResult score_choices(Transformer& model, const Tokenizer& tok,
                           const std::vector<ChoiceItem>& items,
                           const std::function<void(const ChoiceResult&)>& progress) {
  const ModelConfig& c = model.config();
  const ChoiceRows rows = choice_rows(tok, items, c.max_seq_len, c.vocab_size, choices_take_bos(c));
  size_t most = 0;  // endings of the largest item: one forward per item
  for (const ChoiceItem& it : items) most = std::max(most, it.endings.size());
  model.plan_forward_only(static_cast<int64_t>(most), std::max<int64_t>(1, rows.longest));
  return score_rows(model, items, rows, progress);
}

}  // namespace lmforge
