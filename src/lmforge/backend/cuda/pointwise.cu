// Per-element kernels on the grid-stride map: rotary embedding, GELU, SwiGLU and AdamW.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "lmforge/backend/adamw_scalars.h"
#include "lmforge/backend/cuda/device.cuh"
#include "lmforge/core/stochastic_round.h"

namespace lmforge::cuda {

using namespace detail;

namespace {

// ---------------------------------------------------------------------------------------------
// Rotary embedding: one unit per rotated pair (i, i + HS/2) of one head of one token.

template <typename X>  // float, or uint16_t for a bf16 qkv (rotated in fp32, rounded)
struct RopeOp {
  X* x;
  const float* cos;
  const float* sin;
  int64_t T, n_heads, half, HS, row_stride, pos0;
  const int32_t* pos;  // (B*T) positions, or null: pos0 + t
  float sign;          // +1 forward, -1 backward (the inverse rotation)
  template <int K>
  __device__ void apply(int64_t u) const {  // K divides half: one head per call
    const int64_t r = u / half, i = u - r * half;
    const int64_t bt = r / n_heads, h = r - bt * n_heads, t = bt % T;
    X* v = x + bt * row_stride + h * HS + i;
    const int64_t cs = (pos ? pos[bt] : pos0 + t) * half + i;
    Floats<K> x1 = load<K>(v), x2 = load<K>(v + half);
    const Floats<K> c = load<K>(cos + cs), s = load<K>(sin + cs);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float a = x1.v[k], b = x2.v[k], si = sign * s.v[k];
      x1.v[k] = __fsub_rn(__fmul_rn(a, c.v[k]), __fmul_rn(b, si));
      x2.v[k] = __fadd_rn(__fmul_rn(b, c.v[k]), __fmul_rn(a, si));
    }
    store<K>(v, x1);
    store<K>(v + half, x2);
  }
};

template <typename X>
void rope(X* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t n_heads,
          int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos, float sign) {
  const int64_t half = HS / 2;
  const RopeOp<X> op{x, cos, sin, T, n_heads, half, HS, row_stride, pos0, pos, sign};
  launch_map(op, B * T * n_heads * half,
             HS % 2 == 0 && half % 4 == 0 && row_stride % 4 == 0 && aligned4(x) &&
                 aligned16(cos, sin));  // odd HS: h * HS breaks the 16-byte alignment
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh approximation) and SwiGLU.

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluK = 0.044715f;
constexpr float kGeluK3 = static_cast<float>(3 * 0.044715);

// The activations' arithmetic is spelled out with round-to-nearest intrinsics (no contraction into
// FMAs): the kernels on bf16 and on fp32 inputs must give the same bits for the same values, which
// must not depend on the choices nvcc makes per template instantiation.
__device__ __forceinline__ float gelu_tanh_arg(float x) {  // sqrt(2/pi) (x + 0.044715 x^3)
  return __fmul_rn(kGeluC, __fadd_rn(x, __fmul_rn(__fmul_rn(__fmul_rn(kGeluK, x), x), x)));
}
__device__ __forceinline__ float gelu(float x) {  // 0.5 x (1 + tanh(u))
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanhf(gelu_tanh_arg(x))));
}
// d gelu / dx = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
__device__ __forceinline__ float gelu_grad(float x) {
  const float th = tanhf(gelu_tanh_arg(x));
  const float sech2 = __fsub_rn(1.0f, __fmul_rn(th, th));
  const float du = __fmul_rn(kGeluC, __fadd_rn(1.0f, __fmul_rn(__fmul_rn(kGeluK3, x), x)));
  return __fadd_rn(__fmul_rn(0.5f, __fadd_rn(1.0f, th)),
                   __fmul_rn(__fmul_rn(__fmul_rn(0.5f, x), sech2), du));
}

template <typename O, typename I = float>  // float, or uint16_t for bf16 activations
struct GeluForwardOp {
  O* out;
  const I* inp;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> v = load<K>(inp + i);
#pragma unroll
    for (int k = 0; k < K; ++k) v.v[k] = gelu(v.v[k]);
    store<K>(out + i, v);
  }
};

