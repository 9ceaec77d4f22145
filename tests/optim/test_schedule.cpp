// Learning-rate schedules against their closed forms, written out independently here.
#include <gtest/gtest.h>

#include <cmath>

#include "lmforge/core/error.h"
#include "lmforge/optim/schedule.h"

namespace lmforge {
namespace {

constexpr double kLr = 1e-3, kMin = 1e-4;
constexpr int64_t kSteps = 100, kWarm = 10;

Schedule make(const std::string& kind, int64_t warmup = kWarm) {
  Schedule s;
  s.kind = kind;
  s.lr = kLr;
  s.min_lr = kMin;
  s.warmup = warmup;
  s.steps = kSteps;
  s.validate();
  return s;
}

TEST(Schedule, WarmupIsLinearForEveryKindButOneCycle) {
  for (const char* k : {"constant", "cosine", "linear", "wsd"})
    for (int64_t s = 0; s < kWarm; ++s)
      EXPECT_DOUBLE_EQ(make(k).at(s), kLr * (s + 1) / kWarm) << k << " step " << s;
}

TEST(Schedule, ClosedForms) {
  for (int64_t s = kWarm; s < kSteps; ++s) {
    double p = double(s - kWarm) / double(kSteps - kWarm);
    EXPECT_DOUBLE_EQ(make("constant").at(s), kLr);
    EXPECT_NEAR(make("cosine").at(s), kMin + (kLr - kMin) * 0.5 * (1 + std::cos(M_PI * p)), 1e-15);
    EXPECT_NEAR(make("linear").at(s), kLr - (kLr - kMin) * p, 1e-15);
    // WSD, decay_fraction 0.2: stable until step 80, then linear to min_lr at step 99.
    double wsd = s < 80 ? kLr : kLr - (kLr - kMin) * double(s - 80 + 1) / 20.0;
    EXPECT_NEAR(make("wsd").at(s), wsd, 1e-15) << s;
  }
  EXPECT_NEAR(make("wsd").at(kSteps - 1), kMin, 1e-15);
}

TEST(Schedule, OneCycleRisesFromLrOverDivThenFallsToMin) {
  Schedule s = make("one_cycle", 0);  // rising phase: a quarter of the steps
  EXPECT_NEAR(s.at(0), kLr / 25, 1e-15);
  EXPECT_NEAR(s.at(25), kLr, 1e-15);
  for (int64_t i = 0; i < 25; ++i) {
    double p = i / 25.0;
    EXPECT_NEAR(s.at(i), kLr + (kLr / 25 - kLr) * 0.5 * (1 + std::cos(M_PI * p)), 1e-15);
  }
  for (int64_t i = 25; i < kSteps; ++i) {
    double p = (i - 25) / 75.0;
    EXPECT_NEAR(s.at(i), kMin + (kLr - kMin) * 0.5 * (1 + std::cos(M_PI * p)), 1e-15);
  }
}

// A min_lr above the peak would make every decay rise; constant never reaches it. wsd's warmup
// must end before its decay starts (the lr fell by half in one step).
TEST(Schedule, MinLrAbovePeakAndWarmupIntoWsdDecayAreRefused) {
  for (const char* kind : {"cosine", "linear", "wsd", "one_cycle"}) {
    Schedule s = make(kind);
    s.min_lr = 2 * kLr;
    try {
      s.validate();
      ADD_FAILURE() << kind;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("train.min_lr"), std::string::npos) << e.what();
    }
  }
  Schedule c = make("constant");
  c.min_lr = 2 * kLr;
  EXPECT_NO_THROW(c.validate());
  Schedule w = make("wsd", /*warmup=*/80);  // the decay: the last 20 of 100 steps
  EXPECT_NO_THROW(w.validate());
  w.warmup = 81;
  try {
    w.validate();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.warmup"), std::string::npos) << e.what();
  }
}

TEST(Schedule, BadValuesNameTheKey) {
  Schedule s = make("cosine");
  s.kind = "exponential";
  EXPECT_THROW(s.validate(), Error);
  s = make("wsd");
  s.decay_fraction = 1.5;
  try {
    s.validate();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.decay_fraction"), std::string::npos);
  }
}

}  // namespace
}  // namespace lmforge
