#include <fmt/core.h>

#include <exception>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/formats/formats.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

namespace fs = std::filesystem;

std::string fnv1a_hex(std::string_view data, uint64_t h) {
  for (unsigned char c : data) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return fmt::format("{:016x}", h);
}

bool same_vocabulary(const Tokenizer& a, const Tokenizer& b) {
  if (a.fingerprint() == b.fingerprint()) return true;
  if (a.vocab_size() != b.vocab_size() || a.special_tokens() != b.special_tokens() ||
      a.bos_id() != b.bos_id() || a.eos_id() != b.eos_id())
    return false;
  auto bytes = [](const Tokenizer& t, int32_t id) -> std::optional<std::string> {
    try {
      return t.token_bytes(id);
    } catch (const Error&) {  // (an unassigned id)
      return std::nullopt;
    }
  };
  for (int32_t id = 0; id < a.vocab_size(); ++id)
    if (bytes(a, id) != bytes(b, id)) return false;
  return true;
}

std::optional<int32_t> Tokenizer::special_id(std::string_view name) const {
  auto it = specials_.find(std::string(name));
  if (it == specials_.end()) return std::nullopt;
  return it->second;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special,
                                       bool add_bos) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  encode_append(text, out, allow_special, add_bos);
  return out;
}

void Tokenizer::encode_segments(const std::vector<Segment>& segments, std::vector<int32_t>& out,
                                std::vector<size_t>* ends) const {
  for (const Segment& s : segments) {
    if (s.special)
      out.push_back(special_id_or_fail(s.text));
    else
      encode_append(s.text, out);
    if (ends) ends->push_back(out.size());
  }
}

