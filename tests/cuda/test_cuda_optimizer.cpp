// AdamW's CUDA kernels (backend/cuda/kernels.h) against their CPU twins: the fp32 update with and
// without a bf16 copy, the stochastically rounded bf16-master update, LoRA's keep_master, and the
// whole step in one launch (adamw_update_many). Every output bit-identical; skips without a GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/kernel_checks.h"
#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/cuda/matmul.h"  // keep_master
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/core/stochastic_round.h"
#include "testing/cuda.h"

namespace lmforge {
namespace {

using namespace testing;  // DeviceArray; tolerances and checks (cuda/kernel_checks.h)

// Bit-identical p, m, v and bf16 copy; some weights are denormal with zero moments, so the
// copy's flush to zero is exercised; the gradients are clipped in the update (grad_scale).
void adamw(Rng& rng, int64_t n, bool with_p16, int64_t step) {
  std::vector<float> p = randn(rng, n), g = randn(rng, n, 1e-2), m = randn(rng, n, 1e-3), v(n);
  for (float& x : v) x = static_cast<float>(rng.uniform() * 1e-4);
  for (int64_t i = 0; i < n; i += 97) {
    p[i] = (i % 2 ? -1 : 1) * std::numeric_limits<float>::denorm_min() * 1000;
    g[i] = m[i] = v[i] = 0;
  }
  std::vector<uint16_t> p16(n, 0xffff);
  DeviceArray<float> d_p(p), d_g(g), d_m(m), d_v(v);
  DeviceArray<uint16_t> d_p16(p16);
  cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), with_p16 ? p16.data() : nullptr, n,
                    3e-4, 0.9, 0.95, 1e-8, 0.1, step, /*grad_scale=*/0.61);
  cuda::adamw_update(d_p.get(), d_g.get(), d_m.get(), d_v.get(), with_p16 ? d_p16.get() : nullptr,
                     n, 3e-4, 0.9, 0.95, 1e-8, 0.1, step, /*grad_scale=*/0.61);
  EXPECT_TRUE(close("p", d_p.host(), p, kExact));
  EXPECT_TRUE(close("m", d_m.host(), m, kExact));
  EXPECT_TRUE(close("v", d_v.host(), v, kExact));
  EXPECT_TRUE(same_bits("p16", d_p16.host(), p16));
}

// bf16 master weights: the stochastically rounded update, bit-identical (the rounding bits come
// from the element's index, not from the thread that computes it).
void adamw_sr(Rng& rng, int64_t n, int64_t step, uint32_t index0) {
  std::vector<uint16_t> p(n);
  for (uint16_t& h : p) h = fp32_to_bf16(static_cast<float>(rng.normal()));
  std::vector<float> g = randn(rng, n, 1e-2), m = randn(rng, n, 1e-3), v(n);
  for (float& x : v) x = static_cast<float>(rng.uniform() * 1e-4);
  DeviceArray<uint16_t> d_p(p);
  DeviceArray<float> d_g(g), d_m(m), d_v(v);
  const uint32_t key = sr_key(1337, step, 0);
  cpu::adamw_update_sr(p.data(), g.data(), m.data(), v.data(), n, 3e-4, 0.9, 0.95, 1e-8, 0.1, step,
                       0.61, key, index0);
  cuda::adamw_update_sr(d_p.get(), d_g.get(), d_m.get(), d_v.get(), n, 3e-4, 0.9, 0.95, 1e-8, 0.1,
                        step, 0.61, key, index0);
  EXPECT_TRUE(same_bits("p", d_p.host(), p));
  EXPECT_TRUE(close("m", d_m.host(), m, kExact));
  EXPECT_TRUE(close("v", d_v.host(), v, kExact));
}

// LoRA's fp32 masters of bf16 values: masters kept where they round to the value (half of them
// here, denormals among them), the value widened elsewhere; bit-identical to the CPU.
void keep_master(Rng& rng, int64_t n) {
  std::vector<float> w = randn(rng, n);
  for (int64_t i = 0; i < n; i += 97) w[i] = 1e-40f * static_cast<float>(rng.normal());
  std::vector<uint16_t> v(n);
  for (int64_t i = 0; i < n; ++i)
    v[i] = i % 2 ? fp32_to_bf16_ftz(w[i]) : fp32_to_bf16(static_cast<float>(rng.normal()));
  DeviceArray<float> d_w(w);
  DeviceArray<uint16_t> d_v(v);
  cpu::keep_master(w.data(), v.data(), n);
  cuda::keep_master(d_w.get(), d_v.get(), n);
  EXPECT_TRUE(close("master", d_w.host(), w, kExact));
}

