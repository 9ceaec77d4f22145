#include "lmforge/data/loader.h"

#include <algorithm>
#include <map>

#include "lmforge/core/error.h"

namespace lmforge {

std::vector<DataSourceSpec> parse_data_spec(const std::string& spec, const std::string& key) {
  std::vector<DataSourceSpec> out;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t comma = spec.find(',', pos);
    std::string item =
        spec.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    pos = comma == std::string::npos ? spec.size() + 1 : comma + 1;
    auto trim = [](std::string t) {  // (a YAML list written "a@0.7, b@0.3")
      const size_t b = t.find_first_not_of(" \t"), e = t.find_last_not_of(" \t");
      return b == std::string::npos ? std::string() : t.substr(b, e - b + 1);
    };
    item = trim(item);
    if (item.empty()) fail("{}: an empty entry in \"{}\"; remove the extra comma", key, spec);
    DataSourceSpec s;
    size_t at = item.rfind('@');
    s.spec = trim(item.substr(0, at));
    if (at != std::string::npos) {
      char* end = nullptr;
      s.weight = std::strtod(item.c_str() + at + 1, &end);
      if (*end != '\0' || !(s.weight > 0) || !(s.weight < 1e12))  // (a sum that stays finite)
        fail(
            "{}: weight \"{}\" of {} must be a positive number below 1e12 (a share: "
            "a@0.7,b@0.3; an entry without @ weighs 1)",
            key, item.substr(at + 1), s.spec);
    }
    s.shards = expand_shards(s.spec, key);
    out.push_back(std::move(s));
  }
  if (out.empty())
    fail("{}: no data given; set it to shard paths (e.g. out/src or a@0.7,b@0.3)", key);
  return out;
}

Batch Batch::make(int64_t B, int64_t T) {
  Batch b{Tensor::empty({B, T}, DType::kI32),
          Tensor::empty({B, T}, DType::kI32),
          Tensor::empty({B, T}, DType::kI32),
          Tensor::empty({B, T}, DType::kI32),
          std::vector<int8_t>(static_cast<size_t>(B), -1),
          {}};
  b.positions.zero_();  // a batch filled by hand (tokens and targets) is one document per row
  b.doc_ids.zero_();
  return b;
}

std::vector<int64_t> target_counts(const std::vector<Batch>& batches, int32_t ignore_index) {
  std::vector<int64_t> out;
  for (const Batch& b : batches) {
    const int32_t* y = b.targets.data<int32_t>();
    int64_t n = 0;
    for (int64_t i = 0; i < b.targets.numel(); ++i) n += y[i] != ignore_index;
    out.push_back(n);
  }
  return out;
}

void check_packing(const std::string& packing) {
  if (packing != "none" && packing != "best_fit")
    fail("data.packing: expected none or best_fit, got \"{}\"", packing);
}

Loader::Loader(const std::vector<DataSourceSpec>& specs, const LoaderOptions& opt)
    : o_(opt), rng_(opt.seed) {
  check_packing(o_.packing);
  if (o_.world < 1 || o_.rank < 0 || o_.rank >= o_.world)
    fail("loader: rank {} of world {} is invalid", o_.rank, o_.world);
  if (o_.batch < 1 || o_.seq < 1)
    fail("loader: batch size {} and sequence length {} must be at least 1", o_.batch, o_.seq);
  if (o_.pairs && o_.batch % 2)
    fail(
        "train.batch_size: {} is odd; a preference pair takes two rows (chosen, rejected), make "
        "it even",
        o_.batch);
  if (o_.unpaired && o_.packing != "none")
    fail(
        "data.packing: {} packs documents, but KTO takes a row per response; set data.packing: "
        "none",
        o_.packing);
  if (o_.pairs && o_.packing != "none")
    fail(
        "data.packing: {} packs documents, but preference pairs take a row per response; set "
        "data.packing: none",
        o_.packing);
  double wsum = 0;
  for (const DataSourceSpec& spec : specs) {
    Source s;
    s.spec = spec.spec;
    s.weight = spec.weight;
    for (const std::string& p : spec.shards) {
      s.shards.push_back(TokenShard::open(p));
      if (s.shards.back().paired() && !o_.pairs && !o_.unpaired)
        fail(
            "{}: holds preference pairs (chosen and rejected responses), which only "
            "train.objective dpo, orpo, simpo and kto train on; set one, or prepare the data with "
            "format chat",
            p);
      if (s.shards.back().labelled() && !o_.unpaired)
        fail(
            "{}: holds labelled responses (prepare --format unpaired), which only "
            "train.objective kto trains on; set it, or prepare the data with format chat",
            p);
      s.tokens += s.shards.back().size();
    }
    if (o_.pairs || o_.unpaired)
      plan_pairs(s);
    else if (packs_best_fit())
      plan_best_fit(s);
    else
      plan_chunks(s);
    if (s.samples() < 1)
      fail(
          "{}: {} tokens make no sample of train.seq_len+1={} tokens; use more data or a shorter "
          "train.seq_len",
          s.spec, s.tokens, o_.seq + 1);
    total_tokens_ += s.tokens;
    wsum += s.weight;
    sources_.push_back(std::move(s));
  }
  double acc = 0;
  for (const Source& s : sources_) cumulative_.push_back(acc += s.weight / wsum);
}

