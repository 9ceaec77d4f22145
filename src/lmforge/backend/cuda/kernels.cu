// CUDA kernels, fp32 (see kernels.h for the contract). The maths and its rounding points follow
// the CPU reference kernels (backend/cpu/*.cpp) line by line; where the CPU does a plain fp32
// multiply-then-add, the kernels use __fmul_rn / __fadd_rn so nvcc cannot contract it into an
// FMA, making embedding, rope and AdamW bit-identical to the CPU.
//
// Decompositions:
//   elementwise   one grid-stride map (map_kernel), float4 when every pointer is 16-byte aligned
//   row kernels   norms: one warp per row; softmax_xent: one block per row (online max / sum)
//   column sums   norm weight gradients: (column tile, row chunk) blocks write double partials,
//                 a second kernel adds them per column in chunk order
//   sums          sum_squares / lse^2: fixed blocks write partials, one block adds them in order
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/cuda/runtime.h"

namespace lmforge::cuda {

namespace {

constexpr int kThreads = 256;                 // elementwise and row kernels: threads per block
constexpr int kRowsPerBlock = kThreads / 32;  // norms: one warp per row
constexpr unsigned kFullMask = 0xffffffffu;

cudaStream_t cur_stream() { return static_cast<cudaStream_t>(stream()); }

int sm_count() {
  static const int n = [] {
    int dev = 0, count = 0;
    LMF_CUDA(cudaGetDevice(&dev));
    LMF_CUDA(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  }();
  return n;
}

// The partial sums of the reductions: one device buffer, allocated on first use and regrown
// when a call needs more (after synchronizing: kernels queued earlier may still read the old
// one). Every use is stream-ordered, so calls share it. Kept until exit.
double* scratch(int64_t count) {
  static std::mutex mu;
  static void* buf = nullptr;
  static size_t cap = 0;
  const size_t bytes = static_cast<size_t>(count) * sizeof(double);
  std::lock_guard<std::mutex> lock(mu);
  if (bytes > cap) {
    if (buf) {
      synchronize();
      cuda::free(buf);
      buf = nullptr;
    }
    cap = std::max(bytes, size_t{1} << 20);
    buf = cuda::malloc(cap);
  }
  return static_cast<double*>(buf);
}

template <typename... P>
bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}
bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

// ---------------------------------------------------------------------------------------------
// Device helpers

// K consecutive floats, loaded as one float4 when K == 4 (the address is then 16-byte aligned).
template <int K>
struct Floats {
  float v[K];
};

template <int K>
__device__ __forceinline__ Floats<K> load(const float* p) {
  Floats<K> r;
  if constexpr (K == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    r.v[0] = q.x;
    r.v[1] = q.y;
    r.v[2] = q.z;
    r.v[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = p[k];
  }
  return r;
}

template <int K>
__device__ __forceinline__ void store(float* p, const Floats<K>& r) {
  if constexpr (K == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = r.v[k];
  }
}

// K bf16 values; K == 4 is one 8-byte store.
template <int K>
__device__ __forceinline__ void store_bf16(uint16_t* p, const uint16_t (&h)[K]) {
  if constexpr (K == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(h[0] | (static_cast<uint32_t>(h[1]) << 16),
                                              h[2] | (static_cast<uint32_t>(h[3]) << 16));
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = h[k];
  }
}

// fp32 -> bf16, round to nearest even, denormals to zero: core/dtype.h fp32_to_bf16_ftz.
__device__ __forceinline__ uint16_t bf16_ftz(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Butterfly sum: every lane ends with the same value (addition is commutative).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block, in a fixed tree; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  double t = 0;
  if (warp == 0) t = warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? part[lane] : 0.0);
  return t;
}

// Row i of a norm: cpu::row_offset.
__device__ __forceinline__ int64_t row_offset(int64_t i, int64_t C, int64_t group, int64_t stride) {
  return group == 1 ? i * stride : (i / group) * stride + (i % group) * C;
}

// ---------------------------------------------------------------------------------------------
// Elementwise: op.apply<K>(i) handles elements [i, i + K). The vectorized body covers the
// multiple-of-4 prefix, the scalar loop the rest.

template <int K, typename Op>
__global__ void __launch_bounds__(kThreads) map_kernel(Op op, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nk = n / K * K;
  for (int64_t i = tid * K; i < nk; i += step * K) op.template apply<K>(i);
  for (int64_t i = nk + tid; i < n; i += step) op.template apply<1>(i);
}

// vec: every pointer the op touches is 16-byte aligned (8 for bf16) and a group of 4 elements
// never straddles a row of the op.
template <typename Op>
void launch_map(const Op& op, int64_t n, bool vec) {
  if (n <= 0) return;
  const int k = vec ? 4 : 1;
  const int64_t units = (n + k - 1) / k;
  const int64_t blocks =
      std::min<int64_t>((units + kThreads - 1) / kThreads, static_cast<int64_t>(sm_count()) * 16);
  if (vec)
    map_kernel<4><<<static_cast<unsigned>(blocks), kThreads, 0, cur_stream()>>>(op, n);
  else
    map_kernel<1><<<static_cast<unsigned>(blocks), kThreads, 0, cur_stream()>>>(op, n);
  LMF_CUDA_LAUNCHED();
}

struct AddOp {
  float* out;
  const float* a;
  const float* b;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> x = load<K>(a + i);
    const Floats<K> y = load<K>(b + i);
#pragma unroll
    for (int k = 0; k < K; ++k) x.v[k] = __fadd_rn(x.v[k], y.v[k]);
    store<K>(out + i, x);
  }
};

struct ScaleOp {
  float* x;
  float s;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> v = load<K>(x + i);
#pragma unroll
    for (int k = 0; k < K; ++k) v.v[k] = __fmul_rn(v.v[k], s);
    store<K>(x + i, v);
  }
};

