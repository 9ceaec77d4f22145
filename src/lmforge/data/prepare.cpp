#include "lmforge/data/prepare.h"

#include <fmt/ranges.h>
#include <malloc.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <exception>
#include <filesystem>
#include <map>

#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/data/shard.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/dir_lock.h"
#include "lmforge/tokenizer/chat_template.h"
#include "lmforge/tokenizer/string_id_map.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kBatchDocs = 1024;
constexpr size_t kBatchBytes = 16 << 20;

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// By content, not position: a document lands in the same split whatever else the corpus holds
// (skipped records do not shift it), and duplicates never straddle train and validation.
bool goes_to_val(uint64_t seed, std::string_view text, double fraction) {
  if (fraction <= 0) return false;
  uint64_t h = StringIdMap::hash(text);
  double u = static_cast<double>(mix64(mix64(seed) ^ h) >> 11) * 0x1.0p-53;
  return u < fraction;
}

// One split's output: the shard being written (streamed to its temporary file, opened by the
// split's first document after a close) and the totals of the shards closed so far.
struct Split {
  std::unique_ptr<ShardWriter> shard;
  int64_t shards = 0;
  uint64_t docs = 0, total_tokens = 0;
};

// The state a resumed run continues from: what was consumed and written at the last shard close.
struct Progress {
  std::string key;
  uint64_t records = 0;
  bool complete = false;
  json stats = json::object();
};

class Job {
 public:
  Job(const PrepareOptions& o, const PrepareSource& src, const Tokenizer& tok)
      : o_(o), src_(src), tok_(tok), dir_(o.output + "/" + src.name) {
    info_ = {tok.fingerprint(), tok.kind(), static_cast<uint64_t>(tok.vocab_size()), tok.bos_id(),
             tok.eos_id()};
  }

