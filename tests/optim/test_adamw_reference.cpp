// AdamW against torch.optim.AdamW (foreach=False): the parameters of adamw.safetensors
// (tests/reference/adamw_ref.py) in a ParamSet with the same decay flags, the same gradients and
// learning rates for three steps, parameters and both moments compared after every step. The
// step torch clips with clip_grad_norm_ is clipped here in the update (AdamW::step's grad_scale).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

#include "lmforge/optim/adamw.h"
#include "lmforge/optim/clip.h"
#include "testing/compare.h"

namespace lmforge {
namespace {

using nlohmann::json;

// lmforge follows torch's fp32 operations (with the denominator's bias correction folded into two
// scalars: adamw_scalars.h), so only rounding differences (a few ulp of the update, far below 1e-6
// of the parameter) are expected.
constexpr double kTol = 1e-6;

TEST(AdamWReference, ThreeStepsMatchTorch) {
  Safetensors f = testing::open_fixture("adamw.safetensors");
  json h = json::parse(f.metadata().at("adamw"));

  ParamSet ps;
  for (const json& p : h.at("params")) {
    Tensor init = f.get("param." + p.at("name").get<std::string>());
    ps.add(p.at("name"), init.shape(), p.at("decay").get<bool>());
  }
  ps.finalize();
  for (Param& p : ps.params()) p.value.copy_from(f.get("param." + p.name));

  AdamW opt(ps, {.beta1 = h.at("beta1"),
                 .beta2 = h.at("beta2"),
                 .eps = h.at("eps"),
                 .weight_decay = h.at("weight_decay")});
  int steps = h.at("steps");
  for (int s = 1; s <= steps; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    std::string tag = std::to_string(s) + ".";
    for (Param& p : ps.params()) p.grad.copy_from(f.get("grad." + tag + p.name));
    double scale = 1.0;
    if (f.has("max_norm." + std::to_string(s))) {
      scale = clip_coef(grad_norm(ps), f.get("max_norm." + std::to_string(s)).data<double>()[0]);
      EXPECT_LT(scale, 1.0);
    }
    opt.step(f.get("lr." + std::to_string(s)).data<double>()[0], scale);
    for (size_t i = 0; i < ps.params().size(); ++i) {
      const Param& p = ps.params()[i];
      testing::Diff d, dm, dv;
      EXPECT_TRUE(testing::tensors_close("param " + tag + p.name, p.value,
                                         f.get("after." + tag + p.name), kTol, &d));
      EXPECT_TRUE(testing::tensors_close("m " + tag + p.name, opt.m(i), f.get("m." + tag + p.name),
                                         kTol, &dm));
      EXPECT_TRUE(testing::tensors_close("v " + tag + p.name, opt.v(i), f.get("v." + tag + p.name),
                                         kTol, &dv));
      std::printf("  step %d %-12s param err %.2e  m err %.2e  v err %.2e\n", s, p.name.c_str(),
                  d.err, dm.err, dv.err);
    }
  }
}

// Muon (train.optimizer: muon) against torch.optim.Muon with torch.optim.AdamW beside it, both in
// float64 (adamw_ref.py's make_muon): the blocks' tall, wide and square matrices step with Muon
// (the fused q/k/v and gate/up as their projections apart, which torch sees as parameters apart),
// the norm weight, embeddings and head with AdamW, for three steps, the second clipped. Two
// variants: Nesterov momentum with match_rms_adamw's lr (Moonlight), and plain momentum with the
// original scaling and a 20x larger Muon lr. lmforge's Newton-Schulz runs in fp32.
// a - b elementwise, in float64 (b absent: a copy of a).
Tensor difference(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = testing::to_doubles(a);
  const std::vector<double> y =
      b.defined() ? testing::to_doubles(b) : std::vector<double>(x.size());
  Tensor out = Tensor::empty(a.shape(), DType::kF64);
  for (size_t i = 0; i < x.size(); ++i) out.data<double>()[i] = x[i] - y[i];
  return out;
}

// With bf16 Newton-Schulz products (train.precision: bf16; torch runs them in bf16 too) each
// step's update of a Muon matrix is compared instead, within `tol` of torch's float64 update, and
// the matrix is then set to torch's value so the steps are checked one at a time.
void muon_matches_torch(bool bf16, double tol) {
  Safetensors f = testing::open_fixture("adamw.safetensors");
  json h = json::parse(f.metadata().at("adamw"));
  json mh = json::parse(f.metadata().at("muon"));
  for (const auto& [tag, o] : mh.at("variants").items()) {
    SCOPED_TRACE("variant " + tag + (bf16 ? ", bf16 products" : ""));
    const std::string pre = "muon." + tag + ".";
    ParamSet ps;
    for (const json& p : mh.at("params"))
      ps.add(p.at("name"), f.get(pre + "param." + p.at("name").get<std::string>()).shape(),
             p.at("decay").get<bool>());
    ps.finalize();
    for (size_t i = 0; i < ps.params().size(); ++i)
      ps.params()[i].row_blocks = mh.at("params")[i].at("row_blocks").get<std::vector<int64_t>>();
    for (Param& p : ps.params()) p.value.copy_from(f.load(pre + "param." + p.name, DType::kF32));
    AdamWOptions ao{.beta1 = h.at("beta1"),
                    .beta2 = h.at("beta2"),
                    .eps = h.at("eps"),
                    .weight_decay = h.at("weight_decay")};
    ao.muon = {.on = true,
               .momentum = o.at("momentum"),
               .nesterov = o.at("nesterov"),
               .ns_steps = o.at("ns_steps"),
               .match_rms_adamw = o.at("adjust_lr") == "match_rms_adamw",
               .lr_ratio = o.at("lr_ratio"),
               .bf16 = bf16};
    AdamW opt(ps, ao);
    EXPECT_STREQ(opt.name(), "muon");
    int muon_slots = 0;
    for (size_t i = 0; i < ps.params().size(); ++i) {
      EXPECT_EQ(!opt.v(i).defined(), muon_param(ps.params()[i])) << ps.params()[i].name;
      muon_slots += !opt.v(i).defined();
    }
    EXPECT_EQ(muon_slots, 4);
    for (int s = 1; s <= h.at("steps").get<int>(); ++s) {
      SCOPED_TRACE("step " + std::to_string(s));
      const std::string step = std::to_string(s) + ".";
      for (Param& p : ps.params())
        p.grad.copy_from(f.load(pre + "grad." + step + p.name, DType::kF32));
      double scale = 1.0;
      if (f.has("max_norm." + std::to_string(s)))
        scale = clip_coef(grad_norm(ps), f.get("max_norm." + std::to_string(s)).data<double>()[0]);
      std::vector<Tensor> before;
      for (Param& p : ps.params()) before.push_back(difference(p.value, Tensor()));
      opt.step(f.get("lr." + std::to_string(s)).data<double>()[0], scale);
      for (size_t i = 0; i < ps.params().size(); ++i) {
        const Param& p = ps.params()[i];
        const Tensor want = f.get(pre + "after." + step + p.name);
        testing::Diff d, dm;
        if (bf16 && !opt.v(i).defined()) {
          const std::string was = s == 1 ? "param." : "after." + std::to_string(s - 1) + ".";
          const Tensor update = difference(want, f.get(pre + was + p.name));
          // torch's own bf16 update, and its distance from float64's by the same measure.
          const Tensor off = f.get(pre + "bf16_off." + step + p.name);
          Tensor torch16 = difference(update, Tensor());
          for (int64_t e = 0; e < off.numel(); ++e)
            torch16.data<double>()[e] += off.data<double>()[e];
          testing::Diff t16;
          testing::tensors_close("torch's bf16 update", torch16, update, 1e9, &t16);
          EXPECT_TRUE(testing::tensors_close("update " + step + p.name,
                                             difference(p.value, before[i]), update,
                                             std::max(tol, 1.5 * t16.err), &d))
              << "torch's own bf16 update is off by " << t16.err;
          p.value.copy_from(f.load(pre + "after." + step + p.name, DType::kF32));
        } else {
          EXPECT_TRUE(testing::tensors_close("param " + step + p.name, p.value, want, kTol, &d));
        }
        EXPECT_TRUE(testing::tensors_close("m " + step + p.name, opt.m(i),
                                           f.get(pre + "m." + step + p.name), kTol, &dm));
        if (opt.v(i).defined()) {
          EXPECT_TRUE(testing::tensors_close("v " + step + p.name, opt.v(i),
                                             f.get(pre + "v." + step + p.name), kTol));
        }
        std::printf("  %s step %d %-26s param err %.2e  m err %.2e\n", tag.c_str(), s,
                    p.name.c_str(), d.err, dm.err);
      }
    }
  }
}

TEST(AdamWReference, MuonMatchesTorch) { muon_matches_torch(/*bf16=*/false, kTol); }

TEST(AdamWReference, MuonWithBf16ProductsIsWithinBf16OfTorch) {
  // Within 6% (of the largest element) of float64's update, or 1.5 times torch's own bf16
  // iteration's distance from it where that is larger (small matrices: up to 15% at 6x4 over
  // random draws); an update without the iteration, with a wrong scale or orientation, or over
  // the fused q/k/v whole, is off by tens of percent.
  muon_matches_torch(/*bf16=*/true, 0.06);
}

// The bf16 values on either side of y (truncated, and the next one away from zero; equal when y
// is a bf16 value).
std::pair<float, float> bf16_bracket(float y) {
  uint32_t u;
  std::memcpy(&u, &y, 4);
  const float lo = bf16_to_fp32(static_cast<uint16_t>(u >> 16));
  return {lo, (u & 0xffffu) ? bf16_to_fp32(static_cast<uint16_t>((u >> 16) + 1)) : lo};
}

// bf16 master weights: from bf16 parameters, one step must give one of the two bf16 neighbours of
// torch's fp32 result (stochastic rounding), the moments as torch's. torch's fp32 value may lie a
// rounding error from lmforge's, so the neighbours are those of an interval around it.
TEST(AdamWReference, Bf16MasterStepIsTorchsRoundedToANeighbour) {
  Safetensors f = testing::open_fixture("adamw.safetensors");
  json h = json::parse(f.metadata().at("adamw"));
  ParamSet ps;
  for (const json& p : h.at("params")) {
    const std::string name = p.at("name");
    ps.add(name, f.get("sr.param." + name).shape(), p.at("decay").get<bool>());
  }
  ps.finalize();
  for (Param& p : ps.params()) p.value.copy_from(f.load("sr.param." + p.name, DType::kF32));
  ps.use_bf16_master();
  AdamW opt(ps, {.beta1 = h.at("beta1"),
                 .beta2 = h.at("beta2"),
                 .eps = h.at("eps"),
                 .weight_decay = h.at("weight_decay"),
                 .seed = 11});
  for (Param& p : ps.params()) p.grad.copy_from(f.get("sr.grad." + p.name));
  opt.step(f.get("lr.1").data<double>()[0]);
  int64_t moved_up = 0, moved_down = 0, total = 0;
  for (size_t i = 0; i < ps.params().size(); ++i) {
    const Param& p = ps.params()[i];
    ASSERT_EQ(p.value.dtype(), DType::kBF16);
    Tensor want = f.get("sr.after." + p.name);
    for (int64_t k = 0; k < want.numel(); ++k, ++total) {
      const float x = want.data<float>()[k], got = bf16_to_fp32(p.value.bf16_data()[k]);
      bool neighbour = false;  // of x, or of a value a rounding error away
      for (float y : {x, x * (1 - 1e-6f), x * (1 + 1e-6f)}) {
        const auto [lo, hi] = bf16_bracket(y);
        neighbour = neighbour || got == lo || got == hi;
      }
      EXPECT_TRUE(neighbour) << p.name << "[" << k << "]: " << got << " is no bf16 neighbour of "
                             << x;
      moved_up += std::fabs(got) > std::fabs(x);
      moved_down += std::fabs(got) < std::fabs(x);
    }
    EXPECT_TRUE(testing::tensors_close("m " + p.name, opt.m(i), f.get("sr.m." + p.name), kTol));
    EXPECT_TRUE(testing::tensors_close("v " + p.name, opt.v(i), f.get("sr.v." + p.name), kTol));
  }
  std::printf("  %lld weights: %lld rounded away from zero, %lld toward\n", (long long)total,
              (long long)moved_up, (long long)moved_down);
  EXPECT_GT(moved_up, 0);
  EXPECT_GT(moved_down, 0);
}

}  // namespace
}  // namespace lmforge