struct FillOp {
  float* x;
  float value;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> v;
#pragma unroll
    for (int k = 0; k < K; ++k) v.v[k] = value;
    store<K>(x + i, v);
  }
};

// ---------------------------------------------------------------------------------------------
// Embedding (GPT-2's encoder): out[b, t] = wte[tok[b, t]] + wpe[t].

struct EmbeddingForwardOp {
  float* out;
  const int32_t* tokens;
  const float* wte;
  const float* wpe;
  int64_t T, C, V;
  template <int K>
  __device__ void apply(int64_t i) const {  // K divides C: one token per call
    const int64_t bt = i / C, c = i - bt * C;
    const int32_t tok = tokens[bt];
    Floats<K> o;
    if (tok < 0 || tok >= V) {
#pragma unroll
      for (int k = 0; k < K; ++k) o.v[k] = __int_as_float(0x7fc00000);  // NaN: see kernels.h
    } else {
      o = load<K>(wte + static_cast<int64_t>(tok) * C + c);
      Floats<K> p;
      if (wpe) {
        p = load<K>(wpe + (bt % T) * C + c);
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) p.v[k] = 0.0f;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) o.v[k] = __fadd_rn(o.v[k], p.v[k]);
    }
    store<K>(out + i, o);
  }
};

// dwpe[t] += sum over b of dout[b, t], added in b order into the fp32 value (as the CPU).
struct EmbeddingWpeGradOp {
  float* dwpe;
  const float* dout;
  int64_t B, T, C;
  template <int K>
  __device__ void apply(int64_t i) const {
    const int64_t t = i / C, c = i - t * C;
    Floats<K> acc = load<K>(dwpe + i);
    for (int64_t b = 0; b < B; ++b) {
      const Floats<K> g = load<K>(dout + (b * T + t) * C + c);
#pragma unroll
      for (int k = 0; k < K; ++k) acc.v[k] = __fadd_rn(acc.v[k], g.v[k]);
    }
    store<K>(dwpe + i, acc);
  }
};

// dwte scatter-add without atomics. Block (x, y) owns channels [128 x, 128 x + 128) (one per
// thread) of the vocabulary rows v with v % gridDim.y == y, so no element has two writers. It
// walks the tokens in chunks: the block compacts the chunk's tokens that are its own, in (b, t)
// order (ballots plus a prefix over the warps), then each thread adds their dout rows into its
// channel. Every dwte element therefore receives its terms in (b, t) order, one fp32 add at a
// time, exactly as cpu::embedding_backward: the result does not depend on the grid.
constexpr int kEmbChannels = 128;                   // threads per block, one channel each
constexpr int kEmbScan = 8;                         // tokens per thread per chunk
constexpr int kEmbChunk = kEmbChannels * kEmbScan;  // tokens per chunk
constexpr int kEmbWarps = kEmbChannels / 32;