// D float: dinp += (the fp32 path); D uint16_t: dinp = bf16(...) (bf16 activations: d(fc_out) is
// written rounded for the fc matmul's backward).
template <int K, typename D>
__device__ __forceinline__ Floats<K> grad_in(const D* p) {
  if constexpr (std::is_same_v<D, float>) {
    return load<K>(p);
  } else {
    Floats<K> z;
#pragma unroll
    for (int k = 0; k < K; ++k) z.v[k] = 0.0f;
    return z;
  }
}

template <typename D = float, typename I = float>
struct GeluBackwardOp {
  D* dinp;
  const I* inp;
  const float* dout;
  template <int K>
  __device__ void apply(int64_t i) const {
    const Floats<K> xv = load<K>(inp + i), g = load<K>(dout + i);
    Floats<K> d = grad_in<K>(dinp + i);
#pragma unroll
    for (int k = 0; k < K; ++k) d.v[k] = __fadd_rn(d.v[k], __fmul_rn(g.v[k], gelu_grad(xv.v[k])));
    store<K>(dinp + i, d);
  }
};

__device__ __forceinline__ float sigmoid(float x) {
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
}

// The gate's activation act(x) (the GLU variants, gate.h) and, with grad, its derivative.
template <Gate G>
__device__ __forceinline__ float gate_act(float x, float* grad) {
  if constexpr (G == Gate::kSilu) {
    const float s = sigmoid(x);  // silu' = s (1 + x (1 - s))
    if (grad) *grad = __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(x, __fsub_rn(1.0f, s))));
    return __fmul_rn(x, s);
  } else {
    if (grad) *grad = gelu_grad(x);
    return gelu(x);
  }
}

template <Gate G, typename O, typename I = float>
struct GluForwardOp {
  O* out;
  const I* inp;
  int64_t F;
  template <int K>
  __device__ void apply(int64_t i) const {  // K divides F: one row per call
    const int64_t row = i / F, f = i - row * F;
    const I* g = inp + row * 2 * F + f;
    Floats<K> gv = load<K>(g);
    const Floats<K> uv = load<K>(g + F);
#pragma unroll
    for (int k = 0; k < K; ++k) gv.v[k] = __fmul_rn(gate_act<G>(gv.v[k], nullptr), uv.v[k]);
    store<K>(out + i, gv);
  }
};

// dgate += d u act'(g); dup += d act(g).
template <Gate G, typename D = float, typename I = float>  // as GeluBackwardOp
struct GluBackwardOp {
  D* dinp;
  const I* inp;
  const float* dout;
  int64_t F;
  template <int K>
  __device__ void apply(int64_t i) const {
    const int64_t row = i / F, f = i - row * F;
    const I* g = inp + row * 2 * F + f;
    D* dg = dinp + row * 2 * F + f;
    const Floats<K> gv = load<K>(g), uv = load<K>(g + F), d = load<K>(dout + i);
    Floats<K> dgv = grad_in<K>(dg), duv = grad_in<K>(dg + F);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float grad;
      const float a = gate_act<G>(gv.v[k], &grad);
      dgv.v[k] = __fadd_rn(dgv.v[k], __fmul_rn(__fmul_rn(d.v[k], uv.v[k]), grad));
      duv.v[k] = __fadd_rn(duv.v[k], __fmul_rn(d.v[k], a));
    }
    store<K>(dg, dgv);
    store<K>(dg + F, duv);
  }
};

// One launch of Op<Gate::kSilu or kGelu, ...>{args...} over n elements.
template <template <Gate, typename...> class Op, typename... Ts, typename... Args>
void launch_glu(Gate gate, int64_t n, bool vec, Args... args) {
  if (gate == Gate::kSilu)
    launch_map(Op<Gate::kSilu, Ts...>{args...}, n, vec);
  else
    launch_map(Op<Gate::kGelu, Ts...>{args...}, n, vec);
}

