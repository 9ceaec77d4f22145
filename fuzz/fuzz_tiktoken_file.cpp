// Any bytes as a tiktoken rank file: a clear lmforge::Error or a working tokenizer, never a crash.
#include "fuzz_common.h"
#include "lmforge/core/error.h"
#include "lmforge/tokenizer/formats/formats.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = fuzz_file("x.tiktoken", data, size);
  try {
    auto tok = lmforge::load_tiktoken(path);
    auto ids = tok->encode("Hello, world! 123 \xF0\x9F\x8E\x89");
    tok->decode(ids);
  } catch (const lmforge::Error&) {
  }
  return 0;
}
