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
                       int64_t T_, int64_t C, int64_t V, const int32_t* pos, int64_t v0,
                       int64_t vocab_total) {
  const int64_t Vt = vocab_total > 0 ? vocab_total : V;
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T_; ++bt) {
    if (!check.ok(tokens, bt, Vt)) continue;
    const int64_t row = tokens[bt] - v0;  // (vocabulary parallelism: another rank's: zeros)
    const W* e = row >= 0 && row < V ? wte + row * C : nullptr;
    const W* p = wpe ? wpe + (pos ? pos[bt] : bt % T_) * C : nullptr;
    T* o = out + bt * C;
    for (int64_t c = 0; c < C; ++c) o[c] = (e ? widen(e[c]) : T(0)) + (p ? widen(p[c]) : T(0));
  }
  check.raise(tokens, "token id", Vt);
}

template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B,
                        int64_t T_, int64_t C, int64_t V, const int32_t* pos, int64_t v0,
                        int64_t vocab_total) {
  // Scatter-add into dwte: split by channel so rows for repeated tokens never race, and the
  // summation order (b, t ascending) is fixed.
  constexpr int64_t kBlock = 16;
  int64_t nblocks = (C + kBlock - 1) / kBlock;
  const int64_t Vt = vocab_total > 0 ? vocab_total : V;
  IdCheck check;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < (dwte ? nblocks : 0); ++blk) {  // (no dwte: the positions' only)
    int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    for (int64_t bt = 0; bt < B * T_; ++bt) {
      if (!check.ok(tokens, bt, Vt)) continue;
      const int64_t row = tokens[bt] - v0;
      if (row < 0 || row >= V) continue;  // another rank's row
      T* d = dwte + row * C;
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
  check.raise(tokens, "token id", Vt);
}

template void embedding_forward(float*, const int32_t*, const float*, const float*, int64_t,
                                int64_t, int64_t, int64_t, const int32_t*, int64_t, int64_t);
template void embedding_forward(float*, const int32_t*, const uint16_t*, const uint16_t*, int64_t,
                                int64_t, int64_t, int64_t, const int32_t*, int64_t, int64_t);
template void embedding_forward(double*, const int32_t*, const double*, const double*, int64_t,
                                int64_t, int64_t, int64_t, const int32_t*, int64_t, int64_t);
template void embedding_backward<float>(float*, float*, const float*, const int32_t*, int64_t,
                                        int64_t, int64_t, int64_t, const int32_t*, int64_t,
                                        int64_t);
template void embedding_backward<double>(double*, double*, const double*, const int32_t*, int64_t,
                                         int64_t, int64_t, int64_t, const int32_t*, int64_t,
                                         int64_t);

}  // namespace lmforge::cpu
