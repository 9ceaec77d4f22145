// bf16 mixed precision on the CPU: fp32 -> bf16 conversion and bf16 matmuls with fp32
// accumulation. Where the CPU multiplies bf16 faster than fp32 (AMX; AVX512-BF16 on AMD), they go
// to oneDNN's matmul primitive, which picks its brgemm kernels at run time. Elsewhere (Intel's
// AVX512-BF16 without AMX runs them at about half the fp32 rate, AVX-512 without it by emulation
// at a fifth, and Debian's oneDNN 2.x has none without AVX-512) the operands are widened to fp32
// (exactly) and go to the fp32 sgemm: the same products accumulated in fp32, the same rounding of
// a bf16 output. Primitives are created once per shape and cached, so a training step creates none
// after the first; conversion scratch grows during the first step and is then reused.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/error.h"

namespace lmforge::cpu {

namespace {

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void to_bf16_avx512(
    uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 a = _mm512_loadu_ps(src + i), b = _mm512_loadu_ps(src + i + 16);
    __m512bh r = _mm512_cvtne2ps_pbh(b, a);  // low half from a, RNE, NaN stays NaN
    _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(r));
  }
  for (; i < n; ++i) dst[i] = fp32_to_bf16_ftz(src[i]);
}

// Round to nearest even with denormals to zero: identical to _mm512_cvtne2ps_pbh (NaN payloads
// aside).
void to_bf16_portable(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_bf16_ftz(src[i]);
}

struct GemmKey {
  bool ta, tb, acc, bias, c16;  // c16: C is bf16 (rounded from the fp32 accumulator)
  int64_t M, N, K, lda, ldb, ldc;
  bool operator==(const GemmKey&) const = default;
};
struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    size_t h = (k.ta << 0) | (k.tb << 1) | (k.acc << 2) | (k.bias << 3) | (k.c16 << 4);
    for (int64_t v : {k.M, k.N, k.K, k.lda, k.ldb, k.ldc})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};
struct GemmPlan {
  dnnl::memory::desc a, b, c, bias, scratch;
  dnnl::matmul prim;
  bool widen = false;  // no oneDNN bf16 matmul here: widened operands through sgemm
};

std::atomic<Bf16Matmul> g_mode{Bf16Matmul::kAuto};  // set_bf16_matmul

// kAuto: LMFORGE_BF16_MATMUL=native|widened, else the CPU's own (fast_bf16_products).
bool default_native() {
  static const bool native = [] {
    const char* e = std::getenv("LMFORGE_BF16_MATMUL");
    const std::string v = e ? e : "";
    if (v == "native" || v == "widened") return v == "native";
    if (!v.empty())
      std::fprintf(stderr, "warning: LMFORGE_BF16_MATMUL=%s: expected native or widened; ignored\n",
                   e);
    return cpu_features().fast_bf16_products;
  }();
  return native;
}

// The descriptors of a row-major product op(A) op(B) (a transposed operand is the same memory read
// with swapped strides, which oneDNN's brgemm handles without a copy) and its attribute: our own
// scratchpad, and the sum post-op when it accumulates into C.
struct GemmDescs {
  dnnl::memory::desc a, b, c;
  dnnl::primitive_attr attr;
};
GemmDescs describe(const GemmKey& k) {
  using dt = dnnl::memory::data_type;
  GemmDescs g;
  g.a = dnnl::memory::desc({k.M, k.K}, dt::bf16,
                           k.ta ? dnnl::memory::dims{1, k.lda} : dnnl::memory::dims{k.lda, 1});
  g.b = dnnl::memory::desc({k.K, k.N}, dt::bf16,
                           k.tb ? dnnl::memory::dims{1, k.ldb} : dnnl::memory::dims{k.ldb, 1});
  g.c = dnnl::memory::desc({k.M, k.N}, k.c16 ? dt::bf16 : dt::f32, dnnl::memory::dims{k.ldc, 1});
  g.attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (k.acc) {
    dnnl::post_ops po;
    po.append_sum(1.0f);
    g.attr.set_post_ops(po);
  }
  return g;
}

