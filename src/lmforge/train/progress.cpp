#include "lmforge/train/progress.h"

#include <fmt/core.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "lmforge/dist/communicator.h"

namespace lmforge {

namespace {

constexpr double kRedrawSeconds = 0.1;
constexpr int kBarWidth = 20;
constexpr const char* kClearToEol = "\x1b[K";  // ANSI EL: erase the rest of the line

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void write_stdout(std::string_view s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

int terminal_columns() {
  struct winsize w {};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &w) == 0 && w.ws_col > 0) return w.ws_col;
  return 0;
}

std::string bar(int64_t step, int64_t total) {
  double f = total > 0 ? std::clamp(static_cast<double>(step) / total, 0.0, 1.0) : 1.0;
  int full = static_cast<int>(f * kBarWidth);
  std::string b = "[" + std::string(full, '=');
  if (full < kBarWidth) b += '>' + std::string(kBarWidth - full - 1, ' ');
  return b + "]";
}

}  // namespace

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  auto n = static_cast<int64_t>(std::llround(s));
  if (n < 60) return fmt::format("{}s", n);
  if (n < 3600) return fmt::format("{}m{:02}s", n / 60, n % 60);
  if (n < 86400) return fmt::format("{}h{:02}m", n / 3600, n % 3600 / 60);
  return fmt::format("{}d{:02}h", n / 86400, n % 86400 / 3600);
}

bool Progress::stdout_is_tty() {
  // Under mpirun a rank's stdout is OpenMPI's pseudo-terminal whatever mpirun's own is (a file, a
  // pipe): launch says what its stdout is (LMFORGE_STDOUT_TTY); under another launcher, plain
  // lines.
  if (const char* e = std::getenv("LMFORGE_STDOUT_TTY"); e && *e) return e[0] == '1';
  if (dist::rank_info().launcher != "none") return false;
  return isatty(STDOUT_FILENO) == 1;
}

Progress::Progress(int64_t total_steps, int64_t start_step, int64_t log_every, bool tty)
    : Progress(total_steps, start_step, log_every, tty, write_stdout, steady_seconds,
               /*columns=*/-1) {}

Progress::Progress(int64_t total_steps, int64_t start_step, int64_t log_every, bool tty, Sink sink,
                   Clock clock, int columns)
    : total_(total_steps),
      start_(start_step),
      log_every_(std::max<int64_t>(log_every, 1)),
      tty_(tty),
      sink_(std::move(sink)),
      clock_(std::move(clock)),
      columns_(columns),
      t0_(clock_()) {}

Progress::~Progress() { finish(); }

std::string Progress::eta(int64_t step, double now) const {
  if (step >= total_) return "0s";
  double elapsed = now - t0_;
  if (step <= start_ || elapsed <= 0) return "?";
  return format_duration((total_ - step) * elapsed / static_cast<double>(step - start_));
}

void Progress::step(int64_t step, double loss, double lr, double grad_norm, double tokens_per_s) {
  double now = clock_();
  double elapsed = now - t0_;
  if (!tty_) {
    if (step % log_every_ == 0 || step == total_)
      sink_(fmt::format(
          "step {:>6}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.0f} tok/s | {:.1f}s | ETA "
          "{}\n",
          step, total_, loss, lr, grad_norm, tokens_per_s, elapsed, eta(step, now)));
    return;
  }
  line_ = fmt::format("{} {:>6}/{} | loss {:.4f} | {:.0f} tok/s | {} | ETA {}", bar(step, total_),
                      step, total_, loss, tokens_per_s, format_duration(elapsed), eta(step, now));
  // Longer than the terminal, the line would wrap and \r would no longer reach its start.
  int columns = columns_ < 0 ? terminal_columns() : columns_;
  if (columns > 1 && static_cast<int>(line_.size()) >= columns) line_.resize(columns - 1);
  have_line_ = true;
  draw(/*force=*/step >= total_);
}

void Progress::draw(bool force) {
  double now = clock_();
  if (!have_line_ || (!force && live_ && now - last_draw_ < kRedrawSeconds)) return;
  sink_("\r" + line_ + kClearToEol);
  live_ = true;
  last_draw_ = now;
}

void Progress::message(const std::string& line) {
  std::string_view text = line;
  if (text.ends_with('\n')) text.remove_suffix(1);
  if (!tty_ || !live_) {
    sink_(std::string(text) + "\n");
    return;
  }
  sink_("\r" + std::string(text) + kClearToEol + "\n" + line_ + kClearToEol);
  last_draw_ = clock_();
}

void Progress::finish() {
  if (!tty_ || !have_line_) return;
  draw(/*force=*/true);  // the last state, even when a redraw was throttled
  sink_("\n");
  live_ = have_line_ = false;
}

}  // namespace lmforge
