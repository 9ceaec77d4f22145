// Causal scaled dot-product attention (Vaswani et al. 2017) with grouped-query heads
// (Ainslie et al. 2023) and an optional sliding window (Mistral, Phi-3): with window W > 0, query
// t attends to keys (t - W, t], as Hugging Face's sliding-window mask. Packed rows (several
// documents in one row) pass doc_start, the first position of each query's document: query t
// then sees keys [doc_start[t], t] only (a block-diagonal causal mask, as flash-attention's
// variable-length kernels), combined with the window. The scores are scale (q . k), optionally
// soft-capped (backend/attn_score.h: Gemma's scale and Gemma 2's attention soft-capping).
//
// Tiled as FlashAttention (Dao et al. 2022; backward as FlashAttention-2, Dao 2023): queries in
// blocks of kBq rows meet keys in blocks of kBk columns, and the softmax is computed online
// (running row max m, running sum l, the output accumulator rescaled by e^(m_old - m_new) when the
// max grows), so nothing of size (T, T) is ever materialised: the working set of a thread is at
// most two (kBq, kBk) tiles on its stack (64 KiB in fp32). Key blocks above the causal diagonal or
// wholly before the window are skipped. Forward keeps only the per-row logsumexp lse = m + log(l)
// for backward, which recomputes P = exp(S - lse) tile by tile.
//
// Numerics: T = float computes S, P, the running max/sum and the output accumulator in fp32
// (block matmuls through sgemm; exp by exp512 / exp256 where AVX-512 / AVX2 is present, else
// std::exp); the row reduction D = rowsum(dO * O) of backward is accumulated in double. T =
// double is double throughout (gradient checks). Every task walks its tiles in a fixed order, so
// results do not depend on the thread count.
//
// Parallelism: forward over (batch, head, query block); backward over (batch, kv head), so the
// query heads sharing a kv head add into dK/dV one after the other without races, and the rows
// of dQ of a query head are written by that head's task only.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/error.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for this file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lmforge::cpu {

namespace {

// Tile sizes, measured on gpt2 shapes (HS = 64, T = 512, sgemm from inside the OpenMP region):
// 64 x 128 runs attention ~15% faster than 64 x 64 and as fast as 128 x 128, which wastes more
// of the diagonal tiles and leaves fewer tasks to balance.
constexpr int64_t kBq = 64;   // query rows per tile
constexpr int64_t kBk = 128;  // key columns per tile

// The first key position query t may see; lo is the first position of its document (0 in an
// unpacked row).
inline int64_t first_key(int64_t t, int64_t window, int64_t lo = 0) {
  return std::max(window > 0 && t >= window ? t - window + 1 : 0, lo);
}

// Where the documents of a row start: ds[t] for query t (nullptr: one document per row). Document
// starts never decrease along a row (packed documents are contiguous), so a tile's first row has
// the smallest first key.
inline int64_t doc_lo(const int32_t* ds, int64_t t) { return ds ? ds[t] : 0; }

// The first key block (a multiple of kBk) that query rows from t0 on may see.
inline int64_t first_key_block(int64_t t0, int64_t window, const int32_t* ds, int64_t bk = kBk) {
  return first_key(t0, window, doc_lo(ds, t0)) / bk * bk;
}

// The columns [a, e) of key tile j0 (nk wide) that query t sees; empty when a >= e.
inline void visible(int64_t t, int64_t j0, int64_t nk, int64_t window, int64_t lo, int64_t& a,
                    int64_t& e) {
  a = std::max<int64_t>(first_key(t, window, lo) - j0, 0);
  e = std::min<int64_t>(t - j0 + 1, nk);
}

// p[j] = e^(s[j] - m) for j in [0, n); returns the sum of p (in T, lane by lane under AVX-512 or
// AVX2, then lanes in a fixed order).
template <typename T>
T exp_sub_sum(T* p, const T* s, int64_t n, T m) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(s[j] - m);
    sum += p[j];
  }
  return sum;
}

