// The weight-gradient product on AMX tiles: dW (M, N) (+)= A^T B, A (K, M) the output gradient and
// B (K, N) the layer's input, both bf16 row-major, K the step's tokens (short: a few hundred). In
// a training step this GEMM writes every weight gradient once, from cold cache lines; oneDNN's
// brgemm reaches ~60% of its hot speed there. Here each thread owns panels of 32 rows of dW, with
// the whole K in four 16x16 fp32 accumulator tiles, and writes finished rows with streaming stores
// (no read for ownership of lines it overwrites).
//
// Packing: B once per call into AMX's pair-interleaved layout, B'[k/2][n][2] (two rows of B
// interleaved 16 bits at a time); A per panel, the same interleave of its 32 columns and then a
// transpose of the 32-bit pairs, so a tile row holds 32 consecutive k of one row of A^T. K, M and N
// are padded with zeros to whole panels (32 rows of M, 32 k, 32 columns of N).
//
// Each output element is the sum over k in the tiles' fixed order, whatever the thread count:
// deterministic as the rest of the step. The products are exact in fp32 (bf16 x bf16) and the
// sums fp32 with round-to-nearest-even (denormal inputs as zero), as oneDNN's AMX kernels.
//
// On CPUs with AVX512-BF16 and no AMX (AMD Zen 4, Cooper Lake) the same packed panels go through
// vdpbf16ps dot products instead (dp_block), for the gradients far larger than the caches only
// (an LM head's: weight_grad_gemm_takes).
//
// Attention's small products (small_gemm_bf16, one thread each) use the same layouts, packed per
// call, on AMX tiles or with dot products: 160-180 GFLOP/s on one Zen 4 core at 64 x 64 x 64
// (~75% of its peak) where oneDNN's brgemm, called per tile, reaches 130.
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/cpu_features.h"

#define LMF_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq")))

namespace lmforge::cpu {

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for this file's kernels.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace {

constexpr int64_t kPanel = 32;  // rows of dW per panel (two tile rows)
constexpr int64_t kTileK = 32;  // k per tile product (16 pairs)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux keeps the tile data state off until a process asks for it (ARCH_REQ_XCOMP_PERM, 5.16+);
// oneDNN asks too. Without it a tile instruction faults: the kernel is then not used.
bool tile_state_granted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
}

// lo, hi (16 pairs each) = rows r and r+1 of src interleaved 16 bits at a time, for 32 columns
// from c; a row at or past K, or a column at or past n, reads as zero.
LMF_AVX512 inline void interleave32(__m512i& lo, __m512i& hi, const uint16_t* src, int64_t ld,
                                    int64_t r, int64_t K, int64_t c, int64_t n) {
  // Lane 2i takes a's column i, lane 2i+1 b's (hi: columns 16 + i).
  alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                   37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                   11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i il = _mm512_load_si512(kLo);
  const __m512i ih = _mm512_add_epi16(il, _mm512_set1_epi16(16));
  const int64_t valid = std::clamp<int64_t>(n - c, 0, 32);
  const __mmask32 m = valid == 32 ? ~__mmask32(0) : (__mmask32(1) << valid) - 1;
  const __m512i a = r < K ? _mm512_maskz_loadu_epi16(m, src + r * ld + c) : _mm512_setzero_si512();
  const __m512i b =
      r + 1 < K ? _mm512_maskz_loadu_epi16(m, src + (r + 1) * ld + c) : _mm512_setzero_si512();
  lo = _mm512_permutex2var_epi16(a, il, b);
  hi = _mm512_permutex2var_epi16(a, ih, b);
}

// The same stored at dst (64 bf16, 64-byte aligned): a row of AMX's pair layout of B.
LMF_AVX512 inline void interleave32(uint16_t* dst, const uint16_t* src, int64_t ld, int64_t r,
                                    int64_t K, int64_t c, int64_t n) {
  __m512i lo, hi;
  interleave32(lo, hi, src, ld, r, K, c, n);
  _mm512_store_si512(dst, lo);
  _mm512_store_si512(dst + 32, hi);
}

