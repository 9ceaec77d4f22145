// The tiled (online-softmax) attention kernel against the textbook algorithm: full causal softmax
// per row, written here in plain O(T^2) loops in double, independent of the kernel. T = 200 spans
// four query tiles (of 64) and two key tiles (of 128), the last of each partial, so the rescaling
// of the running sum across key tiles, the tiles skipped above the diagonal and, with window 37,
// the key tile the last query tile skips are all exercised; GQA (NH = 4 query heads over NKV = 2 kv
// heads) sends two heads' gradients into each dK/dV.
//
// Bounds (normalised error, testing/compare.h): fp32 kernel vs the double reference 1e-5; the
// fp64 kernel 1e-12. The kernel must also give bit-identical results with 1 and 2 threads, and
// backward must accumulate (a second call doubles dqkv).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/rng.h"
#include "testing/compare.h"

namespace lmforge {
namespace {

constexpr int64_t kB = 2, kT = 200, kHS = 16, kNH = 4, kNKV = 2;
constexpr int64_t kCq = (kNH + 2 * kNKV) * kHS, kCo = kNH * kHS;

struct Naive {
  Tensor out, lse, dqkv;  // (B, T, NH HS), (B, NH, T), (B, T, Cq), fp64
};

// Causal softmax attention, query t seeing keys (t - window, t] (all of [0, t] for window 0), its
// scores scaled and soft-capped as `score` says (attn_score.h; the cap's derivative 1 - tanh^2).
Naive naive_attention(const Tensor& qkv_in, const Tensor& dout_in, int64_t window,
                      const AttnScore& score = {}) {
  Tensor qkv = qkv_in.to(DType::kF64), dout = dout_in.to(DType::kF64);
  const double* x = qkv.data<double>();
  const double* dO = dout.data<double>();
  Naive r{Tensor::zeros({kB, kT, kCo}, DType::kF64), Tensor::zeros({kB, kNH, kT}, DType::kF64),
          Tensor::zeros({kB, kT, kCq}, DType::kF64)};
  double* out = r.out.data<double>();
  double* dx = r.dqkv.data<double>();
  const double scale = score.scale<double>(kHS), cap = score.softcap;
  std::vector<double> p(kT), dp(kT), f(kT, 1.0);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kNH; ++h) {
      const int64_t qo = h * kHS, ko = (kNH + h / (kNH / kNKV)) * kHS, vo = ko + kNKV * kHS;
      auto at = [&](int64_t t, int64_t off) { return x + (b * kT + t) * kCq + off; };
      auto dat = [&](int64_t t, int64_t off) { return dx + (b * kT + t) * kCq + off; };
      for (int64_t t = 0; t < kT; ++t) {
        const int64_t lo = window > 0 ? std::max<int64_t>(0, t - window + 1) : 0;
        double mx = -INFINITY;
        for (int64_t j = lo; j <= t; ++j) {
          double s = 0;
          for (int64_t d = 0; d < kHS; ++d) s += at(t, qo)[d] * at(j, ko)[d];
          p[j] = s * scale;
          if (cap > 0) {
            const double th = std::tanh(p[j] / cap);
            p[j] = cap * th;
            f[j] = 1 - th * th;
          }
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = lo; j <= t; ++j) sum += std::exp(p[j] - mx);
        r.lse.data<double>()[(b * kNH + h) * kT + t] = mx + std::log(sum);
        for (int64_t j = lo; j <= t; ++j) p[j] = std::exp(p[j] - mx) / sum;
        double* o = out + (b * kT + t) * kCo + h * kHS;
        const double* g = dO + (b * kT + t) * kCo + h * kHS;
        for (int64_t j = lo; j <= t; ++j)
          for (int64_t d = 0; d < kHS; ++d) o[d] += p[j] * at(j, vo)[d];
        // dP_j = dO . v_j; dS_j = P_j (dP_j - sum_i P_i dP_i)
        double dot = 0;
        for (int64_t j = lo; j <= t; ++j) {
          dp[j] = 0;
          for (int64_t d = 0; d < kHS; ++d) dp[j] += g[d] * at(j, vo)[d];
          dot += p[j] * dp[j];
        }
        for (int64_t j = lo; j <= t; ++j) {
          const double ds = p[j] * (dp[j] - dot) * f[j] * scale;
          for (int64_t d = 0; d < kHS; ++d) {
            dat(t, qo)[d] += ds * at(j, ko)[d];
            dat(j, ko)[d] += ds * at(t, qo)[d];
            dat(j, vo)[d] += p[j] * g[d];
          }
        }
      }
    }
  return r;
}

Tensor randn(Shape shape, DType dtype, Rng& rng, double scale) {
  Tensor t = Tensor::empty(shape, DType::kF64);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = scale * rng.normal();
  return t.to(dtype);
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

void check(DType dtype, int64_t window, const AttnScore& score = {}) {
  const double tol = dtype == DType::kF32 ? 1e-5 : 1e-12;
  const std::string tag = std::string(dtype_name(dtype)) + " window " + std::to_string(window) +
                          (score.softcap > 0 ? " capped" : "");
  Rng rng(42 + window);
  // Scale 2: scores of order 1-10, so rows are peaked and the running max moves between tiles.
  Tensor qkv = randn({kB, kT, kCq}, dtype, rng, 2.0);
  Tensor dout = randn({kB, kT, kCo}, dtype, rng, 1.0);
  Naive want = naive_attention(qkv, dout, window, score);

  const int threads = omp_get_max_threads();
  Tensor out[2], lse[2], dqkv[2];
  for (int run = 0; run < 2; ++run) {  // run 0 on one thread, run 1 on all of them
    omp_set_num_threads(run == 0 ? 1 : std::max(threads, 2));
    out[run] = Tensor::empty({kB, kT, kCo}, dtype);
    lse[run] = Tensor::empty({kB, kNH, kT}, dtype);
    dqkv[run] = Tensor::zeros({kB, kT, kCq}, dtype);
    out[run].fill_(NAN);
    lse[run].fill_(NAN);
    ops::attention_forward(out[run], lse[run], qkv, kNH, kNKV, window, false, {}, score);
    ops::attention_backward(dqkv[run], dout, qkv, out[run], lse[run], kNH, kNKV, window, false, {},
                            score);
  }
  omp_set_num_threads(threads);

  auto close = [&](const std::string& what, const Tensor& got, const Tensor& ref) {
    testing::Diff d;
    EXPECT_TRUE(testing::tensors_close(tag + " " + what, got, ref, tol, &d));
    std::printf("  %-22s %-8s err %.2e  max abs %.2e  max rel %.2e\n", tag.c_str(), what.c_str(),
                d.err, d.max_abs, d.max_rel);
  };
  close("out", out[1], want.out);
  close("lse", lse[1], want.lse);
  close("dqkv", dqkv[1], want.dqkv);
  EXPECT_TRUE(bit_equal(out[0], out[1])) << tag << ": out depends on the thread count";
  EXPECT_TRUE(bit_equal(lse[0], lse[1])) << tag << ": lse depends on the thread count";
  EXPECT_TRUE(bit_equal(dqkv[0], dqkv[1])) << tag << ": dqkv depends on the thread count";

  ops::attention_backward(dqkv[1], dout, qkv, out[1], lse[1], kNH, kNKV, window, false, {}, score);
  Tensor twice = want.dqkv.clone();
  ops::scale(twice, 2.0);
  close("dqkv x2", dqkv[1], twice);  // backward accumulates
}

// bf16 activations on a CPU with AVX512-BF16 or AMX: the tile products in bf16 (P and dS rounded
// to bf16 before theirs, as FlashAttention on GPUs), against the double reference on the same
// (bf16) qkv: normalised error 1e-2 for out and 2e-2 for dqkv (measured 3e-3 and 7e-3: P's and
// dS's rounding, 2^-9 relative per entry),
// 1e-5 for lse (the scores come from exact bf16 products summed in fp32). dout fp32 (dqkv +=,
// accumulating) or bf16 (dqkv written); bit-identical with 1 and 2 threads.
void check_bf16(int64_t window, bool bf16_dout, const AttnScore& score = {}) {
  // The tiles' kernels, also on CPUs whose bf16 products are slower than fp32 (which otherwise
  // run the fp32 tiles on widened copies).
  const cpu::Bf16MatmulScope native(cpu::Bf16Matmul::kNative);
  if (!cpu::gemm_bf16_tile_available())
    GTEST_SKIP() << "no AVX512-BF16 or AMX on this CPU: the fp32 kernels run on widened copies "
                    "(Bf16.OpsOnBf16MatmulOutputsRoundTheFp32PathOnce)";
  const std::string tag = "bf16 window " + std::to_string(window) +
                          (bf16_dout ? " bf16 dout" : "") + (score.softcap > 0 ? " capped" : "");
  Rng rng(7 + window);
  Tensor q32 = randn({kB, kT, kCq}, DType::kF32, rng, 2.0);
  Tensor qkv = Tensor::empty({kB, kT, kCq}, DType::kBF16);
  ops::to_bf16(qkv, q32);
  ops::from_bf16(q32, qkv);  // the reference reads the bf16 values
  Tensor g32 = randn({kB, kT, kCo}, DType::kF32, rng, 1.0);
  Tensor g16 = Tensor::empty({kB, kT, kCo}, DType::kBF16);
  ops::to_bf16(g16, g32);
  if (bf16_dout) ops::from_bf16(g32, g16);
  Naive want = naive_attention(q32, g32, window, score);

  const int threads = omp_get_max_threads();
  Tensor out[2], lse[2], dqkv[2];
  for (int run = 0; run < 2; ++run) {
    omp_set_num_threads(run == 0 ? 1 : std::max(threads, 2));
    out[run] = Tensor::empty({kB, kT, kCo}, DType::kBF16);
    lse[run] = Tensor::empty({kB, kNH, kT}, DType::kF32);
    lse[run].fill_(NAN);
    ops::attention_forward(out[run], lse[run], qkv, kNH, kNKV, window, true, {}, score);
    if (bf16_dout) {
      dqkv[run] = Tensor::empty({kB, kT, kCq}, DType::kBF16);
      std::memset(dqkv[run].raw(), 0x7f, dqkv[run].nbytes());  // written, not added to
      ops::attention_backward(dqkv[run], g16, qkv, out[run], lse[run], kNH, kNKV, window, true, {},
                              score);
    } else {
      dqkv[run] = Tensor::zeros({kB, kT, kCq}, DType::kF32);
      ops::attention_backward(dqkv[run], g32, qkv, out[run], lse[run], kNH, kNKV, window, true, {},
                              score);
    }
  }
  omp_set_num_threads(threads);
  auto close = [&](const std::string& what, const Tensor& got, const Tensor& ref, double tol) {
    Tensor g = got;
    if (got.dtype() == DType::kBF16) {
      g = Tensor::empty(got.shape(), DType::kF32);
      ops::from_bf16(g, got);
    }
    testing::Diff d;
    EXPECT_TRUE(testing::tensors_close(tag + " " + what, g, ref, tol, &d));
    std::printf("  %-28s %-8s err %.2e  max abs %.2e  max rel %.2e\n", tag.c_str(), what.c_str(),
                d.err, d.max_abs, d.max_rel);
  };
  close("out", out[1], want.out, 1e-2);
  close("lse", lse[1], want.lse, 1e-5);
  close("dqkv", dqkv[1], want.dqkv, 2e-2);
  EXPECT_TRUE(bit_equal(out[0], out[1])) << tag << ": out depends on the thread count";
  EXPECT_TRUE(bit_equal(dqkv[0], dqkv[1])) << tag << ": dqkv depends on the thread count";
  if (!bf16_dout) {
    ops::attention_backward(dqkv[1], g32, qkv, out[1], lse[1], kNH, kNKV, window, true, {}, score);
    Tensor twice = want.dqkv.clone();
    ops::scale(twice, 2.0);
    close("dqkv x2", dqkv[1], twice, 2e-2);  // backward accumulates
  }
}

TEST(FlashAttention, MatchesNaiveFp32) { check(DType::kF32, 0); }
TEST(FlashAttention, Bf16TilesMatchNaive) { check_bf16(0, false); }
TEST(FlashAttention, Bf16TilesMatchNaiveWindow37) { check_bf16(37, false); }
TEST(FlashAttention, Bf16TilesWithBf16GradientsMatchNaive) { check_bf16(0, true); }
TEST(FlashAttention, MatchesNaiveFp32Window37) { check(DType::kF32, 37); }
TEST(FlashAttention, MatchesNaiveFp64) { check(DType::kF64, 0); }
TEST(FlashAttention, MatchesNaiveFp64Window37) { check(DType::kF64, 37); }
// Gemma's scores: scaled by 24^-1/2 (HS = 16), soft-capped at 5 (most of the scores, of order
// 1-10, are bent by the cap).
constexpr AttnScore kGemmaScore{24, 5.0f};
TEST(FlashAttention, SoftcapMatchesNaiveFp32Window37) { check(DType::kF32, 37, kGemmaScore); }
TEST(FlashAttention, SoftcapMatchesNaiveFp64) { check(DType::kF64, 0, kGemmaScore); }
TEST(FlashAttention, SoftcapBf16TilesMatchNaive) { check_bf16(0, false, kGemmaScore); }
TEST(FlashAttention, SoftcapBf16TilesWithBf16GradientsMatchNaive) {
  check_bf16(37, true, kGemmaScore);
}

}  // namespace
}  // namespace lmforge
