#include "lmforge/io/safetensors.h"


#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "lmforge/io/atomic_file.h"
#include "lmforge/io/mapped_file.h"

namespace lmforge {

namespace {

const char* st_dtype(DType t) {
  switch (t) {
    case DType::kF64:
      return "F64";
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kI32:
      return "I32";
    case DType::kU16:
      return "U16";
    case DType::kU32:
      return "U32";
  }
  return "?";
}

bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> table[] = {
      {"F64", DType::kF64}, {"F32", DType::kF32}, {"BF16", DType::kBF16}, {"F16", DType::kF16},
      {"I32", DType::kI32}, {"U16", DType::kU16}, {"U32", DType::kU32}};
  for (auto& [n, t] : table)
    if (s == n) {
      *out = t;
      return true;
    }
  return false;
}

}  // namespace

Safetensors Safetensors::open(const std::string& path) {
  auto mapping = MappedFile::open(path, "check the path");
  Safetensors f;
  f.path_ = path;
  const char* base = mapping->data();
  uint64_t n = 0;
  if (mapping->size() < 8)
    fail("{}: not a safetensors file (too short); the file is truncated", path);
  std::memcpy(&n, base, 8);
  if (n > mapping->size() - 8)
    fail(
        "{}: safetensors header of {} bytes runs past the end of the file; the file is truncated "
        "or corrupt",
        path, n);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(base + 8, base + 8 + n);
  } catch (const std::exception& e) {
    fail("{}: malformed safetensors header ({})", path, e.what());
  }
  f.data_start_ = 8 + n;
  size_t data_size = mapping->size() - f.data_start_;
  try {
    for (auto& [name, v] : header.items()) {
      if (name == "__metadata__") {
        for (auto& [k, val] : v.items()) f.metadata_[k] = val.get<std::string>();
        continue;
      }
      Entry e;
      if (!parse_dtype(v.at("dtype").get<std::string>(), &e.dtype))
        fail("{}: tensor {}: unsupported dtype {}", path, name, v.at("dtype").dump());
      std::vector<int64_t> dims = v.at("shape").get<std::vector<int64_t>>();
      e.shape = Shape::of(dims.data(), static_cast<int>(dims.size()));
      e.begin = v.at("data_offsets").at(0).get<size_t>();
      e.end = v.at("data_offsets").at(1).get<size_t>();
      if (e.end < e.begin || e.end > data_size ||
          e.end - e.begin != static_cast<size_t>(e.shape.numel()) * dtype_size(e.dtype))
        fail(
            "{}: tensor {}: data offsets [{}, {}] disagree with its shape or the file size; the "
            "file is truncated or corrupt",
            path, name, e.begin, e.end);
      f.index_[name] = e;
      f.order_.push_back(name);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed safetensors header ({})", path, e.what());
  }
  f.map_ = Storage::borrow(mapping->raw(), mapping->size(), mapping);
  return f;
}

Tensor Safetensors::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end())
    fail("{}: no tensor named \"{}\"; the file does not match this model", path_, name);
  const Entry& e = it->second;
  return Tensor(map_, data_start_ + e.begin, e.shape, e.dtype);
}

std::vector<std::string> Safetensors::names() const { return order_; }

void SafetensorsWriter::add(const std::string& name, const Tensor& t) {
  tensors_.emplace_back(name, t);
}

void SafetensorsWriter::write(const std::string& path) const {
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (auto& [name, t] : tensors_) {
    std::vector<int64_t> dims;
    for (int i = 0; i < t.ndim(); ++i) dims.push_back(t.size(i));
    header[name] = {{"dtype", st_dtype(t.dtype())},
                    {"shape", dims},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // align the data to 8 bytes, as the HF writer does
  AtomicFile out(path);
  uint64_t n = h.size();
  out.write(&n, 8);
  out.write(h.data(), h.size());
  for (auto& [name, t] : tensors_) out.write(t.raw(), t.nbytes());
  out.commit();
}

}  // namespace lmforge