  json run() {
    std::vector<std::string> files = expand_inputs(src_.inputs);
    uint64_t total_bytes = 0;
    std::string key_src =
        fmt::format("{}|{}|{}|{}|{}|{}|{}|{}|", tok_.fingerprint(), o_.shard_tokens,
                    o_.val_fraction, o_.val_docs, o_.seed, src_.doc.json_field(),
                    src_.doc.text_mode, src_.doc.max_document_bytes);
    // v2: chat templates encode across special tokens, string pairs take an implicit prompt.
    // The key before (v1) is kept to tell an older lmforge's output: complete, it stands (as it
    // did); begun, it is not continued with other documents.
    std::string v1 = key_src, kind;
    if (chat()) kind = "chat:" + src_.doc.chat_format() + "|";
    if (preference()) kind = "preference:" + src_.doc.chat_template + "|";
    if (unpaired()) kind = "unpaired:" + src_.doc.chat_template + "|";
    v1 += kind;
    if (!kind.empty()) key_src += "v2-" + kind;
    for (const std::string& f : files) {
      uint64_t size = fs::file_size(f);
      total_bytes += size;
      const std::string file = fmt::format("{}:{}:{}|", fs::absolute(f).string(), size,
                                           fs::last_write_time(f).time_since_epoch().count());
      key_src += file;
      v1 += file;
    }
    std::string key = fnv1a_hex(key_src);
    make_directories(dir_);
    Progress p = load_progress();
    const bool older = !kind.empty() && p.key == fnv1a_hex(v1);
    if (older && !p.complete)
      fail(
          "{}: holds shards an older lmforge began, whose chat or preference documents this one "
          "encodes differently; delete it and prepare again",
          dir_);
    if (!p.key.empty() && p.key != key && !older)
      fail(
          "{}: holds shards of a different prepare (other inputs, tokenizer or options); choose "
          "another output or delete it",
          dir_);
    if (p.complete) {
      report("already complete");
      return p.stats;
    }
    p.key = key;
    restore(p);

    DocumentReader reader(files, src_.doc);
    RawRecord skipped_record;
    for (uint64_t r = 0; r < p.records; ++r)  // resume: skip what finished shards hold
      if (!reader.next_raw(&skipped_record))
        fail("{}: inputs shrank since the interrupted run; delete it", dir_);
    records_ = p.records;
    start_ = Clock::now();
    resumed_bytes_ = reader.bytes_consumed();

    // A pipeline of batches in record order, on the OpenMP threads alone (no extra threads to
    // share the cores with): while batch k is parsed, checked and tokenized in parallel
    // (results by index), one thread first applies batch k-1 (counts, shard appends and
    // closes, in record order, so a close mid-batch records exactly what precedes it and the
    // output does not depend on timing) and reads batch k+1 (sequential, cheap), then joins the
    // loop over batch k.
    struct Batch {
      std::vector<RawRecord> raw;
      uint64_t consumed = 0;  // input bytes read through this batch
      bool last = false;
    };
    auto read_batch = [&reader](Batch* b) {
      b->raw.clear();
      b->last = false;
      size_t bytes = 0;
      while (b->raw.size() < kBatchDocs && bytes < kBatchBytes) {
        RawRecord r;
        if (!reader.next_raw(&r)) {
          b->last = true;
          break;
        }
        bytes += r.data.size();
        b->raw.push_back(std::move(r));
      }
      b->consumed = reader.bytes_consumed();
    };
    std::vector<Document> docs[2];
    std::vector<std::vector<int32_t>> ids[2];
    std::vector<std::vector<uint8_t>> masks[2];  // chat: the assistant's tokens
    std::vector<size_t> splits[2];  // preference: ids = chosen's then rejected's from here
    auto apply = [&](int slot, uint64_t consumed) {
      for (size_t k = 0; k < docs[slot].size(); ++k) {
        const Document& d = docs[slot][k];
        uint64_t index = p.records + records_read_++;
        if (d.bom_removed && d.skip.empty()) ++repaired_["bom"];  // repaired = kept
        if (!d.skip.empty())
          ++skipped_[d.skip];
        else
          add(index, ids[slot][k], d.text, masked() ? masks[slot][k].data() : nullptr,
              preference() ? splits[slot][k] : 0, d.desirable);
      }
      show(consumed, total_bytes);
    };
    Batch batch[2];
    read_batch(&batch[0]);
    uint64_t applied_consumed = 0;
    int slot = 0;
    for (bool first = true;; first = false, slot ^= 1) {
      Batch& b = batch[slot];
      Batch& next = batch[slot ^ 1];
      const bool more = !b.last;
      const int64_t n = static_cast<int64_t>(b.raw.size());
      docs[slot].resize(n);
      ids[slot].resize(n);  // the buffers are kept and reused: no allocation once warm
      masks[slot].resize(masked() ? n : 0);
      splits[slot].resize(preference() ? n : 0);
      std::exception_ptr serial_error, encode_error;  // must not leave the parallel region
#pragma omp parallel
      {
#pragma omp single nowait
        try {
          if (!first) apply(slot ^ 1, applied_consumed);
          if (more) read_batch(&next);
        } catch (...) {
          serial_error = std::current_exception();
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t k = 0; k < n; ++k) {
          try {
            docs[slot][k] = reader.finish(std::move(b.raw[k]));
            ids[slot][k].clear();
            const Document& d = docs[slot][k];
            if (d.skip.empty() && chat()) {
              ChatEncoding e = apply_chat_template(tok_, d.messages, src_.doc.chat_format());
              ids[slot][k] = std::move(e.ids);
              masks[slot][k] = std::move(e.assistant_mask);
            } else if (d.skip.empty() && preference()) {
              ChatEncoding c = encode_response(d.messages, d.prompt_turns),
                           r = encode_response(d.rejected, d.prompt_turns);
              splits[slot][k] = c.ids.size();
              c.ids.insert(c.ids.end(), r.ids.begin(), r.ids.end());
              c.assistant_mask.insert(c.assistant_mask.end(), r.assistant_mask.begin(),
                                      r.assistant_mask.end());
              ids[slot][k] = std::move(c.ids);
              masks[slot][k] = std::move(c.assistant_mask);
            } else if (d.skip.empty() && unpaired()) {
              ChatEncoding e = encode_response(d.messages, d.prompt_turns);
              ids[slot][k] = std::move(e.ids);
              masks[slot][k] = std::move(e.assistant_mask);
            } else if (d.skip.empty()) {
              tok_.encode_append(d.text, ids[slot][k]);
            }
          } catch (...) {
#pragma omp critical(lmforge_prepare_encode_error)
            if (!encode_error) encode_error = std::current_exception();
          }
        }
      }
      if (serial_error) std::rethrow_exception(serial_error);
      if (encode_error) std::rethrow_exception(encode_error);
      applied_consumed = b.consumed;
      if (!more) break;
    }
    apply(slot, applied_consumed);
    records_ = p.records + records_read_;
    close_shards(/*final=*/true);
    if (o_.progress && isatty(2)) std::fprintf(stderr, "\n");
    return stats();
  }

