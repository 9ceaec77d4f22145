// Pretokenizer: splits text into pieces with a tokenizer's own regex (PCRE2 with JIT, UTF-8 and
// Unicode properties), as tiktoken and Hugging Face's Split pre-tokenizer do. \s means Unicode
// White_Space, as in both (PCRE2's own \s adds U+180E). PCRE2 10.42 classifies characters by
// Unicode 14; the references use newer tables (docs/formats.md, "Tokenizers").
//
// Invalid UTF-8 (documented policy, docs/formats.md): the regex runs with
// PCRE2_MATCH_INVALID_UTF, so invalid bytes never join a match; every invalid byte the regex
// leaves out becomes its own piece, and every run of valid text it leaves out (a Split pattern
// that matches only some of the text) one piece, as Hugging Face's Split does. Encoding therefore
// never fails (a pattern that exceeds PCRE2's resource limits on a text is an Error) and
// decode(encode(x)) == x.
//
//   Pretokenizer p(R"('s|'t| ?\p{L}+| ?\p{N}+|\s+(?!\S)|\s+)", "gpt2.json");
//   p.split(text, [](std::string_view piece) { ... });
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace lmforge {

class Pretokenizer {
 public:
  // `where` names the file the pattern came from, for the error message.
  Pretokenizer(const std::string& pattern, const std::string& where);
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;

  // Calls piece() for consecutive pieces covering all of text, in order.
  void split(std::string_view text, const std::function<void(std::string_view)>& piece) const;
  // The same, saying for each piece whether the pattern matched it (else it is text between
  // matches).
  void split_marked(std::string_view text,
                    const std::function<void(std::string_view, bool matched)>& piece) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string pattern_;
};

}  // namespace lmforge
