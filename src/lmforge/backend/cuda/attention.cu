// Causal GQA flash attention in fp32 on the CUDA cores (interface and semantics: attention.h;
// the maths as cpu/attention.cpp: FlashAttention, Dao et al. 2022; backward as FlashAttention-2,
// Dao 2023).
//
// Tiling. Query and key tiles are both kB = 64 positions, aligned to multiples of 64, so the
// diagonal tile of query tile i0 is the key tile j0 = i0. A block of 256 threads is a 16 x 16
// grid: thread (ty, tx) owns the four tile rows 4ty..4ty+3 and, of a (64, 64) score tile, the
// columns tx, tx+16, tx+32, tx+48; of a (64, HS) accumulator, the columns tx, tx+16, ... The
// 16 threads sharing a row sit in one half-warp, so row max / sum are xor-shuffle reductions
// (every lane gets identical bits). Head sizes are padded with zeros to kD = 32, 64 or 128 in
// shared memory, which changes no dot product. Shared rows are kD + 1 (or 65) floats long: an
// odd stride puts the 16 rows a half-warp walks down in 16 different banks.
//
// Forward: one block per (query tile, head, batch). Q tile in shared memory; for each visible key
// tile, K and V tiles are loaded, S = scale Q K^T is formed in registers, masked (causal, window,
// past T) to -inf, and the online softmax (running max m, running sum l, accumulator rescaled by
// e^(m_old - m_new)) writes P to shared memory for O += P V. A row that has seen no key yet uses
// 0 as its reference max, so e^(-inf) gives 0 and never NaN. lse = m + log(l).
//
// Backward: D = rowsum(dO * O) per (b, h, t) first (in double, one warp per row, into a scratch
// buffer), then two kernels, each recomputing P = exp(S - lse) and dP = dO V^T tile by tile:
//  - dK/dV: one block per (key tile, kv head, batch) holds K, V and the dK, dV accumulators of its
//    64 keys, and walks the query heads of its group and the query tiles that can see its keys
//    in a fixed order: dV += P^T dO, dK += scale dS^T Q with dS = P * (dP - D). Written once
//    (+= into dqkv) by the block that owns the tile.
//  - dQ: one block per (query tile, head, batch), walking the key tiles as the forward does:
//    dQ += scale dS K. Written once by its block.
// No atomics anywhere, and every sum runs in an order fixed by the shapes: bitwise reproducible.
// The price is computing S and dP twice (once per kernel), about 1.4x the FLOPs of a fused FA-2
// backward with atomic dQ.
//
// Numerics: fp32 throughout (scores, softmax statistics, accumulators; expf/logf, no fast math),
// D in double as on the CPU. Results match the CPU to fp32 rounding of a different summation
// order (relative 1e-5 on random inputs).
//
// Shared memory per block, kD = 128: forward 113 KiB, dK/dV 146 KiB, dQ 145 KiB (kD = 64: about
// 65 / 82 / 81 KiB); above the 48 KiB default, so each kernel opts in once, after checking the
// device's limit (227 KiB on H100, 163 KiB on A100).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>

#include "lmforge/backend/cuda/attention.h"
#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"

