// Internal to backend/ops*.cpp: how an op dispatches on its tensors' device and dtype, and the
// small helpers the op bodies share. Not part of the op interface (ops.h).
#pragma once

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/profile.h"

// The CUDA twin of an op (fp32 only): a lambda in a build with the CUDA backend, nothing
// otherwise (the cuda:: functions are then declared but never referenced).
#ifdef LMFORGE_HAVE_CUDA
#define LMF_GPU(...) [&] { __VA_ARGS__; }
#else
#define LMF_GPU(...) nullptr
#endif

namespace lmforge::ops::detail {

// Calls f(T{}) with T the C++ type of t's dtype for a host tensor, or gpu() for a CUDA tensor
// (fp32; an op without a CUDA twin fails with a clear error).
template <typename F, typename G = std::nullptr_t>
inline void dispatch(const char* op, const Tensor& t, F&& f, G&& gpu = nullptr) {
  profile::Scope timed(op, t);  // a row of its own unless the op opened one (with its FLOPs)
  if (t.device() == Device::kCUDA) {
    if constexpr (std::is_same_v<std::decay_t<G>, std::nullptr_t>) {
      cuda_unavailable(op);
    } else {
      LMF_CHECK(t.dtype() == DType::kF32, "{} on CUDA: fp32 only, got {}", op,
                dtype_name(t.dtype()));
      gpu();
    }
    return;
  }
  switch (t.dtype()) {
    case DType::kF32:
      f(float{});
      break;
    case DType::kF64:
      f(double{});
      break;
    default:
      LMF_CHECK(false, "{}: unsupported dtype {}", op, dtype_name(t.dtype()));
  }
}

// For op bodies that read their tensors' dtypes themselves (bf16 activations): dispatches on
// t's device only, calling cpu() on the host and gpu() for a CUDA tensor.
template <typename F, typename G = std::nullptr_t>
inline void dispatch_device(const char* op, const Tensor& t, F&& cpu, G&& gpu = nullptr) {
  profile::Scope timed(op, t);
  if (t.device() != Device::kCUDA) {
    cpu();
  } else if constexpr (std::is_same_v<std::decay_t<G>, std::nullptr_t>) {
    cuda_unavailable(op);
  } else {
    gpu();
  }
}

template <typename T>
inline T* ptr(const Tensor& t) {
  return t.raw() ? t.data<T>() : nullptr;
}
template <typename T>
inline const T* cptr(const Tensor& t) {
  return t.raw() ? t.data<T>() : nullptr;
}

inline int64_t last(const Tensor& t) { return t.size(-1); }
inline int64_t rows(const Tensor& t) { return t.numel() / last(t); }

// bf16 activations on the CPU: `fill(dst, r0, n)` computes rows [r0, r0 + n) of an fp32 kernel's
// output (cols each) into dst; they are rounded into the bf16 `out` (rows ld >= cols elements
// apart; the padding is not written) a block of ~1 MiB (at least 16 rows) at a time, with
// cpu::to_bf16, as a bf16 matmul rounds an fp32 input: bit-identical to rounding the whole fp32
// output afterwards. The fp32 block buffer grows on first use and is then reused.
inline std::vector<float>& rows_bf16_buffer() {
  static std::vector<float> buf;  // one for every op (they run one at a time)
  return buf;
}

// Rows per block of cpu_rows_bf16: ~1 MiB of fp32, at least 16 rows.
inline int64_t cpu_block_rows(int64_t cols) {
  return std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(1, cols));
}

template <typename F>
inline void cpu_rows_bf16(const char* op, const Tensor& out, int64_t N, int64_t cols, F&& fill) {
  const int64_t ld = out.ndim() ? last(out) : cols;
  LMF_CHECK(out.dtype() == DType::kBF16 && ld >= cols && out.numel() == N * ld,
            "{}: bf16 out {} for {} x {}", op, out.shape().str(), N, cols);
  std::vector<float>& buf = rows_bf16_buffer();
  const int64_t block = cpu_block_rows(cols);
  const int64_t most = std::min(block, N);
  if (buf.size() < static_cast<size_t>(most * cols)) buf.resize(static_cast<size_t>(most * cols));
  uint16_t* o = out.bf16_data();
  for (int64_t r0 = 0; r0 < N; r0 += block) {
    const int64_t n = std::min(block, N - r0);
    fill(buf.data(), r0, n);
    if (ld == cols)
      cpu::to_bf16(o + r0 * ld, buf.data(), n * cols);
    else
      for (int64_t r = 0; r < n; ++r) cpu::to_bf16(o + (r0 + r) * ld, buf.data() + r * cols, cols);
  }
}

// Every defined tensor of an op on ref's device: a host pointer handed to cuBLASLt would fail
// later, asynchronously, far from its cause.
inline void same_device(const char* op, const Tensor& ref,
                        std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    LMF_CHECK(!t->defined() || t->device() == ref.device(),
              "{}: every tensor on one device (a {} tensor among {} ones)", op,
              t->device() == Device::kCUDA ? "CUDA" : "host",
              ref.device() == Device::kCUDA ? "CUDA" : "host");
}

inline void same_numel(const char* op, const Tensor& a, const Tensor& b) {
  LMF_CHECK(a.numel() == b.numel(), "{}: {} vs {}", op, a.shape().str(), b.shape().str());
}

#ifdef LMFORGE_HAVE_CUDA
// A device reduction of x's floats into one double, read back (the read waits for the stream).
inline double gpu_reduce(void (*reduce)(double*, const float*, int64_t, bool), const Tensor& x) {
  static Tensor acc;  // one device double, made on first use
  if (!acc.defined()) acc = Tensor::empty({1}, DType::kF64, Device::kCUDA);
  reduce(acc.data<double>(), cptr<float>(x), x.numel(), /*accumulate=*/false);
  return acc.to(Device::kCPU).data<double>()[0];
}
#endif

}  // namespace lmforge::ops::detail