// r[i] holds row i of a 16 x 16 matrix of 32-bit elements; afterwards, column i.
LMF_AVX512 inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// Rows of A^T with k consecutive, for A (K, n) bf16 rows ld apart: dst[i][p] (rows of kh 32-bit
// pairs, i < rows, a multiple of 32) = (A[2p][c0 + i], A[2p + 1][c0 + i]), zeros past K or n.
// Pairs of A's rows interleaved, then transposed 16 x 16 in registers.
LMF_AVX512 void pack_transposed(uint32_t* dst, int64_t kh, const uint16_t* A, int64_t ld, int64_t K,
                                int64_t c0, int64_t n, int64_t rows) {
  for (int64_t p0 = 0; p0 < kh; p0 += 16)
    for (int64_t i0 = 0; i0 < rows; i0 += 32) {
      __m512i lo[16], hi[16];
      for (int64_t q = 0; q < 16; ++q)
        interleave32(lo[q], hi[q], A, ld, 2 * (p0 + q), K, c0 + i0, n);
      transpose16(lo);
      transpose16(hi);
      for (int64_t q = 0; q < 16; ++q) {
        _mm512_store_si512(dst + (i0 + q) * kh + p0, lo[q]);
        _mm512_store_si512(dst + (i0 + 16 + q) * kh + p0, hi[q]);
      }
    }
}

// One thread's part: panels of rows [p_begin, p_end) x columns [n0, n1) of dW.
struct Job {
  int64_t M, N, K, Kp, Np, lda, ldc;
  const uint16_t* A;
  const uint16_t* Bp;  // packed B: Kp/2 rows of Np pairs
  float* C;
  bool accumulate, stream;
};

// Rows [m0, m0 + rows) x columns [n0, n0 + 16) of C (N wide) from v[r * vstride]: added to C under
// accumulate; whole rows of 16 streamed when stream, else written (columns past N untouched).
LMF_AVX512 inline void write_rows(float* C, int64_t ldc, int64_t N, int64_t m0, int64_t rows,
                                  int64_t n0, bool accumulate, bool stream, const __m512* v,
                                  int64_t vstride) {
  const int64_t valid = std::clamp<int64_t>(N - n0, 0, 16);
  if (valid == 0) return;
  const __mmask16 m = __mmask16((1u << valid) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = C + (m0 + r) * ldc + n0;
    __m512 x = v[r * vstride];
    if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, dst));
    if (valid == 16 && stream)
      _mm512_stream_ps(dst, x);
    else
      _mm512_mask_storeu_ps(dst, m, x);
  }
}

// 32 x 32 of a product on the four accumulator tiles (the tile configuration loaded): rows of
// op(A) with k consecutive at a (lda elements apart), op(B)'s pairs for the 32 columns at b (rows
// of ldb pairs), Kp k (a multiple of kTileK); the fp32 result into cbuf (32 rows of 32).
LMF_AMX inline void amx_block(float* cbuf, const uint16_t* a, int64_t lda, const uint16_t* b,
                              int64_t ldb, int64_t Kp) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < Kp; k += kTileK) {
    _tile_loadd(4, a + k, lda * 2);
    _tile_loadd(5, a + 16 * lda + k, lda * 2);
    const uint16_t* bk = b + (k / 2) * (ldb * 2);
    _tile_loadd(6, bk, ldb * 4);
    _tile_loadd(7, bk + 32, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, cbuf, 128);
  _tile_stored(1, cbuf + 16, 128);
  _tile_stored(2, cbuf + 16 * 32, 128);
  _tile_stored(3, cbuf + 16 * 32 + 16, 128);
}

// 8 rows x 32 columns of a product in 16 fp32 registers, with AVX512-BF16 dot products (CPUs
// without AMX: AMD Zen 4 and later, Cooper Lake): acc[r][h] = sum over pairs p < kh of the pair
// a[r * lda + p] of op(A) (broadcast) times the pairs b[p * ldb + 16 h ...] of op(B). vdpbf16ps
// adds a pair's two (exact) products to the fp32 accumulator with denormals as zero, as a tile
// does; k in the same order whatever the thread count.
constexpr int64_t kDpRows = 8;
constexpr int64_t kDpWeightGradMinElems = int64_t{1} << 24;  // weight_grad_gemm_takes
LMF_AVX512_BF16 inline void dp_block(__m512 (&acc)[kDpRows][2], const uint32_t* a, int64_t lda,
                                     const uint32_t* b, int64_t ldb, int64_t kh) {
#pragma GCC unroll 8
  for (int64_t r = 0; r < kDpRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kh; ++p, b += ldb) {
    const auto b0 = (__m512bh)_mm512_load_si512(b);
    const auto b1 = (__m512bh)_mm512_load_si512(b + 16);
#pragma GCC unroll 8
    for (int64_t r = 0; r < kDpRows; ++r) {
      const auto x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
    }
  }
}