__global__ void __launch_bounds__(kEmbChannels)
    embedding_wte_grad_kernel(float* __restrict__ dwte, const float* __restrict__ dout,
                              const int32_t* __restrict__ tokens, int64_t BT, int64_t C,
                              int64_t V) {
  __shared__ int32_t hit_pos[kEmbChunk];  // position within the chunk
  __shared__ int32_t hit_tok[kEmbChunk];
  __shared__ int counts[kEmbScan * kEmbWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kEmbChannels + threadIdx.x;
  const int64_t parts = gridDim.y, part = blockIdx.y;
  const unsigned lanes_below = (1u << lane) - 1u;

  for (int64_t base = 0; base < BT; base += kEmbChunk) {
    int32_t tok[kEmbScan];
    unsigned ballot[kEmbScan];
#pragma unroll
    for (int k = 0; k < kEmbScan; ++k) {
      const int64_t bt = base + k * kEmbChannels + threadIdx.x;
      tok[k] = bt < BT ? tokens[bt] : -1;
      const bool mine = tok[k] >= 0 && tok[k] < V && tok[k] % parts == part;
      ballot[k] = __ballot_sync(kFullMask, mine);
      if (lane == 0) counts[k * kEmbWarps + warp] = __popc(ballot[k]);
    }
    __syncthreads();
    // Exclusive prefix over (k, warp), which is token order.
    int offset[kEmbScan], total = 0;
#pragma unroll
    for (int k = 0; k < kEmbScan; ++k)
      for (int w = 0; w < kEmbWarps; ++w) {
        if (w == warp) offset[k] = total;
        total += counts[k * kEmbWarps + w];
      }
#pragma unroll
    for (int k = 0; k < kEmbScan; ++k)
      if ((ballot[k] >> lane) & 1u) {
        const int at = offset[k] + __popc(ballot[k] & lanes_below);
        hit_pos[at] = k * kEmbChannels + threadIdx.x;
        hit_tok[at] = tok[k];
      }
    __syncthreads();
    if (c < C) {
      int j = 0;
      // Four rows at a time: their dout loads are independent; the dwte read-modify-writes may
      // overlap too when the four tokens differ, and otherwise go one after another.
      for (; j + 4 <= total; j += 4) {
        float* d[4];
        float g[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          d[k] = dwte + static_cast<int64_t>(hit_tok[j + k]) * C + c;
          g[k] = dout[(base + hit_pos[j + k]) * C + c];
        }
        if (d[0] != d[1] && d[0] != d[2] && d[0] != d[3] && d[1] != d[2] && d[1] != d[3] &&
            d[2] != d[3]) {
          float a[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) a[k] = *d[k];
#pragma unroll
          for (int k = 0; k < 4; ++k) *d[k] = __fadd_rn(a[k], g[k]);
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) *d[k] = __fadd_rn(*d[k], g[k]);
        }
      }
      for (; j < total; ++j) {
        float* d = dwte + static_cast<int64_t>(hit_tok[j]) * C + c;
        *d = __fadd_rn(*d, dout[(base + hit_pos[j]) * C + c]);
      }
    }
    __syncthreads();  // the next chunk rewrites counts and hits
  }
}

// ---------------------------------------------------------------------------------------------
// Norms: one warp per row, row statistics in double (as the CPU). K = 4: C and the row starts
// are multiples of 4 and the pointers 16-byte aligned; lane l then owns columns 4 l + 128 j.

template <int K>
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
                             const float* weight, const float* bias, int64_t N, int64_t C,
                             double eps) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;  // the whole warp: no block-wide syncs here
  const float* x = inp + i * C;
  double sum = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> v = load<K>(x + c);
#pragma unroll
    for (int k = 0; k < K; ++k) sum += v.v[k];
  }
  const double m = warp_sum(sum) / C;
  double var = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> v = load<K>(x + c);
