#include "lmforge/tokenizer/unicode_normalize.h"

#include <unicode/unorm2.h>
#include <unicode/uset.h>
#include <unicode/ustring.h>

#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"

namespace lmforge {

namespace {

// Hugging Face's normalizers (the unicode-normalization-alignments crate) know the characters of
// Unicode 9.0: a character assigned later has no decomposition and combining class 0 there, and
// stays as it is. ICU's normalizer filtered to the characters of Unicode 9.0 does the same (text
// outside the filter is left unchanged and separates the spans around it), as ICU's own
// Unicode 3.2 normalization for IDNA does.
constexpr char kHfUnicodeAge[] = "[:age=9.0:]";

// The four forms filtered to kHfUnicodeAge, made on first use and closed at exit.
class FilteredForms {
 public:
  FilteredForms() {
    UErrorCode e = U_ZERO_ERROR;
    UChar pattern[sizeof kHfUnicodeAge];
    u_charsToUChars(kHfUnicodeAge, pattern, static_cast<int32_t>(sizeof kHfUnicodeAge));
    age_ = uset_openPattern(pattern, -1, &e);
    check(e, "the set of Unicode 9.0's characters");
    uset_freeze(age_);
    const UNormalizer2* (*const get[])(UErrorCode*) = {unorm2_getNFCInstance, unorm2_getNFDInstance,
                                                       unorm2_getNFKCInstance,
                                                       unorm2_getNFKDInstance};
    for (int k = 0; k < 4; ++k) {
      const UNormalizer2* full = get[k](&e);
      check(e, normal_form_name(static_cast<NormalForm>(k + 1)));
      forms_[k] = unorm2_openFiltered(full, age_, &e);
      check(e, normal_form_name(static_cast<NormalForm>(k + 1)));
    }
  }
  ~FilteredForms() { close(); }
  FilteredForms(const FilteredForms&) = delete;
  FilteredForms& operator=(const FilteredForms&) = delete;
  const UNormalizer2* get(NormalForm f) const { return forms_[static_cast<int>(f) - 1]; }

 private:
  void check(UErrorCode e, const char* what) {
    if (U_SUCCESS(e)) return;
    close();
    fail("Unicode normalization: ICU cannot make {} ({}); is libicu's data installed?", what,
         u_errorName(e));
  }
  void close() {
    for (UNormalizer2*& n : forms_) {
      if (n) unorm2_close(n);  // before the set it holds
      n = nullptr;
    }
    if (age_) uset_close(age_);
    age_ = nullptr;
  }
  USet* age_ = nullptr;
  UNormalizer2* forms_[4] = {};
};

const UNormalizer2* instance(NormalForm f) {
  if (f == NormalForm::kNone) return nullptr;
  static const FilteredForms forms;
  return forms.get(f);
}

// Runs longer than this are normalized in pieces (see normalize_utf8).
constexpr size_t kRunBytes = size_t{1} << 20;

// Appends the normal form of `run` (valid UTF-8) to `out`.
void normalize_run(const UNormalizer2* norm, std::string_view run, std::string& out) {
  if (run.size() >= (size_t{1} << 26))  // ICU's lengths are int32_t, and expansions grow 18x
    fail("Unicode normalization: {} bytes of text without an ASCII character; split the document",
         run.size());
  thread_local std::vector<UChar> src, dst;
  UErrorCode e = U_ZERO_ERROR;
  int32_t n16 = 0;
  src.resize(run.size() + 1);  // UTF-16 never has more units than UTF-8 has bytes
  u_strFromUTF8(src.data(), static_cast<int32_t>(src.size()), &n16, run.data(),
                static_cast<int32_t>(run.size()), &e);
  LMF_CHECK(U_SUCCESS(e), "UTF-8 -> UTF-16: {}", u_errorName(e));
  // A quick check first: most text is already normalized, and only its tail from the first
  // character that might change needs the normalizer.
  const int32_t ok = unorm2_spanQuickCheckYes(norm, src.data(), n16, &e);
  LMF_CHECK(U_SUCCESS(e), "Unicode normalization: {}", u_errorName(e));
  if (ok == n16) {
    out.append(run);
    return;
  }
  dst.resize(static_cast<size_t>(n16 - ok) * 3 / 2 + 16);  // a first guess; grown if short
  int32_t m = 0;
  for (;;) {
    e = U_ZERO_ERROR;
    m = unorm2_normalize(norm, src.data() + ok, n16 - ok, dst.data(),
                         static_cast<int32_t>(dst.size()), &e);
    if (e != U_BUFFER_OVERFLOW_ERROR) break;
    dst.resize(static_cast<size_t>(m) + 1);
  }
  LMF_CHECK(U_SUCCESS(e), "Unicode normalization: {}", u_errorName(e));
  // The normalized prefix back as UTF-8 (the same bytes as run's), then the normalized tail.
  int32_t prefix8 = 0;
  e = U_ZERO_ERROR;
  u_strToUTF8(nullptr, 0, &prefix8, src.data(), ok, &e);  // preflight: its UTF-8 length
  out.append(run.substr(0, static_cast<size_t>(prefix8)));
  const size_t at = out.size();
  out.resize(at + static_cast<size_t>(m) * 3 + 1);
  int32_t n8 = 0;
  e = U_ZERO_ERROR;
  u_strToUTF8(out.data() + at, static_cast<int32_t>(out.size() - at), &n8, dst.data(), m, &e);
  LMF_CHECK(U_SUCCESS(e), "UTF-16 -> UTF-8: {}", u_errorName(e));
  out.resize(at + static_cast<size_t>(n8));
}

}  // namespace

NormalForm normal_form_named(std::string_view name) {
  if (name == "NFC") return NormalForm::kNFC;
  if (name == "NFD") return NormalForm::kNFD;
  if (name == "NFKC") return NormalForm::kNFKC;
  if (name == "NFKD") return NormalForm::kNFKD;
  return NormalForm::kNone;
}

const char* normal_form_name(NormalForm f) {
  switch (f) {
    case NormalForm::kNFC:
      return "NFC";
    case NormalForm::kNFD:
      return "NFD";
    case NormalForm::kNFKC:
      return "NFKC";
    case NormalForm::kNFKD:
      return "NFKD";
    case NormalForm::kNone:
      break;
  }
  return "none";
}

std::string normalize_utf8(std::string_view text, NormalForm f) {
  std::string out;
  const UNormalizer2* norm = instance(f);
  bool ascii = true;
  for (unsigned char c : text) ascii = ascii && c < 0x80;
  if (!norm || ascii) {  // ASCII is in every normal form
    out.assign(text);
    return out;
  }
  out.reserve(text.size());
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    // A long run is cut before an ASCII character (a boundary of every form: nothing composes
    // with the character before it, nor reorders across it), which bounds ICU's UTF-16 buffers
    // and keeps lengths within its int32_t.
    if (i - start >= kRunBytes && static_cast<unsigned char>(text[i]) < 0x80) {
      normalize_run(norm, text.substr(start, i - start), out);
      start = i;
    }
    if (size_t n = utf8_char_len(text, i)) {
      i += n;
      continue;
    }
    if (i > start) normalize_run(norm, text.substr(start, i - start), out);
    out += text[i];  // an invalid byte, kept
    start = ++i;
  }
  if (start < text.size()) normalize_run(norm, text.substr(start), out);
  return out;
}

}  // namespace lmforge