 private:
  bool chat() const { return src_.doc.format == "chat"; }
  bool preference() const { return src_.doc.format == "preference"; }
  bool unpaired() const { return src_.doc.format == "unpaired"; }
  bool masked() const { return chat() || preference() || unpaired(); }

  // A preference pair's side or a labelled response (prompt + response): with a chat template as
  // chat data; plain, BOS
  // + the prompt's text + the response's + EOS, the response and EOS its targets (the prompt and
  // response tokenized apart, as TRL does).
  ChatEncoding encode_response(const std::vector<ChatMessage>& turns, size_t prompt_turns) const {
    if (!src_.doc.chat_template.empty()) {
      ChatEncoding e = apply_chat_template(tok_, turns, src_.doc.chat_format());
      // The prompt's tokens (its assistant turns too) are no targets: as far as the prompt's own
      // encoding is a prefix of the whole (it is: turns end in special tokens).
      const std::vector<int32_t> p =
          apply_chat_template(tok_,
                              std::vector<ChatMessage>(turns.begin(), turns.begin() + prompt_turns),
                              src_.doc.chat_format())
              .ids;
      for (size_t i = 0; i < p.size() && i < e.ids.size() && p[i] == e.ids[i]; ++i)
        e.assistant_mask[i] = 0;
      return e;
    }
    ChatEncoding e;
    auto push = [&e](int32_t id, uint8_t target) {
      e.ids.push_back(id);
      e.assistant_mask.push_back(target);
    };
    if (tok_.bos_id() >= 0) push(tok_.bos_id(), 0);
    std::vector<int32_t> part;
    for (const ChatMessage& m : turns) {
      part.clear();
      tok_.encode_append(m.content, part);
      for (int32_t id : part) push(id, m.role == "assistant");
    }
    if (tok_.eos_id() >= 0) push(tok_.eos_id(), 1);
    return e;
  }

