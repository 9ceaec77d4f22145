// bf16 master weights: stochastic rounding (core/stochastic_round.h) and the AdamW update that
// uses it (cpu::adamw_update_sr, ops::adamw_update on a bf16 parameter). The rounding must pick
// one of the two bf16 neighbours with the right probability (unbiased), keep inf/NaN, and give
// the same bits whatever the vector width or the way a range is cut; the update must equal the
// fp32 update followed by that rounding, and move weights by steps below bf16's resolution on
// average (where rounding to nearest would freeze them).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/core/stochastic_round.h"
#include "lmforge/nn/params.h"
#include "lmforge/optim/adamw.h"

namespace lmforge {
namespace {

// The bf16 values just below and above x (equal when x is a bf16 value).
std::pair<float, float> neighbours(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const float lo = bf16_to_fp32(static_cast<uint16_t>(u >> 16));
  const float hi = (u & 0xffffu) ? bf16_to_fp32(static_cast<uint16_t>((u >> 16) + 1)) : lo;
  return {lo, hi};  // by magnitude: for negative x, "lo" is the one nearer zero
}

TEST(StochasticRound, PicksANeighbourWithTheRightProbability) {
  Rng rng(5);
  const int kDraws = 4096;
  for (int trial = 0; trial < 40; ++trial) {
    const float x = static_cast<float>(rng.normal() * std::pow(10.0, trial % 7 - 3));
    const auto [lo, hi] = neighbours(x);
    const double p_hi =
        lo == hi ? 0.0 : (std::fabs(x) - std::fabs(lo)) / (std::fabs(hi) - std::fabs(lo));
    int ups = 0;
    double mean = 0;
    for (int s = 1; s <= kDraws; ++s) {  // one element, many steps: the key changes
      const uint32_t key = sr_key(1337, s, 0);
      const float r = bf16_to_fp32(bf16_round_stochastic(x, sr_bits(key, 12345)));
      ASSERT_TRUE(r == lo || r == hi) << x << " -> " << r;
      ups += r == hi && hi != lo;
      mean += r;
    }
    mean /= kDraws;
    // Binomial: 5 standard deviations.
    const double sd = std::sqrt(kDraws * p_hi * (1 - p_hi)) + 1;
    EXPECT_NEAR(ups, kDraws * p_hi, 5 * sd) << "x=" << x;
    EXPECT_NEAR(mean, x, 5 * sd / kDraws * std::fabs(hi - lo) + 1e-12) << "x=" << x;
  }
}

TEST(StochasticRound, KeepsExactValuesInfAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  for (uint32_t bits : {0u, 0x1234u, 0xffffu, 0xdeadbeefu}) {
    for (float x : {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, inf, -inf})
      EXPECT_EQ(bf16_to_fp32(bf16_round_stochastic(x, bits)), x) << x << " bits " << bits;
    EXPECT_TRUE(std::isnan(
        bf16_to_fp32(bf16_round_stochastic(std::numeric_limits<float>::quiet_NaN(), bits))));
  }
  // The bits decide: 0 truncates, all ones rounds any inexact value away from zero.
  EXPECT_EQ(bf16_to_fp32(bf16_round_stochastic(1.001f, 0)), 1.0f);
  EXPECT_EQ(bf16_to_fp32(bf16_round_stochastic(1.001f, 0xffff)), neighbours(1.001f).second);
  EXPECT_EQ(bf16_to_fp32(bf16_round_stochastic(-1.001f, 0xffff)), -neighbours(1.001f).second);
}

TEST(StochasticRound, BitsDependOnSeedStepAndIndex) {
  const uint32_t k = sr_key(1, 1, 0);
  EXPECT_NE(k, sr_key(2, 1, 0));
  EXPECT_NE(k, sr_key(1, 2, 0));
  EXPECT_NE(k, sr_key(1, 1, 1));
  EXPECT_NE(k, sr_key(1ull << 32 | 1, 1, 0));
  // Over consecutive indices the low 16 bits look uniform: the mean of 2^16 draws is 32767.5.
  double mean = 0;
  for (uint32_t i = 0; i < 65536; ++i) mean += sr_bits(k, i) & 0xffffu;
  EXPECT_NEAR(mean / 65536, 32767.5, 5 * 18918.6 / 256);  // sd of U(0, 65535) / sqrt(n)
}

// The update in scalars, from the definitions: torch's fp32 AdamW on bf16(p) widened, then
// bf16_round_stochastic with the bits of the element's flat index.
struct Expected {
  std::vector<uint16_t> p;
  std::vector<float> m, v, fp32;
};
Expected scalar_update(std::vector<uint16_t> p, const std::vector<float>& g, std::vector<float> m,
                       std::vector<float> v, double lr, double wd, int64_t step, double gscale,
                       uint64_t seed, int64_t index0) {
  // The bias corrections folded as the kernels do (backend/adamw_scalars.h).
  const double bc2 = std::sqrt(1.0 - std::pow(0.95, double(step)));
  const float step_size = static_cast<float>(lr * bc2 / (1.0 - std::pow(0.9, double(step))));
  const float decay = static_cast<float>(1.0 - lr * wd), w1 = static_cast<float>(1.0 - 0.9),
              w2 = static_cast<float>(1.0 - 0.95), b2 = 0.95f, eps = static_cast<float>(1e-8 * bc2);
  Expected e;
  for (size_t i = 0; i < p.size(); ++i) {
    const float gi = g[i] * static_cast<float>(gscale);
    float pi = bf16_to_fp32(p[i]) * decay;
    m[i] += w1 * (gi - m[i]);
    v[i] = v[i] * b2 + w2 * gi * gi;
    pi = pi - step_size * (m[i] / (std::sqrt(v[i]) + eps));
    const uint64_t idx = static_cast<uint64_t>(index0) + i;
    p[i] = bf16_round_stochastic(pi, sr_bits(sr_key(seed, step, static_cast<uint32_t>(idx >> 32)),
                                             static_cast<uint32_t>(idx)));
    e.fp32.push_back(pi);
  }
  e.p = p;
  e.m = m;
  e.v = v;
  return e;
}

TEST(StochasticRound, AdamWUpdateIsTheFp32UpdateRoundedStochastically) {
  const int64_t n = 16 * 1100 + 13;  // vector body, several OpenMP chunks, a scalar tail
  Rng rng(9);
  std::vector<uint16_t> p(n);
  std::vector<float> g(n), m(n), v(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = fp32_to_bf16(static_cast<float>(rng.normal()));
    g[i] = static_cast<float>(rng.normal() * 1e-2);
    m[i] = static_cast<float>(rng.normal() * 1e-3);
    v[i] = static_cast<float>(std::fabs(rng.normal()) * 1e-5);
  }
  const uint64_t seed = 77;
  const int64_t step = 3, index0 = 4000;
  const Expected e = scalar_update(p, g, m, v, 1e-3, 0.1, step, 0.5, seed, index0);

  // ops::adamw_update on a bf16 parameter: the kernel (AVX-512 where present) and its dispatch.
  Tensor tp = Tensor::empty({n}, DType::kBF16), tg = Tensor::empty({n}, DType::kF32),
         tm = Tensor::empty({n}, DType::kF32), tv = Tensor::empty({n}, DType::kF32);
  std::memcpy(tp.raw(), p.data(), n * 2);
  std::memcpy(tg.raw(), g.data(), n * 4);
  std::memcpy(tm.raw(), m.data(), n * 4);
  std::memcpy(tv.raw(), v.data(), n * 4);
  ops::adamw_update(tp, tg, tm, tv, 1e-3, 0.9, 0.95, 1e-8, 0.1, step, Tensor(), 0.5, seed, index0);
  EXPECT_EQ(std::memcmp(tp.raw(), e.p.data(), n * 2), 0) << "bf16 weights";
  EXPECT_EQ(std::memcmp(tm.raw(), e.m.data(), n * 4), 0) << "first moment";
  EXPECT_EQ(std::memcmp(tv.raw(), e.v.data(), n * 4), 0) << "second moment";
  int ups = 0, downs = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float r = bf16_to_fp32(tp.bf16_data()[i]);
    const auto [lo, hi] = neighbours(e.fp32[i]);
    ASSERT_TRUE(r == lo || r == hi) << i;
    ups += r == hi && lo != hi;
    downs += r == lo && lo != hi;
  }
  EXPECT_GT(ups, n / 10);
  EXPECT_GT(downs, n / 10);