LMF_AVX512 float exp_sub_sum_avx512(float* p, const float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
    _mm512_storeu_ps(p + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (j < n) {
    const __mmask16 k = lanes(n - j);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm));
    e = _mm512_maskz_mov_ps(k, e);
    _mm512_mask_storeu_ps(p + j, k, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// As exp_sub_sum_avx512 on 8 lanes (a masked load and store for the tail, so that every entry
// goes through exp256).
LMF_AVX2 float exp_sub_sum_avx2(float* p, const float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (j < n) {
    const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(s + j, k), vm));
    e = _mm256_and_ps(e, _mm256_castsi256_ps(k));
    _mm256_maskstore_ps(p + j, k, e);
    acc = _mm256_add_ps(acc, e);
  }
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

template <>
float exp_sub_sum<float>(float* p, const float* s, int64_t n, float m) {
  if (has_avx512()) return exp_sub_sum_avx512(p, s, n, m);
  if (has_avx2()) return exp_sub_sum_avx2(p, s, n, m);
  float sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(s[j] - m);
    sum += p[j];
  }
  return sum;
}

inline double widen(float x) { return x; }
inline double widen(double x) { return x; }
inline double widen(uint16_t x) { return bf16_to_fp32(x); }

// D[r] = rowsum(dO * O) of the nq rows (ld apart, HS wide), accumulated in double; backward's
// correction of dP. dO and O fp32, double or bf16.
template <typename T, typename G, typename O>
void rowsum_products(T* D, const G* dO, const O* out, int64_t nq, int64_t HS, int64_t ld) {
  for (int64_t r = 0; r < nq; ++r) {
    double dot = 0;
    for (int64_t d = 0; d < HS; ++d) dot += widen(dO[r * ld + d]) * widen(out[r * ld + d]);
    D[r] = static_cast<T>(dot);
  }
}

// row[j] = 0 for j in [0, n) outside [a, e) (all of them when a >= e): a tile row's masked entries.
template <typename T>
void zero_outside(T* row, int64_t a, int64_t e, int64_t n) {
  if (a >= e) a = e = n;
  std::fill(row, row + a, T(0));
  std::fill(row + e, row + n, T(0));
}