// A panel's rows of A^T (ap: kPanel rows of Kp/2 pairs), and the next panel's columns of A toward
// L2 while this one computes: its K rows lie a row of A apart (one page or more for an LM head's
// gradient), beyond the hardware prefetchers' reach.
LMF_AVX512 void load_panel(const Job& j, int64_t m0, uint32_t* ap) {
  pack_transposed(ap, j.Kp / 2, j.A, j.lda, j.K, m0, j.M, kPanel);
  if (m0 + kPanel < j.M)
    for (int64_t k = 0; k < j.K; ++k)
      _mm_prefetch(reinterpret_cast<const char*>(j.A + k * j.lda + m0 + kPanel), _MM_HINT_T1);
}

LMF_AMX void panel_rows(const Job& j, int64_t m0, int64_t n0, int64_t n1, uint32_t* ap,
                        float* cbuf) {
  load_panel(j, m0, ap);
  const int64_t rows = std::min(kPanel, j.M - m0);
  const uint16_t* a = reinterpret_cast<const uint16_t*>(ap);
  for (int64_t c0 = n0; c0 < n1; c0 += 32) {
    amx_block(cbuf, a, j.Kp, j.Bp + c0 * 2, j.Np, j.Kp);
    const auto* v = reinterpret_cast<const __m512*>(cbuf);
    write_rows(j.C, j.ldc, j.N, m0, rows, c0, j.accumulate, j.stream, v, 2);
    write_rows(j.C, j.ldc, j.N, m0, rows, c0 + 16, j.accumulate, j.stream, v + 1, 2);
  }
}

LMF_AVX512_BF16 void panel_rows_dp(const Job& j, int64_t m0, int64_t n0, int64_t n1, uint32_t* ap) {
  load_panel(j, m0, ap);
  const int64_t kh = j.Kp / 2, rows = std::min(kPanel, j.M - m0);
  const auto* b32 = reinterpret_cast<const uint32_t*>(j.Bp);
  for (int64_t c0 = n0; c0 < n1; c0 += 32)
    for (int64_t r0 = 0; r0 < rows; r0 += kDpRows) {
      __m512 acc[kDpRows][2];
      dp_block(acc, ap + r0 * kh, kh, b32 + c0, j.Np, kh);
      const int64_t n = std::min(kDpRows, rows - r0);
      write_rows(j.C, j.ldc, j.N, m0 + r0, n, c0, j.accumulate, j.stream, &acc[0][0], 2);
      write_rows(j.C, j.ldc, j.N, m0 + r0, n, c0 + 16, j.accumulate, j.stream, &acc[0][1], 2);
    }
}

// A thread's items (column chunk major: a thread's B stays in cache), on AMX tiles or with dot
// products.
LMF_AMX void run_thread(const Job& j, int64_t items, int64_t panels, int64_t chunk,
                        uint32_t* scratch) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  float* cbuf = reinterpret_cast<float*>(scratch + j.Kp / 2 * kPanel);
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it)
    panel_rows(j, (it % panels) * kPanel, (it / panels) * chunk,
               std::min((it / panels + 1) * chunk, j.Np), scratch, cbuf);
  _tile_release();
  _mm_sfence();  // the streaming stores visible before the threads join
}

LMF_AVX512_BF16 void run_thread_dp(const Job& j, int64_t items, int64_t panels, int64_t chunk,
                                   uint32_t* scratch) {
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it)
    panel_rows_dp(j, (it % panels) * kPanel, (it / panels) * chunk,
                  std::min((it / panels + 1) * chunk, j.Np), scratch);
  _mm_sfence();
}

LMF_AVX512 void pack_b(uint16_t* bp, const uint16_t* B, int64_t ldb, int64_t K, int64_t N,
                       int64_t Kp, int64_t Np) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < Kp / 2; ++p)
    for (int64_t c = 0; c < Np; c += 32)
      interleave32(bp + p * Np * 2 + c * 2, B, ldb, 2 * p, K, c, N);
}

// ---- small products, one thread each (attention's tiles: gemm_bf16_tile) ----------------------
//
// C (M, N) (+)= op(A) op(B) within kSmall* limits, packed per call into the tile layouts: op(A)
// rows with k consecutive (read in place when A is untransposed and whole tiles), op(B) in pairs.
// A transposed operand goes through 16 x 16 transposes of 32-bit pairs in registers.
constexpr int64_t kSmallM = 128, kSmallN = 256, kSmallK = 256;