  // Cut into pieces at other offsets (as shards or slots would be): the same bits.
  std::memcpy(tp.raw(), p.data(), n * 2);
  std::memcpy(tm.raw(), m.data(), n * 4);
  std::memcpy(tv.raw(), v.data(), n * 4);
  for (auto [a, z] : {std::pair<int64_t, int64_t>{0, 7}, {7, 5000}, {5000, n}})
    cpu::adamw_update_sr(tp.bf16_data() + a, tg.data<float>() + a, tm.data<float>() + a,
                         tv.data<float>() + a, z - a, 1e-3, 0.9, 0.95, 1e-8, 0.1, step, 0.5,
                         sr_key(seed, step, 0), static_cast<uint32_t>(index0 + a));
  EXPECT_EQ(std::memcmp(tp.raw(), e.p.data(), n * 2), 0) << "cut into pieces";
}

// A range crossing a 2^32 boundary of the flat index: the high word goes into the key.
TEST(StochasticRound, RangesAcrossTheLowWordWrapAreCut) {
  const int64_t n = 40, index0 = (int64_t{1} << 32) - 17;
  std::vector<uint16_t> p(n, fp32_to_bf16(1.0f));
  std::vector<float> g(n, 0.3f), m(n, 0.0f), v(n, 0.0f);
  const Expected e = scalar_update(p, g, m, v, 1e-3, 0.0, 1, 1.0, 5, index0);
  Tensor tp = Tensor::empty({n}, DType::kBF16), tg = Tensor::empty({n}, DType::kF32),
         tm = Tensor::zeros({n}, DType::kF32), tv = Tensor::zeros({n}, DType::kF32);
  std::memcpy(tp.raw(), p.data(), n * 2);
  std::memcpy(tg.raw(), g.data(), n * 4);
  ops::adamw_update(tp, tg, tm, tv, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1, Tensor(), 1.0, 5, index0);
  EXPECT_EQ(std::memcmp(tp.raw(), e.p.data(), n * 2), 0);
}

// Updates far below bf16's resolution near 1 (2^-7): rounding to nearest would leave every weight
// at 1 forever; stochastic rounding moves them by the right amount on average.
TEST(StochasticRound, SmallUpdatesAccumulateOnAverage) {
  const int64_t n = 4096, steps = 200;
  ParamSet ps;
  Param* w = ps.add("w", {n}, /*decay=*/false);
  ps.finalize();
  w->value.fill_(1.0f);
  ps.use_bf16_master();
  ASSERT_EQ(w->value.dtype(), DType::kBF16);
  AdamW opt(ps, {.seed = 3});
  for (int64_t s = 0; s < steps; ++s) {
    w->grad.fill_(1.0f);  // Adam's step is then lr per step: 200 x 1e-4 = 0.02 in all
    opt.step(1e-4);
  }
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += bf16_to_fp32(w->value.bf16_data()[i]);
  mean /= n;
  EXPECT_NEAR(mean, 1.0 - 0.02, 1e-3);  // rounding to nearest: exactly 1.0
  // The fp32 working copy of this 1-D parameter follows after sync.
  ps.sync_bf16();
  EXPECT_EQ(w->fp32().dtype(), DType::kF32);
  for (int64_t i = 0; i < n; ++i)
    ASSERT_EQ(w->fp32().data<float>()[i], bf16_to_fp32(w->value.bf16_data()[i]));
}

}  // namespace
}  // namespace lmforge