// ---------------------------------------------------------------------------------------------
// AdamW: cpu::adamw_update's operations in its order, each rounded to fp32 (no contraction).

// One element: returns the new weight and updates m and v in place.
__device__ __forceinline__ float adam_element(float p, float g, float& m, float& v,
                                              const AdamScalars& s) {
  const float gi = __fmul_rn(g, s.gscale);  // clipping; exact when 1
  const float pi = __fmul_rn(p, s.decay);
  m = __fadd_rn(m, __fmul_rn(s.w1, __fsub_rn(gi, m)));  // lerp
  v = __fadd_rn(__fmul_rn(v, s.b2), __fmul_rn(__fmul_rn(s.w2, gi), gi));
  const float denom = __fadd_rn(__fsqrt_rn(v), s.eps);
  return __fsub_rn(pi, __fmul_rn(s.step_size, __fdiv_rn(m, denom)));
}

struct AdamwOp {
  float* p;
  const float* g;
  float* m;
  float* v;
  uint16_t* p16;
  AdamScalars s;
  bool keep = false;  // p the fp32 master of the value p16 (AdamwSlot::keep)
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> pv = load<K>(p + i), mv = load<K>(m + i), vv = load<K>(v + i);
    const Floats<K> gv = load<K>(g + i);
    uint16_t h[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (keep && bf16_ftz(pv.v[k]) != p16[i + k])
        pv.v[k] = __uint_as_float(static_cast<uint32_t>(p16[i + k]) << 16);
      pv.v[k] = adam_element(pv.v[k], gv.v[k], mv.v[k], vv.v[k], s);
      h[k] = bf16_ftz(pv.v[k]);
    }
    store<K>(p + i, pv);
    store<K>(m + i, mv);
    store<K>(v + i, vv);
    if (p16) store_bf16<K>(p16 + i, h);
  }
};

// bf16 master weights: AdamwOp's update on bf16(p) widened exactly, written back stochastically
// rounded (cpu::adamw_update_sr; core/stochastic_round.h).
struct AdamwSrOp {
  uint16_t* p;
  const float* g;
  float* m;
  float* v;
  AdamScalars s;
  uint32_t key, index0;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> mv = load<K>(m + i), vv = load<K>(v + i);
    const Floats<K> gv = load<K>(g + i);
    uint16_t h[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float pi = adam_element(__uint_as_float(static_cast<uint32_t>(p[i + k]) << 16), gv.v[k],
                                    mv.v[k], vv.v[k], s);
      h[k] = bf16_round_stochastic(pi, sr_bits(key, index0 + static_cast<uint32_t>(i + k)));
    }
    store<K>(m + i, mv);
    store<K>(v + i, vv);
    store_bf16<K>(p + i, h);
  }
};

// adamw_update_many: blocks of kThreads, each over one chunk of one slot (the slot table and the
// chunk list are uploaded with the launch). A slot whose arrays are aligned takes 4 elements per
// thread at a time, as launch_map's vectorized path.
constexpr int64_t kAdamwChunk = 16384;  // a multiple of 4

struct AdamwDevSlot {
  AdamwSlot s;
  bool vec;
};

struct AdamwChunk {
  int64_t slot, begin;
};

template <typename Op>
__device__ void apply_range(const Op& op, int64_t begin, int64_t end, bool vec) {
  if (vec) {
    const int64_t end4 = begin + (end - begin) / 4 * 4;
    for (int64_t i = begin + 4 * threadIdx.x; i < end4; i += 4 * blockDim.x)
      op.template apply<4>(i);
    begin = end4;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) op.template apply<1>(i);
}