// dst (rows, cols; contiguous) = src (rows, cols; rows ld apart), bf16 widened to fp32; the
// _serial form inside parallel regions.
void widen_rows_serial(float* dst, const uint16_t* src, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) from_bf16_serial(dst + r * cols, src + r * ld, cols);
}
void widen_rows(float* dst, const uint16_t* src, int64_t rows, int64_t cols, int64_t ld) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) from_bf16_serial(dst + r * cols, src + r * ld, cols);
}

class Bf16Gemm {
 public:
  static Bf16Gemm& get() {
    static Bf16Gemm g;
    return g;
  }
  void run(const GemmKey& k, const uint16_t* A, const uint16_t* B, const float* bias, void* C) {
    if (!bf16_matmul_native()) return run_widened(k, A, B, bias, C);
    const GemmPlan& p = plan(k);
    if (p.widen) return run_widened(k, A, B, bias, C);
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, dnnl::memory(p.a, eng_, const_cast<uint16_t*>(A))},
        {DNNL_ARG_WEIGHTS, dnnl::memory(p.b, eng_, const_cast<uint16_t*>(B))},
        {DNNL_ARG_DST, dnnl::memory(p.c, eng_, C)}};
    if (k.bias) args.emplace(DNNL_ARG_BIAS, dnnl::memory(p.bias, eng_, const_cast<float*>(bias)));
    // The library would allocate (and page-fault in) its packing buffers on every call; ours is
    // sized by the largest plan and reused.
    args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(p.scratch, eng_, scratchpad_.data()));
    p.prim.execute(stream_, args);
    stream_.wait();
  }

 private:
  Bf16Gemm() : eng_(dnnl::engine::kind::cpu, 0), stream_(eng_) {}

  // The widened product: op(A) op(B) on fp32 copies of the operands (exact). The operand on C's
  // longer side goes in panels (op(A)'s rows when M > N, an LM head's weight gradient; else
  // op(B)'s columns, a weight), one per thread at a time, each widened into its thread's buffer (at
  // most kPanelBytes: it stays in the caches) and multiplied by a single-threaded sgemm (oneDNN
  // runs so inside a parallel region) into its part of C, or of an fp32 panel rounded into a bf16
  // C; the other operand is widened whole, once. As fast as widening both for the multi-threaded
  // sgemm (GPT-2's shapes, 2 cores of an Emerald Rapids), without a copy of the largest weight (the
  // LM head's took 154 MB). The bias joins the fp32 accumulator as oneDNN's does.
  void run_widened(const GemmKey& k, const uint16_t* A, const uint16_t* B, const float* bias,
                   void* C) {
    if (k.K > 8 * std::max(k.M, k.N) && 4 * k.K * std::max(k.M, k.N) > kPanelBytes)
      return k.M * k.N <= kSmallC ? run_widened_k_parts(k, A, B, bias, C)
                                  : run_widened_k_chunks(k, A, B, bias, C);
    const bool by_rows = k.M > k.N;
    // The operand widened whole, (rows, cols) as stored; its leading dimension becomes cols.
    const int64_t whole_rows = by_rows ? (k.tb ? k.N : k.K) : (k.ta ? k.K : k.M),
                  whole_cols = by_rows ? (k.tb ? k.K : k.N) : (k.ta ? k.M : k.K);
    float* whole = grow(wide_, whole_rows * whole_cols);
    widen_rows(whole, by_rows ? B : A, whole_rows, whole_cols, by_rows ? k.ldb : k.lda);
    const int threads = omp_get_max_threads();
    if (static_cast<int>(panel_.size()) < threads) panel_.resize(threads);
    // Panels of at most kPanelBytes of fp32, at least a block of sgemm's, as many as threads or a
    // multiple.
    const int64_t len = by_rows ? k.M : k.N;
    const int64_t cap = std::max<int64_t>(64, kPanelBytes / (4 * k.K) / 16 * 16);
    int64_t panels = std::max<int64_t>(1, std::min<int64_t>(threads, (len + 15) / 16));
    if ((len + panels - 1) / panels > cap)
      panels = ((len + cap - 1) / cap + threads - 1) / threads * threads;
    const int64_t pc = (len + panels - 1) / panels;
    const float beta = k.acc || bias ? 1.0f : 0.0f;
#pragma omp parallel for schedule(static) num_threads(std::min <int64_t>(threads, panels))
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t i0 = p * pc, n = std::min(pc, len - i0);
      if (n <= 0) continue;
      // Lines i0 .. i0 + n of op(X): n rows of X, each K long, when X is read untransposed as
      // op(A) or transposed as op(B); else those columns of each of X's K rows.
      const uint16_t* X = by_rows ? A : B;
      const int64_t ldx = by_rows ? k.lda : k.ldb;
      const bool lines_are_rows = by_rows ? !k.ta : k.tb;
      const int64_t rows = by_rows ? n : k.M, cols = by_rows ? k.N : n;  // of this part of C
      std::vector<float>& buf = panel_[omp_get_thread_num()];
      float* x = grow(buf, k.K * n + (k.c16 ? rows * cols : 0));
      if (lines_are_rows)
        widen_rows_serial(x, X + i0 * ldx, n, k.K, ldx);
      else
        widen_rows_serial(x, X + i0, k.K, n, ldx);
      const int64_t ldp = lines_are_rows ? k.K : n;
      const int64_t off = by_rows ? i0 * k.ldc : i0;  // this part's first element of C
      float* c = k.c16 ? x + k.K * n : static_cast<float*>(C) + off;
      const int64_t ldc = k.c16 ? cols : k.ldc;
      if (bias)
        for (int64_t i = 0; i < rows; ++i)
          std::memcpy(c + i * ldc, bias + (by_rows ? 0 : i0), cols * sizeof(float));
      if (by_rows)
        gemm<float>(k.ta, k.tb, n, k.N, k.K, 1.0f, x, ldp, whole, whole_cols, beta, c, ldc);
      else
        gemm<float>(k.ta, k.tb, k.M, n, k.K, 1.0f, whole, whole_cols, x, ldp, beta, c, ldc);
      if (k.c16)
        for (int64_t i = 0; i < rows; ++i)
          to_bf16_serial(static_cast<uint16_t*>(C) + off + i * k.ldc, c + i * cols, cols);
    }
  }
  // K far the longest side (an LM head's input gradient, K = the vocabulary; a layer's, K = 4 C,
  // is faster in panels): both operands widened a chunk of K at a time (each about kPanelBytes)
  // for the multi-threaded sgemm, which accumulates the chunks in C (or in an fp32 C rounded at
  // the end). Panels of C would each read all of the other, widened, operand: 256 x 768 x 50257
  // ran at 98 ms against sgemm's 78 on fp32.
  void run_widened_k_chunks(const GemmKey& k, const uint16_t* A, const uint16_t* B,
                            const float* bias, void* C) {
    const int64_t kc = std::max<int64_t>(256, kPanelBytes / (4 * std::max(k.M, k.N)) / 16 * 16);
    float* a = grow(wide_, std::min(kc, k.K) * (k.M + k.N) + (k.c16 ? k.M * k.N : 0));
    float* b = a + std::min(kc, k.K) * k.M;
    float* c = k.c16 ? b + std::min(kc, k.K) * k.N : static_cast<float*>(C);
    const int64_t ldc = k.c16 ? k.N : k.ldc;
    if (bias)
      for (int64_t i = 0; i < k.M; ++i) std::memcpy(c + i * ldc, bias, k.N * sizeof(float));
    for (int64_t k0 = 0; k0 < k.K; k0 += kc) {
      const int64_t n = std::min(kc, k.K - k0);
      widen_k_chunk(k, A, B, k0, n, a, b, /*serial=*/false);
      const float beta = k0 > 0 || k.acc || bias ? 1.0f : 0.0f;
      gemm<float>(k.ta, k.tb, k.M, k.N, n, 1.0f, a, k.ta ? k.M : n, b, k.tb ? n : k.N, beta, c,
                  ldc);
    }
    if (k.c16) {
      auto* out = static_cast<uint16_t*>(C);
#pragma omp parallel for schedule(static) if (k.M * k.N > (1 << 16))
      for (int64_t i = 0; i < k.M; ++i) to_bf16_serial(out + i * k.ldc, c + i * k.N, k.N);
    }
  }
  // op(A)[:, k0 .. k0 + n) into a and op(B)[k0 .. k0 + n, :] into b, widened, stored as A and B
  // are (leading dimensions n, or M and N where transposed); serial inside a parallel region.
  static void widen_k_chunk(const GemmKey& k, const uint16_t* A, const uint16_t* B, int64_t k0,
                            int64_t n, float* a, float* b, bool serial) {
    auto widen = serial ? widen_rows_serial : widen_rows;
    if (k.ta)
      widen(a, A + k0 * k.lda, n, k.M, k.lda);
    else
      widen(a, A + k0, k.M, n, k.lda);
    if (k.tb)
      widen(b, B + k0, k.N, n, k.ldb);
    else
      widen(b, B + k0 * k.ldb, n, k.N, k.ldb);
  }
  // K far the longest and C small (an LM head's input gradient for a few hundred rows: 256 x 768
  // for GPT-2 at 4 x 64, 256 x 128 for llama3-tiny): K in a fixed number of parts (set by K alone,
  // not by the thread count, so the sums are the same on any machine), each part's product
  // accumulated by one thread into its own C from chunks of K widened into that thread's
  // cache-sized buffers (no fork, join or L3 round trip per chunk, as the chunks above take); the
  // parts then added in order. 256 x 128 x 128256: 171 -> 260 GFLOP/s; 256 x 768 x 50257: 273 ->
  // 293 (fp32 sgemm: 237-243 and 316-320).
  void run_widened_k_parts(const GemmKey& k, const uint16_t* A, const uint16_t* B,
                           const float* bias, void* C) {
    const int64_t parts = std::clamp<int64_t>(k.K / 4096, 2, 16), plen = (k.K + parts - 1) / parts;
    const int64_t kc =
        std::min(plen, std::max<int64_t>(64, (int64_t{1} << 20) / (4 * (k.M + k.N)) / 16 * 16));
    const int64_t mn = k.M * k.N;
    float* acc = grow(wide_, parts * mn);
    const int threads = omp_get_max_threads();
    if (static_cast<int>(panel_.size()) < threads) panel_.resize(threads);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < parts; ++p) {
      float* c = acc + p * mn;
      float* a = grow(panel_[omp_get_thread_num()], kc * (k.M + k.N));
      float* b = a + kc * k.M;
      const int64_t k1 = std::min(k.K, (p + 1) * plen);
      if (p * plen >= k1) std::fill(c, c + mn, 0.0f);
      for (int64_t k0 = p * plen; k0 < k1; k0 += kc) {
        const int64_t n = std::min(kc, k1 - k0);
        widen_k_chunk(k, A, B, k0, n, a, b, /*serial=*/true);
        gemm<float>(k.ta, k.tb, k.M, k.N, n, 1.0f, a, k.ta ? k.M : n, b, k.tb ? n : k.N,
                    k0 > p * plen ? 1.0f : 0.0f, c, k.N);
      }
    }
