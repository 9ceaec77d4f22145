// Any bytes as a Hugging Face tokenizer.json: a clear lmforge::Error or a working tokenizer.
#include "fuzz_common.h"
#include "lmforge/core/error.h"
#include "lmforge/tokenizer/formats/formats.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = fuzz_file("tokenizer.json", data, size);
  try {
    auto tok = lmforge::load_hf_tokenizer_json(path);
    tok->decode(tok->encode("Hello, world! 123 \xF0\x9F\x8E\x89", true, true));
  } catch (const lmforge::Error&) {
  }
  return 0;
}
