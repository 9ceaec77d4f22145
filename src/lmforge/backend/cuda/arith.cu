// Elementwise arithmetic (add, accumulate, scale, fill), sums of squares and the shared
// reduction state (device.cuh).
#include <mutex>

#include "lmforge/backend/cuda/device.cuh"

namespace lmforge::cuda {

using namespace detail;

namespace {

template <typename Bt>  // float, or uint16_t for a bf16 b (widened exactly)
struct AddOp {
  float* out;
  const float* a;
  const Bt* b;
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

struct AxpbyOp {
  float* y;
  const float* x;
  float a, b;
  template <int K>
  __device__ void apply(int64_t i) const {
    Floats<K> u = load<K>(y + i);
    const Floats<K> w = load<K>(x + i);
#pragma unroll
    for (int k = 0; k < K; ++k) u.v[k] = __fadd_rn(__fmul_rn(a, u.v[k]), __fmul_rn(b, w.v[k]));
    store<K>(y + i, u);
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
// Sums: fixed blocks, then one fixed-order reduction.

constexpr int kSumThreads = 256;
constexpr int64_t kSumMaxBlocks = 1024, kSumMinChunk = 1 << 12;

template <int K, bool kSquare>
__global__ void __launch_bounds__(kSumThreads)
    sum_kernel(double* partial, const float* x, int64_t n, int64_t chunk) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * chunk, i1 = min(n, i0 + chunk);
  const int64_t body = i0 + (i1 - i0) / K * K;
  double acc = 0;
  for (int64_t i = i0 + threadIdx.x * K; i < body; i += kSumThreads * K) {
    const Floats<K> v = load<K>(x + i);
#pragma unroll
    for (int k = 0; k < K; ++k) acc += static_cast<double>(v.v[k]) * (kSquare ? v.v[k] : 1.0f);
  }
  for (int64_t i = body + threadIdx.x; i < i1; i += kSumThreads)
    acc += static_cast<double>(x[i]) * (kSquare ? x[i] : 1.0f);
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

}  // namespace

namespace detail {

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
  static GrowingBuffer buf;
  const size_t bytes = static_cast<size_t>(count) * sizeof(double);
  std::lock_guard<std::mutex> lock(mu);
  return static_cast<double*>(buf.get(std::max(bytes, size_t{1} << 20)));
}

void sum_partials(double* out, const double* partial, int64_t n, bool accumulate) {
  sum_partials_kernel<<<1, kFinishThreads, 0, cur_stream()>>>(out, partial, n, accumulate);
  LMF_CUDA_LAUNCHED();
}

}  // namespace detail

void add(float* out, const float* a, const float* b, int64_t n) {
  launch_map(AddOp<float>{out, a, b}, n, aligned16(out, a, b));
}

void add(float* out, const float* a, const uint16_t* b, int64_t n) {
  launch_map(AddOp<uint16_t>{out, a, b}, n, aligned16(out, a) && aligned4(b));
}

void accumulate(float* dst, const float* src, int64_t n) {
  launch_map(AddOp<float>{dst, dst, src}, n, aligned16(dst, src));
}

namespace {
struct AccumulateRowsOp {
  float* dst;
  const float* src;
  int64_t cols, ldd, lds;
  template <int K>
  __device__ void apply(int64_t u) const {  // K divides cols: one row per call
    const int64_t r = u / cols, c = u - r * cols;
    Floats<K> x = load<K>(dst + r * ldd + c);
    const Floats<K> y = load<K>(src + r * lds + c);
#pragma unroll
    for (int k = 0; k < K; ++k) x.v[k] = __fadd_rn(x.v[k], y.v[k]);
    store<K>(dst + r * ldd + c, x);
  }
};
}  // namespace

void accumulate_rows(float* dst, const float* src, int64_t rows, int64_t cols, int64_t ld) {
  accumulate_block(dst, ld, src, ld, rows, cols);
}

void accumulate_block(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                      int64_t cols) {
  launch_map(AccumulateRowsOp{dst, src, cols, ldd, lds}, rows * cols,
             cols % 4 == 0 && ldd % 4 == 0 && lds % 4 == 0 && aligned16(dst, src));
}

void scale(float* x, float s, int64_t n) { launch_map(ScaleOp{x, s}, n, aligned16(x)); }

void axpby(float* y, float a, const float* x, float b, int64_t n) {
  launch_map(AxpbyOp{y, x, a, b}, n, aligned16(y, x));
}

void fill(float* x, float value, int64_t n) { launch_map(FillOp{x, value}, n, aligned16(x)); }

void zero(float* x, int64_t n) {
  if (n > 0) LMF_CUDA(cudaMemsetAsync(x, 0, static_cast<size_t>(n) * sizeof(float), cur_stream()));
}

namespace {
template <bool kSquare>
void launch_sum(double* result, const float* x, int64_t n, bool accumulate) {
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
    sum_kernel<4, kSquare>
        <<<static_cast<unsigned>(blocks), kSumThreads, 0, cur_stream()>>>(partial, x, n, chunk);
  else
    sum_kernel<1, kSquare>
        <<<static_cast<unsigned>(blocks), kSumThreads, 0, cur_stream()>>>(partial, x, n, chunk);
  LMF_CUDA_LAUNCHED();
  sum_partials(result, partial, blocks, accumulate);
}
}  // namespace

void sum_squares(double* result, const float* x, int64_t n, bool accumulate) {
  launch_sum<true>(result, x, n, accumulate);
}

void sum(double* result, const float* x, int64_t n, bool accumulate) {
  launch_sum<false>(result, x, n, accumulate);
}

}  // namespace lmforge::cuda