#pragma omp parallel for schedule(static) if (mn * parts > (1 << 16))
    for (int64_t i = 0; i < k.M; ++i)
      for (int64_t j = 0; j < k.N; ++j) {
        float s = k.acc ? static_cast<const float*>(C)[i * k.ldc + j] : bias ? bias[j] : 0.0f;
        for (int64_t p = 0; p < parts; ++p) s += acc[p * mn + i * k.N + j];
        if (k.c16)
          static_cast<uint16_t*>(C)[i * k.ldc + j] = fp32_to_bf16_ftz(s);
        else
          static_cast<float*>(C)[i * k.ldc + j] = s;
      }
  }
  static float* grow(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }

  const GemmPlan& plan(const GemmKey& k) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(k);
    if (it != cache_.end()) return it->second;
    using dt = dnnl::memory::data_type;
    GemmPlan p;
    GemmDescs g = describe(k);
    p.a = g.a;
    p.b = g.b;
    p.c = g.c;
    if (k.bias) p.bias = dnnl::memory::desc({1, k.N}, dt::f32, dnnl::memory::dims{k.N, 1});
    const dnnl::primitive_attr& attr = g.attr;
    try {
      auto d =
          k.bias ? dnnl::matmul::desc(p.a, p.b, p.bias, p.c) : dnnl::matmul::desc(p.a, p.b, p.c);
      dnnl::matmul::primitive_desc pd(d, attr, eng_);
      p.scratch = pd.scratchpad_desc();
      if (scratchpad_.size() < p.scratch.get_size()) scratchpad_.resize(p.scratch.get_size());
      p.prim = dnnl::matmul(pd);
    } catch (const dnnl::error& e) {
      if (e.status != dnnl_unimplemented)
        fail("oneDNN bf16 matmul M={} N={} K={}: {}; use train.precision: fp32", k.M, k.N, k.K,
             e.what());
      p = GemmPlan{};
      p.widen = true;
      static bool told = false;
      if (!told && !cpu_features().avx512f) {
        told = true;
        std::fprintf(stderr,
                     "note: this CPU has no AVX-512, for which oneDNN has no bf16 matmul: bf16 "
                     "matmuls run as fp32 GEMMs on the widened operands (same results, slower "
                     "than train.precision: fp32 on this CPU)\n");
      }
    }
    return cache_.emplace(k, std::move(p)).first->second;
  }

  dnnl::engine eng_;
  dnnl::stream stream_;
  std::mutex mu_;
  std::unordered_map<GemmKey, GemmPlan, GemmKeyHash> cache_;
  std::vector<char> scratchpad_;
  // The widened product's operand widened whole, and each thread's panel of the other (and of a
  // bf16 C's accumulator).
  static constexpr int64_t kPanelBytes = int64_t{4} << 20;
  static constexpr int64_t kSmallC = int64_t{1} << 18;  // elements of C for run_widened_k_parts
  std::vector<float> wide_;
  std::vector<std::vector<float>> panel_;
};

