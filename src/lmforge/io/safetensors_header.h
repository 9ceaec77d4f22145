// The safetensors header, read exactly as the reference implementation reads it (internal to
// io/safetensors*.cpp; users go through Safetensors in safetensors.h).
//
//   Header h = read_header(path, bytes, size);   // throws Error naming the file and tensor
//   for (const std::string& name : h.order) h.tensors.at(name).info ...
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "lmforge/io/safetensors.h"

namespace lmforge::safetensors_detail {

// A dtype of the format (safetensors 0.8 knows 22), its size in bits, and the lmforge DType that
// holds it, if any.
struct FormatDType {
  const char* name;
  int bits;
  bool lmforge;
  DType dtype;
};
const FormatDType& format_dtype(int kind);
const char* format_dtype_name(DType t);  // "F32" for DType::kF32

struct Header {
  struct Tensor {
    Safetensors::Info info;
    int kind = -1;  // for format_dtype()
  };
  std::map<std::string, Tensor> tensors;
  std::vector<std::string> order;  // by data offset
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // 8 + the header length
};

// Checks the `size` bytes of a whole file (`file` names it in errors) as the reference's
// SafeTensors::read_metadata does: length, UTF-8, JSON, types, offsets.
Header read_header(const std::string& file, const char* bytes, uint64_t size);

bool is_utf8(std::string_view s);
// `s` as a JSON string literal ("a\nb" -> "\"a\\nb\""), so an error message stays one line.
std::string quote_name(std::string_view s);

}  // namespace lmforge::safetensors_detail
