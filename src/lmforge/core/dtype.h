// Element types and devices. fp64 exists for gradient checks; fp32 is the training dtype of the
// CPU reference kernels; bf16/fp16 are storage types for the speed and CUDA issues; int32 holds
// token ids and targets; uint16/uint32 are the on-disk token types of shards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace lmforge {

enum class DType : uint8_t { kF64, kF32, kBF16, kF16, kI32, kU16, kU32 };
enum class Device : uint8_t { kCPU, kCUDA };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF64:
      return 8;
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kI32:
      return 4;
    case DType::kU16:
      return 2;
    case DType::kU32:
      return 4;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF64:
      return "f64";
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
    case DType::kI32:
      return "i32";
    case DType::kU16:
      return "u16";
    case DType::kU32:
      return "u32";
  }
  return "?";
}

constexpr std::string_view device_name(Device d) { return d == Device::kCPU ? "cpu" : "cuda"; }

// Maps a C++ type to its DType (for Tensor::data<T>() checks).
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kF64;
};
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<uint16_t> {
  static constexpr DType value = DType::kU16;
};
template <>
struct DTypeOf<uint32_t> {
  static constexpr DType value = DType::kU32;
};

// bf16 <-> fp32, round to nearest even (used by storage conversions, not by fp32 training).
inline uint16_t fp32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// As the AVX512-BF16 instructions convert (VCVTNEPS2BF16): denormal inputs become zero. The
// training path's bf16 copies use this everywhere so every CPU rounds alike.
inline uint16_t fp32_to_bf16_ftz(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  return fp32_to_bf16(f);
}
inline float bf16_to_fp32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace lmforge
