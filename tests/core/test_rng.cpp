#include <gtest/gtest.h>

#include <cmath>

#include "lmforge/core/rng.h"

namespace lmforge {

TEST(Rng, StateRoundTripResumesTheSameStream) {
  Rng a(42);
  for (int i = 0; i < 5; ++i) a.normal();  // leaves a spare normal cached
  Rng::State st = a.state();
  Rng b(0);
  b.set_state(st);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(a.normal(), b.normal());
    EXPECT_EQ(a.below(1000), b.below(1000));
  }
}

TEST(Rng, NormalHasUnitMomentsAndBelowIsInRange) {
  Rng r(7);
  const int n = 200000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    double x = r.normal();
    s += x;
    s2 += x * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.02);
  int counts[10] = {};
  for (int i = 0; i < n; ++i) {
    uint64_t v = r.below(10);
    ASSERT_LT(v, 10u);
    counts[v]++;
  }
  for (int c : counts) EXPECT_NEAR(c, n / 10, n / 100);
}

}  // namespace lmforge