__global__ void __launch_bounds__(kThreads)
    adamw_many_kernel(const AdamwDevSlot* slots, const AdamwChunk* chunks, AdamScalars with_decay,
                      AdamScalars without_decay) {
  const AdamwChunk c = chunks[blockIdx.x];
  const AdamwDevSlot d = slots[c.slot];
  const AdamwSlot& s = d.s;
  const AdamScalars& sc = s.decay ? with_decay : without_decay;
  const int64_t end = min(c.begin + kAdamwChunk, s.n);
  if (s.sr)
    apply_range(AdamwSrOp{static_cast<uint16_t*>(s.p), s.g, s.m, s.v, sc, s.key, s.index0}, c.begin,
                end, d.vec);
  else
    apply_range(AdamwOp{static_cast<float*>(s.p), s.g, s.m, s.v, s.p16, sc, s.keep}, c.begin, end,
                d.vec);
}

}  // namespace

void rope_forward(float* x, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                  const int32_t* pos) {
  rope(x, cos, sin, B, T, n_heads, HS, row_stride, pos0, pos, 1.0f);
}

void rope_forward(uint16_t* x, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                  const int32_t* pos) {
  rope(x, cos, sin, B, T, n_heads, HS, row_stride, pos0, pos, 1.0f);
}
void rope_backward(uint16_t* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                   const int32_t* pos) {
  rope(dx, cos, sin, B, T, n_heads, HS, row_stride, pos0, pos, -1.0f);
}
void rope_backward(float* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                   const int32_t* pos) {
  rope(dx, cos, sin, B, T, n_heads, HS, row_stride, pos0, pos, -1.0f);
}

void gelu_forward(float* out, const float* inp, int64_t n) {
  launch_map(GeluForwardOp<float>{out, inp}, n, aligned16(out, inp));
}

void gelu_forward(uint16_t* out, const float* inp, int64_t n) {
  launch_map(GeluForwardOp<uint16_t>{out, inp}, n, aligned16(out, inp));
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) {
  launch_map(GeluBackwardOp<>{dinp, inp, dout}, n, aligned16(dinp, inp, dout));
}
void gelu_forward(uint16_t* out, const uint16_t* inp, int64_t n) {
  launch_map(GeluForwardOp<uint16_t, uint16_t>{out, inp}, n, aligned4(out) && aligned4(inp));
}
void gelu_backward(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t n) {
  launch_map(GeluBackwardOp<uint16_t, uint16_t>{dinp, inp, dout}, n,
             aligned4(dinp) && aligned4(inp) && aligned4(dout));
}

void glu_forward(float* out, const float* inp, int64_t N, int64_t F, Gate gate) {
  launch_glu<GluForwardOp, float>(gate, N * F, F % 4 == 0 && aligned16(out, inp), out, inp, F);
}

void glu_forward(uint16_t* out, const float* inp, int64_t N, int64_t F, Gate gate) {
  launch_glu<GluForwardOp, uint16_t>(gate, N * F, F % 4 == 0 && aligned16(out, inp), out, inp, F);
}

void glu_backward(float* dinp, const float* inp, const float* dout, int64_t N, int64_t F,
                  Gate gate) {
  launch_glu<GluBackwardOp>(gate, N * F, F % 4 == 0 && aligned16(dinp, inp, dout), dinp, inp, dout,
                            F);
}
void glu_forward(uint16_t* out, const uint16_t* inp, int64_t N, int64_t F, Gate gate) {
  launch_glu<GluForwardOp, uint16_t, uint16_t>(
      gate, N * F, F % 4 == 0 && aligned4(out) && aligned4(inp), out, inp, F);
}
void glu_backward(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t N, int64_t F,
                  Gate gate) {
  launch_glu<GluBackwardOp, uint16_t, uint16_t>(
      gate, N * F, F % 4 == 0 && aligned4(dinp) && aligned4(inp) && aligned4(dout), dinp, inp, dout,
      F);
}

void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale) {
  // The scalars exactly as cpu::adamw_update computes them.
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  launch_map(AdamwOp{p, g, m, v, p16, s}, n, aligned16(p, g, m, v) && aligned8(p16));
}

void adamw_update_sr(uint16_t* p, const float* g, float* m, float* v, int64_t n, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     double grad_scale, uint32_t key, uint32_t index0) {
  const AdamScalars s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  launch_map(AdamwSrOp{p, g, m, v, s, key, index0}, n, aligned16(g, m, v) && aligned8(p));
}

