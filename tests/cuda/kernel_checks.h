// Helpers of the CUDA kernel parity tests (test_cuda_kernels.cpp, test_cuda_optimizer.cpp):
// tolerances, random inputs and comparisons of device results with the CPU's.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"

namespace lmforge::testing {

// Tolerances: the normalised error max|gpu - cpu| / max|cpu| of each output (as
// testing/compare.h), so one number fits outputs of any scale.
constexpr double kExact = 0;  // the same fp32 operations in the same order (kernels.h says which)
constexpr double kElementwise = 1e-5;  // gelu, swiglu: CUDA tanhf / expf vs the CPU's exp-based
constexpr double kReduction = 1e-4;    // norms, softmax cross-entropy: summation order
constexpr double kDoubleSum = 1e-12;   // sum_squares: double sums of the same fp32 squares

inline double device_scalar(double* p) {
  double v = 0;
  cuda::memcpy(&v, p, sizeof(double), cuda::Copy::kDeviceToHost);
  return v;
}

template <typename T = float>
inline std::vector<T> zeros(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n));
}

inline std::vector<float> randn(Rng& rng, int64_t n, double scale = 1.0, double shift = 0.0) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng.normal() * scale + shift);
  return v;
}

inline std::vector<int32_t> rand_ids(Rng& rng, int64_t n, int64_t below) {
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = static_cast<int32_t>(rng.below(below));
  return v;
}

// Passes when max|got - want| / max|want| <= tol (NaN where both are NaN counts as equal); a
// failure names the max absolute and relative errors and their indices.
inline ::testing::AssertionResult close(const std::string& what, const std::vector<float>& got,
                                        const std::vector<float>& want, double tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " elements, want " << want.size();
  double max_abs = 0, max_rel = 0, ref_max = 0;
  size_t abs_at = 0, rel_at = 0, mismatched_nan = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) {
      mismatched_nan += std::isnan(got[i]) != std::isnan(want[i]);
      continue;
    }
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(e <= max_abs)) max_abs = e, abs_at = i;
    if (want[i] != 0 && e / std::fabs(want[i]) > max_rel)
      max_rel = e / std::fabs(want[i]), rel_at = i;
    ref_max = std::max(ref_max, std::fabs(static_cast<double>(want[i])));
  }
  const double err = max_abs / std::max(ref_max, 1e-30);
  char msg[512];
  std::snprintf(msg, sizeof msg,
                "%s: err %.3g (max abs %.3g at %zu: got %.9g, want %.9g; max rel %.3g at %zu; "
                "max|want| %.3g; %zu NaN mismatches) vs tolerance %.1g",
                what.c_str(), err, max_abs, abs_at, got.empty() ? 0.0 : got[abs_at],
                want.empty() ? 0.0 : want[abs_at], max_rel, rel_at, ref_max, mismatched_nan, tol);
  if (mismatched_nan || !(err <= tol)) return ::testing::AssertionFailure() << msg;
  return ::testing::AssertionSuccess() << msg;
}

inline ::testing::AssertionResult same_bits(const std::string& what,
                                            const std::vector<uint16_t>& got,
                                            const std::vector<uint16_t>& want) {
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i])
      return ::testing::AssertionFailure() << what << ": first difference at " << i << ": got 0x"
                                           << std::hex << got[i] << ", want 0x" << want[i];
  return ::testing::AssertionSuccess();
}

// bf16 rows ld apart (got16, N x V used) against fp32 rows want (N x V): each within bf16's
// rounding, the padding columns left at 0xabab.
inline void expect_bf16_rows_near(const std::vector<uint16_t>& got16,
                                  const std::vector<float>& want, int64_t N, int64_t V,
                                  int64_t ld) {
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t v = 0; v < V; ++v) {
      const float g = bf16_to_fp32(got16[i * ld + v]), w = want[i * V + v];
      ASSERT_LE(std::abs(g - w), 1e-2f * std::abs(w) + 1e-6f) << "row " << i << " col " << v;
    }
    for (int64_t v = V; v < ld; ++v) ASSERT_EQ(got16[i * ld + v], 0xabab) << "row " << i;
  }
}

// One parity case of a parametrized test: its name (the test's) and what it runs on both backends.
struct KernelCase {
  std::string name;
  std::function<void(Rng&)> run;
};

inline void PrintTo(const KernelCase& c, std::ostream* os) { *os << c.name; }

inline std::string kernel_case_name(const ::testing::TestParamInfo<KernelCase>& p) {
  return p.param.name;
}

// Runs c with a fixed seed per case (FNV-1a of its name); skips without a GPU.
inline void run_kernel_case(const KernelCase& c) {
  if (!cuda::available()) GTEST_SKIP() << cuda::unavailable_reason();
  uint64_t seed = 1469598103934665603ull;
  for (char ch : c.name) seed = (seed ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  Rng rng(seed);
  c.run(rng);
}

template <typename T>
inline bool bit_identical(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace lmforge::testing