#pragma unroll
    for (int k = 0; k < K; ++k) var += (v.v[k] - m) * (v.v[k] - m);
  }
  var = warp_sum(var) / C;
  const double s = 1.0 / sqrt(var + eps);
  float* o = out + i * C;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    Floats<K> v = load<K>(x + c);
    const Floats<K> w = load<K>(weight + c);
    Floats<K> b;
    if (bias) {
      b = load<K>(bias + c);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) b.v[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < K; ++k)
      v.v[k] = __fadd_rn(__fmul_rn(static_cast<float>((v.v[k] - m) * s), w.v[k]), b.v[k]);
    store<K>(o + c, v);
  }
  if (lane == 0) {
    mean[i] = static_cast<float>(m);
    rstd[i] = static_cast<float>(s);
  }
}

// dinp += (dn - mean(dn) - n mean(dn n)) s, with n = (x - m) s and dn = w dout.
template <int K>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                              const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;
  const float* x = inp + i * C;
  const float* g = dout + i * C;
  const double m = mean[i], s = rstd[i];
  double dnorm_mean = 0, dnorm_norm_mean = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double n = (xv.v[k] - m) * s;
      const double dn = static_cast<double>(wv.v[k]) * gv.v[k];
      dnorm_mean += dn;
      dnorm_norm_mean += dn * n;
    }
  }
  dnorm_mean = warp_sum(dnorm_mean) / C;
  dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
  float* d = dinp + i * C;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
    Floats<K> dv = load<K>(d + c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double n = (xv.v[k] - m) * s;
      const double dn = static_cast<double>(wv.v[k]) * gv.v[k];
      dv.v[k] = __fadd_rn(dv.v[k], static_cast<float>((dn - dnorm_mean - n * dnorm_norm_mean) * s));
    }
    store<K>(d + c, dv);
  }
}

template <int K>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* weight,
                           int64_t N, int64_t C, double eps, int64_t group, int64_t stride) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;
  const int64_t at = row_offset(i, C, group, stride);
  const float* x = inp + at;
  double ss = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> v = load<K>(x + c);
#pragma unroll
    for (int k = 0; k < K; ++k) ss += static_cast<double>(v.v[k]) * v.v[k];
  }
  const double s = 1.0 / sqrt(warp_sum(ss) / C + eps);
  float* o = out + at;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    Floats<K> v = load<K>(x + c);
    const Floats<K> w = load<K>(weight + c);
#pragma unroll
    for (int k = 0; k < K; ++k) v.v[k] = __fmul_rn(static_cast<float>(v.v[k] * s), w.v[k]);
    store<K>(o + c, v);
  }
  if (lane == 0) rstd[i] = static_cast<float>(s);
}

// dinp += s (dn - n mean(dn n)), with n = x s and dn = w dout.
template <int K>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                            const float* rstd, int64_t N, int64_t C, int64_t group,
                            int64_t stride) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= N) return;
  const int64_t at = row_offset(i, C, group, stride);
  const float* x = inp + at;
  const float* g = dout + at;
  const double s = rstd[i];
  double dot = 0;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
#pragma unroll
    for (int k = 0; k < K; ++k) dot += static_cast<double>(wv.v[k]) * gv.v[k] * xv.v[k] * s;
  }
  dot = warp_sum(dot) / C;
  float* d = dinp + at;
  for (int64_t c = lane * K; c < C; c += 32 * K) {
    const Floats<K> xv = load<K>(x + c), gv = load<K>(g + c), wv = load<K>(weight + c);
    Floats<K> dv = load<K>(d + c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double n = xv.v[k] * s;
      dv.v[k] = __fadd_rn(
          dv.v[k], static_cast<float>(s * (static_cast<double>(wv.v[k]) * gv.v[k] - n * dot)));
    }
    store<K>(d + c, dv);
  }
}

// Weight (and bias) gradients of the norms: column sums over rows, deterministic. Rows are cut
// into chunks fixed by N alone (at most kColChunks); block (x, y) sums chunk y of columns
// [128 x, 128 x + 128), one column per thread (coalesced across the warp), in row order, into
// double partials; colsum_finish_kernel adds a column's partials in chunk order.
constexpr int kColThreads = 128;
constexpr int64_t kColChunks = 256, kColMinRows = 32;