void adamw_update_many(const AdamwSlot* slots, int64_t count, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, double grad_scale) {
  std::vector<AdamwDevSlot> dev;
  std::vector<AdamwChunk> chunks;
  for (int64_t i = 0; i < count; ++i) {
    const AdamwSlot& s = slots[i];
    if (s.n <= 0) continue;
    const bool vec = s.sr ? aligned16(s.g, s.m, s.v) && aligned8(s.p)
                          : aligned16(s.p, s.g, s.m, s.v) && aligned8(s.p16);
    for (int64_t b = 0; b < s.n; b += kAdamwChunk)
      chunks.push_back({static_cast<int64_t>(dev.size()), b});
    dev.push_back({s, vec});
  }
  if (chunks.empty()) return;
  // One upload of the table and the chunks into a device buffer that grows to the largest step
  // (the first) and is then reused; the copy is ordered on the stream, after the last step's
  // kernel has read the old table.
  const size_t slot_bytes = (dev.size() * sizeof(AdamwDevSlot) + 15) / 16 * 16;
  const size_t bytes = slot_bytes + chunks.size() * sizeof(AdamwChunk);
  std::vector<unsigned char> host(bytes);
  std::memcpy(host.data(), dev.data(), dev.size() * sizeof(AdamwDevSlot));
  std::memcpy(host.data() + slot_bytes, chunks.data(), chunks.size() * sizeof(AdamwChunk));
  static std::mutex mu;
  static GrowingBuffer table;
  std::lock_guard<std::mutex> lock(mu);
  void* buf = table.get(bytes);
  cuda::memcpy(buf, host.data(), bytes, Copy::kHostToDevice);
  const auto* d_slots = static_cast<const AdamwDevSlot*>(buf);
  const auto* d_chunks =
      reinterpret_cast<const AdamwChunk*>(static_cast<const unsigned char*>(buf) + slot_bytes);
  // The scalars exactly as cpu::adamw_update computes them (no decay: weight_decay 0).
  const AdamScalars sd = adam_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  const AdamScalars sn = adam_scalars(lr, beta1, beta2, eps, 0.0, step, grad_scale);
  adamw_many_kernel<<<static_cast<unsigned>(chunks.size()), kThreads, 0, cur_stream()>>>(
      d_slots, d_chunks, sd, sn);
  LMF_CUDA_LAUNCHED();
}

namespace {
__global__ void dropout_forward_kernel(float* out, const float* x, const uint16_t* h, int64_t n,
                                       uint32_t cut, float scale, uint32_t key) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x ? x[i] : __uint_as_float(static_cast<uint32_t>(h[i]) << 16);
    out[i] = sr_bits(key, static_cast<uint32_t>(i)) >= cut ? v * scale : 0.0f;
  }
}
__global__ void dropout_backward_kernel(float* dinp, const float* g, int64_t n, uint32_t cut,
                                        float scale, uint32_t key) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    if (sr_bits(key, static_cast<uint32_t>(i)) >= cut) dinp[i] = __fadd_rn(dinp[i], g[i] * scale);
}
unsigned dropout_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65536));
}
}  // namespace

void dropout_forward(float* out, const float* x, const uint16_t* h, int64_t n, uint32_t cut,
                     float scale, uint32_t key) {
  if (n <= 0) return;
  dropout_forward_kernel<<<dropout_blocks(n), 256, 0, cur_stream()>>>(out, x, h, n, cut, scale,
                                                                      key);
  LMF_CUDA(cudaGetLastError());
}

void dropout_backward(float* dinp, const float* g, int64_t n, uint32_t cut, float scale,
                      uint32_t key) {
  if (n <= 0) return;
  dropout_backward_kernel<<<dropout_blocks(n), 256, 0, cur_stream()>>>(dinp, g, n, cut, scale, key);
  LMF_CUDA(cudaGetLastError());
}

}  // namespace lmforge::cuda