  // is_target (chat, preference, unpaired): the loss mask of ids; the template frames the
  // conversation (no BOS/EOS). split (preference): ids are the chosen side's [0, split) then the
  // rejected side's, written as two documents. desirable (unpaired): the document's label.
  void add(uint64_t record, const std::vector<int32_t>& ids, std::string_view text,
           const uint8_t* is_target, size_t split = 0, bool desirable = false) {
    bool val =
        o_.val_docs > 0 ? val_.docs < o_.val_docs : goes_to_val(o_.seed, text, o_.val_fraction);
    Split& b = val ? val_ : train_;
    if (!b.shard)
      b.shard = std::make_unique<ShardWriter>(
          fmt::format("{}/{}-{:05d}.bin", dir_, val ? "val" : "train", b.shards), info_,
          ShardWriter::width_for(info_.vocab_size), /*loss_mask=*/masked(),
          /*paired=*/preference(), /*labelled=*/unpaired());
    if (unpaired())
      b.shard->begin_document(desirable);
    else
      b.shard->begin_document();
    if (preference()) {
      b.shard->append(ids.data(), split, is_target);
      b.shard->begin_document();
      b.shard->append(ids.data() + split, ids.size() - split, is_target + split);
    } else if (chat() || unpaired()) {
      b.shard->append(ids.data(), ids.size(), is_target);
    } else {
      if (tok_.bos_id() >= 0) b.shard->append(tok_.bos_id());
      b.shard->append(ids.data(), ids.size());
      if (tok_.eos_id() >= 0) b.shard->append(tok_.eos_id());
    }
    ++b.docs;
    docs_bytes_ += text.size();
    if (train_.shard && train_.shard->tokens() >= o_.shard_tokens) {
      records_ = record + 1;
      close_shards(false);
    }
  }

  void close(Split& b) {
    if (!b.shard) return;
    b.shard->commit();
    b.total_tokens += b.shard->tokens();
    b.shard.reset();
    ++b.shards;
  }

  // Writes both pending shards and the progress that points just past them.
  void close_shards(bool final) {
    close(train_);
    close(val_);
    json j = {{"key", key_}, {"records", records_}, {"complete", final}, {"stats", stats()}};
    write_file_atomic(dir_ + "/progress.json", j.dump(2) + "\n");
    if (!final && o_.stop_after_shards > 0 && train_.shards >= o_.stop_after_shards)
      fail("prepare {}: stopped after {} shards (--stop-after-shards); run again to resume",
           src_.name, train_.shards);
  }

  json stats() const {
    return {{"records", records_},
            {"documents", {{"train", train_.docs}, {"val", val_.docs}}},
            {"tokens", {{"train", train_.total_tokens}, {"val", val_.total_tokens}}},
            {"shards", {{"train", train_.shards}, {"val", val_.shards}}},
            {"skipped", skipped_},
            {"repaired", repaired_},
            {"document_bytes", docs_bytes_}};
  }

  Progress load_progress() const {
    Progress p;
    std::string path = dir_ + "/progress.json";
    if (!fs::exists(path)) return p;
    json j = json::parse(read_file(path), nullptr, false);
    if (j.is_discarded()) fail("{}: corrupt progress file; delete {} and run again", path, dir_);
    p.key = j.value("key", "");
    p.records = j.value("records", uint64_t{0});
    p.complete = j.value("complete", false);
    p.stats = j.value("stats", json::object());
    return p;
  }

  void restore(const Progress& p) {
    key_ = p.key;
    // Shards an interrupted run was streaming (never committed) are incomplete.
    for (auto& e : fs::directory_iterator(dir_))
      if (e.path().extension() == ".tmp") fs::remove(e.path());
    if (p.stats.empty()) {
      // A fresh start: remove shards an interrupted run wrote after its last progress update.
      for (auto& e : fs::directory_iterator(dir_))
        if (e.path().extension() == ".bin") fs::remove(e.path());
      return;
    }
    const json& s = p.stats;
    train_.docs = s["documents"]["train"];
    val_.docs = s["documents"]["val"];
    train_.total_tokens = s["tokens"]["train"];
    val_.total_tokens = s["tokens"]["val"];
    train_.shards = s["shards"]["train"];
    val_.shards = s["shards"]["val"];
    skipped_ = s["skipped"].get<std::map<std::string, uint64_t>>();
    repaired_ = s["repaired"].get<std::map<std::string, uint64_t>>();
    docs_bytes_ = s.value("document_bytes", uint64_t{0});
    // Shards past the recorded counts were written after the last progress: drop them.
    for (auto& e : fs::directory_iterator(dir_)) {
      std::string n = e.path().filename().string();
      int idx = -1;
      if (std::sscanf(n.c_str(), "train-%d.bin", &idx) == 1 && idx >= train_.shards)
        fs::remove(e.path());
      else if (std::sscanf(n.c_str(), "val-%d.bin", &idx) == 1 && idx >= val_.shards)
        fs::remove(e.path());
    }
  }