namespace lmforge::cuda {

namespace {

constexpr int kB = 64;         // query rows and key columns per tile
constexpr int kThreads = 256;  // 16 x 16: thread (ty, tx) owns tile rows 4ty .. 4ty+3
constexpr int kPS = kB + 1;    // row stride of (kB, kB) tiles in shared memory
constexpr int64_t kMaxHS = 128;

struct Shape {
  int64_t B, T, NH, NKV, HS, window;
  const int32_t* doc_start;  // (B, T) device array, or null: see attention.h
  int64_t Cq, Co, group;     // qkv row width, out row width, query heads per kv head
  float scale;               // 1 / sqrt(HS), or of the score's scale_dim (attn_score.h)
  float softcap;             // > 0: scores soft-capped (attn_score.h)
};

// The score of a raw product x = q . k: scale x, soft-capped when s.softcap > 0; deriv receives
// its derivative with respect to scale x (1 without the cap), which backward multiplies into dS.
__device__ __forceinline__ float score_of(float x, const Shape& s, float& deriv) {
  const float y = x * s.scale;
  if (s.softcap <= 0.0f) {
    deriv = 1.0f;
    return y;
  }
  const float t = tanhf(y / s.softcap);
  deriv = 1.0f - t * t;
  return s.softcap * t;
}

// The first key position query t may see.
__host__ __device__ inline int64_t first_key(int64_t t, int64_t window) {
  return window > 0 && t >= window ? t - window + 1 : 0;
}

// The first position of query t's document in row b (0 without document starts, or past T).
__device__ __forceinline__ int64_t doc_lo(const Shape& s, int64_t b, int64_t t) {
  return s.doc_start && t < s.T ? s.doc_start[b * s.T + t] : 0;
}

// The first key block (a multiple of kB) a query tile from row i0 of row b may see: document
// starts never decrease along a row, so the tile's first row has the smallest first key.
__device__ __forceinline__ int64_t first_key_block(const Shape& s, int64_t b, int64_t i0) {
  const int64_t w = first_key(i0, s.window), d = doc_lo(s, b, i0);
  return (w > d ? w : d) / kB * kB;
}

// Query t sees key j: causal, within the window and its document (lo: doc_lo), and t a real row
// (tiles run past T).
__device__ __forceinline__ bool visible(int64_t t, int64_t j, int64_t T, int64_t window,
                                        int64_t lo) {
  return t < T && j <= t && j >= lo && (window <= 0 || j > t - window);
}

// dst (kB, kD + 1) in shared memory = rows [0, rows) and columns [0, HS) of src (row stride
// `stride`, in global memory); zero elsewhere. Consecutive threads read consecutive columns.
template <int kD>
__device__ void load_tile(float* __restrict__ dst, const float* __restrict__ src, int64_t stride,
                          int64_t rows, int64_t HS) {
  constexpr int kDP = kD + 1;
  for (int i = threadIdx.x; i < kB * kD; i += kThreads) {
    const int r = i / kD, d = i % kD;
    dst[r * kDP + d] = r < rows && d < HS ? src[r * stride + d] : 0.0f;
  }
}

// Max / sum over the 16 lanes of a half-warp (the threads that share ty). At each xor step the two
// partners add the same two values, so every lane ends with the same bits.
// Two 64x64 score-like products from shared tiles (rows of kD + 1 floats), each thread holding
// a 4x4 block: c1[i][j] += a1[row] . b1[col], c2[i][j] += a2[row] . b2[col] over kD, for rows
// 4 ty + i and columns tx + 16 j. The backward kernels use it for (S, dP) and their transposes.
template <int kD>
__device__ __forceinline__ void two_products(const float* __restrict__ a1,
                                             const float* __restrict__ a2,
                                             const float* __restrict__ b1,
                                             const float* __restrict__ b2, int ty, int tx,
                                             float c1[4][4], float c2[4][4]) {
  constexpr int kDP = kD + 1;
#pragma unroll 4
  for (int d = 0; d < kD; ++d) {
    float ra[4], rb[4], ca[4], cb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ra[i] = a1[(4 * ty + i) * kDP + d];
      rb[i] = a2[(4 * ty + i) * kDP + d];
    }
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      ca[jj] = b1[(tx + 16 * jj) * kDP + d];
      cb[jj] = b2[(tx + 16 * jj) * kDP + d];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        c1[i][jj] = fmaf(ra[i], ca[jj], c1[i][jj]);
        c2[i][jj] = fmaf(rb[i], cb[jj], c2[i][jj]);
      }
  }
}

