// AdamW against torch.optim.AdamW (foreach=False): the parameters of adamw.safetensors
// (tests/reference/adamw_ref.py) in a ParamSet with the same decay flags, the same gradients and
// learning rates for three steps, parameters and both moments compared after every step. The
// step torch clips with clip_grad_norm_ is clipped here in the update (AdamW::step's grad_scale).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "lmforge/optim/adamw.h"
#include "lmforge/optim/clip.h"
#include "testing/compare.h"

namespace lmforge {
namespace {

using nlohmann::json;

// lmforge follows torch's fp32 operation order, so only rounding differences (a few ulp of the
// update, far below 1e-6 of the parameter) are expected.
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

}  // namespace
}  // namespace lmforge