  void show(uint64_t done, uint64_t total) {
    if (!o_.progress || !isatty(2)) return;
    double dt = std::chrono::duration<double>(Clock::now() - start_).count();
    double rate = dt > 0 ? (done - resumed_bytes_) / dt : 0;
    double eta = rate > 0 ? (total - std::min(total, done)) / rate : 0;
    std::fprintf(stderr, "\rprepare %s: %.1f/%.1f MB  %.1f MB/s  %.0f docs/s  ETA %.0fs   ",
                 src_.name.c_str(), done / 1e6, total / 1e6, rate / 1e6,
                 dt > 0 ? (train_.docs + val_.docs) / dt : 0.0, eta);
  }

  void report(const char* what) { fmt::print("prepare {}: {}\n", src_.name, what); }

  const PrepareOptions& o_;
  const PrepareSource& src_;
  const Tokenizer& tok_;
  std::string dir_, key_;
  ShardTokenizerInfo info_;
  Split train_, val_;
  std::map<std::string, uint64_t> skipped_, repaired_;
  uint64_t records_ = 0, records_read_ = 0, docs_bytes_ = 0, resumed_bytes_ = 0;
  Clock::time_point start_;
};

// What to do when a source keeps no document, by its most frequent skip reason.
std::string nothing_kept_hint(const json& skipped) {
  std::string top;
  uint64_t most = 0;
  for (const auto& [reason, n] : skipped.items())
    if (n.get<uint64_t>() > most) most = n.get<uint64_t>(), top = reason;
  if (top == "too_large")
    return "raise the source's max_document_bytes (default 64 MiB) or split the documents";
  if (top == "nul_bytes" || top == "invalid_utf8")
    return "the files hold binary or non-UTF-8 bytes; convert them to UTF-8 text";
  if (top == "empty") return "the documents are empty";
  return "check --field (the JSONL key holding the text) and --format against the files";
}

}  // namespace

PrepareOptions load_prepare_config(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    fail("{}: cannot open; check the path", path);
  } catch (const YAML::Exception& e) {
    fail("{}:{}: invalid YAML ({})", path, e.mark.line + 1, e.msg);
  }
  PrepareOptions o;
  auto bad = [&](const std::string& key, const std::string& why) -> void {
    fail("{}: {}: {}", path, key, why);
  };
  std::string at = "the top level";  // the key being read, for a type error
  try {
    for (auto it = root.begin(); it != root.end(); ++it) {
      std::string k = it->first.as<std::string>();
      at = k;
      const YAML::Node v = it->second;  // a handle: the iterator's pair is a temporary
      if (k == "output")
        o.output = v.as<std::string>();
      else if (k == "tokenizer")
        o.tokenizer = v.as<std::string>();
      else if (k == "shard_tokens")
        o.shard_tokens = v.as<uint64_t>();
      else if (k == "val_fraction")
        o.val_fraction = v.as<double>();
      else if (k == "val_docs")
        o.val_docs = v.as<uint64_t>();
      else if (k == "seed")
        o.seed = v.as<uint64_t>();
      else if (k == "sources") {
        for (auto s = v.begin(); s != v.end(); ++s) {
          PrepareSource src;
          src.name = s->first.as<std::string>();
          for (auto f = s->second.begin(); f != s->second.end(); ++f) {
            std::string fk = f->first.as<std::string>();
            at = "sources." + src.name + "." + fk;
            const YAML::Node fv = f->second;
            if (fk == "inputs") {
              if (fv.IsSequence())
                for (auto x : fv) src.inputs.push_back(x.as<std::string>());
              else
                src.inputs.push_back(fv.as<std::string>());
            } else if (fk == "field")
              src.doc.field = fv.as<std::string>();
            else if (fk == "text_mode")
              src.doc.text_mode = fv.as<std::string>();
            else if (fk == "max_document_bytes")
              src.doc.max_document_bytes = fv.as<uint64_t>();
            else if (fk == "format")
              src.doc.format = fv.as<std::string>();
            else if (fk == "chat_template")
              src.doc.chat_template = fv.as<std::string>();
            else
              bad("sources." + src.name + "." + fk,
                  "unknown key; known: inputs, field, text_mode, max_document_bytes, format, "
                  "chat_template");
          }
          o.sources.push_back(src);
        }
      } else {
        bad(k,
            "unknown key; known: output, tokenizer, shard_tokens, val_fraction, val_docs, seed, "
            "sources");
      }
    }
  } catch (const YAML::Exception& e) {
    fail("{}:{}: {}: wrong type ({}); see docs/formats.md for the prepare keys", path,
         e.mark.line + 1, at, e.msg);
  }
  return o;
}