// Over the nq rows of a score tile (row stride kBk) of queries i0.. and keys j0..j0+nk: calls
// f(r, row, a, e) for each row that sees some of the tile's keys, on its visible columns [a, e),
// and sets every masked entry to 0 (a row that sees none is all 0 and f is not called).
// ds: the row's document starts (nullptr: one document).
template <typename T, typename F>
void for_visible_rows(T* s, int64_t i0, int64_t j0, int64_t nq, int64_t nk, int64_t window,
                      const int32_t* ds, F&& f, int64_t ld = kBk) {
  for (int64_t r = 0; r < nq; ++r) {
    T* row = s + r * ld;
    int64_t a, e;
    visible(i0 + r, j0, nk, window, doc_lo(ds, i0 + r), a, e);
    if (a < e) f(r, row, a, e);
    zero_outside(row, a, e, nk);
  }
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* lse, const T* qkv, int64_t B, int64_t T_, int64_t NH, int64_t NKV,
                       int64_t HS, int64_t window, const int32_t* doc_start,
                       const AttnScore& score) {
  const int64_t Cq = (NH + 2 * NKV) * HS, Co = NH * HS, group = NH / NKV;
  const int64_t nqb = (T_ + kBq - 1) / kBq;
  const T scale = score.scale<T>(HS), cap = T(score.softcap);
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        alignas(64) T s[kBq * kBk];  // S, then P, of one tile
        T m[kBq], l[kBq];            // running max and sum per row
        const int64_t i0 = qb * kBq, nq = std::min(kBq, T_ - i0);
        const T* q = qkv + (b * T_ + i0) * Cq + h * HS;
        const T* k = qkv + b * T_ * Cq + (NH + h / group) * HS;
        const T* v = qkv + b * T_ * Cq + (NH + NKV + h / group) * HS;
        T* o = out + (b * T_ + i0) * Co + h * HS;  // (nq, HS) rows of stride Co: the accumulator
        const int32_t* ds = doc_start ? doc_start + b * T_ : nullptr;
        for (int64_t r = 0; r < nq; ++r) {
          std::fill(o + r * Co, o + r * Co + HS, T(0));
          m[r] = -std::numeric_limits<T>::infinity();
          l[r] = 0;
        }
        for (int64_t j0 = first_key_block(i0, window, ds); j0 < i0 + nq; j0 += kBk) {
          const int64_t nk = std::min(kBk, i0 + nq - j0);
          gemm<T>(false, true, nq, nk, HS, scale, q, Cq, k + j0 * Cq, Cq, T(0), s, kBk);
          // A row that sees none of the tile gets P = 0 and rescales nothing.
          for_visible_rows(
              s, i0, j0, nq, nk, window, ds, [&](int64_t r, T* row, int64_t a, int64_t e) {
                if (cap > 0) softcap_serial<T>(row + a, nullptr, e - a, cap);
                const T mx = std::max(m[r], *std::max_element(row + a, row + e));
                if (mx > m[r]) {  // rescale what is accumulated (from -inf: all zero, factor 0)
                  const T corr = std::exp(m[r] - mx);
                  l[r] *= corr;
                  for (int64_t d = 0; d < HS; ++d) o[r * Co + d] *= corr;
                  m[r] = mx;
                }
                l[r] += exp_sub_sum(row + a, row + a, e - a, mx);
              });
          gemm<T>(false, false, nq, HS, nk, T(1), s, kBk, v + j0 * Cq, Cq, T(1), o, Co);
        }
        T* lr = lse + (b * NH + h) * T_ + i0;
        for (int64_t r = 0; r < nq; ++r) {  // every row sees its own key, so l >= 1
          const T inv = T(1) / l[r];
          for (int64_t d = 0; d < HS; ++d) o[r * Co + d] *= inv;
          lr[r] = m[r] + std::log(l[r]);
        }
      }
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse, int64_t B,
                        int64_t T_, int64_t NH, int64_t NKV, int64_t HS, int64_t window,
                        const int32_t* doc_start, const AttnScore& score) {
  const int64_t Cq = (NH + 2 * NKV) * HS, Co = NH * HS, group = NH / NKV;
  const int64_t nqb = (T_ + kBq - 1) / kBq;
  const T scale = score.scale<T>(HS), cap = T(score.softcap);
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < NKV; ++kvh) {
      alignas(64) T p[kBq * kBk];   // P of one tile
      alignas(64) T dp[kBq * kBk];  // dP, then dS
      alignas(64) T f[kBq * kBk];   // soft-capping's derivative, if any
      T D[kBq];                     // rowsum(dO * O) per query row
      const T* base = qkv + b * T_ * Cq;
      T* dbase = dqkv + b * T_ * Cq;
      const T* k = base + (NH + kvh) * HS;
      const T* v = base + (NH + NKV + kvh) * HS;
      T* dk = dbase + (NH + kvh) * HS;
      T* dv = dbase + (NH + NKV + kvh) * HS;
      const int32_t* ds = doc_start ? doc_start + b * T_ : nullptr;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * kBq, nq = std::min(kBq, T_ - i0);
          const T* q = base + i0 * Cq + h * HS;
          T* dq = dbase + i0 * Cq + h * HS;
          const T* dO = dout + (b * T_ + i0) * Co + h * HS;
          const T* O = out + (b * T_ + i0) * Co + h * HS;
          const T* lr = lse + (b * NH + h) * T_ + i0;
          rowsum_products(D, dO, O, nq, HS, Co);
          for (int64_t j0 = first_key_block(i0, window, ds); j0 < i0 + nq; j0 += kBk) {
            const int64_t nk = std::min(kBk, i0 + nq - j0);
            // P = exp(scale Q K^T - lse) (capped), zero where masked.
            gemm<T>(false, true, nq, nk, HS, scale, q, Cq, k + j0 * Cq, Cq, T(0), p, kBk);
            for_visible_rows(p, i0, j0, nq, nk, window, ds,
                             [&](int64_t r, T* row, int64_t a, int64_t e) {
                               if (cap > 0) softcap_serial<T>(row + a, f + r * kBk + a, e - a, cap);
                               exp_sub_sum(row + a, row + a, e - a, lr[r]);
                             });
            // dV += P^T dO; dP = dO V^T
            gemm<T>(true, false, nk, HS, nq, T(1), p, kBk, dO, Co, T(1), dv + j0 * Cq, Cq);
            gemm<T>(false, true, nq, nk, HS, T(1), dO, Co, v + j0 * Cq, Cq, T(0), dp, kBk);
            // dS = P * (dP - D); masked entries have P = 0 and so dS = 0.
            for (int64_t r = 0; r < nq; ++r)
              for (int64_t j = 0; j < nk; ++j)
                dp[r * kBk + j] = p[r * kBk + j] * (dp[r * kBk + j] - D[r]);
            if (cap > 0)  // through the cap: dS *= 1 - tanh^2
              for_visible_rows(dp, i0, j0, nq, nk, window, ds,
                               [&](int64_t r, T* row, int64_t a, int64_t e) {
                                 for (int64_t j = a; j < e; ++j) row[j] *= f[r * kBk + j];
                               });
            // dQ += scale dS K; dK += scale dS^T Q
            gemm<T>(false, false, nq, HS, nk, scale, dp, kBk, k + j0 * Cq, Cq, T(1), dq, Cq);
            gemm<T>(true, false, nk, HS, nq, scale, dp, kBk, q, Cq, T(1), dk + j0 * Cq, Cq);
          }
        }
    }
}