void Loader::plan_chunks(Source& s) {
  const int64_t L = o_.seq + 1;
  s.first_span.push_back(0);
  for (size_t k = 0; k < s.shards.size(); ++k) {
    const TokenShard& sh = s.shards[k];
    for (int64_t start = 0; start + L <= sh.size(); start += o_.seq) {
      s.spans.push_back({static_cast<int32_t>(k), static_cast<int32_t>(L), start});
      s.first_span.push_back(static_cast<int64_t>(s.spans.size()));
    }
    for (int64_t d = 0; d < sh.num_docs(); ++d) {  // documents crossing a window boundary
      int64_t b = sh.doc_start(d), e = sh.doc_start(d + 1);
      ++s.docs;
      if (e - b > 0 && b / o_.seq != (e - 1) / o_.seq) ++s.cut_chunked;
    }
  }
  s.filled = s.samples() * L;
}

void Loader::plan_best_fit(Source& s) {
  const int64_t L = o_.seq + 1;
  struct Piece {
    int32_t shard;
    int64_t start, len, pos0;
  };
  std::vector<Piece> pieces;
  std::vector<std::vector<Span>> bins;
  for (size_t k = 0; k < s.shards.size(); ++k) {
    const TokenShard& sh = s.shards[k];
    if (sh.num_docs() == 0)
      fail(
          "{}: data.packing=best_fit needs shards with a document index; make them with "
          "`lmforge prepare`",
          sh.path());
    for (int64_t d = 0; d < sh.num_docs(); ++d) {
      int64_t b = sh.doc_start(d), e = sh.doc_start(d + 1);
      ++s.docs;
      if (e - b > 0 && b / o_.seq != (e - 1) / o_.seq) ++s.cut_chunked;
      if (e - b > L) ++s.cut_packed;
      const int64_t doc_begin = b;
      // Full slots of a long document, each starting at the previous one's last token (its last
      // target is the next slot's first input, as windows overlap in plan_chunks): every token
      // but the document's first is a target once. The rest (2 tokens or more) is a piece.
      for (; e - b > L; b += o_.seq) {
        bins.push_back({{static_cast<int32_t>(k), static_cast<int32_t>(L), b,
                         static_cast<int32_t>(b - doc_begin)}});
        s.filled += L;
      }
      if (e > b) pieces.push_back({static_cast<int32_t>(k), b, e - b, b - doc_begin});
    }
  }
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.len > b.len; });
  std::multimap<int64_t, size_t> room;  // remaining capacity -> bin: best fit is lower_bound
  for (const Piece& p : pieces) {
    auto it = room.lower_bound(p.len);
    size_t bin;
    int64_t left;
    if (it == room.end()) {
      bin = bins.size();
      bins.emplace_back();
      left = L;
    } else {
      bin = it->second;
      left = it->first;
      room.erase(it);
    }
    bins[bin].push_back(
        {p.shard, static_cast<int32_t>(p.len), p.start, static_cast<int32_t>(p.pos0)});
    s.filled += p.len;
    if (left - p.len > 0) room.emplace(left - p.len, bin);
  }
  // Samples in the order of their earliest piece (shard, then start): a sequential read (the
  // validation batches) takes the documents from the first on, as plan_chunks' windows do, not
  // the long documents' slots and the longest pieces first.
  std::vector<std::pair<std::pair<int32_t, int64_t>, size_t>> order;  // (earliest piece, bin)
  for (size_t i = 0; i < bins.size(); ++i) {
    std::pair<int32_t, int64_t> key{bins[i][0].shard, bins[i][0].start};
    for (const Span& sp : bins[i]) key = std::min(key, std::pair(sp.shard, sp.start));
    order.emplace_back(key, i);
  }
  std::sort(order.begin(), order.end());
  s.first_span.push_back(0);
  for (const auto& [key, i] : order) {
    const std::vector<Span>& bin = bins[i];
    s.spans.insert(s.spans.end(), bin.begin(), bin.end());
    s.first_span.push_back(static_cast<int64_t>(s.spans.size()));
  }
}