json run_prepare(const PrepareOptions& o) {
  if (o.output.empty()) fail("prepare: no output directory; pass --output DIR");
  if (o.sources.empty())
    fail("prepare: no inputs; pass --input PATH or list sources in the config");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1))
    fail("val_fraction: {} must be in [0, 1)", o.val_fraction);
  if (o.shard_tokens == 0) fail("shard_tokens: must be positive");
  if (o.val_docs > 0 && o.val_fraction > 0)
    fail("val_docs and val_fraction: set one of them (a count or a fraction), not both");
  for (const PrepareSource& s : o.sources)  // each is a directory of --output
    if (s.name.empty() || s.name == "." || s.name == ".." ||
        s.name.find_first_of("/\\") != std::string::npos)
      fail(
          "source name \"{}\": must be a plain directory name (not empty, no '/', not . or ..); "
          "it names the directory under {}",
          s.name, o.output);
  // Each batch frees and reallocates a few MB of document strings; glibc would hand the top of
  // the heap back to the kernel after each and fault it in (zeroed) again: ~5% of a run.
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
  auto t_load = Clock::now();
  std::unique_ptr<Tokenizer> tok;
  try {
    tok = load_tokenizer(o.tokenizer);
  } catch (const Error& e) {
    fail("tokenizer: {}", e.what());
  }
  for (const PrepareSource& s : o.sources) {  // fail before any work
    if (s.inputs.empty())
      fail("source {}: no inputs; list its files, directories or globs", s.name);
    std::vector<std::string> skipped;
    DocumentReader check(expand_inputs(s.inputs, &skipped), s.doc);  // options and input kinds
    for (const std::string& line : skipped)
      fmt::print(stderr,
                 "lmforge: warning: source {}: {} not read (a directory gives .txt, .jsonl and "
                 ".ndjson files, plain, .gz or .zst; name a .json file to read it)\n",
                 s.name, line);
    if (s.doc.format == "chat" || ((s.doc.format == "preference" || s.doc.format == "unpaired") &&
                                   !s.doc.chat_template.empty())) {  // its specials
      try {
        apply_chat_template(*tok, {{"user", "?"}, {"assistant", "!"}}, s.doc.chat_format());
      } catch (const Error& e) {
        fail("source {}: {}", s.name, e.what());
      }
    }
  }
  std::error_code ec;  // the output directory only once the inputs are known good
  const bool output_fresh = !fs::exists(o.output, ec);
  try {
    make_directories(o.output);  // (removed again if prepare fails while it is empty)
  } catch (const fs::filesystem_error& e) {
    ec = e.code();
  }
  if (ec || access(o.output.c_str(), W_OK) != 0)
    fail("{}: cannot write the output directory ({}); check permissions", o.output,
         ec ? ec.message() : std::strerror(errno));
  // One prepare at a time into an output (two lost one's summary and raced on its shards).
  DirLock lock;
  lock.take(o.output, "--output");
  double load_seconds = std::chrono::duration<double>(Clock::now() - t_load).count();
  auto t0 = Clock::now();
  json summary = {{"tokenizer",
                   {{"source", tok->source()},
                    {"kind", tok->kind()},
                    {"fingerprint", tok->fingerprint()},
                    {"vocab_size", tok->vocab_size()},
                    {"bos", tok->bos_id()},
                    {"eos", tok->eos_id()}}},
                  {"sources", json::object()}};
  // Sources prepared into this output earlier (another --name) stay listed while their directory
  // is there, when they were made with the same tokenizer (the summary names one).
  try {
    const json before = json::parse(read_file(o.output + "/summary.json"));
    if (before.at("tokenizer").at("fingerprint") == tok->fingerprint())
      for (const auto& [name, st] : before.at("sources").items())
        if (fs::is_directory(fs::path(o.output) / name, ec)) summary["sources"][name] = st;
  } catch (const std::exception&) {  // (none, or not one this could read: replaced)
  }
  uint64_t bytes = 0;
  for (const PrepareSource& s : o.sources) {
    const bool fresh = !fs::exists(fs::path(o.output) / s.name, ec);  // (else not ours to remove)
    json st = Job(o, s, *tok).run();
    bytes += st.value("document_bytes", uint64_t{0});
    summary["sources"][s.name] = st;
    fmt::print("prepare {}: {} train + {} val documents, {} + {} tokens, skipped {}, repaired {}\n",
               s.name, st["documents"]["train"].get<uint64_t>(),
               st["documents"]["val"].get<uint64_t>(), st["tokens"]["train"].get<uint64_t>(),
               st["tokens"]["val"].get<uint64_t>(), st["skipped"].dump(), st["repaired"].dump());
    // A fraction of a few documents (a directory of files, each one document) can draw none:
    // data.val would then find no val shards.
    if (o.val_fraction > 0 && o.stop_after_shards == 0 &&
        st["documents"]["val"].get<uint64_t>() == 0 && st["documents"]["train"].get<uint64_t>() > 0)
      fmt::print(
          stderr,
          "lmforge: warning: prepare {}: val_fraction {} drew none of its {} documents for "
          "validation (a .txt file is one document unless --text-mode splits it, a JSONL line "
          "one); use --val-docs N{}\n",
          s.name, o.val_fraction, st["documents"]["train"].get<uint64_t>(),
          s.doc.text_mode == "blank_line" ? "" : ", or --text-mode blank_line for text files");
    // Nothing kept (every record skipped: a wrong field or format): no shards to train on, and
    // none left behind.
    if (st["documents"]["train"].get<uint64_t>() + st["documents"]["val"].get<uint64_t>() == 0 &&
        o.stop_after_shards == 0) {
      if (fresh) fs::remove_all(fs::path(o.output) / s.name, ec);
      if (output_fresh) remove_leftovers();  // (the lock file and the directories made)
      fail("prepare {}: no documents kept from {} (skipped {}); {}", s.name,
           fmt::join(s.inputs, ", "), st["skipped"].dump(), nothing_kept_hint(st["skipped"]));
    }
  }
  double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  summary["seconds"] = dt;  // reading, tokenizing and writing; excludes loading the tokenizer
  summary["tokenizer_load_seconds"] = load_seconds;
  summary["mb_per_s"] = dt > 0 ? bytes / 1e6 / dt : 0;
  write_file_atomic(o.output + "/summary.json", summary.dump(2) + "\n");
  lock.keep();  // (the output is whole)
  fmt::print(
      "prepare: {:.1f} MB of documents in {:.1f}s ({:.1f} MB/s); summary in {}/summary.json\n",
      bytes / 1e6, dt, dt > 0 ? bytes / 1e6 / dt : 0, o.output);
  return summary;
}

}  // namespace lmforge