// ---- bf16 operands (bf16 activations on a CPU with AVX512-BF16 or AMX) --------------------------
//
// The same tiles, online softmax and task split as above, with the tile products as bf16 GEMMs
// with fp32 accumulation (gemm_bf16_tile: lmforge's AMX or AVX512-BF16 kernels run by the calling
// thread, cpu/amx.cpp; oneDNN's measured on a 2-core Sapphire Rapids at 64 x 128 x 64 tiles:
// 300-550 GFLOP/s against 90-165 for fp32 sgemm tiles). Q, K, V and dO are read as bf16 where they
// lie; S, the softmax, O's accumulator, D and dP are fp32; P and dS are rounded to bf16 for their
// products (as FlashAttention does on GPUs). The scale is applied to S before the softmax and
// folded into dS.

namespace {

// The softmax passes of the bf16 kernels on a row of raw scores s (fp32; bf16 tiles imply
// AVX512-BF16): x = scale s[j] and e^(x - m) with the fp32 kernels' operations (exp512, lanes
// summed one by one in a fixed order), fused so that a tile row is read once or twice and only
// what the next product reads is stored.

// The largest scale s[j], j in [0, n).
LMF_AVX512 float scaled_max(const float* s, int64_t n, float scale) {
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(n - j);
    mx = _mm512_mask_max_ps(mx, k, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), vs));
  }
  return _mm512_reduce_max_ps(mx);
}

