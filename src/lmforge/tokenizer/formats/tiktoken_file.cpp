#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_tokenizer.h"
#include "lmforge/tokenizer/formats/formats.h"
#include "lmforge/tokenizer/known_encodings.h"

namespace lmforge {

namespace {

int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool base64_decode(std::string_view in, std::string* out) {
  out->clear();
  uint32_t acc = 0;
  int bits = 0;
  for (unsigned char c : in) {
    if (c == '=') break;
    int v = b64_value(c);
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return true;
}

}  // namespace

std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path) {
  std::string text = read_file(path);
  auto tok = std::make_unique<BpeTokenizer>();
  size_t line_no = 0, n = 0;
  std::string bytes;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    int64_t rank = -1;
    if (sp != std::string_view::npos) {
      try {
        size_t used = 0;
        rank = std::stoll(std::string(line.substr(sp + 1)), &used);
        if (used != line.size() - sp - 1) rank = -1;
      } catch (...) {
        rank = -1;
      }
    }
    if (sp == std::string_view::npos || rank < 0 || !base64_decode(line.substr(0, sp), &bytes) ||
        bytes.empty())
      fail(
          "{}:{}: expected \"<base64 token> <rank>\"; the file is not a tiktoken rank file or is "
          "corrupt",
          path, line_no);
    tok->add_token(checked_token_id(rank, fmt::format("{}:{}", path, line_no)), bytes);
    ++n;
  }
  if (n < 256) fail("{}: {} ranks; a byte-level rank file has at least 256", path, n);

  // Every split of a token into two tokens is a merge at the token's rank (tiktoken semantics).
  BpeEngine& e = tok->engine();
  e.reserve(n * 4);
  for (int32_t id = 0; id < tok->vocab_size(); ++id) {
    std::string t = tok->token_bytes(id);
    for (size_t k = 1; k < t.size(); ++k) {
      int32_t a = tok->id_of(std::string_view(t).substr(0, k));
      int32_t b = tok->id_of(std::string_view(t).substr(k));
      if (a >= 0 && b >= 0) e.add_merge(a, b, id, static_cast<uint32_t>(id));
    }
  }

  // Pattern and specials: a sibling .json, else the built-in public encoding of that size.
  std::string meta_path = path.substr(0, path.rfind('.')) + ".json";
  const KnownEncoding* known = known_encoding_for_ranks(n);
  std::string pattern;
  if (std::ifstream(meta_path).good()) {
    try {
      auto j = nlohmann::json::parse(read_file(meta_path));
      pattern = j.at("pat_str").get<std::string>();
      nlohmann::json specials = j.value("special_tokens", nlohmann::json::object());
      for (auto& [name, id] : specials.items())
        tok->add_special(name, checked_token_id(id.get<int64_t>(), meta_path));
    } catch (const nlohmann::json::exception& ex) {
      fail("{}: expected {{\"pat_str\": ..., \"special_tokens\": {{...}}}} ({})", meta_path,
           ex.what());
    }
  } else if (known) {
    pattern = known->pattern;
    for (auto& [name, id] : known->specials) tok->add_special(name, id);
  } else {
    fail(
        "{}: {} ranks match no known encoding and there is no {} with its pat_str and "
        "special_tokens; add that file",
        path, n, meta_path);
  }
  tok->set_pretokenizer(std::make_unique<Pretokenizer>(pattern, meta_path));
  tok->set_whole_piece_lookup(true);
  auto sid = [&](const std::string& name) {
    auto it = tok->special_tokens().find(name);
    return it == tok->special_tokens().end() ? -1 : it->second;
  };
  int32_t bos = known ? sid(known->bos) : sid("<|begin_of_text|>");
  int32_t eos = known ? sid(known->eos) : -1;
  if (eos < 0) eos = sid("<|endoftext|>") >= 0 ? sid("<|endoftext|>") : sid("<|end_of_text|>");
  tok->set_bos_eos(bos, eos);
  // The identity: the ranks, and the pattern and specials where they are not the built-in
  // encoding's (a .json that changes either makes another tokenizer, whose shards and
  // checkpoints must not pass for this one's). The public files, with their .json or without,
  // keep the ranks' fingerprint that earlier shards and checkpoints recorded.
  std::vector<std::pair<std::string, int32_t>> specials(tok->special_tokens().begin(),
                                                        tok->special_tokens().end());
  std::sort(specials.begin(), specials.end());
  bool as_known = known && known->same_pattern(pattern);
  if (as_known) {
    auto builtin = known->specials;
    std::sort(builtin.begin(), builtin.end());
    as_known = builtin == specials;
  }
  std::string identity = text;
  if (!as_known) {
    identity += '\0' + pattern;
    for (const auto& [name, id] : specials) identity += '\0' + name + '=' + std::to_string(id);
  }
  tok->set_identity("tiktoken", path, fnv1a_hex(identity));
  tok->finalize();
  return tok;
}

}  // namespace lmforge
