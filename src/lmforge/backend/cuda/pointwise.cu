// Per-element kernels on the grid-stride map: rotary embedding, GELU, SwiGLU and AdamW.
#include "lmforge/backend/cuda/device.cuh"

namespace lmforge::cuda {

using namespace detail;

namespace {

// ---------------------------------------------------------------------------------------------
// Rotary embedding: one unit per rotated pair (i, i + HS/2) of one head of one token.

struct RopeOp {
  float* x;
  const float* cos;
  const float* sin;
  int64_t T, n_heads, half, HS, row_stride, pos0;
  float sign;  // +1 forward, -1 backward (the inverse rotation)
  template <int K>
  __device__ void apply(int64_t u) const {  // K divides half: one head per call
    const int64_t r = u / half, i = u - r * half;
    const int64_t bt = r / n_heads, h = r - bt * n_heads, t = bt % T;
    float* v = x + bt * row_stride + h * HS + i;
    const int64_t cs = (pos0 + t) * half + i;
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

void rope(float* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t n_heads,
          int64_t HS, int64_t row_stride, int64_t pos0, float sign) {
  const int64_t half = HS / 2;
  const RopeOp op{x, cos, sin, T, n_heads, half, HS, row_stride, pos0, sign};
  launch_map(op, B * T * n_heads * half,
             half % 4 == 0 && row_stride % 4 == 0 && aligned16(x, cos, sin));
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh approximation) and SwiGLU.

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluK = 0.044715f;
constexpr float kGeluK3 = static_cast<float>(3 * 0.044715);

struct GeluForwardOp {
  float* out;
  const float* inp;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> v = load<K>(inp + i);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float x = v.v[k], u = kGeluC * (x + kGeluK * x * x * x);
      v.v[k] = 0.5f * x * (1.0f + tanhf(u));
    }
    store<K>(out + i, v);
  }
};

struct GeluBackwardOp {
  float* dinp;
  const float* inp;
  const float* dout;
  template <int K>
  __device__ void apply(int64_t i) const {
    const Floats<K> xv = load<K>(inp + i), g = load<K>(dout + i);
    Floats<K> d = load<K>(dinp + i);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float x = xv.v[k];
      const float th = tanhf(kGeluC * (x + kGeluK * x * x * x));
      const float sech2 = 1.0f - th * th;
      const float du = kGeluC * (1.0f + kGeluK3 * x * x);
      d.v[k] += g.v[k] * (0.5f * (1.0f + th) + 0.5f * x * sech2 * du);
    }
    store<K>(dinp + i, d);
  }
};

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

struct SwigluForwardOp {
  float* out;
  const float* inp;
  int64_t F;
  template <int K>
  __device__ void apply(int64_t i) const {  // K divides F: one row per call
    const int64_t row = i / F, f = i - row * F;
    const float* g = inp + row * 2 * F + f;
    Floats<K> gv = load<K>(g);
    const Floats<K> uv = load<K>(g + F);
#pragma unroll
    for (int k = 0; k < K; ++k) gv.v[k] = gv.v[k] * sigmoid(gv.v[k]) * uv.v[k];
    store<K>(out + i, gv);
  }
};

// dgate += d u s (1 + g (1 - s)); dup += d g s, with s = sigmoid(g).
struct SwigluBackwardOp {
  float* dinp;
  const float* inp;
  const float* dout;
  int64_t F;
  template <int K>
  __device__ void apply(int64_t i) const {
    const int64_t row = i / F, f = i - row * F;
    const float* g = inp + row * 2 * F + f;
    float* dg = dinp + row * 2 * F + f;
    const Floats<K> gv = load<K>(g), uv = load<K>(g + F), d = load<K>(dout + i);
    Floats<K> dgv = load<K>(dg), duv = load<K>(dg + F);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float x = gv.v[k], s = sigmoid(x);
      dgv.v[k] += d.v[k] * uv.v[k] * s * (1.0f + x * (1.0f - s));
      duv.v[k] += d.v[k] * x * s;
    }
    store<K>(dg, dgv);
    store<K>(dg + F, duv);
  }
};

// ---------------------------------------------------------------------------------------------
// AdamW: cpu::adamw_update's operations in its order, each rounded to fp32 (no contraction).

struct AdamwOp {
  float* p;
  const float* g;
  float* m;
  float* v;
  uint16_t* p16;
  float step_size, decay, w1, w2, b2, bc2_sqrt, eps, gscale;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> pv = load<K>(p + i), mv = load<K>(m + i), vv = load<K>(v + i);
    const Floats<K> gv = load<K>(g + i);
    uint16_t h[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float gi = __fmul_rn(gv.v[k], gscale);  // clipping; exact when 1
      float pi = __fmul_rn(pv.v[k], decay);
      const float mi = __fadd_rn(mv.v[k], __fmul_rn(w1, __fsub_rn(gi, mv.v[k])));  // lerp
      const float vi = __fadd_rn(__fmul_rn(vv.v[k], b2), __fmul_rn(__fmul_rn(w2, gi), gi));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
      pi = __fsub_rn(pi, __fmul_rn(step_size, __fdiv_rn(mi, denom)));
      pv.v[k] = pi;
      mv.v[k] = mi;
      vv.v[k] = vi;
      h[k] = bf16_ftz(pi);
    }
    store<K>(p + i, pv);
    store<K>(m + i, mv);
    store<K>(v + i, vv);
    if (p16) store_bf16<K>(p16 + i, h);
  }
};

}  // namespace

void rope_forward(float* x, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0) {
  rope(x, cos, sin, B, T, n_heads, HS, row_stride, pos0, 1.0f);
}

void rope_backward(float* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0) {
  rope(dx, cos, sin, B, T, n_heads, HS, row_stride, pos0, -1.0f);
}

void gelu_forward(float* out, const float* inp, int64_t n) {
  launch_map(GeluForwardOp{out, inp}, n, aligned16(out, inp));
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) {
  launch_map(GeluBackwardOp{dinp, inp, dout}, n, aligned16(dinp, inp, dout));
}

void swiglu_forward(float* out, const float* inp, int64_t N, int64_t F) {
  launch_map(SwigluForwardOp{out, inp, F}, N * F, F % 4 == 0 && aligned16(out, inp));
}

void swiglu_backward(float* dinp, const float* inp, const float* dout, int64_t N, int64_t F) {
  launch_map(SwigluBackwardOp{dinp, inp, dout, F}, N * F, F % 4 == 0 && aligned16(dinp, inp, dout));
}

void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale) {
  // The scalars exactly as cpu::adamw_update computes them (double, then fp32).
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const AdamwOp op{p,
                   g,
                   m,
                   v,
                   p16,
                   /*step_size=*/static_cast<float>(lr / bc1),
                   /*decay=*/static_cast<float>(1.0 - lr * weight_decay),
                   /*w1=*/static_cast<float>(1.0 - beta1),
                   /*w2=*/static_cast<float>(1.0 - beta2),
                   /*b2=*/static_cast<float>(beta2),
                   /*bc2_sqrt=*/static_cast<float>(std::sqrt(bc2)),
                   /*eps=*/static_cast<float>(eps),
                   /*gscale=*/static_cast<float>(grad_scale)};
  launch_map(op, n, aligned16(p, g, m, v) && aligned8(p16));
}

}  // namespace lmforge::cuda