int32_t Tokenizer::special_id_or_fail(std::string_view name) const {
  if (auto id = special_id(name)) return *id;
  fail("{}: the tokenizer has no {} token", source_, name);
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(
    const std::vector<std::string_view>& texts, bool allow_special, bool add_bos) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  std::exception_ptr error;  // must not leave the parallel region (std::terminate)
#pragma omp parallel for schedule(dynamic, 4)
  for (size_t i = 0; i < texts.size(); ++i) {
    try {
      out[i] = encode(texts[i], allow_special, add_bos);
    } catch (...) {
#pragma omp critical(lmforge_encode_batch_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

namespace {

// First bytes of the file decide: '{' JSON, a base64 token then a space and a digit tiktoken,
// else (binary protobuf) SentencePiece.
std::string sniff(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string head(256, '\0');
  in.read(head.data(), head.size());
  head.resize(in.gcount());
  size_t i = head.find_first_not_of(" \t\r\n");
  if (i != std::string::npos && head[i] == '{') return "json";
  size_t sp = head.find(' '), nl = head.find('\n');
  if (sp != std::string::npos && nl != std::string::npos && sp < nl && sp > 0 && sp + 1 < nl &&
      std::isdigit(static_cast<unsigned char>(head[sp + 1])))
    return "tiktoken";
  return "binary";
}

// The ids a tokenizer.json names (its model's vocabulary and its added tokens: the highest + 1),
// or -1 when it is not such JSON.
int64_t tokenizer_json_ids(const std::string& path) {
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) return -1;
  int64_t n = -1;
  const nlohmann::json& vocab = j["model"].value("vocab", nlohmann::json());
  if (vocab.is_array()) n = static_cast<int64_t>(vocab.size());  // Unigram: [piece, score]
  if (vocab.is_object())
    for (const auto& [piece, id] : vocab.items())
      if (id.is_number_integer()) n = std::max<int64_t>(n, id.get<int64_t>() + 1);
  if (j.contains("added_tokens") && j["added_tokens"].is_array())
    for (const nlohmann::json& t : j["added_tokens"])
      if (t.is_object() && t.contains("id") && t["id"].is_number_integer())
        n = std::max<int64_t>(n, t["id"].get<int64_t>() + 1);
  return n;
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  if (path == "byte") return make_byte_tokenizer();
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    fs::path d(path);
    if (fs::exists(d / "tokenizer.json")) {
      try {
        return load_hf_tokenizer_json((d / "tokenizer.json").string());
      } catch (const Error& e) {
        // A SentencePiece model beside it (Llama 2's layout, lmforge's own exports of one, whose
        // generated tokenizer.json may use normalizers lmforge does not read) is the source —
        // where the tokenizer.json is one (valid JSON, as many ids): not a damaged file, nor one
        // with tokens added to it.
        const std::exception_ptr refused = std::current_exception();
        if (!fs::exists(d / "tokenizer.model")) throw;
        std::unique_ptr<Tokenizer> sp;
        try {
          sp = load_tokenizer((d / "tokenizer.model").string());
        } catch (const Error&) {
          std::rethrow_exception(refused);
        }
        if (const int64_t ids = tokenizer_json_ids((d / "tokenizer.json").string());
            ids != sp->vocab_size()) {
          if (ids < 0) std::rethrow_exception(refused);  // (not JSON: its own error says so)
          fail(
              "{}; the tokenizer.model beside it has {} pieces but tokenizer.json names {} ids, "
              "so it cannot stand in",
              e.what(), sp->vocab_size(), ids);
        }
        fmt::print(stderr, "lmforge: note: {}; reading {} instead\n", e.what(),
                   (d / "tokenizer.model").string());
        return sp;
      }
    }
    if (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt"))
      return load_gpt2_vocab_merges((d / "vocab.json").string(), (d / "merges.txt").string());
    if (fs::exists(d / "tokenizer.model")) return load_tokenizer((d / "tokenizer.model").string());
    for (auto& e : fs::directory_iterator(d))
      if (e.path().extension() == ".tiktoken") return load_tiktoken(e.path().string());
    fail(
        "{}: no tokenizer here (looked for tokenizer.json, vocab.json + merges.txt, "
        "tokenizer.model, *.tiktoken)",
        path);
  }
  if (!fs::exists(path, ec)) fail("{}: no such tokenizer file; check the path", path);
  std::string name = fs::path(path).filename().string();
  if (name == "vocab.json") {
    fs::path merges = fs::path(path).parent_path() / "merges.txt";
    return load_gpt2_vocab_merges(path, merges.string());
  }
  // By content, or by name when the content is no format's (an empty or damaged file: the error
  // of the format it claims to be).
  const std::string kind = sniff(path), ext = fs::path(path).extension().string();
  if (kind == "json" || (kind == "binary" && ext == ".json")) return load_hf_tokenizer_json(path);
  if (kind == "tiktoken" || (kind == "binary" && ext == ".tiktoken")) return load_tiktoken(path);
  return load_sentencepiece(path);
}

bool copy_tokenizer_files(const Tokenizer& tok, const std::string& dir) {
  if (tok.kind() == "byte") return false;
  fs::create_directories(dir);
  fs::path src(tok.source());
  auto copy = [&](const fs::path& from, const std::string& name) {
    copy_file_atomic(from.string(), (fs::path(dir) / name).string());
  };
  if (tok.kind() == "tiktoken") {
    copy(src, src.filename().string());
    fs::path meta = src;
    meta.replace_extension(".json");
    if (fs::exists(meta)) copy(meta, src.stem().string() + ".json");
  } else if (tok.kind() == "gpt2-merges") {
    copy(src, "vocab.json");
    copy(src.parent_path() / "merges.txt", "merges.txt");
  } else if (tok.kind() == "sentencepiece") {
    copy(src, "tokenizer.model");
  } else {
    copy(src, "tokenizer.json");
    // What transformers reads beside it: the EOS (which load_hf_tokenizer_json takes from it),
    // the pad token, the chat template, the length, and the model's generation_config.json (the
    // ids generate stops at, its sampling defaults); an export carries them on.
    // (a model directory's pair only, as load_hf_tokenizer_json reads it: the copy is named
    // tokenizer.json whatever the original's name, and must load as the same tokenizer)
    if (src.filename() == "tokenizer.json")
      for (const char* name : {"tokenizer_config.json", "special_tokens_map.json",
                               "chat_template.jinja", "generation_config.json"})
        if (fs::exists(src.parent_path() / name)) copy(src.parent_path() / name, name);
  }
  return true;
}

}  // namespace lmforge