void Loader::plan_pairs(Source& s) {
  const int64_t L = o_.seq + 1;
  s.first_span.push_back(0);
  for (size_t k = 0; k < s.shards.size(); ++k) {
    const TokenShard& sh = s.shards[k];
    if (o_.pairs && !sh.paired())
      fail(
          "{}: is not made of preference pairs, which train.objective dpo, orpo and simpo train "
          "on; make them with `lmforge prepare --format preference`",
          sh.path());
    if (o_.unpaired && !sh.paired() && !sh.labelled())
      fail(
          "{}: holds no labelled responses, which train.objective kto trains on; make them with "
          "`lmforge prepare --format unpaired` (or --format preference: pairs)",
          sh.path());
    const int64_t per = o_.pairs ? 2 : 1;  // documents per sample
    for (int64_t d = 0; d < sh.num_docs(); d += per) {
      bool cut = false, empty = false;
      for (int64_t side = 0; side < per; ++side) {  // chosen, rejected: cut to T+1 tokens
        const int64_t b = sh.doc_start(d + side), len = std::min(sh.doc_start(d + side + 1) - b, L);
        cut = cut || sh.doc_start(d + side + 1) - b > L;
        bool target = false;  // a token after the first that the mask keeps
        for (int64_t i = b + 1; i < b + len && !target; ++i) target = sh.is_target(i);
        empty = empty || !target;
        s.spans.push_back({static_cast<int32_t>(k), static_cast<int32_t>(len), b});
        s.filled += len;
      }
      if (o_.unpaired)  // a pair's chosen side is desirable, its rejected one not
        s.labels.push_back(sh.labelled() ? sh.label(d) : static_cast<int8_t>(d % 2 == 0));
      s.docs += per;
      s.cut_packed += cut;     // pairs (responses) cut by train.seq_len
      s.empty_pairs += empty;  // a side without targets: the pair counts for nothing
      s.first_span.push_back(static_cast<int64_t>(s.spans.size()));
    }
  }
}

void Loader::fill_sample(const Source& s, int64_t sample, int64_t row, Batch& b) const {
  const int64_t k0 = s.first_span[sample], k1 = s.first_span[sample + 1];
  if (o_.unpaired) b.labels[static_cast<size_t>(row)] = s.labels[static_cast<size_t>(sample)];
  if (!o_.pairs) return fill_row(s, k0, k1, row, b);
  for (int64_t k = k0; k < k1; ++k) fill_row(s, k, k + 1, row + (k - k0), b);
}

void Loader::pad_row(int64_t row, Batch& b) const {
  const int64_t T = o_.seq;
  std::fill_n(b.tokens.data<int32_t>() + row * T, T, o_.pad_token);
  std::fill_n(b.targets.data<int32_t>() + row * T, T, o_.ignore_index);
  std::fill_n(b.positions.data<int32_t>() + row * T, T, 0);
  std::fill_n(b.doc_ids.data<int32_t>() + row * T, T, -1);
  if (o_.unpaired) b.labels[static_cast<size_t>(row)] = -1;
}

