// Safetensors (one file): reading over a mapping, conversion on load, writing. The header is
// read by safetensors_header.cpp; sharded sets are in safetensors_set.cpp.
#include "lmforge/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "lmforge/io/atomic_file.h"
#include "lmforge/io/mapped_file.h"
#include "lmforge/io/safetensors_header.h"

namespace lmforge {

using namespace safetensors_detail;

namespace {

// IEEE 754 binary16 <-> binary32/64. Decoding is exact; encoding rounds to nearest even, with
// subnormals, overflow to infinity and NaN kept quiet (sign and top payload bits kept).
float fp16_to_fp32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {                                // subnormal: man * 2^-24, normalised
    int shift = __builtin_clz(man) - 21;  // leading zeros within the 10-bit field, plus one
    man = (man << shift) & 0x3FF;
    u = sign | ((113 - shift) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Rounds x to the binary format with `ebits` exponent and `mbits` stored mantissa bits.
uint32_t round_fp64(double x, int ebits, int mbits) {
  uint64_t u;
  std::memcpy(&u, &x, 8);
  uint32_t sign = static_cast<uint32_t>(u >> 63) << (ebits + mbits);
  uint64_t mag = u & 0x7FFFFFFFFFFFFFFFull;
  uint32_t inf = ((1u << ebits) - 1) << mbits;
  if (mag > 0x7FF0000000000000ull)
    return sign | inf | (1u << (mbits - 1)) |
           static_cast<uint32_t>((mag >> (52 - mbits)) & ((1u << mbits) - 1));
  if (mag == 0x7FF0000000000000ull) return sign | inf;
  if ((mag >> 52) == 0) return sign;  // an f64 subnormal is far below any target's subnormals
  int bias = (1 << (ebits - 1)) - 1;
  int e = static_cast<int>(mag >> 52) - 1023;
  uint64_t m = (mag & ((1ull << 52) - 1)) | (1ull << 52);  // x = m * 2^(e - 52)
  int q = std::max(e, 1 - bias) - mbits;                   // the target's ulp is 2^q
  int shift = q - (e - 52);
  if (shift > 53) return sign;  // below half the smallest subnormal
  uint64_t r = m >> shift, rem = m & ((1ull << shift) - 1), half = 1ull << (shift - 1);
  if (rem > half || (rem == half && (r & 1))) ++r;
  // r counts ulps from the bottom of x's binade (or from 0 for subnormals); a carry into the
  // next binade lands on the right encoding because the exponent field sits above the mantissa.
  uint64_t bits = (static_cast<uint64_t>(std::max(e, 1 - bias) + bias - 1) << mbits) + r;
  if (bits >= inf) return sign | inf;
  return sign | static_cast<uint32_t>(bits);
}

bool is_float(DType t) {
  return t == DType::kF64 || t == DType::kF32 || t == DType::kBF16 || t == DType::kF16;
}

void convert_floats(const void* src, DType from, void* dst, DType to, int64_t n) {
  auto get = [&](int64_t i) -> double {
    switch (from) {
      case DType::kF64:
        return static_cast<const double*>(src)[i];
      case DType::kF32:
        return static_cast<const float*>(src)[i];
      case DType::kBF16:
        return bf16_to_fp32(static_cast<const uint16_t*>(src)[i]);
      default:
        return fp16_to_fp32(static_cast<const uint16_t*>(src)[i]);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    double v = get(i);  // exact for every source dtype
    switch (to) {
      case DType::kF64:
        static_cast<double*>(dst)[i] = v;
        break;
      case DType::kF32:
        static_cast<float*>(dst)[i] = static_cast<float>(v);
        break;
      case DType::kBF16:
        // From f64, round once (through f32 would round twice); else v is an exact float.
        static_cast<uint16_t*>(dst)[i] = from == DType::kF64
                                             ? static_cast<uint16_t>(round_fp64(v, 8, 7))
                                             : fp32_to_bf16(static_cast<float>(v));
        break;
      default:
        static_cast<uint16_t*>(dst)[i] = static_cast<uint16_t>(round_fp64(v, 5, 10));
    }
  }
}

}  // namespace

Safetensors Safetensors::open(const std::string& path) {
  auto mapping = MappedFile::open(path, "check the path");
  Safetensors f = from_bytes(Storage::borrow(mapping->raw(), mapping->size(), mapping), path);
  f.file_ = std::move(mapping);
  return f;
}

void Safetensors::release(const std::string& name) const {
  if (!file_) return;
  const Info& i = entry(name).info;
  file_->release(static_cast<const char*>(map_->data()) + data_start_ + i.begin, i.end - i.begin);
}

Safetensors Safetensors::from_bytes(std::shared_ptr<Storage> bytes, const std::string& name) {
  Header h = read_header(name, static_cast<const char*>(bytes->data()), bytes->bytes());
  Safetensors f;
  for (auto& [k, t] : h.tensors) f.index_.emplace(k, Entry{std::move(t.info), t.kind});
  f.order_ = std::move(h.order);
  f.metadata_ = std::move(h.metadata);
  f.path_ = name;
  f.map_ = std::move(bytes);
  f.data_start_ = h.data_start;
  return f;
}

const Safetensors::Entry& Safetensors::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end())
    fail("{}: no tensor named {}; the file does not match this model", path_, quote_name(name));
  return it->second;
}

const Safetensors::Info& Safetensors::info(const std::string& name) const {
  return entry(name).info;
}

Tensor Safetensors::get(const std::string& name) const {
  const Entry& e = entry(name);
  const FormatDType& f = format_dtype(e.kind);
  if (!f.lmforge)
    fail(
        "{}: tensor {} has dtype {}, which lmforge cannot hold (it reads F64, F32, BF16, F16, "
        "I32, U16, U32); convert the file first",
        path_, quote_name(name), f.name);
  const std::vector<uint64_t>& dims = e.info.shape;
  if (dims.size() > static_cast<size_t>(kMaxDims))
    fail("{}: tensor {} has {} dimensions; lmforge tensors have at most {}", path_,
         quote_name(name), dims.size(), kMaxDims);
  int64_t d[kMaxDims];
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] > static_cast<uint64_t>(INT64_MAX))
      fail("{}: tensor {}: dimension {} is too large", path_, quote_name(name), dims[i]);
    d[i] = static_cast<int64_t>(dims[i]);
  }
  Shape shape = Shape::of(d, static_cast<int>(dims.size()));
  size_t offset = data_start_ + e.info.begin;
  const char* p = static_cast<const char*>(map_->data()) + offset;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(f.dtype) != 0) {
    Tensor t = Tensor::empty(shape, f.dtype);
    if (t.nbytes()) std::memcpy(t.raw(), p, t.nbytes());
    return t;
  }
  return Tensor(map_, offset, shape, f.dtype);
}

