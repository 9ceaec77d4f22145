// Checks lmforge's tokenizers against the fixtures of tests/reference/tokenizer_ref.py: for every
// record, encode() must give the reference's ids exactly and decode() of them what the
// reference's decode gives (the text itself for plain documents). Shared by the fast tier
// (test_tokenizer_reference, ~1.5 MB sample) and the slow one (test_tokenizer_full).
//
//   check_tokenizer_fixture(testing::ref_dir() + "/tokenizers", "tiktoken-gpt2");
//
// The one documented difference (docs/formats.md, "Tokenizers"): PCRE2 10.42 classifies
// characters by Unicode 14, the references by Unicode 16. Records of documents holding
// characters whose class differs carry "ids_unicode14" (the reference's ids with Unicode 14's
// classes), and those are the ids lmforge must give there.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge::testing {

// Every tokenizer the fixtures hold (each must be in manifest.json).
inline const std::vector<std::string>& reference_tokenizer_names() {
  static const std::vector<std::string> names = {"tiktoken-gpt2",
                                                 "tiktoken-cl100k_base",
                                                 "tiktoken-o200k_base",
                                                 "tiktoken-llama3",
                                                 "tiktoken-builtin-gpt2",
                                                 "tiktoken-builtin-cl100k_base",
                                                 "tiktoken-builtin-o200k_base",
                                                 "hf-gpt2",
                                                 "hf-gpt2-prefix-space",
                                                 "gpt2-vocab-merges",
                                                 "hf-llama3",
                                                 "hf-sp-bpe",
                                                 "hf-sp-metaspace",
                                                 "hf-added-flags",
                                                 "hf-split-words",
                                                 "hf-gpt2-dup-merges",
                                                 "hf-sp-unk",
                                                 "hf-sp-partial-bytes",
                                                 "hf-digits",
                                                 "hf-qwen2-nfc",
                                                 "hf-nfd",
                                                 "hf-nfkc",
                                                 "hf-nfkd",
                                                 "sentencepiece-bpe",
                                                 "sentencepiece-unigram"};
  return names;
}

// Bytes as a C-like string literal: printable ASCII as is, the rest as \xNN (UTF-8 included, so
// a piece that splits a character shows its bytes).
inline std::string escaped(std::string_view s, size_t max = 80) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < max; ++i) {
    unsigned char c = s[i];
    if (c == '"' || c == '\\')
      out += fmt::format("\\{}", static_cast<char>(c));
    else if (c == '\n')
      out += "\\n";
    else if (c >= 0x20 && c < 0x7F)
      out += static_cast<char>(c);
    else
      out += fmt::format("\\x{:02x}", c);
  }
  if (s.size() > max) out += "...";
  return out + "\"";
}

// ids[from, to) as "[i] id "piece"" lines.
inline std::string describe_ids(const Tokenizer& tok, const std::vector<int32_t>& ids, size_t from,
                                size_t to) {
  std::string s;
  for (size_t i = from; i < std::min(to, ids.size()); ++i)
    s += fmt::format("\n    [{}] {} {}", i, ids[i], escaped(tok.token_bytes(ids[i])));
  return s.empty() ? " (none)" : s;
}

// The first difference of two id sequences, with `context` ids either side from both, and the
// text where it happens.
inline std::string describe_mismatch(const Tokenizer& tok, const std::vector<int32_t>& got,
                                     const std::vector<int32_t>& want, const std::string& text,
                                     size_t context = 5) {
  size_t at = 0;
  while (at < got.size() && at < want.size() && got[at] == want[at]) ++at;
  size_t from = at > context ? at - context : 0, to = at + context + 1;
  size_t offset = 0;  // bytes of text before the first difference, by the reference's pieces
  for (size_t i = 0; i < at; ++i) offset += tok.token_bytes(want[i]).size();
  size_t lo = offset > 40 ? offset - 40 : 0;
  return fmt::format(
      "first difference at id {} (lmforge {} ids, reference {}), near byte {}\n"
      "  text from byte {}: {}\n  reference:{}\n  lmforge:{}",
      at, got.size(), want.size(), offset, lo,
      escaped(std::string_view(text).substr(std::min(lo, text.size())), 120),
      describe_ids(tok, want, from, to), describe_ids(tok, got, from, to));
}