void Loader::fill_row(const Source& s, int64_t k0, int64_t k1, int64_t row, Batch& b) const {
  const int64_t T = o_.seq;
  int32_t* tok = b.tokens.data<int32_t>() + row * T;
  int32_t* tgt = b.targets.data<int32_t>() + row * T;
  int32_t* pos = b.positions.data<int32_t>() + row * T;
  int32_t* doc = b.doc_ids.data<int32_t>() + row * T;
  // The sample's T+1 tokens, padded; seq[i] predicts seq[i+1] within the same span.
  int64_t t = 0;
  int32_t d = 0;
  for (int64_t k = k0; k < k1; ++k, ++d) {
    const Span& sp = s.spans[k];
    const TokenShard& sh = s.shards[sp.shard];
    for (int64_t i = 0; i < sp.len && t <= T; ++i, ++t) {
      int32_t id = static_cast<int32_t>(sh[sp.start + i]);
      if (t < T) {
        tok[t] = id;
        pos[t] = sp.pos0 + static_cast<int32_t>(i);
        doc[t] = d;
        tgt[t] = o_.ignore_index;  // set when the next token of the span arrives
      }
      // A span's first token is never a target, nor one a loss mask clears (SFT: not the
      // assistant's).
      if (t > 0 && i > 0) tgt[t - 1] = sh.is_target(sp.start + i) ? id : o_.ignore_index;
    }
  }
  for (; t < T; ++t) {
    tok[t] = o_.pad_token;
    tgt[t] = o_.ignore_index;
    pos[t] = 0;
    doc[t] = -1;
  }
}

int64_t Loader::take(Source& s) {
  const int64_t n = s.samples();
  if (s.cursor >= n) {  // epoch over
    ++s.epoch;
    s.cursor = 0;
  }
  if (s.order_epoch != s.epoch) {
    s.order.resize(n);
    for (int64_t i = 0; i < n; ++i) s.order[i] = i;
    Rng r(o_.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(s.epoch) * 0x632be59bd9b4e019ull +
          static_cast<uint64_t>(&s - sources_.data()));
    for (int64_t i = n - 1; i > 0; --i) std::swap(s.order[i], s.order[r.below(i + 1)]);
    s.order_epoch = s.epoch;
  }
  return s.order[s.cursor++];
}

void Loader::next(Batch& b) {
  last_.clear();
  if (o_.unpaired) b.labels.assign(static_cast<size_t>(o_.batch), -1);
  // Every rank walks the whole global batch (sources drawn, samples taken) and fills its rows.
  const int64_t per = rows_per_sample(), n = o_.batch / per, first = o_.rank * n;
  for (int64_t i = 0; i < n * o_.world; ++i) {
    size_t src = 0;
    if (sources_.size() > 1) {
      double u = rng_.uniform();
      while (src + 1 < sources_.size() && u >= cumulative_[src]) ++src;
    }
    int64_t sample = take(sources_[src]);
    if (i < first || i >= first + n) continue;
    fill_sample(sources_[src], sample, (i - first) * per, b);
    last_.push_back({static_cast<int32_t>(src), sample});
  }
  b.samples = last_;
}

void Loader::sequential(int64_t i, Batch& b) const {
  int64_t total = 0;
  for (const Source& s : sources_) total += s.samples();
  const int64_t per = rows_per_sample(), n = o_.batch / per;
  if (o_.unpaired) b.labels.assign(static_cast<size_t>(o_.batch), -1);
  b.samples.assign(static_cast<size_t>(n), SampleId{-1, -1});
  for (int64_t j = 0; j < n; ++j) {
    int64_t k = i * n + j;
    if (k >= total) {  // past the end: rows of padding
      for (int64_t q = 0; q < per; ++q) pad_row(j * per + q, b);
      continue;
    }
    size_t src = 0;
    while (k >= sources_[src].samples()) k -= sources_[src++].samples();
    fill_sample(sources_[src], k, j * per, b);
    b.samples[static_cast<size_t>(j)] = {static_cast<int32_t>(src), k};
  }
}

int64_t Loader::sequential_batches() const {
  int64_t total = 0;
  for (const Source& s : sources_) total += s.samples();
  const int64_t n = o_.batch / rows_per_sample();
  return (total + n - 1) / n;
}

nlohmann::json Loader::stats() const {
  nlohmann::json j = nlohmann::json::array();
  for (const Source& s : sources_) {
    double slots = static_cast<double>(s.samples() * rows_per_sample()) * (o_.seq + 1);
    j.push_back({{"source", s.spec},
                 {"weight", s.weight},
                 {"tokens", s.tokens},
                 {"samples", s.samples()},
                 {"documents", s.docs},
                 {"cut_by_packing", s.cut_packed},
                 {"cut_by_chunking", s.cut_chunked},
                 {"pairs_without_targets", s.empty_pairs},
                 {"fill", slots > 0 ? s.filled / slots : 0.0}});
  }
  return j;
}

