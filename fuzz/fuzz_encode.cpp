// Any bytes (invalid UTF-8 included) through real tokenizers: never a crash, and
// decode(encode(x)) == x for the byte-level ones (the documented invalid-UTF-8 policy); and
// through the Unicode normal forms (ICU, UTF-16 buffers): never a crash, and a second
// normalization changes nothing.
#include <cstdlib>
#include <memory>

#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/tokenizer/unicode_normalize.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<lmforge::Tokenizer> toks[2] = {
      lmforge::load_tokenizer(std::string(LMFORGE_SHARED_TOKENIZERS) + "/cl100k_base.tiktoken"),
      lmforge::load_tokenizer(std::string(LMFORGE_SHARED_TOKENIZERS) + "/o200k_base.tiktoken")};
  std::string_view text(reinterpret_cast<const char*>(data), size);
  for (auto& tok : toks) {
    for (bool special : {false, true}) {
      auto ids = tok->encode(text, special);
      if (tok->decode(ids) != text) std::abort();
    }
  }
  using lmforge::NormalForm;
  for (NormalForm f : {NormalForm::kNFC, NormalForm::kNFD, NormalForm::kNFKC, NormalForm::kNFKD}) {
    const std::string once = lmforge::normalize_utf8(text, f);
    if (lmforge::normalize_utf8(once, f) != once) std::abort();
  }
  return 0;
}
