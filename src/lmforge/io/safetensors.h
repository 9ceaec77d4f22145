// safetensors (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N,
// N bytes of JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
// "__metadata__": {str: str}}, then the raw little-endian data. Used for lmforge checkpoints,
// test fixtures, and (the HF issue) Hugging Face weights.
//
//   SafetensorsWriter w; w.add("wte", tensor); w.metadata["step"] = "10"; w.write(path);
//   Safetensors f = Safetensors::open(path);   // mmap'ed; tensors borrow the mapping
//   Tensor t = f.get("wte");
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lmforge/core/tensor.h"

namespace lmforge {

class Safetensors {
 public:
  // Throws Error naming the file on a missing file, a truncated file or a malformed header.
  static Safetensors open(const std::string& path);
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // A view into the mapped file (read-only; copy before modifying). Throws if absent.
  Tensor get(const std::string& name) const;
  std::vector<std::string> names() const;  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  struct Entry {
    DType dtype;
    Shape shape;
    size_t begin, end;
  };
  std::string path_;
  std::shared_ptr<Storage> map_;  // the whole file
  size_t data_start_ = 0;
  std::map<std::string, Entry> index_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  void add(const std::string& name, const Tensor& t);  // keeps a reference; data read at write()
  std::map<std::string, std::string> metadata;
  // Writes to path + ".tmp" then renames: a reader never sees a half-written file.
  void write(const std::string& path) const;

 private:
  std::vector<std::pair<std::string, Tensor>> tensors_;
};

}  // namespace lmforge
