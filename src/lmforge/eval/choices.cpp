#include "lmforge/eval/choices.h"

#include <fmt/core.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"

namespace lmforge {

std::vector<ChoiceItem> read_hellaswag(const std::string& path, int64_t limit) {
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

namespace {
// One choice's tokens: the context's, then the ending's; `scored` of the last ones are the
// ending's.
struct Row {
  std::vector<int32_t> ids;
  int64_t scored = 0;
};
}  // namespace

ChoiceResult score_choices(Transformer& model, const Tokenizer& tok,
                           const std::vector<ChoiceItem>& items,
                           const std::function<void(const ChoiceResult&)>& progress) {
  const int64_t max_t = model.config().max_seq_len;
  // Tokenize everything first: the plan's (B, T) is the largest item's.
  std::vector<std::vector<Row>> rows(items.size());
  int64_t B = 0, T = 1;
  for (size_t i = 0; i < items.size(); ++i) {
    const ChoiceItem& it = items[i];
    const std::vector<int32_t> ctx = tok.encode(it.context);
    if (ctx.empty()) fail("item {}: its context encodes to no tokens", i + 1);
    for (const std::string& e : it.endings) {
      Row r;
      const std::vector<int32_t> end = tok.encode(" " + e);
      if (static_cast<int64_t>(end.size()) > max_t)
        fail("item {}: an ending of {} tokens does not fit the model's context of {}", i + 1,
             end.size(), max_t);
      r.ids = ctx;
      r.ids.insert(r.ids.end(), end.begin(), end.end());
      r.scored = static_cast<int64_t>(end.size());
      if (static_cast<int64_t>(r.ids.size()) > max_t + 1)  // the context cut from the left
        r.ids.erase(r.ids.begin(), r.ids.end() - (max_t + 1));
      T = std::max<int64_t>(T, static_cast<int64_t>(r.ids.size()) - 1);
      rows[i].push_back(std::move(r));
    }
    B = std::max<int64_t>(B, static_cast<int64_t>(it.endings.size()));
  }
  for (const auto& rs : rows)
    for (const Row& r : rs)
      for (int32_t id : r.ids)
        if (id < 0 || id >= model.config().vocab_size)
          fail(
              "token id {} is outside the model's vocabulary of {}; the tokenizer does not "
              "match the model",
              id, model.config().vocab_size);

  model.plan_forward_only(B, T);
  constexpr int32_t kIgnore = -100;
  Tensor tokens = Tensor::empty({B, T}, DType::kI32), targets = Tensor::empty({B, T}, DType::kI32);
  ChoiceResult out;
  std::vector<double> logp;
  for (size_t i = 0; i < items.size(); ++i) {
    int32_t* tk = tokens.data<int32_t>();
    int32_t* tg = targets.data<int32_t>();
    std::fill(tk, tk + B * T, 0);
    std::fill(tg, tg + B * T, kIgnore);
    for (size_t c = 0; c < rows[i].size(); ++c) {
      const Row& r = rows[i][c];
      const int64_t n = static_cast<int64_t>(r.ids.size()) - 1;  // positions
      for (int64_t t = 0; t < n; ++t) {
        tk[c * T + t] = r.ids[t];
        if (t >= n - r.scored) tg[c * T + t] = r.ids[t + 1];
      }
    }
    model.forward(tokens, targets, kIgnore);
    model.row_logps(logp);
    ChoiceScore s;
    for (size_t c = 0; c < rows[i].size(); ++c) {
      s.logp.push_back(logp[c]);
      s.tokens.push_back(model.row_targets()[c]);
      const double norm = s.logp[c] / std::max<int64_t>(1, s.tokens[c]);
      if (s.logp[c] > s.logp[s.pred]) s.pred = static_cast<int>(c);
      if (norm > s.logp[s.pred_norm] / std::max<int64_t>(1, s.tokens[s.pred_norm]))
        s.pred_norm = static_cast<int>(c);
    }
    out.correct += s.pred == items[i].label;
    out.correct_norm += s.pred_norm == items[i].label;
    out.scores.push_back(std::move(s));
    if (progress) progress(out);
  }
  return out;
}

}  // namespace lmforge
