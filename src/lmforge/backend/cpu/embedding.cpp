// Token (+ learned position) embedding, as GPT-2's encoder: out[b,t] = wte[tok[b,t]] + wpe[t], or
// wpe[pos[b,t]] with explicit positions (packed rows: each document from position 0).
#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/error.h"

namespace lmforge::cpu {

namespace {
template <typename T>
T widen(T x) {
  return x;
}
float widen(uint16_t h) { return bf16_to_fp32(h); }
}  // namespace

void IdCheck::raise(const int32_t* ids, const char* what, int64_t V) const {
  const int64_t i = at.load();
  if (i >= 0) fail("{} {} (at position {}) outside the vocabulary of {}", what, ids[i], i, V);
}

template <typename T, typename W>
void embedding_forward(T* out, const int32_t* tokens, const W* wte, const W* wpe, int64_t B,
                       int64_t T_, int64_t C, int64_t V, const int32_t* pos) {
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T_; ++bt) {
    if (!check.ok(tokens, bt, V)) continue;
    const int32_t tok = tokens[bt];
    const W* e = wte + tok * C;
    const W* p = wpe ? wpe + (pos ? pos[bt] : bt % T_) * C : nullptr;
    T* o = out + bt * C;
    for (int64_t c = 0; c < C; ++c) o[c] = widen(e[c]) + (p ? widen(p[c]) : T(0));
  }
  check.raise(tokens, "token id", V);
}

template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B,
                        int64_t T_, int64_t C, int64_t V, const int32_t* pos) {
  // Scatter-add into dwte: split by channel so rows for repeated tokens never race, and the
  // summation order (b, t ascending) is fixed.
  constexpr int64_t kBlock = 16;
  int64_t nblocks = (C + kBlock - 1) / kBlock;
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    for (int64_t bt = 0; bt < B * T_; ++bt) {
      if (!check.ok(tokens, bt, V)) continue;
      T* d = dwte + tokens[bt] * C;
      const T* g = dout + bt * C;
      for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
    }
  }
  if (dwpe && pos) {  // the same scatter-add for explicit positions (b, t ascending per row)
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
      for (int64_t bt = 0; bt < B * T_; ++bt) {
        T* d = dwpe + pos[bt] * C;
        const T* g = dout + bt * C;
        for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
      }
    }
  } else if (dwpe) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t b = 0; b < B; ++b) {
        const T* g = dout + (b * T_ + t) * C;
        for (int64_t c = 0; c < C; ++c) dwpe[t * C + c] += g[c];
      }
  }
  check.raise(tokens, "token id", V);
}

template void embedding_forward(float*, const int32_t*, const float*, const float*, int64_t,
                                int64_t, int64_t, int64_t, const int32_t*);
template void embedding_forward(float*, const int32_t*, const uint16_t*, const uint16_t*, int64_t,
                                int64_t, int64_t, int64_t, const int32_t*);
template void embedding_forward(double*, const int32_t*, const double*, const double*, int64_t,
                                int64_t, int64_t, int64_t, const int32_t*);
template void embedding_backward<float>(float*, float*, const float*, const int32_t*, int64_t,
                                        int64_t, int64_t, int64_t, const int32_t*);
template void embedding_backward<double>(double*, double*, const double*, const int32_t*, int64_t,
                                         int64_t, int64_t, int64_t, const int32_t*);

}  // namespace lmforge::cpu