// p16[j] = bf16(e^(scale s[j] - m)) for j in [0, n), and p[j] the fp32 value unless p is null
// (p may be s); returns the sum of the fp32 values.
LMF_AVX512_BF16 float exp_scaled(float* p, uint16_t* p16, const float* s, int64_t n, float scale,
                                 float m) {
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(n - j);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), vs);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(x, vm)));
    if (p) _mm512_mask_storeu_ps(p + j, k, e);
    store16(p16 + j, k, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// ds16[j] = bf16(scale p[j] (dp[j] - D) f[j]), j in [0, n): backward's scaled dS, through
// soft-capping's derivative f unless f is null.
LMF_AVX512_BF16 void softmax_grad_bf16(uint16_t* ds16, const float* p, const float* dp, int64_t n,
                                       float scale, float D, const float* f) {
  const __m512 vs = _mm512_set1_ps(scale), vd = _mm512_set1_ps(D);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = lanes(n - j);
    __m512 x = _mm512_mul_ps(_mm512_mul_ps(vs, _mm512_maskz_loadu_ps(k, p + j)),
                             _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), vd));
    if (f) x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(k, f + j));
    store16(ds16 + j, k, x);
  }
}

std::atomic<bool> g_bf16_tiles{true};

// The bf16 kernels' tiles: larger than the fp32 ones (each product is a oneDNN call of a few
// microseconds' overhead).
constexpr int64_t kQ16 = 64, kK16 = 128;

template <typename T, size_t N>
struct alignas(64) Tile {
  T v[N];
};

}  // namespace

bool bf16_attention_tiles(int64_t HS) {
  return g_bf16_tiles.load(std::memory_order_relaxed) && HS <= kMaxBf16HeadSize &&
         gemm_bf16_tile_available();
}
void set_bf16_attention_tiles(bool on) { g_bf16_tiles.store(on); }

void attention_forward_bf16(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T_,
                            int64_t NH, int64_t NKV, int64_t HS, int64_t window,
                            const int32_t* doc_start, const AttnScore& score) {
  LMF_CHECK(HS <= kMaxBf16HeadSize, "attention_forward_bf16: head size {} above {}", HS,
            kMaxBf16HeadSize);
  const int64_t Cq = (NH + 2 * NKV) * HS, Co = NH * HS, group = NH / NKV;
  const int64_t nqb = (T_ + kQ16 - 1) / kQ16;
  // With soft-capping the scale goes into the capped scores, and the softmax passes take them as
  // they are.
  const float cap = score.softcap, scale = score.scale<float>(HS), sm = cap > 0 ? 1.0f : scale;
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        Tile<float, kQ16 * kK16> s;                // S, then P, of one tile
        Tile<uint16_t, kQ16 * kK16> p16;           // bf16(P)
        Tile<float, kQ16 * kMaxBf16HeadSize> acc;  // O's accumulator (nq, HS)
        float m[kQ16], l[kQ16];
        const int64_t i0 = qb * kQ16, nq = std::min(kQ16, T_ - i0);
        const uint16_t* q = qkv + (b * T_ + i0) * Cq + h * HS;
        const uint16_t* k = qkv + b * T_ * Cq + (NH + h / group) * HS;
        const uint16_t* v = qkv + b * T_ * Cq + (NH + NKV + h / group) * HS;
        float* o = acc.v;
        const int32_t* ds = doc_start ? doc_start + b * T_ : nullptr;
        std::fill(o, o + nq * HS, 0.0f);
        std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
        std::fill(l, l + nq, 0.0f);
        for (int64_t j0 = first_key_block(i0, window, ds, kK16); j0 < i0 + nq; j0 += kK16) {
          const int64_t nk = std::min(kK16, i0 + nq - j0);
          gemm_bf16_tile(false, true, nq, nk, HS, q, Cq, k + j0 * Cq, Cq, false, s.v, kK16);
          // S into bf16(P) (zero where masked), with the running max and sum.
          for_visible_rows(
              p16.v, i0, j0, nq, nk, window, ds,
              [&](int64_t r, uint16_t* prow, int64_t a, int64_t e) {
                float* srow = s.v + r * kK16;
                if (cap > 0) softcap_serial<float>(srow + a, nullptr, e - a, cap, scale);
                const float mx = std::max(m[r], scaled_max(srow + a, e - a, sm));
                if (mx > m[r]) {
                  const float corr = std::exp(m[r] - mx);
                  l[r] *= corr;
                  for (int64_t d = 0; d < HS; ++d) o[r * HS + d] *= corr;
                  m[r] = mx;
                }
                l[r] += exp_scaled(nullptr, prow + a, srow + a, e - a, sm, mx);
              },
              kK16);
          gemm_bf16_tile(false, false, nq, HS, nk, p16.v, kK16, v + j0 * Cq, Cq, true, o, HS);
        }
        float* lr = lse + (b * NH + h) * T_ + i0;
        uint16_t* orow = out + (b * T_ + i0) * Co + h * HS;
        for (int64_t r = 0; r < nq; ++r) {
          const float inv = 1.0f / l[r];
          for (int64_t d = 0; d < HS; ++d) o[r * HS + d] *= inv;
          to_bf16_serial(orow + r * Co, o + r * HS, HS);
          lr[r] = m[r] + std::log(l[r]);
        }
      }
}

