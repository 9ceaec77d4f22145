// Gradient checks: every op's backward against central finite differences of its forward, in
// fp64 (the ops accept DType::kF64; rope tables stay fp32), on tiny random shapes. Each case
// defines a scalar loss L = sum(out * R) with a fixed random R, and a backward that puts dL/dx
// into zeroed gradient buffers; the check perturbs every input element by +-h.
//
// Numerics: with h = 1e-5 and O(1) values, truncation (h^2 f''' / 6) and rounding
// (1e-16 |L| / h) errors are both ~1e-10, so the normalised error bound kTol = 1e-7 leaves margin
// while a wrong backward (errors O(1)) cannot pass.
#include <gtest/gtest.h>

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/core/rng.h"
#include "lmforge/models/rope_table.h"
#include "testing/compare.h"

namespace lmforge {
namespace {

constexpr double kStep = 1e-5;
constexpr double kTol = 1e-7;
constexpr int32_t kIgnore = -100;

double dot(const Tensor& a, const Tensor& b) {
  const double* x = a.data<double>();
  const double* y = b.data<double>();
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += x[i] * y[i];
  return s;
}

// What one case sets up: its differentiable inputs, the loss and its backward.
class Check {
 public:
  explicit Check(uint64_t seed) : rng_(seed) {}

  Tensor randn(Shape shape, double scale = 1.0, double shift = 0.0) {
    Tensor t = Tensor::empty(shape, DType::kF64);
    double* p = t.data<double>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = shift + scale * rng_.normal();
    return t;
  }
  // A differentiable input and its (zeroed) gradient buffer.
  std::pair<Tensor, Tensor> input(const std::string& name, Shape shape, double scale = 1.0,
                                  double shift = 0.0) {
    Tensor x = randn(shape, scale, shift), g = Tensor::zeros(shape, DType::kF64);
    inputs.push_back({name, x, g});
    return {x, g};
  }
  Tensor tokens(Shape shape, int32_t vocab, int32_t ignore_every = 0) {
    Tensor t = Tensor::empty(shape, DType::kI32);
    int32_t* p = t.data<int32_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      p[i] =
          ignore_every && i % ignore_every == 1 ? kIgnore : static_cast<int32_t>(rng_.below(vocab));
    return t;
  }

  struct Input {
    std::string name;
    Tensor value, grad;
  };
  std::vector<Input> inputs;
  std::function<double()> loss;    // runs the forward; returns L
  std::function<void()> backward;  // dL/d(input) into the zeroed gradient buffers