int64_t col_rows_per_chunk(int64_t N) {
  return std::max(kColMinRows, (N + kColChunks - 1) / kColChunks);
}

// kLayer: partial = [dw chunks (chunks, C) | db chunks (chunks, C)]; else dw only (no mean).
template <bool kLayer>
__global__ void __launch_bounds__(kColThreads)
    norm_colsum_kernel(double* partial, const float* dout, const float* inp, const float* mean,
                       const float* rstd, int64_t N, int64_t C, int64_t group, int64_t stride,
                       int64_t rows) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t chunk = blockIdx.y, r0 = chunk * rows, r1 = min(N, r0 + rows);
  double dw = 0, db = 0;
#pragma unroll 4
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t at = row_offset(i, C, group, stride) + c;
    const double s = rstd[i];
    const float g = dout[at];
    if constexpr (kLayer) {
      dw += (inp[at] - static_cast<double>(mean[i])) * s * g;
      db += g;
    } else {
      dw += static_cast<double>(inp[at]) * s * g;
    }
  }
  partial[chunk * C + c] = dw;
  if constexpr (kLayer) partial[(gridDim.y + chunk) * C + c] = db;
}

__global__ void __launch_bounds__(kThreads)
    colsum_finish_kernel(float* dst, const double* partial, int64_t chunks, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double t = 0;
  for (int64_t k = 0; k < chunks; ++k) t += partial[k * C + c];
  dst[c] = __fadd_rn(dst[c], static_cast<float>(t));
}

// dweight (and dbias, when not null) += the column sums; group/stride as rmsnorm (1, C for
// layernorm). mean null: rmsnorm.
void norm_param_grads(float* dweight, float* dbias, const float* dout, const float* inp,
                      const float* mean, const float* rstd, int64_t N, int64_t C, int64_t group,
                      int64_t stride) {
  const int64_t rows = col_rows_per_chunk(N), chunks = (N + rows - 1) / rows;
  const bool layer = mean != nullptr;
  double* partial = scratch((layer ? 2 : 1) * chunks * C);
  const dim3 grid(static_cast<unsigned>((C + kColThreads - 1) / kColThreads),
                  static_cast<unsigned>(chunks));
  if (layer)
    norm_colsum_kernel<true><<<grid, kColThreads, 0, cur_stream()>>>(partial, dout, inp, mean, rstd,
                                                                     N, C, group, stride, rows);
  else
    norm_colsum_kernel<false><<<grid, kColThreads, 0, cur_stream()>>>(
        partial, dout, inp, mean, rstd, N, C, group, stride, rows);
  LMF_CUDA_LAUNCHED();
  const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  colsum_finish_kernel<<<blocks, kThreads, 0, cur_stream()>>>(dweight, partial, chunks, C);
  LMF_CUDA_LAUNCHED();
  if (layer && dbias) {
    colsum_finish_kernel<<<blocks, kThreads, 0, cur_stream()>>>(dbias, partial + chunks * C, chunks,
                                                                C);
    LMF_CUDA_LAUNCHED();
  }
}

unsigned row_blocks(int64_t N) {
  return static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
}

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
// Softmax cross-entropy: one block per row. Each thread keeps an online (max, sum of exp(x -
// max)) in fp32 over its columns (Milakov & Gimelshein 2018), the block combines them in a
// fixed tree, and lse = max + log(sum) in double. Rows are read as float4 between an unaligned
// head and tail (V is usually odd).

constexpr int kXentThreads = 512;

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ void push(MaxSum& a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;  // expf(-inf) = 0 for the first element
    a.m = x;
  } else if (x != -INFINITY) {  // a -inf logit adds nothing (and -inf - -inf would be NaN)
    a.s += expf(x - a.m);
  }
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// f(v, x[v]) for the columns of a row of V that this thread owns.
template <typename F>
__device__ __forceinline__ void for_row(const float* x, int64_t V, F&& f) {
  const int64_t head =
      min(V, static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / 4);
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) f(v, x[v]);
  const int64_t nvec = (V - head) / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x + head);
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const float4 q = x4[j];
    const int64_t v = head + 4 * j;
    f(v, q.x);
    f(v + 1, q.y);
    f(v + 2, q.z);
    f(v + 3, q.w);
  }
  for (int64_t v = head + 4 * nvec + threadIdx.x; v < V; v += blockDim.x) f(v, x[v]);
}

