// The activation ops: GELU (tanh) and the gated units (SwiGLU, GeGLU) over fp32 or bf16
// activations, forward and backward.
#include <algorithm>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/dispatch.h"
#include "lmforge/backend/ops.h"

namespace lmforge::ops {

using namespace detail;

namespace {
// bf16 rows in, bf16 rows out on the CPU, in parallel: blocks of rows (~16K floats, L2-sized),
// each widened into its thread's fp32 buffer, computed by body(y, x, r0, n) into the thread's other
// buffer and rounded into out's rows by to_bf16: one pass over memory, one parallel region (the
// kernels' own OpenMP loops run single-threaded inside it).
template <typename Body>
void cpu_bf16_rows_parallel(const Tensor& out, const Tensor& inp, Body&& body) {
  const int64_t N = rows(inp), in_cols = last(inp), out_cols = last(out);
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 14) / std::max(in_cols, out_cols));
  const auto* x16 = static_cast<const uint16_t*>(inp.bf16_data());
  auto* y16 = static_cast<uint16_t*>(out.bf16_data());
#pragma omp parallel
  {
    thread_local std::vector<float> xb, yb;  // grown on first use, then reused
    if (xb.size() < static_cast<size_t>(block * in_cols)) xb.resize(block * in_cols);
    if (yb.size() < static_cast<size_t>(block * out_cols)) yb.resize(block * out_cols);
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      cpu::from_bf16_serial(xb.data(), x16 + r0 * in_cols, n * in_cols);
      body(yb.data(), xb.data(), r0, n);
      cpu::to_bf16_serial(y16 + r0 * out_cols, yb.data(), n * out_cols);
    }
  }
}

// The activations with bf16 activations throughout: a bf16 input (the fc matmul's bf16 output)
// gives a bf16 output, and the backward writes (not +=) a bf16 dinp for the fc matmul's
// backward; the arithmetic is the fp32 kernels' on the widened input. out_cols: the output's
// row width (F for GELU and SwiGLU alike). cpu_fused: the one-pass bf16 kernel, false where the
// CPU has none (then blocks of rows are widened for the fp32 kernel and rounded back).
template <typename CpuFused, typename CpuFwd, typename GpuFwd>
void act_forward_bf16(const char* op, const Tensor& out, const Tensor& inp, int64_t out_cols,
                      CpuFused&& cpu_fused, CpuFwd&& cpu_fwd, GpuFwd&& gpu_fwd) {
  LMF_CHECK(
      out.dtype() == DType::kBF16 && out.numel() == rows(inp) * out_cols && last(out) == out_cols,
      "{}: a bf16 input {} needs a bf16 output of {} columns, not {} {}", op, inp.shape().str(),
      out_cols, dtype_name(out.dtype()), out.shape().str());
  dispatch_device(
      op, inp,
      [&] {
        if (cpu_fused(out.bf16_data(), static_cast<const uint16_t*>(inp.bf16_data()))) return;
        cpu_bf16_rows_parallel(
            out, inp, [&](float* y, const float* x, int64_t, int64_t n) { cpu_fwd(y, x, n); });
      },
      std::forward<GpuFwd>(gpu_fwd));
}

template <typename CpuFused, typename CpuBwd, typename GpuBwd>
void act_backward_bf16(const char* op, const Tensor& dinp, const Tensor& inp, const Tensor& dout,
                       CpuFused&& cpu_fused, CpuBwd&& cpu_bwd, GpuBwd&& gpu_bwd) {
  LMF_CHECK(dinp.dtype() == DType::kBF16 && dout.dtype() == DType::kF32,
            "{}: a bf16 input takes an fp32 dout and writes a bf16 dinp", op);
  same_numel(op, dinp, inp);
  LMF_CHECK(last(dinp) == last(inp), "{}: dinp {} for inp {}", op, dinp.shape().str(),
            inp.shape().str());
  const int64_t cols = last(inp), out_cols = last(dout);
  dispatch_device(
      op, inp,
      [&] {
        if (cpu_fused(dinp.bf16_data(), static_cast<const uint16_t*>(inp.bf16_data()),
                      dout.data<float>()))
          return;
        cpu_bf16_rows_parallel(dinp, inp, [&](float* y, const float* x, int64_t r0, int64_t n) {
          std::fill(y, y + n * cols, 0.0f);
          cpu_bwd(y, x, dout.data<float>() + r0 * out_cols, n);
        });
      },
      std::forward<GpuBwd>(gpu_bwd));
}
}  // namespace

