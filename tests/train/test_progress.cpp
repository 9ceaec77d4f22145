// The progress display (train/progress.h) with an injected clock and output: the plain line is
// the trainer's log line plus the ETA; the live terminal line redraws in place, throttled, and
// messages print above it.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>

#include "lmforge/train/progress.h"

namespace lmforge {
namespace {

struct Harness {
  double now = 1000;  // any origin: only differences count
  std::string out;
  Progress make(int64_t total, int64_t start, int64_t log_every, bool tty, int columns = 0) {
    return Progress(
        total, start, log_every, tty, [this](std::string_view s) { out += s; },
        [this] { return now; }, columns);
  }
};

TEST(Progress, FormatDuration) {
  EXPECT_EQ(format_duration(0), "0s");
  EXPECT_EQ(format_duration(44.6), "45s");
  EXPECT_EQ(format_duration(59.4), "59s");
  EXPECT_EQ(format_duration(60), "1m00s");
  EXPECT_EQ(format_duration(185), "3m05s");
  EXPECT_EQ(format_duration(3599), "59m59s");
  EXPECT_EQ(format_duration(3600 * 2 + 7 * 60 + 20), "2h07m");
  EXPECT_EQ(format_duration(86400 * 3 + 3600 * 4 + 5), "3d04h");
  EXPECT_EQ(format_duration(-1), "?");
  EXPECT_EQ(format_duration(NAN), "?");
}

TEST(Progress, PlainLineIsTheTrainersLineWithTheEta) {
  Harness h;
  {
    Progress p = h.make(100, 0, 10, /*tty=*/false);
    for (int64_t s = 1; s <= 100; ++s) {
      h.now += 0.5;
      p.step(s, 2.5, 1e-3, 0.5, 1234.4);
    }
  }
  std::vector<std::string> lines;
  for (size_t i = 0, j; (j = h.out.find('\n', i)) != std::string::npos; i = j + 1)
    lines.push_back(h.out.substr(i, j - i));
  ASSERT_EQ(lines.size(), 10u);  // every 10 steps; the last step is one of them
  // trainer.cpp's format, unchanged, then " | ETA": 10 steps in 5 s, 90 to go.
  std::string trainer =
      fmt::format("step {:>6}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.0f} tok/s | {:.1f}s",
                  10, 100, 2.5, 1e-3, 0.5, 1234.4, 5.0);
  EXPECT_EQ(lines[0], trainer + " | ETA 45s");
  EXPECT_EQ(lines[0],
            "step     10/100 | loss 2.5000 | lr 1.00e-03 | norm 0.500 | 1234 tok/s | "
            "5.0s | ETA 45s");
  EXPECT_EQ(lines[9],
            "step    100/100 | loss 2.5000 | lr 1.00e-03 | norm 0.500 | 1234 tok/s | 50.0s | "
            "ETA 0s");
  EXPECT_EQ(h.out.find('\r'), std::string::npos);
  EXPECT_EQ(h.out.find('\x1b'), std::string::npos);
}

TEST(Progress, LastStepIsPrintedAndMessagesAreLines) {
  Harness h;
  Progress p = h.make(25, 0, 10, false);
  h.now += 25;
  p.step(25, 1, 1, 1, 1);
  p.message("step     25/25 | val loss 1.2345\n");
  p.finish();
  EXPECT_EQ(h.out,
            "step     25/25 | loss 1.0000 | lr 1.00e+00 | norm 1.000 | 1 tok/s | 25.0s | ETA 0s\n"
            "step     25/25 | val loss 1.2345\n");
}

TEST(Progress, EtaIsFromTheRateSinceTheStartStep) {
  Harness h;
  Progress p = h.make(1000, 500, 1, false);
  h.now += 50;  // 100 steps in 50 s after resuming at 500: 400 to go at 2 steps/s
  p.step(600, 1, 1, 1, 1);
  EXPECT_NE(h.out.find("| 50.0s | ETA 3m20s\n"), std::string::npos) << h.out;
  h.out.clear();
  Progress q = h.make(1000, 500, 1, false);
  q.step(500, 1, 1, 1, 1);  // no step done yet since the start: unknown
  EXPECT_NE(h.out.find("| ETA ?\n"), std::string::npos) << h.out;
}

TEST(Progress, TerminalLineRedrawsInPlaceAndMessagesGoAbove) {
  Harness h;
  {
    Progress p = h.make(100, 0, 10, /*tty=*/true);
    h.now += 30;
    p.step(50, 3.21454, 1e-3, 0.5, 12345);
    EXPECT_EQ(h.out,
              "\r[==========>         ]     50/100 | loss 3.2145 | 12345 tok/s | 30s | ETA 30s"
              "\x1b[K");
    h.out.clear();
    h.now += 0.05;  // within 0.1 s of the last redraw: not drawn
    p.step(51, 3.2, 1e-3, 0.5, 12345);
    EXPECT_EQ(h.out, "");
    p.message("step     51/100 | val loss 3.0000");  // above the bar, then the bar again
    EXPECT_EQ(h.out,
              "\rstep     51/100 | val loss 3.0000\x1b[K\n"
              "[==========>         ]     51/100 | loss 3.2000 | 12345 tok/s | 30s | ETA 29s"
              "\x1b[K");
    h.out.clear();
    h.now += 1;
    p.step(100, 3.0, 1e-3, 0.5, 12345);
    EXPECT_EQ(h.out,
              "\r[====================]    100/100 | loss 3.0000 | 12345 tok/s | 31s | ETA 0s"
              "\x1b[K");
    h.out.clear();
    p.finish();
    EXPECT_EQ(h.out,
              "\r[====================]    100/100 | loss 3.0000 | 12345 tok/s | 31s | "
              "ETA 0s\x1b[K\n");
    h.out.clear();
  }  // the destructor after finish(): nothing more
  EXPECT_EQ(h.out, "");
}

TEST(Progress, TerminalLineFitsTheTerminalAndEndsOnDestruction) {
  Harness h;
  {
    Progress p = h.make(100, 0, 1, true, /*columns=*/40);
    h.now += 1;
    p.step(1, 3.0, 1e-3, 0.5, 100);
    EXPECT_EQ(h.out, "\r[>                   ]      1/100 | los\x1b[K");
    h.now += 0.01;
    p.step(2, 3.0, 1e-3, 0.5, 100);  // throttled, but shown by the destructor (an exception)
  }
  EXPECT_TRUE(h.out.ends_with("      2/100 | los\x1b[K\n")) << h.out;
}

TEST(Progress, MessageBeforeAnyStepIsAPlainLine) {
  Harness h;
  Progress p = h.make(100, 0, 1, true);
  p.message("resumed from x at step 0");
  p.finish();
  EXPECT_EQ(h.out, "resumed from x at step 0\n");
}

}  // namespace
}  // namespace lmforge