// Conversion buffers reused by every bf16 linear: they grow during the first step only.
uint16_t* scratch(int slot, int64_t n) {
  static std::vector<uint16_t> bufs[2];
  if (static_cast<int64_t>(bufs[slot].size()) < n) bufs[slot].resize(n);
  return bufs[slot].data();
}

// Small bf16 products for kernels that tile their work over OpenMP threads (attention): each
// thread owns its primitives, stream, memory objects and scratchpad, so calls from inside a
// parallel region need no lock, and oneDNN runs each one on the calling thread (its OpenMP
// regions nest inactive). A few shapes per kernel: the per-thread caches stay small.
class TileGemm {
 public:
  static bool available() {
    static const bool ok = [] {
      if (!cpu_features().avx512_bf16) return false;  // emulated or absent: the fp32 kernels
      try {
        dnnl::engine eng(dnnl::engine::kind::cpu, 0);
        using dt = dnnl::memory::data_type;
        dnnl::memory::desc a({64, 64}, dt::bf16, {64, 1}), c({64, 64}, dt::f32, {64, 1});
        dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, a, c), eng);
        return true;
      } catch (const dnnl::error&) {
        return false;
      }
    }();
    return ok;
  }

  static void run(const GemmKey& k, const uint16_t* A, const uint16_t* B, float* C) {
    thread_local TileGemm t;
    t.exec(k, A, B, C);
  }

 private:
  struct Plan {
    dnnl::matmul prim;
    dnnl::memory a, b, c, scratch;
  };
  TileGemm() : eng_(dnnl::engine::kind::cpu, 0), stream_(eng_) {}

  void exec(const GemmKey& k, const uint16_t* A, const uint16_t* B, float* C) {
    auto it = cache_.find(k);
    if (it == cache_.end()) it = cache_.emplace(k, make(k)).first;
    Plan& p = it->second;
    p.a.set_data_handle(const_cast<uint16_t*>(A));
    p.b.set_data_handle(const_cast<uint16_t*>(B));
    p.c.set_data_handle(C);
    p.scratch.set_data_handle(scratchpad_.data());
    p.prim.execute(stream_, {{DNNL_ARG_SRC, p.a},
                             {DNNL_ARG_WEIGHTS, p.b},
                             {DNNL_ARG_DST, p.c},
                             {DNNL_ARG_SCRATCHPAD, p.scratch}});
  }

  Plan make(const GemmKey& k) {
    const GemmDescs g = describe(k);  // c16 false: an fp32 C
    const dnnl::memory::desc &a = g.a, &b = g.b, &c = g.c;
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), g.attr, eng_);
    const dnnl::memory::desc sd = pd.scratchpad_desc();
    // Grown before any memory object points into it (a plan made later may need more: the
    // handles are set on every call).
    if (scratchpad_.size() < sd.get_size() + 64) scratchpad_.resize(sd.get_size() + 64);
    return Plan{dnnl::matmul(pd), dnnl::memory(a, eng_, nullptr), dnnl::memory(b, eng_, nullptr),
                dnnl::memory(c, eng_, nullptr), dnnl::memory(sd, eng_, nullptr)};
  }

  dnnl::engine eng_;
  dnnl::stream stream_;
  std::unordered_map<GemmKey, Plan, GemmKeyHash> cache_;
  std::vector<char> scratchpad_;
};

}  // namespace