// d[v] = f(v, x[v]) over a row; d may alias x (each element is read and written by one thread).
template <typename F>
__device__ __forceinline__ void map_row(float* d, const float* x, int64_t V, F&& f) {
  if (((reinterpret_cast<uintptr_t>(d) ^ reinterpret_cast<uintptr_t>(x)) & 15) != 0) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = f(v, x[v]);
    return;
  }
  const int64_t head =
      min(V, static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / 4);
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) d[v] = f(v, x[v]);
  const int64_t nvec = (V - head) / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x + head);
  float4* d4 = reinterpret_cast<float4*>(d + head);
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const float4 q = x4[j];
    const int64_t v = head + 4 * j;
    d4[j] = make_float4(f(v, q.x), f(v + 1, q.y), f(v + 2, q.z), f(v + 3, q.w));
  }
  for (int64_t v = head + 4 * nvec + threadIdx.x; v < V; v += blockDim.x) d[v] = f(v, x[v]);
}

// logsumexp of a row, the same value in every thread (all threads of the block must call).
__device__ double row_logsumexp(const float* x, int64_t V) {
  __shared__ MaxSum part[kXentThreads / 32];
  MaxSum a{-INFINITY, 0.0f};
  for_row(x, V, [&](int64_t, float xv) { push(a, xv); });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const MaxSum b{__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o)};
    a = combine(a, b);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < kXentThreads / 32 ? part[lane] : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const MaxSum b{__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o)};
      a = combine(a, b);
    }
    if (lane == 0) part[0] = a;
  }
  __syncthreads();
  a = part[0];
  return static_cast<double>(a.m) + log(static_cast<double>(a.s));
}

__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_forward_kernel(float* losses, double* lse_sq, const float* logits,
                                const int32_t* targets, int64_t V, int32_t ignore_index) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  if (y == ignore_index) {  // the whole block
    if (threadIdx.x == 0) {
      losses[i] = 0.0f;
      if (lse_sq) lse_sq[i] = 0.0;
    }
    return;
  }
  const float* x = logits + i * V;
  const double lse = row_logsumexp(x, V);
  if (threadIdx.x == 0) {
    const bool valid = y >= 0 && y < V;
    losses[i] = valid ? static_cast<float>(lse - x[y]) : __int_as_float(0x7fc00000);
    if (lse_sq) lse_sq[i] = valid ? lse * lse : __longlong_as_double(0x7ff8000000000000LL);
  }
}

// d(lse - x_y + z lse^2) / dx_v = p_v (1 + 2 z lse) - [v == y]. The row is fully read (for lse,
// then a block sync) before any write, so dlogits may alias logits.
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_backward_kernel(float* dlogits, const float* logits, const int32_t* targets,
                                 float dloss, int64_t V, int32_t ignore_index, double z_loss) {
  const int64_t i = blockIdx.x;
  const int32_t y = targets[i];
  const float* x = logits + i * V;
  float* d = dlogits + i * V;
  if (y == ignore_index) {
    map_row(d, x, V, [](int64_t, float) { return 0.0f; });
    return;
  }
  const double lse = row_logsumexp(x, V);
  const double zf = 1.0 + 2.0 * z_loss * lse;
  const bool valid = y >= 0 && y < V;
  const float lse_f = static_cast<float>(lse), coef = static_cast<float>(dloss * zf);
  map_row(d, x, V, [&](int64_t v, float xv) {
    if (!valid) return __int_as_float(0x7fc00000);
    if (v == y) return static_cast<float>(dloss * (exp(static_cast<double>(xv) - lse) * zf - 1.0));
    return expf(xv - lse_f) * coef;
  });
}

// ---------------------------------------------------------------------------------------------
// Sums: fixed blocks, then one fixed-order reduction.