template <typename DO>
void attention_backward_bf16(float* dqkv, const DO* dout, const uint16_t* qkv, const uint16_t* out,
                             const float* lse, int64_t B, int64_t T_, int64_t NH, int64_t NKV,
                             int64_t HS, int64_t window, const int32_t* doc_start,
                             const AttnScore& score) {
  LMF_CHECK(HS <= kMaxBf16HeadSize, "attention_backward_bf16: head size {} above {}", HS,
            kMaxBf16HeadSize);
  const int64_t Cq = (NH + 2 * NKV) * HS, Co = NH * HS, group = NH / NKV;
  const int64_t nqb = (T_ + kQ16 - 1) / kQ16;
  const float cap = score.softcap, scale = score.scale<float>(HS), sm = cap > 0 ? 1.0f : scale;
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < NKV; ++kvh) {
      Tile<float, kQ16 * kK16> p, dp, f;              // P; dP; soft-capping's derivative
      Tile<uint16_t, kQ16 * kK16> p16, ds16;          // bf16(P); bf16(scale dS)
      Tile<uint16_t, kQ16 * kMaxBf16HeadSize> dO16s;  // dO of the query block, when fp32
      float D[kQ16];
      const uint16_t* base = qkv + b * T_ * Cq;
      float* dbase = dqkv + b * T_ * Cq;
      const uint16_t* k = base + (NH + kvh) * HS;
      const uint16_t* v = base + (NH + NKV + kvh) * HS;
      float* dk = dbase + (NH + kvh) * HS;
      float* dv = dbase + (NH + NKV + kvh) * HS;
      const int32_t* ds = doc_start ? doc_start + b * T_ : nullptr;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * kQ16, nq = std::min(kQ16, T_ - i0);
          const uint16_t* q = base + i0 * Cq + h * HS;
          float* dq = dbase + i0 * Cq + h * HS;
          const DO* dO = dout + (b * T_ + i0) * Co + h * HS;
          const uint16_t* O = out + (b * T_ + i0) * Co + h * HS;
          const float* lr = lse + (b * NH + h) * T_ + i0;
          // dO as a bf16 operand: where it lies, or rounded into the block's buffer.
          const uint16_t* g16;
          int64_t ldg;
          if constexpr (std::is_same_v<DO, uint16_t>) {
            g16 = dO;
            ldg = Co;
          } else {
            for (int64_t r = 0; r < nq; ++r) to_bf16_serial(dO16s.v + r * HS, dO + r * Co, HS);
            g16 = dO16s.v;
            ldg = HS;
          }
          rowsum_products(D, dO, O, nq, HS, Co);
          for (int64_t j0 = first_key_block(i0, window, ds, kK16); j0 < i0 + nq; j0 += kK16) {
            const int64_t nk = std::min(kK16, i0 + nq - j0);
            // P = exp(scale Q K^T - lse), zero where masked.
            gemm_bf16_tile(false, true, nq, nk, HS, q, Cq, k + j0 * Cq, Cq, false, p.v, kK16);
            for (int64_t r = 0; r < nq; ++r) {  // P in place and as bf16
              float* row = p.v + r * kK16;
              uint16_t* row16 = p16.v + r * kK16;
              int64_t a, e;
              visible(i0 + r, j0, nk, window, doc_lo(ds, i0 + r), a, e);
              if (a < e && cap > 0)
                softcap_serial<float>(row + a, f.v + r * kK16 + a, e - a, cap, scale);
              if (a < e) exp_scaled(row + a, row16 + a, row + a, e - a, sm, lr[r]);
              zero_outside(row, a, e, nk);
              zero_outside(row16, a, e, nk);
              if (cap > 0) zero_outside(f.v + r * kK16, a, e, nk);
            }
            // dV += P^T dO; dP = dO V^T
            gemm_bf16_tile(true, false, nk, HS, nq, p16.v, kK16, g16, ldg, true, dv + j0 * Cq, Cq);
            gemm_bf16_tile(false, true, nq, nk, HS, g16, ldg, v + j0 * Cq, Cq, false, dp.v, kK16);
            // scale dS = scale P (dP - D); masked entries have P = 0 and so dS = 0.
            for (int64_t r = 0; r < nq; ++r)
              softmax_grad_bf16(ds16.v + r * kK16, p.v + r * kK16, dp.v + r * kK16, nk, scale, D[r],
                                cap > 0 ? f.v + r * kK16 : nullptr);
            // dQ += (scale dS) K; dK += (scale dS)^T Q
            gemm_bf16_tile(false, false, nq, HS, nk, ds16.v, kK16, k + j0 * Cq, Cq, true, dq, Cq);
            gemm_bf16_tile(true, false, nk, HS, nq, ds16.v, kK16, q, Cq, true, dk + j0 * Cq, Cq);
          }
        }
    }
}