bool gemm_bf16_tile_available() { return bf16_matmul_native() && TileGemm::available(); }

void gemm_bf16_tile(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                    int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C,
                    int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  if (small_gemm_bf16(ta, tb, M, N, K, A, lda, B, ldb, accumulate, C, ldc)) return;
  TileGemm::run({ta, tb, accumulate, false, false, M, N, K, lda, ldb, ldc}, A, B, C);
}

void set_bf16_matmul(Bf16Matmul mode) { g_mode.store(mode); }

bool bf16_matmul_native() {
  const Bf16Matmul m = g_mode.load(std::memory_order_relaxed);
  return m == Bf16Matmul::kAuto ? default_native() : m == Bf16Matmul::kNative;
}

// The conversions run in chunks of this many elements over OpenMP threads, one chunk serially.
constexpr int64_t kChunk = 1 << 16;

void to_bf16(uint16_t* dst, const float* src, int64_t n) {
  static const bool fast = cpu_features().avx512_bf16;
#pragma omp parallel for schedule(static) if (n > kChunk)
  for (int64_t c = 0; c < n; c += kChunk) {
    int64_t len = std::min(kChunk, n - c);
    if (fast)
      to_bf16_avx512(dst + c, src + c, len);
    else
      to_bf16_portable(dst + c, src + c, len);
  }
}