__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kD>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(float* __restrict__ out, float* __restrict__ lse,
                             const float* __restrict__ qkv, Shape s) {
  constexpr int kDP = kD + 1, kDT = kD / 16;  // kDT: accumulator columns per thread
  extern __shared__ float smem[];
  float* Qs = smem;           // (kB, kDP)
  float* Ks = Qs + kB * kDP;  // (kB, kDP)
  float* Vs = Ks + kB * kDP;  // (kB, kDP)
  float* Ps = Vs + kB * kDP;  // (kB, kPS)
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  // The last query tiles see the most keys: start them first.
  const int64_t qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t i0 = qb * kB, nq = s.T - i0 < kB ? s.T - i0 : kB;
  const int64_t kvh = h / s.group;
  const float* base = qkv + b * s.T * s.Cq;
  const float* kp = base + (s.NH + kvh) * s.HS;
  const float* vp = base + (s.NH + s.NKV + kvh) * s.HS;
  load_tile<kD>(Qs, base + i0 * s.Cq + h * s.HS, s.Cq, nq, s.HS);

  float o[4][kDT], m[4], l[4];  // l: this thread's columns only, summed over the row at the end
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int dd = 0; dd < kDT; ++dd) o[i][dd] = 0.0f;
  }

  int64_t lo[4];  // each row's document start
#pragma unroll
  for (int i = 0; i < 4; ++i) lo[i] = doc_lo(s, b, i0 + 4 * ty + i);
  for (int64_t j0 = first_key_block(s, b, i0); j0 < i0 + nq; j0 += kB) {
    __syncthreads();  // the previous tile's reads of Ks, Vs, Ps are done
    load_tile<kD>(Ks, kp + j0 * s.Cq, s.Cq, s.T - j0, s.HS);
    load_tile<kD>(Vs, vp + j0 * s.Cq, s.Cq, s.T - j0, s.HS);
    __syncthreads();

    float sc[4][4] = {};  // S of rows 4ty+i, columns tx+16jj
#pragma unroll 8
    for (int d = 0; d < kD; ++d) {
      float a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Qs[(4 * ty + i) * kDP + d];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) c[jj] = Ks[(tx + 16 * jj) * kDP + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) sc[i][jj] = fmaf(a[i], c[jj], sc[i][jj]);
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t t = i0 + 4 * ty + i;
      float mx = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int64_t j = j0 + tx + 16 * jj;
        float unused;
        sc[i][jj] =
            visible(t, j, s.T, s.window, lo[i]) ? score_of(sc[i][jj], s, unused) : -INFINITY;
        mx = fmaxf(mx, sc[i][jj]);
      }
      mx = half_warp_max(mx);
      const float m_new = fmaxf(m[i], mx);
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;  // no key seen yet: p = 0
      const float corr = expf(m[i] - m_ref);                  // m = -inf: 0 (nothing to rescale)
      m[i] = m_new;
      l[i] *= corr;
#pragma unroll
      for (int dd = 0; dd < kDT; ++dd) o[i][dd] *= corr;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float p = expf(sc[i][jj] - m_ref);
        l[i] += p;
        Ps[(4 * ty + i) * kPS + tx + 16 * jj] = p;
      }
    }
    __syncthreads();

#pragma unroll 4
    for (int j = 0; j < kB; ++j) {  // O += P V
      float p[4], v[kDT];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = Ps[(4 * ty + i) * kPS + j];
#pragma unroll
      for (int dd = 0; dd < kDT; ++dd) v[dd] = Vs[j * kDP + tx + 16 * dd];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int dd = 0; dd < kDT; ++dd) o[i][dd] = fmaf(p[i], v[dd], o[i][dd]);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float lt = half_warp_sum(l[i]);  // by every lane: before the branch
    const int64_t t = i0 + 4 * ty + i;
    if (t < s.T) {  // a real row sees its own key, so lt >= 1
      const float inv = 1.0f / lt;
      float* orow = out + (b * s.T + t) * s.Co + h * s.HS;
#pragma unroll
      for (int dd = 0; dd < kDT; ++dd) {
        const int d = tx + 16 * dd;
        if (d < s.HS) orow[d] = o[i][dd] * inv;
      }
      if (tx == 0) lse[(b * s.NH + h) * s.T + t] = m[i] + logf(lt);
    }
  }
}

