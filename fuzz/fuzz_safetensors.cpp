// Any bytes as a safetensors file: a one-line lmforge::Error, or a file whose tensors tile its data
// and all read and convert; never a crash or a read past the input. The first byte picks how the
// rest is used (mod 3): 0, as the whole file; 1, as the header text; 2, as edits (3 bytes each:
// position, position, byte to write, insert or delete) of a valid sample header. Header text is
// framed with its length and followed by as many zero bytes as the largest integer in it (likely
// the last data offset), so the fuzzer reaches every rule and valid files without guessing lengths.
#include <algorithm>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/io/safetensors.h"

namespace {

void check_one_line(const lmforge::Error& e) {
  if (std::strchr(e.what(), '\n')) __builtin_trap();
}

void exercise(const std::vector<char>& file) {
  using namespace lmforge;
  auto bytes = Storage::borrow(const_cast<char*>(file.data()), file.size());
  try {
    Safetensors f = Safetensors::from_bytes(bytes, "fuzz.safetensors");
    uint64_t n;
    std::memcpy(&n, file.data(), 8);
    uint64_t at = 0;
    for (const std::string& name : f.names()) {  // in data order: contiguous, ending at EOF
      const Safetensors::Info& i = f.info(name);
      if (i.begin != at || i.end < i.begin) __builtin_trap();
      at = i.end;
      try {
        Tensor t = f.get(name);
        if (t.nbytes() != i.end - i.begin) __builtin_trap();
        if (t.nbytes() && std::memcmp(t.raw(), file.data() + 8 + n + i.begin, t.nbytes()) != 0)
          __builtin_trap();
        for (DType want : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64}) f.load(name, want);
      } catch (const Error& e) {
        check_one_line(e);
      }
    }
    if (8 + n + at != file.size()) __builtin_trap();
  } catch (const Error& e) {
    check_one_line(e);
  }
}

// A valid header touching every form the format allows; its data is 68 zero bytes.
constexpr std::string_view kSample =
    R"({"__metadata__":{"format":"pt","k\u00e9":"v"},"w":{"dtype":"F32","shape":[2,3],)"
    R"("data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
    R"("h":["F16",[2],[32,36]],"i":{"dtype":{"I32":null},"shape":[],"data_offsets":[36,40]},)"
    R"("f8":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[40,48],"extra":[1,{"x":null}]},)"
    R"("z":{"dtype":"U16","shape":[0,5],"data_offsets":[48,48]},"q":{"dtype":"F4","shape":[2,2],)"
    R"("data_offsets":[48,50]},"d":{"dtype":"F64","shape":[1,1,1,1,1,1,1],"data_offsets":[50,58]},)"
    R"("u":{"dtype":"U32","shape":[2],"data_offsets":[58,66]},"x":{"dtype":"U8","shape":[2],)"
    R"("data_offsets":[66,68]}} )";

void exercise_header(std::string_view header) {
  size_t zeros = 0, v = 0;
  for (size_t i = 0; i <= header.size(); ++i) {
    if (i < header.size() && header[i] >= '0' && header[i] <= '9') {
      v = std::min<size_t>(v * 10 + (header[i] - '0'), 1 << 16);
    } else {
      zeros = std::max(zeros, v), v = 0;
    }
  }
  uint64_t n = header.size();
  std::vector<char> file(8 + n + zeros, 0);
  std::memcpy(file.data(), &n, 8);
  std::copy(header.begin(), header.end(), file.data() + 8);
  exercise(file);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const char* p = reinterpret_cast<const char*>(data) + 1;
  std::string_view rest(p, size - 1);
  if (data[0] % 3 == 0) {
    exercise(std::vector<char>(rest.begin(), rest.end()));
  } else if (data[0] % 3 == 1) {
    exercise_header(rest);
  } else {
    std::string h(kSample);
    for (size_t i = 0; i + 3 <= rest.size(); i += 3) {
      size_t pos =
          (static_cast<uint8_t>(rest[i]) | static_cast<uint8_t>(rest[i + 1]) << 8) % (h.size() + 1);
      auto c = static_cast<uint8_t>(rest[i + 2]);
      if (c == 0xFF && pos < h.size())
        h.erase(pos, 1);
      else if (c >= 0x80)
        h.insert(pos, 1, static_cast<char>(c & 0x7F));
      else if (pos < h.size())
        h[pos] = static_cast<char>(c);
    }
    exercise_header(h);
  }
  return 0;
}