void to_bf16_serial(uint16_t* dst, const float* src, int64_t n) {
  static const bool fast = cpu_features().avx512_bf16;
  if (fast)
    to_bf16_avx512(dst, src, n);
  else
    to_bf16_portable(dst, src, n);
}

void from_bf16_serial(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(src[i]);  // the compiler vectorizes it
}

void from_bf16(float* dst, const uint16_t* src, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kChunk)
  for (int64_t c = 0; c < n; c += kChunk)
    from_bf16_serial(dst + c, src + c, std::min(kChunk, n - c));
}

void keep_master(float* master, const uint16_t* value, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kChunk)
  for (int64_t i = 0; i < n; ++i)
    if (fp32_to_bf16_ftz(master[i]) != value[i]) master[i] = bf16_to_fp32(value[i]);
}

void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
               const uint16_t* B, int64_t ldb, const float* bias, bool accumulate, float* C,
               int64_t ldc) {
  if (M == 0 || N == 0) return;
  LMF_CHECK(!(bias && accumulate), "gemm_bf16: bias with accumulate");
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = bias ? bias[j] : 0.0f;
    return;
  }
  if (!ta && tb && gemv_takes(M))  // decoding's matrix-vector products
    return gemv_bf16(M, N, K, A, lda, B, ldb, bias, accumulate, C, ldc);
  if (ta && !tb && !bias && weight_grad_gemm_takes(M, N, K))
    return gemm_bf16_weight_grad(M, N, K, A, lda, B, ldb, accumulate, C, ldc);  // weight gradients
  Bf16Gemm::get().run({ta, tb, accumulate, bias != nullptr, false, M, N, K, lda, ldb, ldc}, A, B,
                      bias, C);
}

