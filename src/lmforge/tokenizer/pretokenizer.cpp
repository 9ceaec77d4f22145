#define PCRE2_CODE_UNIT_WIDTH 8
#include "lmforge/tokenizer/pretokenizer.h"

#include <pcre2.h>

#include <mutex>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"

namespace lmforge {

// The JIT's machine stack for this thread: PCRE2's default (32 KiB) runs out on long runs under
// nested quantifiers, e.g. (?:\p{L}\p{M}*)+ over 2000 letters; grown on demand up to 64 MiB.
pcre2_match_context* jit_context() {
  struct Context {
    pcre2_jit_stack* stack = pcre2_jit_stack_create(32 << 10, 64 << 20, nullptr);
    pcre2_match_context* ctx = pcre2_match_context_create(nullptr);
    Context() { pcre2_jit_stack_assign(ctx, nullptr, stack); }
    ~Context() {
      pcre2_match_context_free(ctx);
      pcre2_jit_stack_free(stack);
    }
  };
  thread_local Context c;
  return c.ctx;
}

struct Pretokenizer::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
  // Match data is per thread: pcre2 match data is not shareable between concurrent matches.
  pcre2_match_data* match_data() const {
    thread_local std::vector<std::pair<const Impl*, pcre2_match_data*>> cache;
    for (auto& [owner, md] : cache)
      if (owner == this) return md;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
    cache.emplace_back(this, md);
    return md;
  }
  ~Impl() {
    if (code) pcre2_code_free(code);
  }
};

namespace {

// \s and \S as \p{White_Space} and \P{White_Space}, inside classes too. PCRE2 10.42's \s (with
// UCP) also matches U+180E MONGOLIAN VOWEL SEPARATOR, which left White_Space in Unicode 6.3;
// tiktoken's regex crate and Hugging Face's Oniguruma match White_Space exactly.
std::string white_space_property(const std::string& pattern) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
      continue;
    }
    char next = pattern[i + 1];
    if (next == 'Q') {  // \Q...\E is literal text
      size_t end = pattern.find("\\E", i + 2);
      end = end == std::string::npos ? pattern.size() : end + 2;
      out.append(pattern, i, end - i);
      i = end - 1;
      continue;
    }
    if (next == 's')
      out += "\\p{White_Space}";
    else if (next == 'S')
      out += "\\P{White_Space}";
    else
      out.append(pattern, i, 2);
    ++i;
  }
  return out;
}

// Text the pattern does not cover (a Split pattern that matches words only; invalid UTF-8, which
// never joins a match): each run of valid characters is one piece, as Hugging Face's Split keeps
// it, and each invalid byte a piece of its own.
void emit_gap(std::string_view text, size_t from, size_t to,
              const std::function<void(std::string_view, bool)>& piece) {
  while (from < to) {
    size_t run = from;
    for (size_t n; run < to && (n = utf8_char_len(text, run)) > 0 && run + n <= to;) run += n;
    if (run > from) {
      piece(text.substr(from, run - from), false);
      from = run;
    } else {
      piece(text.substr(from++, 1), false);
    }
  }
}

}  // namespace

Pretokenizer::Pretokenizer(const std::string& pattern, const std::string& where)
    : impl_(std::make_unique<Impl>()), pattern_(pattern) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  const std::string compiled = white_space_property(pattern);
  impl_->code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(compiled.data()), compiled.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    fail("{}: invalid pre-tokenizer pattern at offset {} of {}: {}", where, offset, compiled,
         reinterpret_cast<const char*>(msg));
  }
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
}

Pretokenizer::~Pretokenizer() = default;

void Pretokenizer::split(std::string_view text,
                         const std::function<void(std::string_view)>& piece) const {
  split_marked(text, [&](std::string_view p, bool) { piece(p); });
}

void Pretokenizer::split_marked(std::string_view text,
                                const std::function<void(std::string_view, bool)>& piece) const {
  pcre2_match_data* md = impl_->match_data();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0, covered = 0;
  while (pos <= text.size()) {
    int rc = impl_->jit
                 ? pcre2_jit_match(impl_->code, subject, text.size(), pos, 0, md, jit_context())
                 : pcre2_match(impl_->code, subject, text.size(), pos, 0, md, nullptr);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && impl_->jit)  // the interpreter's limits differ
      rc = pcre2_match(impl_->code, subject, text.size(), pos, PCRE2_NO_JIT, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {  // a resource limit: splitting the rest differently would change the tokens
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof(msg));
      fail(
          "pre-tokenizer pattern {}: matching failed at byte {} of a {}-byte text ({}); split the "
          "text into smaller documents",
          pattern_, pos, text.size(), reinterpret_cast<const char*>(msg));
    }
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t start = ov[0], end = ov[1];
    emit_gap(text, covered, start, piece);
    if (end > start) piece(text.substr(start, end - start), true);
    covered = end;
    pos = end > start ? end : end + 1;  // an empty match: step over one byte
    if (end == start && start < text.size()) {
      // Step over a whole UTF-8 character so the next search starts on a boundary.
      while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
    }
  }
  emit_gap(text, covered, text.size(), piece);
}

}  // namespace lmforge
