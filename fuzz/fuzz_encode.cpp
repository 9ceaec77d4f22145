// Any bytes (invalid UTF-8 included) through real tokenizers: never a crash, and
// decode(encode(x)) == x for the byte-level ones (the documented invalid-UTF-8 policy).
#include <cstdlib>
#include <memory>

#include "lmforge/tokenizer/tokenizer.h"

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
  return 0;
}
