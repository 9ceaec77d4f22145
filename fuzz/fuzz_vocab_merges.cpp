// Any bytes as GPT-2 vocab.json + merges.txt (split at the first NUL byte).
#include <cstring>

#include "fuzz_common.h"
#include "lmforge/core/error.h"
#include "lmforge/tokenizer/formats/formats.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const uint8_t* nul = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  size_t n = nul ? static_cast<size_t>(nul - data) : size;
  std::string vocab = fuzz_file("vocab.json", data, n);
  std::string merges = fuzz_file("merges.txt", nul ? nul + 1 : data + size, nul ? size - n - 1 : 0);
  try {
    auto tok = lmforge::load_gpt2_vocab_merges(vocab, merges);
    tok->decode(tok->encode("Hello, world! 123"));
  } catch (const lmforge::Error&) {
  }
  return 0;
}