template void attention_backward_bf16<float>(float*, const float*, const uint16_t*, const uint16_t*,
                                             const float*, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, int64_t, const int32_t*, const AttnScore&);
template void attention_backward_bf16<uint16_t>(float*, const uint16_t*, const uint16_t*,
                                                const uint16_t*, const float*, int64_t, int64_t,
                                                int64_t, int64_t, int64_t, int64_t, const int32_t*,
                                                const AttnScore&);

namespace {
inline float cached(float x) { return x; }
inline float cached(uint16_t x) { return bf16_to_fp32(x); }  // a bf16 cache's value

// The scores of one query row against the cached keys [lo, len): att[j] = (q . K_j) scale; and
// the row's output o (HS) = sum_j w att[j] V_j. Portable, and AVX-512 below (16 lanes of the
// head at a time; the output accumulated in registers, up to 128 columns per pass).
template <typename KV>
void decode_scores(float* att, const float* qh, const KV* K, int64_t lo, int64_t len, int64_t HS,
                   float scale) {
  for (int64_t j = lo; j < len; ++j) {
    float s = 0;
    for (int64_t d = 0; d < HS; ++d) s += qh[d] * cached(K[j * HS + d]);
    att[j] = s * scale;
  }
}
template <typename KV>
void decode_values(float* o, const float* att, const KV* Vc, int64_t lo, int64_t len, int64_t HS,
                   float w) {
  for (int64_t d = 0; d < HS; ++d) o[d] = 0;
  for (int64_t j = lo; j < len; ++j)
    for (int64_t d = 0; d < HS; ++d) o[d] += att[j] * w * cached(Vc[j * HS + d]);
}

template <typename KV>
LMF_AVX512 void decode_scores_avx512(float* att, const float* qh, const KV* K, int64_t lo,
                                     int64_t len, int64_t HS, float scale) {
  for (int64_t j = lo; j < len; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < HS; d += 16)
      acc = _mm512_fmadd_ps(load16(qh + d, lanes(HS - d)), load16(K + j * HS + d, lanes(HS - d)),
                            acc);
    att[j] = _mm512_reduce_add_ps(acc) * scale;
  }
}
template <typename KV>
LMF_AVX512 void decode_values_avx512(float* o, const float* att, const KV* Vc, int64_t lo,
                                     int64_t len, int64_t HS, float w) {
  const int64_t chunks = (HS + 15) / 16;
  for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
    const int64_t nc = std::min<int64_t>(8, chunks - c0);
    __m512 acc[8];
    for (int64_t c = 0; c < nc; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j = lo; j < len; ++j) {
      const __m512 p = _mm512_set1_ps(att[j] * w);
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t d = 16 * (c0 + c);
        acc[c] = _mm512_fmadd_ps(p, load16(Vc + j * HS + d, lanes(HS - d)), acc[c]);
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t d = 16 * (c0 + c);
      store16(o + d, lanes(HS - d), acc[c]);
    }
  }
}