void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
               const uint16_t* B, int64_t ldb, const float* bias, uint16_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // bias alone
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = fp32_to_bf16_ftz(bias ? bias[j] : 0.0f);
    return;
  }
  Bf16Gemm::get().run({ta, tb, false, bias != nullptr, true, M, N, K, lda, ldb, ldc}, A, B, bias,
                      C);
}

void linear_forward_bf16(uint16_t* out, const uint16_t* inp, const uint16_t* weight,
                         const float* bias, int64_t N, int64_t C, int64_t OC) {
  gemm_bf16(false, true, N, OC, C, inp, C, weight, C, bias, out, OC);
}

void linear_forward_bf16(uint16_t* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC) {
  uint16_t* x = scratch(0, N * C);
  to_bf16(x, inp, N * C);
  linear_forward_bf16(out, x, weight, bias, N, C, OC);
}

void linear_forward_bf16(float* out, const uint16_t* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC) {
  gemm_bf16(false, true, N, OC, C, inp, C, weight, C, bias, false, out, OC);
}

void linear_forward_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC) {
  uint16_t* x = scratch(0, N * C);
  to_bf16(x, inp, N * C);
  linear_forward_bf16(out, x, weight, bias, N, C, OC);
}

namespace {
// dout rounded into scratch for the GEMMs; dinp fp32 (+=) or bf16 (written); dbias from the fp32
// dout.
template <typename DinT>
void linear_backward_rounding_dout(DinT* dinp, float* dweight, float* dbias, const float* dout,
                                   const uint16_t* inp, const uint16_t* weight, int64_t N,
                                   int64_t C, int64_t OC, bool dw_acc, bool dx_acc) {
  uint16_t* d = scratch(0, N * OC);
  to_bf16(d, dout, N * OC);
  if constexpr (std::is_same_v<DinT, float>) {
    linear_backward_bf16_dout(dinp, dweight, nullptr, d, OC, inp, weight, N, C, OC, dw_acc, dx_acc);
  } else {
    if (dinp) gemm_bf16(false, false, N, C, OC, d, OC, weight, C, nullptr, dinp, C);
    linear_backward_bf16_dout(nullptr, dweight, nullptr, d, OC, inp, weight, N, C, OC, dw_acc);
  }
  if (dbias) bias_grad(dbias, dout, N, OC);
}
}  // namespace

void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC, bool dw_acc, bool dx_acc) {
  linear_backward_rounding_dout(dinp, dweight, dbias, dout, inp, weight, N, C, OC, dw_acc, dx_acc);
}

void linear_backward_bf16(uint16_t* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC, bool dw_acc, bool dx_acc) {
  linear_backward_rounding_dout(dinp, dweight, dbias, dout, inp, weight, N, C, OC, dw_acc, dx_acc);
}

void linear_backward_bf16_dout(float* dinp, float* dweight, float* dbias, const uint16_t* dout,
                               int64_t ld, const uint16_t* inp, const uint16_t* weight, int64_t N,
                               int64_t C, int64_t OC, bool dw_acc, bool dx_acc) {
  if (dinp) gemm_bf16(false, false, N, C, OC, dout, ld, weight, C, nullptr, dx_acc, dinp, C);
  if (dweight) gemm_bf16(true, false, OC, C, N, dout, ld, inp, C, nullptr, dw_acc, dweight, C);
  if (dbias) bias_grad(dbias, dout, N, OC, ld);
}

void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const float* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC, bool dw_acc, bool dx_acc) {
  uint16_t* x = nullptr;
  if (dweight) {
    x = scratch(1, N * C);
    to_bf16(x, inp, N * C);
  }
  linear_backward_bf16(dinp, dweight, dbias, dout, x, weight, N, C, OC, dw_acc, dx_acc);
}

}  // namespace lmforge::cpu