constexpr int kSumThreads = 256;
constexpr int64_t kSumMaxBlocks = 1024, kSumMinChunk = 1 << 12;

template <int K>
__global__ void __launch_bounds__(kSumThreads)
    sum_squares_kernel(double* partial, const float* x, int64_t n, int64_t chunk) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * chunk, i1 = min(n, i0 + chunk);
  const int64_t body = i0 + (i1 - i0) / K * K;
  double acc = 0;
  for (int64_t i = i0 + threadIdx.x * K; i < body; i += kSumThreads * K) {
    const Floats<K> v = load<K>(x + i);
#pragma unroll
    for (int k = 0; k < K; ++k) acc += static_cast<double>(v.v[k]) * v.v[k];
  }
  for (int64_t i = body + threadIdx.x; i < i1; i += kSumThreads)
    acc += static_cast<double>(x[i]) * x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// *out (+)= sum of partial[0, n): thread t adds t, t + 1024, ... in order, then a fixed tree.
constexpr int kFinishThreads = 1024;
__global__ void __launch_bounds__(kFinishThreads)
    sum_partials_kernel(double* out, const double* partial, int64_t n, bool accumulate) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kFinishThreads) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = accumulate ? *out + acc : acc;
}

void sum_partials(double* out, const double* partial, int64_t n, bool accumulate) {
  sum_partials_kernel<<<1, kFinishThreads, 0, cur_stream()>>>(out, partial, n, accumulate);
  LMF_CUDA_LAUNCHED();
}

// ---------------------------------------------------------------------------------------------
// AdamW: cpu::adamw_update's operations in its order, each rounded to fp32 (no contraction).

struct AdamwOp {
  float* p;
  const float* g;
  float* m;
  float* v;
  uint16_t* p16;
  float step_size, decay, w1, w2, b2, bc2_sqrt, eps;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> pv = load<K>(p + i), mv = load<K>(m + i), vv = load<K>(v + i);
    const Floats<K> gv = load<K>(g + i);
    uint16_t h[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float gi = gv.v[k];
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

// ---------------------------------------------------------------------------------------------
// Interface

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V) {
  launch_map(EmbeddingForwardOp{out, tokens, wte, wpe, T, C, V}, B * T * C,
             C % 4 == 0 && aligned16(out, wte, wpe));
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V) {
  const int64_t BT = B * T;
  if (BT <= 0 || C <= 0) return;
  // The grid only spreads the work: results are the same for any number of parts. Aim for a
  // few blocks per SM.
  const int64_t slices = (C + kEmbChannels - 1) / kEmbChannels;
  const int64_t parts = std::clamp<int64_t>((4 * sm_count() + slices - 1) / slices, 1,
                                            std::clamp<int64_t>(V, 1, 65535));
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(parts));
  embedding_wte_grad_kernel<<<grid, kEmbChannels, 0, cur_stream()>>>(dwte, dout, tokens, BT, C, V);
  LMF_CUDA_LAUNCHED();
  if (dwpe)
    launch_map(EmbeddingWpeGradOp{dwpe, dout, B, T, C}, T * C, C % 4 == 0 && aligned16(dwpe, dout));
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, double eps) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && aligned16(out, inp, weight, bias))
    layernorm_forward_kernel<4><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, mean, rstd, inp, weight, bias, N, C, eps);
  else
    layernorm_forward_kernel<1><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, mean, rstd, inp, weight, bias, N, C, eps);
  LMF_CUDA_LAUNCHED();
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd,
                        int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && aligned16(dinp, dout, inp, weight))
    layernorm_backward_kernel<4>
        <<<row_blocks(N), kThreads, 0, cur_stream()>>>(dinp, dout, inp, weight, mean, rstd, N, C);
  else
    layernorm_backward_kernel<1>
        <<<row_blocks(N), kThreads, 0, cur_stream()>>>(dinp, dout, inp, weight, mean, rstd, N, C);
  LMF_CUDA_LAUNCHED();
  norm_param_grads(dweight, dbias, dout, inp, mean, rstd, N, C, 1, C);
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, double eps, int64_t group, int64_t stride) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && stride % 4 == 0 && aligned16(out, inp, weight))
    rmsnorm_forward_kernel<4><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, rstd, inp, weight, N, C, eps, group, stride);
  else
    rmsnorm_forward_kernel<1><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        out, rstd, inp, weight, N, C, eps, group, stride);
  LMF_CUDA_LAUNCHED();
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C, int64_t group,
                      int64_t stride) {
  if (N <= 0 || C <= 0) return;
  if (C % 4 == 0 && stride % 4 == 0 && aligned16(dinp, dout, inp, weight))
    rmsnorm_backward_kernel<4><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        dinp, dout, inp, weight, rstd, N, C, group, stride);
  else
    rmsnorm_backward_kernel<1><<<row_blocks(N), kThreads, 0, cur_stream()>>>(
        dinp, dout, inp, weight, rstd, N, C, group, stride);
  LMF_CUDA_LAUNCHED();
  norm_param_grads(dweight, nullptr, dout, inp, nullptr, rstd, N, C, group, stride);
}

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

