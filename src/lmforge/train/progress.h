// The training progress display.
//  - On a terminal: one live line, redrawn in place with \r at most 10 times a second:
//      [=========>          ]    450/1000 | loss 3.2145 | 12345 tok/s | 1m23s | ETA 1m41s
//    message() lines (eval results, checkpoints) print above it without tearing it.
//  - Otherwise (a log file, a pipe): the trainer's plain line every log_every steps and at the
//    last step, with the ETA added:
//      step    450/1000 | loss 3.2145 | lr 3.00e-04 | norm 0.412 | 12345 tok/s | 83.4s | ETA 1m42s
// The ETA is the remaining steps at the rate since start_step (so a resumed run's ETA is its own).
//
//   Progress p(t.steps, st.step, t.log_every);      // at the start of the loop
//   p.step(st.step, loss, lr, norm, tps);           // after each optimizer step (steps done)
//   p.message("step 100/1000 | val loss 3.1");      // instead of printing directly
//   p.finish();                                     // after the loop (also done by the destructor)
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace lmforge {

class Progress {
 public:
  using Clock = std::function<double()>;               // seconds, monotonic
  using Sink = std::function<void(std::string_view)>;  // receives the text, flushes it

  Progress(int64_t total_steps, int64_t start_step, int64_t log_every = 1,
           bool tty = stdout_is_tty());
  // For tests: output to `sink`, time from `clock`, and a terminal `columns` wide (tty only;
  // 0 = unlimited, -1 = ask the terminal at each redraw, as the constructor above does).
  Progress(int64_t total_steps, int64_t start_step, int64_t log_every, bool tty, Sink sink,
           Clock clock, int columns = 0);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `step` counts steps done (1 after the first optimizer step).
  void step(int64_t step, double loss, double lr, double grad_norm, double tokens_per_s);
  void message(const std::string& line);
  void finish();

  static bool stdout_is_tty();

 private:
  void draw(bool force);
  std::string eta(int64_t step, double now) const;

  int64_t total_, start_, log_every_;
  bool tty_;
  Sink sink_;
  Clock clock_;
  int columns_;  // see the constructor
  double t0_;
  double last_draw_ = -1;
  bool live_ = false;       // a live line is on screen
  std::string line_;        // the live line's text
  bool have_line_ = false;  // line_ holds a step not yet drawn (throttled)
};

// "45s", "3m05s", "2h07m", "3d04h"; "?" for a negative or non-finite duration.
std::string format_duration(double seconds);

}  // namespace lmforge