// D[(b, h, t)] = sum_d dout * out over the head's HS values, in double; one warp per (b, t, h).
__global__ void attention_backward_d_kernel(float* __restrict__ D, const float* __restrict__ dout,
                                            const float* __restrict__ out, Shape s) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = s.B * s.T * s.NH;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; w < rows; w += warps) {
    const int64_t bt = w / s.NH, h = w % s.NH;  // bt = b * T + t
    const float* o = out + bt * s.Co + h * s.HS;
    const float* g = dout + bt * s.Co + h * s.HS;
    double acc = 0;
    for (int64_t d = lane; d < s.HS; d += 32) acc += static_cast<double>(g[d]) * o[d];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      const int64_t b = bt / s.T, t = bt % s.T;
      D[(b * s.NH + h) * s.T + t] = static_cast<float>(acc);
    }
  }
}

template <int kD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkv_kernel(float* __restrict__ dqkv, const float* __restrict__ dout,
                                  const float* __restrict__ qkv, const float* __restrict__ lse,
                                  const float* __restrict__ Dg, Shape s) {
  constexpr int kDP = kD + 1, kDT = kD / 16;
  extern __shared__ float smem[];
  float* Ks = smem;            // (kB, kDP) keys of this block
  float* Vs = Ks + kB * kDP;   // (kB, kDP)
  float* Qs = Vs + kB * kDP;   // (kB, kDP) the current query tile
  float* dOs = Qs + kB * kDP;  // (kB, kDP)
  float* Ss = dOs + kB * kDP;  // (kB, kPS) P^T, then dS^T: rows keys, columns queries
  float* Ls = Ss + kB * kPS;   // (kB) lse of the query tile
  float* Dsm = Ls + kB;        // (kB) D of the query tile
  int32_t* Lo = reinterpret_cast<int32_t*>(Dsm + kB);  // (kB) doc_lo of the query tile
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t kb = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t j0 = kb * kB, nk = s.T - j0 < kB ? s.T - j0 : kB;
  const float* base = qkv + b * s.T * s.Cq;
  load_tile<kD>(Ks, base + j0 * s.Cq + (s.NH + kvh) * s.HS, s.Cq, nk, s.HS);
  load_tile<kD>(Vs, base + j0 * s.Cq + (s.NH + s.NKV + kvh) * s.HS, s.Cq, nk, s.HS);
  // Query t sees key j iff j <= t < j + window: the query tiles from j0 up to the window's reach.
  const int64_t reach = j0 + nk - 1 + s.window;
  const int64_t t_end = s.window > 0 && reach < s.T ? reach : s.T;

  float dk[4][kDT], dv[4][kDT];  // rows: keys 4ty+i; columns tx+16dd
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int dd = 0; dd < kDT; ++dd) dk[i][dd] = dv[i][dd] = 0.0f;

  for (int64_t h = kvh * s.group; h < (kvh + 1) * s.group; ++h) {
    for (int64_t i0 = j0; i0 < t_end; i0 += kB) {
      // Packed rows: once a query tile's first document starts after this key tile, so do all
      // later ones (starts never decrease); the same for every thread of the block.
      if (doc_lo(s, b, i0) > j0 + nk - 1) break;
      const int64_t nq = s.T - i0 < kB ? s.T - i0 : kB;
      __syncthreads();  // the previous tile's reads of Qs, dOs, Ss, Ls, Dsm are done
      load_tile<kD>(Qs, base + i0 * s.Cq + h * s.HS, s.Cq, nq, s.HS);
      load_tile<kD>(dOs, dout + (b * s.T + i0) * s.Co + h * s.HS, s.Co, nq, s.HS);
      for (int r = threadIdx.x; r < kB; r += kThreads) {
        const int64_t at = (b * s.NH + h) * s.T + i0 + r;
        Ls[r] = r < nq ? lse[at] : 0.0f;
        Dsm[r] = r < nq ? Dg[at] : 0.0f;
        Lo[r] = static_cast<int32_t>(doc_lo(s, b, i0 + r));
      }
      __syncthreads();

      float st[4][4] = {}, dpt[4][4] = {};  // S^T and dP^T: rows keys 4ty+i, columns tx+16jj
      two_products<kD>(Ks, Vs, Qs, dOs, ty, tx, st, dpt);

      float ds[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int q = tx + 16 * jj;
          const int64_t j = j0 + 4 * ty + i, t = i0 + q;
          // P = exp(score - lse), 0 where masked; dS = P (dP - D), through the cap
          float f = 1.0f;
          const float p =
              visible(t, j, s.T, s.window, Lo[q]) ? expf(score_of(st[i][jj], s, f) - Ls[q]) : 0.0f;
          ds[i][jj] = p * (dpt[i][jj] - Dsm[q]) * f;
          Ss[(4 * ty + i) * kPS + q] = p;
        }
      __syncthreads();
#pragma unroll 4
      for (int q = 0; q < kB; ++q) {  // dV += P^T dO
        float pr[4], g[kDT];
#pragma unroll
        for (int i = 0; i < 4; ++i) pr[i] = Ss[(4 * ty + i) * kPS + q];
#pragma unroll
        for (int dd = 0; dd < kDT; ++dd) g[dd] = dOs[q * kDP + tx + 16 * dd];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int dd = 0; dd < kDT; ++dd) dv[i][dd] = fmaf(pr[i], g[dd], dv[i][dd]);
      }
      __syncthreads();  // P^T read: overwrite it with dS^T
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) Ss[(4 * ty + i) * kPS + tx + 16 * jj] = ds[i][jj];
      __syncthreads();