 private:
  Rng rng_;
};

struct GradCase {
  std::string name;
  std::function<void(Check&)> build;
};
void PrintTo(const GradCase& c, std::ostream* os) { *os << c.name; }  // for gtest's messages

void linear(Check& c, bool bias) {
  const int64_t N = 6, C = 5, OC = 4;
  auto [x, dx] = c.input("x", {2, N / 2, C});
  auto [w, dw] = c.input("weight", {OC, C});
  Tensor b, db;
  if (bias) std::tie(b, db) = c.input("bias", {OC});
  Tensor out = Tensor::empty({2, N / 2, OC}, DType::kF64), R = c.randn(out.shape());
  c.loss = [=] {
    ops::linear_forward(out, x, w, b);
    return dot(out, R);
  };
  c.backward = [=] { ops::linear_backward(dx, dw, db, R, x, w); };
}

void embedding(Check& c, bool learned) {
  const int64_t B = 2, T = 3, C = 4, V = 4;  // B*T > V: repeated ids add into one row
  Tensor tokens = c.tokens({B, T}, V);
  auto [wte, dwte] = c.input("wte", {V, C});
  Tensor wpe, dwpe;
  if (learned) std::tie(wpe, dwpe) = c.input("wpe", {T + 2, C});
  Tensor out = Tensor::empty({B, T, C}, DType::kF64), R = c.randn(out.shape());
  c.loss = [=] {
    ops::embedding_forward(out, tokens, wte, wpe);
    return dot(out, R);
  };
  c.backward = [=] { ops::embedding_backward(dwte, dwpe, R, tokens); };
}

void layernorm(Check& c, bool bias) {
  const int64_t N = 5, C = 6;
  auto [x, dx] = c.input("x", {N, C}, 2.0, 0.5);
  auto [w, dw] = c.input("weight", {C}, 0.5, 1.0);
  Tensor b, db;
  if (bias) std::tie(b, db) = c.input("bias", {C});
  Tensor out = Tensor::empty({N, C}, DType::kF64), R = c.randn(out.shape());
  Tensor mean = Tensor::empty({N}, DType::kF64), rstd = Tensor::empty({N}, DType::kF64);
  c.loss = [=] {
    ops::layernorm_forward(out, mean, rstd, x, w, b, 1e-5);
    return dot(out, R);
  };
  c.backward = [=] { ops::layernorm_backward(dx, dw, db, R, x, w, mean, rstd); };
}

// offset: Gemma's scale of 1 + w (weights then around 0).
void rmsnorm(Check& c, double offset = 0) {
  const int64_t N = 5, C = 6;
  auto [x, dx] = c.input("x", {N, C}, 2.0, 0.5);
  auto [w, dw] = c.input("weight", {C}, 0.5, 1.0 - offset);
  Tensor out = Tensor::empty({N, C}, DType::kF64), R = c.randn(out.shape());
  Tensor rstd = Tensor::empty({N}, DType::kF64);
  c.loss = [=] {
    ops::rmsnorm_forward(out, rstd, x, w, 1e-5, offset);
    return dot(out, R);
  };
  c.backward = [=] { ops::rmsnorm_backward(dx, dw, R, x, w, rstd, offset); };
}

// GQA heads, pos0 > 0 and llama3 scaling with a short original context, so all three frequency
// bands occur.
void rope(Check& c) {
  const int64_t B = 2, T = 3, NH = 4, NKV = 2, HS = 8, pos0 = 5;
  ModelConfig cfg;
  cfg.n_head = NH;
  cfg.n_kv_head = NKV;
  cfg.n_embd = NH * HS;
  cfg.max_seq_len = pos0 + T;
  cfg.rope_theta = 10000;
  cfg.rope_scaling = {"llama3", 4.0, 1.0, 4.0,
                      64};  // kept: HS-wavelength 6.3 < 16; 63 blended; > 64 divided
  Tensor cos = Tensor::empty({cfg.max_seq_len, HS / 2}, DType::kF32);
  Tensor sin = Tensor::empty({cfg.max_seq_len, HS / 2}, DType::kF32);
  rope_tables(cfg, cos, sin);
  auto [x, dx] = c.input("qkv", {B, T, (NH + 2 * NKV) * HS});
  Tensor out = Tensor::empty(x.shape(), DType::kF64), R = c.randn(x.shape());
  Tensor tmp = Tensor::empty(x.shape(), DType::kF64);
  c.loss = [=] {
    out.copy_from(x);
    ops::rope_forward(out, cos, sin, NH, NKV, pos0);
    return dot(out, R);
  };
  c.backward = [=] {
    tmp.copy_from(R);
    ops::rope_backward(tmp, cos, sin, NH, NKV, pos0);  // in place on the gradient
    ops::accumulate(dx, tmp);
  };
}

void qk_norm(Check& c, double offset = 0) {
  const int64_t B = 2, T = 3, NH = 4, NKV = 2, HS = 4;
  auto [x, dx] = c.input("qkv", {B, T, (NH + 2 * NKV) * HS}, 2.0, 0.5);
  auto [wq, dwq] = c.input("wq", {HS}, 0.5, 1.0 - offset);
  auto [wk, dwk] = c.input("wk", {HS}, 0.5, 1.0 - offset);
  Tensor out = Tensor::empty(x.shape(), DType::kF64), R = c.randn(out.shape());
  Tensor rq = Tensor::empty({B * T * NH}, DType::kF64),
         rk = Tensor::empty({B * T * NKV}, DType::kF64);
  c.loss = [=] {
    ops::qk_norm_forward(out, rq, rk, x, wq, wk, NH, NKV, 1e-5, offset);
    return dot(out, R);
  };
  c.backward = [=] { ops::qk_norm_backward(dx, dwq, dwk, R, x, wq, wk, rq, rk, NH, NKV, offset); };
}

// T = 4 lies inside one tile of the kernel; T = 200 spans four query tiles (of 64) and two key
// tiles (of 128), the last of each partial, so the online softmax's rescaling is differentiated,
// and with window 37 the last query tile skips the first key tile.
void attention(Check& c, int64_t NH, int64_t NKV, int64_t window = 0, int64_t T = 4, int64_t B = 2,
               AttnScore score = {}) {
  const int64_t HS = 4;
  auto [qkv, dqkv] = c.input("qkv", {B, T, (NH + 2 * NKV) * HS}, 1.5);
  Tensor out = Tensor::empty({B, T, NH * HS}, DType::kF64), R = c.randn(out.shape());
  Tensor lse = Tensor::empty({B, NH, T}, DType::kF64);
  c.loss = [=] {
    ops::attention_forward(out, lse, qkv, NH, NKV, window, false, {}, score);
    return dot(out, R);
  };
  c.backward = [=] {
    ops::attention_backward(dqkv, R, qkv, out, lse, NH, NKV, window, false, {}, score);
  };
}

// Final-logit soft-capping: out = cap tanh(x / cap) in place, backward from the capped values.
void softcap(Check& c) {
  auto [x, dx] = c.input("x", {3, 7}, 2.5);
  Tensor y = Tensor::empty(x.shape(), DType::kF64), R = c.randn(x.shape());
  c.loss = [=] {
    y.copy_from(x);
    ops::softcap_forward(y, 1.5);
    return dot(y, R);
  };
  c.backward = [=] { ops::softcap_backward(dx, R, y, 1.5); };
}

void gelu(Check& c) {
  auto [x, dx] = c.input("x", {3, 7}, 2.5);
  Tensor out = Tensor::empty(x.shape(), DType::kF64), R = c.randn(x.shape());
  c.loss = [=] {
    ops::gelu_forward(out, x);
    return dot(out, R);
  };
  c.backward = [=] { ops::gelu_backward(dx, x, R); };
}

void glu(Check& c, Gate gate) {
  const int64_t N = 3, F = 5;
  auto [x, dx] = c.input("x", {N, 2 * F}, 2.5);
  Tensor out = Tensor::empty({N, F}, DType::kF64), R = c.randn(out.shape());
  c.loss = [=] {
    ops::glu_forward(out, x, gate);
    return dot(out, R);
  };
  c.backward = [=] { ops::glu_backward(dx, x, R, gate); };
}

void add(Check& c) {
  auto [a, da] = c.input("a", {2, 3, 4});
  auto [b, db] = c.input("b", {2, 3, 4});
  Tensor out = Tensor::empty(a.shape(), DType::kF64), R = c.randn(a.shape());
  c.loss = [=] {
    ops::add(out, a, b);
    return dot(out, R);
  };
  c.backward = [=] {
    ops::accumulate(da, R);
    ops::accumulate(db, R);
  };
}

// L = w * mean (loss + z lse^2) over non-ignored rows; backward gets dloss = w / count as the model
// passes it. z = 0: plain cross-entropy; z > 0: with PaLM's z-loss.
void xent(Check& c, double z = 0) {
  const int64_t N = 6, V = 5;
  auto [logits, dlogits] = c.input("logits", {N, V}, 2.0);
  Tensor targets = c.tokens({N}, V, /*ignore_every=*/4);  // rows 1 and 5 ignored
  Tensor losses = Tensor::empty({N}, DType::kF64);
  const double w = 0.7;
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) count += targets.data<int32_t>()[i] != kIgnore;
  c.loss = [=] {
    double lse_sq = 0;
    double ce = ops::softmax_xent_forward(losses, logits, targets, kIgnore, &lse_sq);
    return w * (ce + z * lse_sq);
  };
  c.backward = [=] { ops::softmax_xent_backward(dlogits, logits, targets, w / count, kIgnore, z); };
}

std::vector<GradCase> cases() {
  return {
      {"linear_bias", [](Check& c) { linear(c, true); }},
      {"linear_nobias", [](Check& c) { linear(c, false); }},
      {"embedding", [](Check& c) { embedding(c, true); }},
      {"embedding_nopos", [](Check& c) { embedding(c, false); }},
      {"layernorm", [](Check& c) { layernorm(c, true); }},
      {"layernorm_nobias", [](Check& c) { layernorm(c, false); }},
      {"rmsnorm", [](Check& c) { rmsnorm(c); }},
      {"rmsnorm_offset1", [](Check& c) { rmsnorm(c, 1.0); }},
      {"rope_gqa_pos0_scaled", rope},
      {"attention_gqa", [](Check& c) { attention(c, 4, 2); }},
      {"attention_mha", [](Check& c) { attention(c, 2, 2); }},
      {"attention_mqa", [](Check& c) { attention(c, 3, 1); }},
      {"attention_window2", [](Check& c) { attention(c, 4, 2, 2); }},
      {"attention_tiles", [](Check& c) { attention(c, 2, 1, 0, 200, 1); }},
      {"attention_tiles_window37", [](Check& c) { attention(c, 2, 1, 37, 200, 1); }},
      // Gemma's scores: scaled by 6^-1/2 (HS = 4), soft-capped at 0.8 (the scores reach ~2)
      {"attention_softcap",
       [](Check& c) {
         attention(c, 4, 2, 0, 4, 2, {6, 0.8f});
       }},
      {"attention_softcap_tiles",
       [](Check& c) {
         attention(c, 2, 1, 37, 200, 1, {6, 0.8f});
       }},
      {"softcap", softcap},
      {"qk_norm", [](Check& c) { qk_norm(c); }},
      {"qk_norm_offset1", [](Check& c) { qk_norm(c, 1.0); }},
      {"gelu", gelu},
      {"swiglu", [](Check& c) { glu(c, Gate::kSilu); }},
      {"geglu", [](Check& c) { glu(c, Gate::kGelu); }},
      {"add", add},
      {"softmax_xent", [](Check& c) { xent(c); }},
      {"softmax_xent_zloss", [](Check& c) { xent(c, 0.3); }},
  };
}

class Gradcheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(Gradcheck, BackwardMatchesFiniteDifferences) {
  const GradCase& gc = GetParam();
  uint64_t seed = 1469598103934665603ull;  // FNV-1a of the name: a fixed seed per case
  for (char ch : gc.name) seed = (seed ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  Check c(seed);
  gc.build(c);
  ASSERT_FALSE(c.inputs.empty());
  c.loss();
  c.backward();
  for (Check::Input& in : c.inputs) {
    Tensor numeric = Tensor::empty(in.value.shape(), DType::kF64);
    double* x = in.value.data<double>();
    for (int64_t i = 0; i < in.value.numel(); ++i) {
      double xi = x[i];
      x[i] = xi + kStep;
      double lp = c.loss();
      x[i] = xi - kStep;
      double lm = c.loss();
      x[i] = xi;
      numeric.data<double>()[i] = (lp - lm) / (2 * kStep);
    }
    testing::Diff d;
    EXPECT_TRUE(testing::tensors_close(gc.name + " d" + in.name, in.grad, numeric, kTol, &d));
    std::printf("  %-22s d%-8s err %.2e  max abs %.2e\n", gc.name.c_str(), in.name.c_str(), d.err,
                d.max_abs);
  }
}

INSTANTIATE_TEST_SUITE_P(Ops, Gradcheck, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<GradCase>& p) { return p.param.name; });

}  // namespace
}  // namespace lmforge