// One query row of one head against the cached keys [lo, len): out (HS) = softmax(q K^T scale) V,
// att: scratch for the scores; the cache fp32 or bf16 (KV). The softmax is the tiled kernel's
// (exp_sub_sum), after the soft-capping, if any (cap > 0).
template <typename KV>
void decode_row(float* o, const float* qh, const KV* K, const KV* Vc, int64_t lo, int64_t len,
                int64_t HS, float scale, float cap, float* att) {
  const bool avx512 = has_avx512();
  if (avx512)
    decode_scores_avx512(att, qh, K, lo, len, HS, scale);
  else
    decode_scores(att, qh, K, lo, len, HS, scale);
  if (cap > 0) softcap_serial<float>(att + lo, nullptr, len - lo, cap);
  const float mx = *std::max_element(att + lo, att + len);
  const float w = 1.0f / exp_sub_sum<float>(att + lo, att + lo, len - lo, mx);
  if (avx512)
    decode_values_avx512(o, att, Vc, lo, len, HS, w);
  else
    decode_values(o, att, Vc, lo, len, HS, w);
}
}  // namespace

template <typename KV>
void attention_decode(float* out, const float* q, int64_t q_stride, const KV* kcache,
                      const KV* vcache, int64_t n, int64_t pos0, int64_t T_max, int64_t NH,
                      int64_t NKV, int64_t HS, int64_t window, const AttnScore& score) {
  const int64_t group = NH / NKV;
  const float scale = score.scale<float>(HS);
  // One row of scores per thread, allocated before the parallel region (a bad_alloc inside it
  // would end the process); per generate call, not a training step.
  const int64_t row = pos0 + n;
  std::vector<float> rows(static_cast<size_t>(omp_get_max_threads() * row));
#pragma omp parallel
  {
    float* att = rows.data() + static_cast<size_t>(omp_get_thread_num()) * row;
    // (round-robin: row i's work grows with i)
#pragma omp for collapse(2) schedule(static, 1)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < NH; ++h) {
        const float* qh = q + i * q_stride + h * HS;
        const KV* K = kcache + (h / group) * T_max * HS;
        const KV* Vc = vcache + (h / group) * T_max * HS;
        const int64_t len = pos0 + i + 1, lo = first_key(pos0 + i, window);
        float* o = out + i * NH * HS + h * HS;
        decode_row(o, qh, K, Vc, lo, len, HS, scale, score.softcap, att);
      }
  }
}

template void attention_decode<float>(float*, const float*, int64_t, const float*, const float*,
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                      const AttnScore&);
template void attention_decode<uint16_t>(float*, const float*, int64_t, const uint16_t*,
                                         const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, int64_t, const AttnScore&);
template void attention_forward<float>(float*, float*, const float*, int64_t, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, const int32_t*, const AttnScore&);
template void attention_forward<double>(double*, double*, const double*, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, int64_t, const int32_t*,
                                        const AttnScore&);
template void attention_backward<float>(float*, const float*, const float*, const float*,
                                        const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, const int32_t*, const AttnScore&);
template void attention_backward<double>(double*, const double*, const double*, const double*,
                                         const double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, const int32_t*, const AttnScore&);

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