#pragma unroll 4
      for (int q = 0; q < kB; ++q) {  // dK += dS^T Q (scaled once, at the end)
        float dr[4], qv[kDT];
#pragma unroll
        for (int i = 0; i < 4; ++i) dr[i] = Ss[(4 * ty + i) * kPS + q];
#pragma unroll
        for (int dd = 0; dd < kDT; ++dd) qv[dd] = Qs[q * kDP + tx + 16 * dd];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int dd = 0; dd < kDT; ++dd) dk[i][dd] = fmaf(dr[i], qv[dd], dk[i][dd]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t j = j0 + 4 * ty + i;
    if (j >= s.T) continue;
    float* drow = dqkv + (b * s.T + j) * s.Cq;
#pragma unroll
    for (int dd = 0; dd < kDT; ++dd) {
      const int d = tx + 16 * dd;
      if (d >= s.HS) continue;
      drow[(s.NH + kvh) * s.HS + d] += s.scale * dk[i][dd];
      drow[(s.NH + s.NKV + kvh) * s.HS + d] += dv[i][dd];
    }
  }
}

template <int kD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(float* __restrict__ dqkv, const float* __restrict__ dout,
                                 const float* __restrict__ qkv, const float* __restrict__ lse,
                                 const float* __restrict__ Dg, Shape s) {
  constexpr int kDP = kD + 1, kDT = kD / 16;
  extern __shared__ float smem[];
  float* Qs = smem;            // (kB, kDP) queries of this block
  float* dOs = Qs + kB * kDP;  // (kB, kDP)
  float* Ks = dOs + kB * kDP;  // (kB, kDP) the current key tile
  float* Vs = Ks + kB * kDP;   // (kB, kDP)
  float* Ss = Vs + kB * kDP;   // (kB, kPS) dS: rows queries, columns keys
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t i0 = qb * kB, nq = s.T - i0 < kB ? s.T - i0 : kB;
  const int64_t kvh = h / s.group;
  const float* base = qkv + b * s.T * s.Cq;
  const float* kp = base + (s.NH + kvh) * s.HS;
  const float* vp = base + (s.NH + s.NKV + kvh) * s.HS;
  load_tile<kD>(Qs, base + i0 * s.Cq + h * s.HS, s.Cq, nq, s.HS);
  load_tile<kD>(dOs, dout + (b * s.T + i0) * s.Co + h * s.HS, s.Co, nq, s.HS);
  float L[4], Dr[4], dq[4][kDT];  // rows: queries 4ty+i
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = i0 + 4 * ty + i;
    L[i] = t < s.T ? lse[(b * s.NH + h) * s.T + t] : 0.0f;
    Dr[i] = t < s.T ? Dg[(b * s.NH + h) * s.T + t] : 0.0f;
#pragma unroll
    for (int dd = 0; dd < kDT; ++dd) dq[i][dd] = 0.0f;
  }

  int64_t lo[4];  // each row's document start