Tensor Safetensors::load(const std::string& name, DType want) const {
  Tensor src = get(name);
  if (src.dtype() == want) return src.clone();
  if (!is_float(src.dtype()) || !is_float(want))
    fail("{}: tensor {} is {} and cannot be loaded as {}; only F64, F32, BF16 and F16 convert",
         path_, quote_name(name), format_dtype_name(src.dtype()), format_dtype_name(want));
  Tensor out = Tensor::empty(src.shape(), want);
  convert_floats(src.raw(), src.dtype(), out.raw(), want, src.numel());
  return out;
}

std::vector<std::string> Safetensors::names() const { return order_; }

void SafetensorsWriter::add(const std::string& name, const Tensor& t) {
  // A GPU tensor is copied to the host now: what is written is its value at add().
  LMF_CHECK(t.defined(), "tensor {} is undefined", name);
  const Tensor host = t.device() == Device::kCPU ? t : t.to(Device::kCPU);
  tensors_.push_back({name, host, host.dtype(), host.shape(), {}});
}

void SafetensorsWriter::add(const std::string& name, DType dtype, const Shape& shape,
                            std::function<Tensor()> make) {
  tensors_.push_back({name, Tensor(), dtype, shape, std::move(make)});
}

void SafetensorsWriter::write(const std::string& path) const {
  auto check_utf8 = [&](const std::string& s, const char* what) {
    if (!is_utf8(s)) fail("{}: {} {} is not valid UTF-8", path, what, quote_name(s));
  };
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  auto bytes = [](const Entry& e) {
    return static_cast<uint64_t>(e.shape.numel()) * dtype_size(e.dtype);
  };
  for (const Entry& e : tensors_) {
    if (e.name == "__metadata__" || header.contains(e.name))
      fail("{}: cannot write tensor {}: {}", path, quote_name(e.name),
           e.name == "__metadata__" ? "the name is reserved" : "two tensors have this name");
    check_utf8(e.name, "tensor name");
    std::vector<int64_t> dims;
    for (int i = 0; i < e.shape.ndim(); ++i) dims.push_back(e.shape[i]);
    header[e.name] = {{"dtype", format_dtype_name(e.dtype)},
                      {"shape", dims},
                      {"data_offsets", {offset, offset + bytes(e)}}};
    offset += bytes(e);
  }
  for (auto& [k, v] : metadata) {
    check_utf8(k, "metadata key");
    check_utf8(v, "metadata value");
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // align the data to 8 bytes, as the HF writer does
  AtomicFile out(path);
  uint64_t n = h.size();
  out.write(&n, 8);
  out.write(h.data(), h.size());
  for (const Entry& e : tensors_) {
    const Tensor t = e.make ? e.make() : e.t;
    LMF_CHECK(t.defined() && t.device() == Device::kCPU && t.dtype() == e.dtype &&
                  t.shape() == e.shape && t.nbytes() == bytes(e),
              "tensor {}: {} {} on the host expected", e.name, dtype_name(e.dtype), e.shape.str());
    out.write(t.raw(), t.nbytes());
  }
  out.commit();
}

}  // namespace lmforge