struct SmallBuffers {
  alignas(64) uint16_t a[kSmallM * kSmallK];
  alignas(64) uint16_t b[kSmallK * kSmallN];
  alignas(64) float c[32 * 32];
};

// 32 bf16 of row r from column c (zeros at or past n), as 16 pairs' worth of a vector.
LMF_AVX512 inline __m512i row32(const uint16_t* src, int64_t ld, int64_t r, int64_t rows, int64_t c,
                                int64_t n) {
  if (r >= rows) return _mm512_setzero_si512();
  const int64_t valid = std::clamp<int64_t>(n - c, 0, 32);
  const __mmask32 m = valid == 32 ? ~__mmask32(0) : (__mmask32(1) << valid) - 1;
  return _mm512_maskz_loadu_epi16(m, src + r * ld + c);
}

// The operands of a small product in the kernels' layouts: op(A) rows with k consecutive (a,
// lda apart: A itself when untransposed and whole tiles, else buf.a padded to Mp x Kp), op(B) in
// 32-bit pairs b[p][n] = (op(B)[2p][n], op(B)[2p+1][n]), Np apart. Zeros pad K, M and N.
struct SmallOperands {
  const uint16_t* a;
  int64_t lda, Mp, Np, Kp;
  const uint16_t* b;
};

LMF_AVX512 SmallOperands pack_small(SmallBuffers& buf, bool ta, bool tb, int64_t M, int64_t N,
                                    int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                                    int64_t ldb) {
  SmallOperands o{A, lda, (M + 31) / 32 * 32, (N + 31) / 32 * 32, (K + 31) / 32 * 32, buf.b};
  const int64_t kh = o.Kp / 2;
  if (ta || M % 32 || K % 32 || lda % 2 || reinterpret_cast<uintptr_t>(A) % 4) {
    o.a = buf.a;
    o.lda = o.Kp;
    if (!ta) {
      for (int64_t i = 0; i < o.Mp; ++i)
        for (int64_t k = 0; k < o.Kp; k += 32)
          _mm512_store_si512(buf.a + i * o.Kp + k, row32(A, lda, i, M, k, K));
    } else {  // A is (K, M)
      pack_transposed(reinterpret_cast<uint32_t*>(buf.a), kh, A, lda, K, 0, M, o.Mp);
    }
  }
  uint32_t* b32 = reinterpret_cast<uint32_t*>(buf.b);
  if (!tb) {
    for (int64_t p = 0; p < kh; ++p)
      for (int64_t c = 0; c < o.Np; c += 32)
        interleave32(buf.b + p * o.Np * 2 + c * 2, B, ldb, 2 * p, K, c, N);
  } else {  // B is (N, K): a row's pairs are 32-bit elements already; transposed 16 x 16
    for (int64_t n0 = 0; n0 < o.Np; n0 += 16)
      for (int64_t p0 = 0; p0 < kh; p0 += 16) {
        __m512i r[16];
        for (int64_t q = 0; q < 16; ++q) r[q] = row32(B, ldb, n0 + q, N, 2 * p0, K);
        transpose16(r);
        for (int64_t q = 0; q < 16; ++q) _mm512_store_si512(b32 + (p0 + q) * o.Np + n0, r[q]);
      }
  }
  return o;
}

LMF_AMX void small_gemm_amx(const SmallOperands& o, int64_t M, int64_t N, bool accumulate, float* C,
                            int64_t ldc, float* cbuf) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  for (int64_t m0 = 0; m0 < o.Mp; m0 += 32)
    for (int64_t n0 = 0; n0 < o.Np; n0 += 32) {
      amx_block(cbuf, o.a + m0 * o.lda, o.lda, o.b + n0 * 2, o.Np, o.Kp);
      const int64_t rows = std::min<int64_t>(32, M - m0);
      const auto* v = reinterpret_cast<const __m512*>(cbuf);
      write_rows(C, ldc, N, m0, rows, n0, accumulate, false, v, 2);
      write_rows(C, ldc, N, m0, rows, n0 + 16, accumulate, false, v + 1, 2);
    }
  _tile_release();
}