#pragma unroll
  for (int i = 0; i < 4; ++i) lo[i] = doc_lo(s, b, i0 + 4 * ty + i);
  for (int64_t j0 = first_key_block(s, b, i0); j0 < i0 + nq; j0 += kB) {
    __syncthreads();  // the previous tile's reads of Ks, Vs, Ss are done
    load_tile<kD>(Ks, kp + j0 * s.Cq, s.Cq, s.T - j0, s.HS);
    load_tile<kD>(Vs, vp + j0 * s.Cq, s.Cq, s.T - j0, s.HS);
    __syncthreads();

    float sc[4][4] = {}, dp[4][4] = {};  // S and dP: rows queries 4ty+i, columns keys tx+16jj
    two_products<kD>(Qs, dOs, Ks, Vs, ty, tx, sc, dp);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int64_t t = i0 + 4 * ty + i, j = j0 + tx + 16 * jj;
        float f = 1.0f;
        const float p =
            visible(t, j, s.T, s.window, lo[i]) ? expf(score_of(sc[i][jj], s, f) - L[i]) : 0.0f;
        Ss[(4 * ty + i) * kPS + tx + 16 * jj] = p * (dp[i][jj] - Dr[i]) * f;
      }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kB; ++k) {  // dQ += dS K (scaled once, at the end)
      float dr[4], kv[kDT];
#pragma unroll
      for (int i = 0; i < 4; ++i) dr[i] = Ss[(4 * ty + i) * kPS + k];
#pragma unroll
      for (int dd = 0; dd < kDT; ++dd) kv[dd] = Ks[k * kDP + tx + 16 * dd];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int dd = 0; dd < kDT; ++dd) dq[i][dd] = fmaf(dr[i], kv[dd], dq[i][dd]);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = i0 + 4 * ty + i;
    if (t >= s.T) continue;
    float* drow = dqkv + (b * s.T + t) * s.Cq + h * s.HS;
#pragma unroll
    for (int dd = 0; dd < kDT; ++dd) {
      const int d = tx + 16 * dd;
      if (d < s.HS) drow[d] += s.scale * dq[i][dd];
    }
  }
}

constexpr size_t forward_smem(int kD) { return sizeof(float) * (3 * kB * (kD + 1) + kB * kPS); }
constexpr size_t dkv_smem(int kD) {
  return sizeof(float) * (4 * kB * (kD + 1) + kB * kPS + 3 * kB);  // + Ls, Dsm, Lo
}
constexpr size_t dq_smem(int kD) { return sizeof(float) * (4 * kB * (kD + 1) + kB * kPS); }

cudaStream_t cur_stream() { return static_cast<cudaStream_t>(stream()); }

// Lets `kernel` use `bytes` of dynamic shared memory (above the 48 KiB default), after checking
// that the device has that much per block.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int64_t HS) {
  int dev = 0, optin = 0;
  LMF_CUDA(cudaGetDevice(&dev));
  LMF_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > static_cast<size_t>(optin))
    detail::raise("cuda::attention: head size " + std::to_string(HS) + " needs " +
                  std::to_string(bytes) + " bytes of shared memory per block, " + device_name() +
                  " allows " + std::to_string(optin) +
                  "; use a smaller head size or train.device: cpu");
  LMF_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <int kD>
void forward_kD(float* out, float* lse, const float* qkv, const Shape& s) {
  static std::once_flag once;
  std::call_once(once, [&] { allow_smem(attention_forward_kernel<kD>, forward_smem(kD), s.HS); });
  const dim3 grid(static_cast<unsigned>((s.T + kB - 1) / kB), static_cast<unsigned>(s.NH),
                  static_cast<unsigned>(s.B));
  attention_forward_kernel<kD>
      <<<grid, kThreads, forward_smem(kD), cur_stream()>>>(out, lse, qkv, s);
  LMF_CUDA(cudaGetLastError());
}

