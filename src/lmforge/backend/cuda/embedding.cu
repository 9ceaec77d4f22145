// Token and position embeddings (GPT-2's encoder), forward and deterministic backward.
#include "lmforge/backend/cuda/device.cuh"

namespace lmforge::cuda {

using namespace detail;

namespace {

// ---------------------------------------------------------------------------------------------
// Embedding (GPT-2's encoder): out[b, t] = wte[tok[b, t]] + wpe[t].

// K table values from fp32 or bf16 (bf16 master weights; widened exactly).
template <int K>
__device__ __forceinline__ Floats<K> load_table(const float* p) {
  return load<K>(p);
}
template <int K>
__device__ __forceinline__ Floats<K> load_table(const uint16_t* p) {
  Floats<K> r;
#pragma unroll
  for (int k = 0; k < K; ++k) r.v[k] = __uint_as_float(static_cast<uint32_t>(p[k]) << 16);
  return r;
}

template <typename W>
struct EmbeddingForwardOp {
  float* out;
  const int32_t* tokens;
  const W* wte;
  const W* wpe;
  const int32_t* pos;  // or null: t
  int64_t T, C, V;
  int64_t v0, Vt;  // wte's rows are ids [v0, v0 + V) of Vt (vocabulary parallelism; else 0, V)
  template <int K>
  __device__ void apply(int64_t i) const {  // K divides C: one token per call
    const int64_t bt = i / C, c = i - bt * C;
    const int32_t tok = tokens[bt];
    const int64_t row = static_cast<int64_t>(tok) - v0;
    Floats<K> o;
    if (tok < 0 || tok >= Vt) {
#pragma unroll
      for (int k = 0; k < K; ++k) o.v[k] = __int_as_float(0x7fc00000);  // NaN: see kernels.h
    } else {
      if (row >= 0 && row < V) {
        o = load_table<K>(wte + row * C + c);
      } else {  // another rank's row: zeros
#pragma unroll
        for (int k = 0; k < K; ++k) o.v[k] = 0.0f;
      }
      Floats<K> p;
      if (wpe) {
        p = load_table<K>(wpe + (pos ? pos[bt] : bt % T) * C + c);
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
                              const int32_t* __restrict__ tokens, int64_t BT, int64_t C, int64_t V,
                              int64_t v0) {
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
      // (rows [v0, v0 + V) of the vocabulary: another rank's ids land outside [0, V))
      tok[k] = bt < BT ? static_cast<int32_t>(tokens[bt] - v0) : -1;
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
      // A run of one token (padding, a repeated prompt) is summed in a register and written
      // once: the same fp32 additions in the same order as one read-modify-write per hit, without
      // a dependent global load and store per repeat. `pend` is the row whose sum is not stored
      // yet; every other row's memory is current.
      float* pend = nullptr;
      float acc = 0.0f;
      auto add = [&](float* d, float g) {
        if (d != pend) {
          if (pend) *pend = acc;
          pend = d;
          acc = *d;
        }
        acc = __fadd_rn(acc, g);
      };
      int j = 0;
      // Four rows at a time: their dout loads are independent, and so are the dwte
      // read-modify-writes when the four tokens differ (and differ from the pending one).
      for (; j + 4 <= total; j += 4) {
        float* d[4];
        float g[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          d[k] = dwte + static_cast<int64_t>(hit_tok[j + k]) * C + c;
          g[k] = dout[(base + hit_pos[j + k]) * C + c];
        }
        if (d[0] != d[1] && d[0] != d[2] && d[0] != d[3] && d[1] != d[2] && d[1] != d[3] &&
            d[2] != d[3] && pend != d[0] && pend != d[1] && pend != d[2] && pend != d[3]) {
          if (pend) *pend = acc;
          pend = nullptr;
          float a[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) a[k] = *d[k];
#pragma unroll
          for (int k = 0; k < 4; ++k) *d[k] = __fadd_rn(a[k], g[k]);
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) add(d[k], g[k]);
        }
      }
      for (; j < total; ++j)
        add(dwte + static_cast<int64_t>(hit_tok[j]) * C + c, dout[(base + hit_pos[j]) * C + c]);
      if (pend) *pend = acc;
    }
    __syncthreads();  // the next chunk rewrites counts and hits
  }
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, const int32_t* pos, int64_t v0,
                       int64_t vocab_total) {
  const int64_t Vt = vocab_total > 0 ? vocab_total : V;
  launch_map(EmbeddingForwardOp<float>{out, tokens, wte, wpe, pos, T, C, V, v0, Vt}, B * T * C,
             C % 4 == 0 && aligned16(out, wte, wpe));
}

void embedding_forward(float* out, const int32_t* tokens, const uint16_t* wte, const uint16_t* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, const int32_t* pos) {
  launch_map(EmbeddingForwardOp<uint16_t>{out, tokens, wte, wpe, pos, T, C, V, 0, V}, B * T * C,
             C % 4 == 0 && aligned16(out));
}

namespace {
// d[ids[i]] += dout[i] over the BT rows, V rows of d (embedding_wte_grad_kernel).
void scatter_rows(float* d, const float* dout, const int32_t* ids, int64_t BT, int64_t C, int64_t V,
                  int64_t v0 = 0) {
  // The grid only spreads the work: results are the same for any number of parts. Aim for a
  // few blocks per SM.
  const int64_t slices = (C + kEmbChannels - 1) / kEmbChannels;
  const int64_t parts = std::clamp<int64_t>((4 * sm_count() + slices - 1) / slices, 1,
                                            std::clamp<int64_t>(V, 1, 65535));
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(parts));
  embedding_wte_grad_kernel<<<grid, kEmbChannels, 0, cur_stream()>>>(d, dout, ids, BT, C, V, v0);
  LMF_CUDA_LAUNCHED();
}
}  // namespace

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, const int32_t* pos, int64_t P,
                        int64_t v0) {
  const int64_t BT = B * T;
  if (BT <= 0 || C <= 0) return;
  if (dwte) scatter_rows(dwte, dout, tokens, BT, C, V, v0);
  if (dwpe && pos) {
    if (P <= 0) detail::raise("cuda::embedding_backward: positions need P, the table's rows");
    scatter_rows(dwpe, dout, pos, BT, C, P);
  } else if (dwpe)
    launch_map(EmbeddingWpeGradOp{dwpe, dout, B, T, C}, T * C, C % 4 == 0 && aligned16(dwpe, dout));
}

}  // namespace lmforge::cuda