// The same with AVX512-BF16 dot products (dp_block).
LMF_AVX512_BF16 void small_gemm_dpbf16(const SmallOperands& o, int64_t M, int64_t N,
                                       bool accumulate, float* C, int64_t ldc) {
  const int64_t kh = o.Kp / 2;
  const auto* a32 = reinterpret_cast<const uint32_t*>(o.a);
  const auto* b32 = reinterpret_cast<const uint32_t*>(o.b);
  for (int64_t m0 = 0; m0 < M; m0 += kDpRows)  // rows to Mp are there (zeros) to read
    for (int64_t n0 = 0; n0 < o.Np; n0 += 32) {
      __m512 acc[kDpRows][2];
      dp_block(acc, a32 + m0 * (o.lda / 2), o.lda / 2, b32 + n0, o.Np, kh);
      const int64_t rows = std::min(kDpRows, M - m0);
      write_rows(C, ldc, N, m0, rows, n0, accumulate, false, &acc[0][0], 2);
      write_rows(C, ldc, N, m0, rows, n0 + 16, accumulate, false, &acc[0][1], 2);
    }
}

}  // namespace
#pragma GCC diagnostic pop

bool amx_gemm_available() {
  static const bool ok = cpu_features().amx_bf16 && tile_state_granted();
  return ok;
}

bool small_gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                     int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C,
                     int64_t ldc) {
  static const bool amx = amx_gemm_available(), dp = has_avx512_bf16();
  if (M > kSmallM || N > kSmallN || K > kSmallK || !(amx || dp)) return false;
  static thread_local SmallBuffers buf;
  const SmallOperands o = pack_small(buf, ta, tb, M, N, K, A, lda, B, ldb);
  if (amx)
    small_gemm_amx(o, M, N, accumulate, C, ldc, buf.c);
  else
    small_gemm_dpbf16(o, M, N, accumulate, C, ldc);
  return true;
}

bool weight_grad_gemm_takes(int64_t M, int64_t N, int64_t K) {
  if (K <= 0 || K > kWeightGradMaxK || M <= 0 || N <= 0 || omp_in_parallel() ||
      !bf16_matmul_native())
    return false;
  if (amx_gemm_available()) return true;
  // With dot products, only gradients far larger than the caches (an LM head's): there oneDNN's
  // brgemm slows down (Zen 4, 2 cores: 50257 x 768 at K = 256, 258 -> 350 GFLOP/s; K = 1024, 312
  // -> 403), while for a layer's (768 x 3072 or smaller) it is as fast or faster.
  return has_avx512_bf16() && M * N >= kDpWeightGradMinElems;
}

void gemm_bf16_weight_grad(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                           const uint16_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  const int64_t Kp = (K + kTileK - 1) / kTileK * kTileK, Np = (N + 31) / 32 * 32;
  static std::vector<uint16_t> bpack;  // grows during the first step only
  static std::vector<uint32_t> scratch;
  if (static_cast<int64_t>(bpack.size()) < Kp * Np + 32) bpack.resize(Kp * Np + 32);
  uint16_t* bp = bpack.data() + ((-reinterpret_cast<uintptr_t>(bpack.data())) & 63) / 2;
  pack_b(bp, B, ldb, K, N, Kp, Np);

  const int threads = omp_get_max_threads();
  const int64_t panels = (M + kPanel - 1) / kPanel;
  // Whole rows of dW per item unless there are too few panels to share out: then column chunks.
  const int64_t splits = std::min<int64_t>(Np / 32, (4 * threads + panels - 1) / panels);
  const int64_t chunk = (Np / 32 + splits - 1) / splits * 32;
  const int64_t items = panels * ((Np + chunk - 1) / chunk);
  const int64_t per_thread = Kp / 2 * kPanel + 32 * 32 + 16;  // panel (uint32) + cbuf
  if (static_cast<int64_t>(scratch.size()) < per_thread * threads)
    scratch.resize(per_thread * threads);
  const bool stream = reinterpret_cast<uintptr_t>(C) % 64 == 0 && ldc % 16 == 0;
  static const bool amx = amx_gemm_available();
  const Job job{M, N, K, Kp, Np, lda, ldc, A, bp, C, accumulate, stream};
#pragma omp parallel num_threads(threads)
  {
    uint32_t* s = scratch.data() + per_thread * omp_get_thread_num();
    s += ((-reinterpret_cast<uintptr_t>(s)) & 63) / 4;  // 64-byte aligned
    if (amx)
      run_thread(job, items, panels, chunk, s);
    else
      run_thread_dp(job, items, panels, chunk, s);
  }
}

}  // namespace lmforge::cpu