template <int kD>
void backward_kD(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* D,
                 const Shape& s) {
  static std::once_flag once;
  std::call_once(once, [&] {
    allow_smem(attention_backward_dkv_kernel<kD>, dkv_smem(kD), s.HS);
    allow_smem(attention_backward_dq_kernel<kD>, dq_smem(kD), s.HS);
  });
  const unsigned tiles = static_cast<unsigned>((s.T + kB - 1) / kB);
  attention_backward_dkv_kernel<kD>
      <<<dim3(tiles, static_cast<unsigned>(s.NKV), static_cast<unsigned>(s.B)), kThreads,
         dkv_smem(kD), cur_stream()>>>(dqkv, dout, qkv, lse, D, s);
  LMF_CUDA(cudaGetLastError());
  attention_backward_dq_kernel<kD>
      <<<dim3(tiles, static_cast<unsigned>(s.NH), static_cast<unsigned>(s.B)), kThreads,
         dq_smem(kD), cur_stream()>>>(dqkv, dout, qkv, lse, D, s);
  LMF_CUDA(cudaGetLastError());
}

// Checks the shape (an Error naming the bad value) and fills in the derived sizes.
Shape make_shape(const char* op, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                 int64_t window, const int32_t* doc_start, const AttnScore& score) {
  auto bad = [&](const std::string& what) {
    detail::raise(std::string("cuda::") + op + ": " + what + " (B=" + std::to_string(B) + " T=" +
                  std::to_string(T) + " NH=" + std::to_string(NH) + " NKV=" + std::to_string(NKV) +
                  " HS=" + std::to_string(HS) + " window=" + std::to_string(window) + ")");
  };
  if (B < 0 || T < 0 || window < 0) bad("negative size");
  if (NH < 1 || NKV < 1 || NH % NKV != 0) bad("NH must be a positive multiple of NKV");
  if (HS < 1 || HS > kMaxHS)
    bad("head size must be in [1, 128] for the CUDA flash attention; use train.device: cpu");
  if (B > 65535 || NH > 65535) bad("B and NH must be at most 65535 (grid limits)");
  Shape s{B,
          T,
          NH,
          NKV,
          HS,
          window,
          doc_start,
          (NH + 2 * NKV) * HS,
          NH * HS,
          NH / NKV,
          score.scale<float>(HS),  // as the CPU computes it
          score.softcap};
  return s;
}

// D (B, NH, T) for backward: grows to the largest size asked for, then is reused. Growing waits
// for the stream, since a queued backward may still read the old buffer.
float* d_scratch(size_t n) {
  static std::mutex mu;
  static GrowingBuffer buf;
  std::lock_guard<std::mutex> lock(mu);
  return static_cast<float*>(buf.get(n * sizeof(float)));
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t NH,
                       int64_t NKV, int64_t HS, int64_t window, const int32_t* doc_start,
                       const AttnScore& score) {
  const Shape s = make_shape("attention_forward", B, T, NH, NKV, HS, window, doc_start, score);
  if (B == 0 || T == 0) return;
  if (HS <= 32)
    forward_kD<32>(out, lse, qkv, s);
  else if (HS <= 64)
    forward_kD<64>(out, lse, qkv, s);
  else
    forward_kD<128>(out, lse, qkv, s);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                        int64_t window, const int32_t* doc_start, const AttnScore& score) {
  const Shape s = make_shape("attention_backward", B, T, NH, NKV, HS, window, doc_start, score);
  if (B == 0 || T == 0) return;
  float* D = d_scratch(static_cast<size_t>(B * NH * T));
  const int64_t rows = B * T * NH, per_block = kThreads / 32;
  const int64_t blocks = std::min<int64_t>((rows + per_block - 1) / per_block, 1 << 16);
  attention_backward_d_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, cur_stream()>>>(D, dout,
                                                                                            out, s);
  LMF_CUDA(cudaGetLastError());
  if (HS <= 32)
    backward_kD<32>(dqkv, dout, qkv, lse, D, s);
  else if (HS <= 64)
    backward_kD<64>(dqkv, dout, qkv, lse, D, s);
  else
    backward_kD<128>(dqkv, dout, qkv, lse, D, s);
}

}  // namespace lmforge::cuda
