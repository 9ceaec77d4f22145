// Op-level profile: where the time of a training step goes, op by op and shape by shape
// (`lmforge bench train --profile-steps N`). Every op of backend/ops.h and Tensor::zero_ /
// copy_from open a Scope; only the outermost scope of a thread counts, so an op made of other
// ops is one row. Host tensors are timed on the wall clock (ops are synchronous there); CUDA
// tensors by a pair of CUDA events around the op on the compute stream, resolved when the rows
// are read, so profiling adds no host synchronization inside a step. Off by default: a disabled
// Scope is one branch.
//
//   profile::enable(true);
//   ... steps ...
//   fmt::print("{}", profile::report(steps, seconds_per_step));
//   profile::enable(false);  // also clears the rows
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lmforge {
class Tensor;
}

namespace lmforge::profile {

namespace detail {
extern bool g_on;
}

inline bool enabled() { return detail::g_on; }
// Turning it on or off clears what was recorded, unless keep: enable(false, true) pauses (work
// between profiled steps is left out) and enable(true, true) resumes.
void enable(bool on, bool keep = false);

// Times the op from construction to destruction; the row's key is (op, t's shape), and t's
// device picks the clock. flops: the op's floating-point operations, for GFLOP/s (0: not shown).
class Scope {
 public:
  Scope(const char* op, const Tensor& t, double flops = 0) {
    if (detail::g_on) begin(op, t, flops);
  }
  ~Scope() {
    if (active_) end();
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  void begin(const char* op, const Tensor& t, double flops);
  void end();
  bool active_ = false;
  bool gpu_ = false;
  int64_t row_ = 0;
  double t0_ = 0;
  void* event_ = nullptr;
};

struct Row {
  std::string op, shape;  // shape: "(N, OC)" of the tensor the op was keyed on
  bool gpu = false;
  int64_t calls = 0;
  double seconds = 0, flops = 0;
};

// Every row so far, in first-call order (GPU rows: waits for their events).
std::vector<Row> rows();

// The table: per op, then the top rows per op and shape, each with calls and milliseconds per
// step, the share of step_seconds, GFLOP/s where known, and the time outside any op (host work,
// communication, waiting) as the rest of step_seconds.
std::string report(int64_t steps, double step_seconds);

}  // namespace lmforge::profile