// The whole step in one launch (adamw_update_many): fp32 slots with and without a bf16 copy and
// weight decay, one of them unaligned (the scalar path) and spanning several chunks, a bf16
// master slot, and an fp32 master of bf16 values kept first (LoRA's adapters under bf16 master
// weights: half its masters no longer round to their values), against the CPU's one call per
// slot: bit-identical.
void adamw_many(Rng& rng, int64_t step) {
  const int64_t n0 = 5, n1 = 40001, n2 = 70001, n3 = 20003;
  std::vector<float> p0 = randn(rng, n0), p1 = randn(rng, n1 + 1), p3 = randn(rng, n3);
  std::vector<uint16_t> p2(n2), p16(n0, 0xffff), h3(n3);
  for (uint16_t& h : p2) h = fp32_to_bf16(static_cast<float>(rng.normal()));
  for (int64_t i = 0; i < n3; i += 97) p3[i] = 1e-40f * static_cast<float>(rng.normal());
  for (int64_t i = 0; i < n3; ++i)
    h3[i] = i % 2 ? fp32_to_bf16_ftz(p3[i]) : fp32_to_bf16(static_cast<float>(rng.normal()));
  const int64_t n = n0 + n1 + 1 + n2 + n3;
  std::vector<float> g = randn(rng, n, 1e-2), m = randn(rng, n, 1e-3), v(n);
  for (float& x : v) x = static_cast<float>(rng.uniform() * 1e-4);
  DeviceArray<float> d_p0(p0), d_p1(p1), d_p3(p3), d_g(g), d_m(m), d_v(v);
  DeviceArray<uint16_t> d_p2(p2), d_p16(p16), d_h3(h3);
  const uint32_t key = sr_key(1337, step, 0), index0 = 4000000000u;
  const double lr = 3e-4, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, gs = 0.61;
  // CPU: one call per slot. Slot 1 starts one element into its arrays (unaligned).
  const int64_t o1 = n0 + 1, o2 = n0 + n1 + 1, o3 = o2 + n2;
  cpu::adamw_update(p0.data(), g.data(), m.data(), v.data(), p16.data(), n0, lr, b1, b2, eps, wd,
                    step, gs);
  cpu::adamw_update(p1.data() + 1, g.data() + o1, m.data() + o1, v.data() + o1, nullptr, n1, lr, b1,
                    b2, eps, 0.0, step, gs);
  cpu::adamw_update_sr(p2.data(), g.data() + o2, m.data() + o2, v.data() + o2, n2, lr, b1, b2, eps,
                       wd, step, gs, key, index0);
  cpu::keep_master(p3.data(), h3.data(), n3);
  cpu::adamw_update(p3.data(), g.data() + o3, m.data() + o3, v.data() + o3, h3.data(), n3, lr, b1,
                    b2, eps, wd, step, gs);
  const cuda::AdamwSlot slots[] = {
      {d_p0.get(), d_g.get(), d_m.get(), d_v.get(), d_p16.get(), n0, 0, 0, false, true},
      {d_p1.get() + 1, d_g.get() + o1, d_m.get() + o1, d_v.get() + o1, nullptr, n1, 0, 0, false,
       false},
      {d_p2.get(), d_g.get() + o2, d_m.get() + o2, d_v.get() + o2, nullptr, n2, key, index0, true,
       true},
      {d_p3.get(), d_g.get() + o3, d_m.get() + o3, d_v.get() + o3, d_h3.get(), n3, 0, 0, false,
       true,
       /*keep=*/true}};
  cuda::adamw_update_many(slots, 4, lr, b1, b2, eps, wd, step, gs);
  EXPECT_TRUE(close("p0", d_p0.host(), p0, kExact));
  EXPECT_TRUE(same_bits("p16", d_p16.host(), p16));
  EXPECT_TRUE(close("p1", d_p1.host(), p1, kExact));
  EXPECT_TRUE(same_bits("p2 (bf16 masters)", d_p2.host(), p2));
  EXPECT_TRUE(close("p3 (fp32 masters of bf16 values)", d_p3.host(), p3, kExact));
  EXPECT_TRUE(same_bits("their values", d_h3.host(), h3));
  EXPECT_TRUE(close("m", d_m.host(), m, kExact));
  EXPECT_TRUE(close("v", d_v.host(), v, kExact));
}

std::vector<KernelCase> cases() {
  return {
      {"adamw_n5_step1", [](Rng& r) { adamw(r, 5, false, 1); }},
      {"adamw_p16_n1000003_step10", [](Rng& r) { adamw(r, 1000003, true, 10); }},
      {"adamw_sr_n5_step1", [](Rng& r) { adamw_sr(r, 5, 1, 0); }},
      {"adamw_sr_n1000003_step10", [](Rng& r) { adamw_sr(r, 1000003, 10, 4000000000u); }},
      {"keep_master_n1000003", [](Rng& r) { keep_master(r, 1000003); }},
      {"adamw_many_step1", [](Rng& r) { adamw_many(r, 1); }},
      {"adamw_many_step7", [](Rng& r) { adamw_many(r, 7); }},
  };
}

class CudaOptimizer : public ::testing::TestWithParam<KernelCase> {};

TEST_P(CudaOptimizer, MatchesCpu) { run_kernel_case(GetParam()); }

INSTANTIATE_TEST_SUITE_P(AdamW, CudaOptimizer, ::testing::ValuesIn(cases()), kernel_case_name);

}  // namespace
}  // namespace lmforge