void softmax_xent_forward(float* losses, const float* logits, const int32_t* targets, int64_t N,
                          int64_t V, int32_t ignore_index, double* lse_sq_sum) {
  if (N <= 0) {
    if (lse_sq_sum) LMF_CUDA(cudaMemsetAsync(lse_sq_sum, 0, sizeof(double), cur_stream()));
    return;
  }
  double* lse_sq = lse_sq_sum ? scratch(N) : nullptr;
  softmax_xent_forward_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      losses, lse_sq, logits, targets, V, ignore_index);
  LMF_CUDA_LAUNCHED();
  if (lse_sq_sum) sum_partials(lse_sq_sum, lse_sq, N, false);
}

void softmax_xent_backward(float* dlogits, const float* logits, const int32_t* targets, float dloss,
                           int64_t N, int64_t V, int32_t ignore_index, double z_loss) {
  if (N <= 0) return;
  softmax_xent_backward_kernel<<<static_cast<unsigned>(N), kXentThreads, 0, cur_stream()>>>(
      dlogits, logits, targets, dloss, V, ignore_index, z_loss);
  LMF_CUDA_LAUNCHED();
}

void add(float* out, const float* a, const float* b, int64_t n) {
  launch_map(AddOp{out, a, b}, n, aligned16(out, a, b));
}

void accumulate(float* dst, const float* src, int64_t n) {
  launch_map(AddOp{dst, dst, src}, n, aligned16(dst, src));
}

void scale(float* x, float s, int64_t n) { launch_map(ScaleOp{x, s}, n, aligned16(x)); }

void fill(float* x, float value, int64_t n) { launch_map(FillOp{x, value}, n, aligned16(x)); }

void zero(float* x, int64_t n) {
  if (n > 0) LMF_CUDA(cudaMemsetAsync(x, 0, static_cast<size_t>(n) * sizeof(float), cur_stream()));
}

void sum_squares(double* result, const float* x, int64_t n, bool accumulate) {
  if (n <= 0) {
    if (!accumulate) LMF_CUDA(cudaMemsetAsync(result, 0, sizeof(double), cur_stream()));
    return;
  }
  // The partition depends on n alone; a multiple of 4 keeps every block's start aligned.
  int64_t chunk = std::max(kSumMinChunk, (n + kSumMaxBlocks - 1) / kSumMaxBlocks);
  chunk = (chunk + 3) / 4 * 4;
  const int64_t blocks = (n + chunk - 1) / chunk;
  double* partial = scratch(blocks);
  if (aligned16(x))
    sum_squares_kernel<4>
        <<<static_cast<unsigned>(blocks), kSumThreads, 0, cur_stream()>>>(partial, x, n, chunk);
  else
    sum_squares_kernel<1>
        <<<static_cast<unsigned>(blocks), kSumThreads, 0, cur_stream()>>>(partial, x, n, chunk);
  LMF_CUDA_LAUNCHED();
  sum_partials(result, partial, blocks, accumulate);
}

void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step) {
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
                   /*eps=*/static_cast<float>(eps)};
  launch_map(op, n, aligned16(p, g, m, v) && aligned8(p16));
}

}  // namespace lmforge::cuda