void Loader::check_vocab(int64_t vocab_size, const std::string& key) const {
  for (const Source& src : sources_)
    for (const TokenShard& s : src.shards) {
      uint32_t mx = s.max_token();
      if (static_cast<int64_t>(mx) >= vocab_size)
        fail(
            "{}: {} holds token id {} but model.vocab_size is {}; the shards were made with a "
            "different tokenizer, re-create them or set model.vocab_size",
            key, s.path(), mx, vocab_size);
    }
}

void Loader::check_tokenizer(const Tokenizer& tok, const std::string& key) const {
  for (const Source& src : sources_)
    for (const TokenShard& s : src.shards) {
      const ShardTokenizerInfo& t = s.tokenizer();
      if (!t.fingerprint.empty() && t.fingerprint != tok.fingerprint())
        fail(
            "{}: {} was made with tokenizer {} (fingerprint {}, {} ids) but data.tokenizer is {} "
            "({}, fingerprint {}, {} ids); re-run prepare with it or set data.tokenizer to the "
            "shards' tokenizer",
            key, s.path(), t.kind, t.fingerprint, t.vocab_size, tok.source(), tok.kind(),
            tok.fingerprint(), tok.vocab_size());
    }
}

nlohmann::json Loader::state() const {
  nlohmann::json src = nlohmann::json::array();
  for (const Source& s : sources_) {
    src.push_back({{"epoch", s.epoch}, {"cursor", s.cursor}, {"samples", s.samples()}});
    if (packs_best_fit()) src.back()["plan"] = kBestFitPlan;
  }
  return {{"rng", rng_.state()}, {"seed", o_.seed}, {"sources", src}};
}

void Loader::set_state(const nlohmann::json& j) {
  try {
    rng_.set_state(j.at("rng").get<Rng::State>());
    // Each epoch's order is drawn from the seed: another seed would reorder the epoch under its
    // saved position (samples seen twice, others never). Checkpoints before it was saved:
    // unchecked.
    if (j.contains("seed") && j.at("seed").get<uint64_t>() != o_.seed)
      fail(
          "the loader's order was drawn with seed {} but this loader's is {}; resume with the "
          "same seed, or start a new run from the checkpoint with init_from",
          j.at("seed").get<uint64_t>(), o_.seed);
    const auto& src = j.at("sources");
    if (src.size() != sources_.size())
      fail("loader state has {} sources but data.train has {}; resume with the same data",
           src.size(), sources_.size());
    for (size_t i = 0; i < sources_.size(); ++i) {
      Source& s = sources_[i];
      // Checkpoints before "samples" was saved carry only epoch and cursor.
      if (src[i].contains("samples") && src[i].at("samples").get<int64_t>() != s.samples())
        fail(
            "checkpoint loader state: {} made {} samples but now makes {} (its shards, "
            "train.seq_len or data.packing changed); resume with the same data, or start a new "
            "run from the checkpoint with init_from",
            s.spec, src[i].at("samples").get<int64_t>(), s.samples());
      // best_fit's rows were cut and numbered otherwise before plan 2 (2026-12-07): a saved
      // position would point at other rows, repeating some and skipping others.
      if (packs_best_fit() && src[i].value("plan", 1) != kBestFitPlan)
        fail(
            "checkpoint loader state: {}: saved by an earlier lmforge, whose data.packing "
            "best_fit cut and numbered the rows otherwise; start a new run from the checkpoint "
            "with init_from (its weights), or resume it with that version",
            s.spec);
      const int64_t epoch = src[i].at("epoch").get<int64_t>();
      const int64_t cursor = src[i].at("cursor").get<int64_t>();
      if (epoch < 0 || cursor < 0 || cursor > s.samples())
        fail("checkpoint loader state: {}: epoch {}, sample {} of {} is out of range", s.spec,
             epoch, cursor, s.samples());
      s.epoch = epoch;
      s.cursor = cursor;
    }
  } catch (const nlohmann::json::exception& e) {
    fail("checkpoint loader state is malformed ({})", e.what());
  }
}

}  // namespace lmforge