// Checks one tokenizer's fixture in `dir` (a directory tokenizer_ref.py wrote) and prints what
// it covered. Reports up to 5 mismatching documents in full.
inline void check_tokenizer_fixture(const std::string& dir, const std::string& name) {
  using nlohmann::json;
  constexpr size_t kMaxReported = 5;
  std::ifstream manifest_in(dir + "/manifest.json");
  ASSERT_TRUE(manifest_in) << dir
                           << "/manifest.json is missing: run tests/reference/make_fixtures.py "
                              "(the reference_fixtures test)";
  const json manifest = json::parse(manifest_in);
  json entry;
  for (const json& e : manifest.at("tokenizers"))
    if (e.at("name") == name) entry = e;
  ASSERT_FALSE(entry.is_null()) << name << " is not in " << dir << "/manifest.json";

  auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Tokenizer> tok = load_tokenizer(entry.at("path").get<std::string>());
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const std::string fixture = dir + "/" + entry.at("fixture").get<std::string>();
  const std::string reference = entry.at("reference").get<std::string>();
  std::ifstream in(fixture);
  ASSERT_TRUE(in) << fixture << ": cannot open";
  size_t docs = 0, bytes = 0, tokens = 0, unicode14 = 0, id_failures = 0, decode_failures = 0;
  double encode_s = 0;
  std::string line;
  for (size_t line_no = 1; std::getline(in, line); ++line_no) {
    json rec = json::parse(line);
    const std::string text = rec.at("text").get<std::string>();
    const bool allow_special = rec.at("allow_special").get<bool>();
    const bool add_bos = rec.at("add_bos").get<bool>();
    const bool u14 = rec.contains("ids_unicode14");
    const auto want = rec.at(u14 ? "ids_unicode14" : "ids").get<std::vector<int32_t>>();

    auto e0 = std::chrono::steady_clock::now();
    std::vector<int32_t> got = tok->encode(text, allow_special, add_bos);
    encode_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count();
    ++docs;
    unicode14 += u14;
    bytes += text.size();
    tokens += got.size();
    const std::string where =
        fmt::format("{}:{} (document {}, allow_special={}, add_bos={}{})", fixture, line_no,
                    rec.at("name").get<std::string>(), allow_special, add_bos,
                    u14 ? "; expecting the ids under Unicode 14's classes" : "");
    if (got != want && ++id_failures <= kMaxReported)
      ADD_FAILURE() << where << ": ids differ from " << reference << "'s\n"
                    << describe_mismatch(*tok, got, want, text);

    const std::string want_text = rec.value("decoded", text);
    const std::string decoded = tok->decode(got);
    if (decoded != want_text && ++decode_failures <= kMaxReported) {
      size_t at = 0;
      while (at < decoded.size() && at < want_text.size() && decoded[at] == want_text[at]) ++at;
      size_t lo = at > 20 ? at - 20 : 0;
      ADD_FAILURE() << where << ": decode(encode(text)) differs "
                    << (rec.contains("decoded") ? "from the reference's decode" : "from the text")
                    << " at byte " << at
                    << "\n  want: " << escaped(std::string_view(want_text).substr(lo))
                    << "\n  got:  "
                    << escaped(std::string_view(decoded).substr(std::min(lo, decoded.size())));
    }
  }
  EXPECT_EQ(id_failures, 0u) << name << ": documents whose ids differ from " << reference;
  EXPECT_EQ(decode_failures, 0u) << name << ": documents that do not decode back";
  EXPECT_EQ(docs, entry.at("docs").get<size_t>()) << fixture << " is truncated";
  std::printf(
      "%s (%s, against %s): %zu docs, %.2f MB, %zu tokens, %zu under Unicode 14 classes; "
      "load %.2f s, encode %.1f MB/s\n",
      name.c_str(), tok->kind().c_str(), reference.c_str(), docs, bytes / 1e6, tokens, unicode14,
      load_s, encode_s > 0 ? bytes / 1e6 / encode_s : 0.0);
  std::fflush(stdout);
}

}  // namespace lmforge::testing
