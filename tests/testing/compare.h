// Test helpers shared by the reference and gradient-check tests: opening the PyTorch fixtures that
// tests/reference/make_fixtures.py writes, and comparing tensors with a report.
//
//   namespace t = lmforge::testing;
//   Safetensors f = t::open_fixture("ops.safetensors");   // $LMFORGE_REF_DIR/ops.safetensors
//   EXPECT_TRUE(t::tensors_close("linear.out", out, f.get("linear.out"), 1e-5));
//
// The error a test bounds is normalised per tensor: max|a - b| / max(max|b|, tiny), so one
// tolerance fits tensors of any scale. A failure also prints the max absolute error, the max
// elementwise relative error (|a - b| / |b|) and the index of each.
#pragma once

#include <fmt/ranges.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "lmforge/core/tensor.h"
#include "lmforge/io/safetensors.h"
#include "testing/paths.h"

namespace lmforge::testing {

// Below this, max|b| is treated as zero and the error is absolute.
inline constexpr double kTiny = 1e-30;

inline Safetensors open_fixture(const std::string& file) {
  return Safetensors::open(ref_dir() + "/" + file);
}

// Any float or int32 tensor as doubles.
inline std::vector<double> to_doubles(const Tensor& t) {
  std::vector<double> v(t.numel());
  switch (t.dtype()) {
    case DType::kF32: {
      const float* p = t.data<float>();
      for (int64_t i = 0; i < t.numel(); ++i) v[i] = p[i];
      break;
    }
    case DType::kF64: {
      const double* p = t.data<double>();
      for (int64_t i = 0; i < t.numel(); ++i) v[i] = p[i];
      break;
    }
    case DType::kI32: {
      const int32_t* p = t.data<int32_t>();
      for (int64_t i = 0; i < t.numel(); ++i) v[i] = p[i];
      break;
    }
    default:
      throw Error(fmt::format("to_doubles: unsupported dtype {}", dtype_name(t.dtype())));
  }
  return v;
}

// "[1, 0, 3]": the multi-index of flat element i of shape.
inline std::string index_str(const Shape& shape, int64_t i) {
  std::vector<int64_t> idx(shape.ndim());
  for (int d = shape.ndim() - 1; d >= 0; --d) {
    idx[d] = i % shape[d];
    i /= shape[d];
  }
  return fmt::format("[{}]", fmt::join(idx, ", "));
}

struct Diff {
  double err = 0;      // max_abs / max(ref_max, kTiny): what tests bound
  double max_abs = 0;  // max |a - b|
  int64_t abs_at = 0;  // flat index of max_abs
  double max_rel = 0;  // max |a - b| / |b| over elements with b != 0
  int64_t rel_at = 0;
  double ref_max = 0;     // max |b|
  int64_t nonfinite = 0;  // elements of a that are NaN or inf
};

inline Diff diff(const std::vector<double>& a, const std::vector<double>& b) {
  Diff d;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) ++d.nonfinite;
    double e = std::fabs(a[i] - b[i]);
    if (e > d.max_abs || (!std::isfinite(e) && std::isfinite(d.max_abs))) {
      d.max_abs = e;
      d.abs_at = static_cast<int64_t>(i);
    }
    if (b[i] != 0 && e / std::fabs(b[i]) > d.max_rel) {
      d.max_rel = e / std::fabs(b[i]);
      d.rel_at = static_cast<int64_t>(i);
    }
    d.ref_max = std::max(d.ref_max, std::fabs(b[i]));
  }
  d.err = d.nonfinite ? INFINITY : d.max_abs / std::max(d.ref_max, kTiny);
  return d;
}

inline std::string report(const std::string& what, const Shape& shape, const Diff& d,
                          const std::vector<double>& a, const std::vector<double>& b) {
  if (a.empty()) return fmt::format("{}: empty", what);
  return fmt::format(
      "{} {}: err {:.3g} (max abs {:.3g} at {}: got {:.9g}, want {:.9g}; max rel {:.3g} at {}; "
      "max|ref| {:.3g}{})",
      what, shape.str(), d.err, d.max_abs, index_str(shape, d.abs_at), a[d.abs_at], b[d.abs_at],
      d.max_rel, index_str(shape, d.rel_at), d.ref_max,
      d.nonfinite ? fmt::format("; {} non-finite", d.nonfinite) : "");
}

// Flat vectors of floats: passes when the sizes match and diff(got, want).err <= tol; the
// message (also on success) is report()'s.
inline ::testing::AssertionResult parity(const std::string& what, const std::vector<float>& got,
                                         const std::vector<float>& want, double tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " values, want " << want.size();
  std::vector<double> a(got.begin(), got.end()), b(want.begin(), want.end());
  const Diff d = diff(a, b);
  const std::string msg = report(what, Shape({static_cast<int64_t>(a.size())}), d, a, b);
  if (!(d.err <= tol)) return ::testing::AssertionFailure() << msg << " > tolerance " << tol;
  return ::testing::AssertionSuccess() << msg;
}

// Passes when shapes match and diff(actual, expected).err <= tol. `d` receives the diff.
inline ::testing::AssertionResult tensors_close(const std::string& what, const Tensor& actual,
                                                const Tensor& expected, double tol,
                                                Diff* d = nullptr) {
  if (!(actual.shape() == expected.shape()))
    return ::testing::AssertionFailure() << what << ": shape " << actual.shape().str()
                                         << " but the reference is " << expected.shape().str();
  std::vector<double> a = to_doubles(actual), b = to_doubles(expected);
  Diff r = diff(a, b);
  if (d) *d = r;
  std::string msg = report(what, actual.shape(), r, a, b);
  if (!(r.err <= tol))
    return ::testing::AssertionFailure() << msg << " > tolerance " << fmt::format("{:.1g}", tol);
  return ::testing::AssertionSuccess() << msg;
}

}  // namespace lmforge::testing