void gelu_forward(const Tensor& out, const Tensor& inp) {
  same_device("gelu_forward", out, {&inp});
  same_numel("gelu_forward", out, inp);
  const int64_t N = rows(inp), F = last(inp);
  if (inp.dtype() == DType::kBF16) {
    act_forward_bf16(
        "gelu_forward", out, inp, F,
        [&](uint16_t* y, const uint16_t* x) { return cpu::gelu_forward_bf16(y, x, inp.numel()); },
        [&](float* dst, const float* x, int64_t n) { cpu::gelu_forward<float>(dst, x, n * F); },
        LMF_GPU(cuda::gelu_forward(out.bf16_data(), inp.bf16_data(), inp.numel())));
    return;
  }
  if (out.dtype() == DType::kBF16) {  // bf16 activations
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::gelu_forward<float>(dst, cptr<float>(inp) + r0 * F, n * F);
    };
    dispatch(
        "gelu_forward", inp, [&](auto) { cpu_rows_bf16("gelu_forward", out, N, F, fill); },
        LMF_GPU(cuda::gelu_forward(out.bf16_data(), cptr<float>(inp), inp.numel())));
    return;
  }
  dispatch(
      "gelu_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::gelu_forward<T>(ptr<T>(out), cptr<T>(inp), inp.numel());
      },
      LMF_GPU(cuda::gelu_forward(ptr<float>(out), cptr<float>(inp), inp.numel())));
}

void gelu_backward(const Tensor& dinp, const Tensor& inp, const Tensor& dout) {
  same_device("gelu_backward", dout, {&dinp, &inp});
  if (inp.dtype() == DType::kBF16) {
    act_backward_bf16(
        "gelu_backward", dinp, inp, dout,
        [&](uint16_t* d, const uint16_t* x, const float* g) {
          return cpu::gelu_backward_bf16(d, x, g, inp.numel());
        },
        [&](float* dst, const float* x, const float* g, int64_t n) {
          cpu::gelu_backward<float>(dst, x, g, n * last(inp));
        },
        LMF_GPU(cuda::gelu_backward(dinp.bf16_data(), inp.bf16_data(), dout.data<float>(),
                                    inp.numel())));
    return;
  }
  dispatch(
      "gelu_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::gelu_backward<T>(ptr<T>(dinp), cptr<T>(inp), cptr<T>(dout), inp.numel());
      },
      LMF_GPU(
          cuda::gelu_backward(ptr<float>(dinp), cptr<float>(inp), cptr<float>(dout), inp.numel())));
}

void glu_forward(const Tensor& out, const Tensor& inp, Gate gate) {
  same_device("glu_forward", out, {&inp});
  int64_t F = last(inp) / 2, N = rows(inp);
  LMF_CHECK(out.numel() == N * F, "glu: inp {} out {}", inp.shape().str(), out.shape().str());
  if (inp.dtype() == DType::kBF16) {
    act_forward_bf16(
        "glu_forward", out, inp, F,
        [&](uint16_t* y, const uint16_t* x) { return cpu::glu_forward_bf16(y, x, N, F, gate); },
        [&](float* dst, const float* x, int64_t n) { cpu::glu_forward<float>(dst, x, n, F, gate); },
        LMF_GPU(cuda::glu_forward(out.bf16_data(), inp.bf16_data(), N, F, gate)));
    return;
  }
  if (out.dtype() == DType::kBF16) {  // bf16 activations
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::glu_forward<float>(dst, cptr<float>(inp) + r0 * 2 * F, n, F, gate);
    };
    dispatch(
        "glu_forward", inp, [&](auto) { cpu_rows_bf16("glu_forward", out, N, F, fill); },
        LMF_GPU(cuda::glu_forward(out.bf16_data(), cptr<float>(inp), N, F, gate)));
    return;
  }
  dispatch(
      "glu_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::glu_forward<T>(ptr<T>(out), cptr<T>(inp), N, F, gate);
      },
      LMF_GPU(cuda::glu_forward(ptr<float>(out), cptr<float>(inp), N, F, gate)));
}

void glu_backward(const Tensor& dinp, const Tensor& inp, const Tensor& dout, Gate gate) {
  same_device("glu_backward", dout, {&dinp, &inp});
  const int64_t N = rows(inp), F = last(inp) / 2;
  if (inp.dtype() == DType::kBF16) {
    act_backward_bf16(
        "glu_backward", dinp, inp, dout,
        [&](uint16_t* d, const uint16_t* x, const float* g) {
          return cpu::glu_backward_bf16(d, x, g, N, F, gate);
        },
        [&](float* dst, const float* x, const float* g, int64_t n) {
          cpu::glu_backward<float>(dst, x, g, n, F, gate);
        },
        LMF_GPU(
            cuda::glu_backward(dinp.bf16_data(), inp.bf16_data(), dout.data<float>(), N, F, gate)));
    return;
  }
  dispatch(
      "glu_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::glu_backward<T>(ptr<T>(dinp), cptr<T>(inp), cptr<T>(dout), N, F, gate);
      },
      LMF_GPU(
          cuda::glu_backward(ptr<float>(dinp), cptr<float>(inp), cptr<float>(dout), N, F, gate)));
}

}  // namespace lmforge::ops
