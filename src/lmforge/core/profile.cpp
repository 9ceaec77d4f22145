#include "lmforge/core/profile.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <numeric>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/tensor.h"

namespace lmforge::profile {

namespace detail {
bool g_on = false;
}

namespace {

struct Pending {  // a GPU op whose events are not read yet
  int64_t row;
  void *start, *end;
};

struct Table {
  std::mutex mu;
  std::vector<Row> rows;
  std::map<std::pair<std::string, std::string>, int64_t> index;
  std::vector<Pending> pending;

  // Gives the pending events back, their times added to their rows first when read. Holds mu.
  void drain(bool read) {
    for (const Pending& p : pending) {
      if (read) rows[p.row].seconds += cuda::event_elapsed_ms(p.start, p.end) / 1e3;
      cuda::event_release(p.start);
      cuda::event_release(p.end);
    }
    pending.clear();
  }
  void resolve() { drain(true); }  // waits for the last event
  void clear() {
    drain(false);
    rows.clear();
    index.clear();
  }
};

Table& table() {
  static auto* t = new Table;  // never destroyed: scopes may close during static destruction
  return *t;
}

thread_local int tl_depth = 0;  // open scopes on this thread

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

void enable(bool on, bool keep) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  if (!keep) t.clear();
  detail::g_on = on;
}

void Scope::begin(const char* op, const Tensor& t, double flops) {
  active_ = true;
  if (tl_depth++ > 0) {  // inside another op: that one's row has the time
    row_ = -1;
    return;
  }
  gpu_ = t.device() == Device::kCUDA;
  Table& tab = table();
  {
    std::lock_guard<std::mutex> lock(tab.mu);
    std::string shape = t.shape().str();
    auto [it, added] = tab.index.try_emplace({op, shape}, tab.rows.size());
    if (added) tab.rows.push_back(Row{op, std::move(shape), gpu_, 0, 0, 0});
    row_ = it->second;
    tab.rows[row_].calls += 1;
    tab.rows[row_].flops += flops;
  }
  if (gpu_)
    event_ = cuda::event_record();
  else
    t0_ = now();
}

void Scope::end() {
  --tl_depth;
  if (row_ < 0) return;
  void* stop = gpu_ ? cuda::event_record() : nullptr;
  const double t1 = gpu_ ? 0 : now();
  Table& tab = table();
  std::lock_guard<std::mutex> lock(tab.mu);
  if (row_ >= static_cast<int64_t>(tab.rows.size())) {  // cleared meanwhile
    cuda::event_release(event_);
    cuda::event_release(stop);
    return;
  }
  if (gpu_) {
    tab.pending.push_back({row_, event_, stop});
    if (tab.pending.size() >= 4096) tab.resolve();  // bounds the events held
  } else {
    tab.rows[row_].seconds += t1 - t0_;
  }
}

std::vector<Row> rows() {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.resolve();
  return t.rows;
}

std::string report(int64_t steps, double step_seconds) {
  std::vector<Row> all = rows();
  const double n = static_cast<double>(std::max<int64_t>(steps, 1));
  // Per op: the rows of every shape added up.
  std::vector<Row> by_op;
  for (const Row& r : all) {
    auto it = std::find_if(by_op.begin(), by_op.end(), [&](const Row& o) { return o.op == r.op; });
    if (it == by_op.end()) {
      by_op.push_back(r);
      by_op.back().shape.clear();
    } else {
      it->calls += r.calls;
      it->seconds += r.seconds;
      it->flops += r.flops;
    }
  }
  auto slowest_first = [](const Row& a, const Row& b) { return a.seconds > b.seconds; };
  std::stable_sort(by_op.begin(), by_op.end(), slowest_first);
  std::stable_sort(all.begin(), all.end(), slowest_first);
  const double in_ops = std::accumulate(all.begin(), all.end(), 0.0,
                                        [](double s, const Row& r) { return s + r.seconds; }) /
                        n;
  const bool gpu = std::any_of(all.begin(), all.end(), [](const Row& r) { return r.gpu; });

  std::string out =
      fmt::format("profile of {} step(s), {:.2f} ms per step; time of the outermost ops{}\n", steps,
                  step_seconds * 1e3, gpu ? " (GPU ops: CUDA event time on the stream)" : "");
  auto line = [&](const std::string& name, const Row& r) {
    const double s = r.seconds / n;
    out += fmt::format("  {:<48} {:>8.1f} {:>10.3f} {:>6.1f}%", name, r.calls / n, s * 1e3,
                       step_seconds > 0 ? 100 * s / step_seconds : 0.0);
    if (r.flops > 0 && r.seconds > 0) out += fmt::format(" {:>9.1f}", r.flops / r.seconds / 1e9);
    out += "\n";
  };
  out += fmt::format("  {:<48} {:>8} {:>10} {:>7} {:>9}\n", "op", "calls", "ms/step", "share",
                     "GFLOP/s");
  for (const Row& r : by_op) line(r.op, r);
  out += fmt::format("  {:<48} {:>8} {:>10.3f} {:>6.1f}%\n", "all ops", "", in_ops * 1e3,
                     step_seconds > 0 ? 100 * in_ops / step_seconds : 0.0);
  const double rest = step_seconds - in_ops;
  out += fmt::format("  {:<48} {:>8} {:>10.3f} {:>6.1f}%\n",
                     "outside ops (host work, communication, waiting)", "", rest * 1e3,
                     step_seconds > 0 ? 100 * rest / step_seconds : 0.0);
  const size_t top = std::min<size_t>(all.size(), 24);
  out += fmt::format("by op and shape (the {} slowest of {})\n", top, all.size());
  for (size_t i = 0; i < top; ++i) line(all[i].op + " " + all[i].shape, all[i]);
  return out;
}

}  // namespace lmforge::profile
