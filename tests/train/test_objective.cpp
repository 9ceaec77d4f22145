// DPO (its sigmoid, hinge and IPO losses), ORPO, SimPO and KTO (train/objective.h) against
// tests/reference/preference_ref.py: the same policy and reference weights and the same pairs
// through lmforge's trainer path (DataParallel with a PreferenceObjective,
// Transformer::forward_backward_rows) and through PyTorch in float64 (TRL's losses written from
// the papers); the loss, rewards and EVERY parameter gradient compared, in one micro-batch and
// split into three (the losses are normalized over the whole step). Then knowledge distillation
// against tests/reference/distill_ref.py.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "lmforge/core/rng.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/models/presets.h"
#include "lmforge/train/objective.h"
#include "testing/compare.h"

namespace lmforge {
namespace {

using nlohmann::json;

// fp32 against the float64 reference (observed: ~1e-6).
constexpr double kTol = 1e-4;

struct Fixture {
  Safetensors f = testing::open_fixture("preference.safetensors");
  json hyper = json::parse(f.metadata().at("hyper"));
  ModelConfig cfg = model_preset(hyper.at("preset").get<std::string>());
  Transformer policy{cfg}, reference{cfg};
  Tensor tokens = f.get("tokens"), targets = f.get("targets");
  int64_t B = tokens.size(0), T = tokens.size(1);

  Fixture() {
    for (Param& p : policy.params().params()) p.value.copy_from(f.get(p.name));
    for (Param& p : reference.params().params()) p.value.copy_from(f.get("ref." + p.name));
  }
  // The fixture's rows as micro-batches of `rows` rows each.
  std::vector<Batch> micro(int64_t rows) const {
    std::vector<Batch> out;
    for (int64_t r0 = 0; r0 < B; r0 += rows) {
      Batch b = Batch::make(rows, T);
      std::memcpy(b.tokens.data<int32_t>(), tokens.data<int32_t>() + r0 * T, rows * T * 4);
      std::memcpy(b.targets.data<int32_t>(), targets.data<int32_t>() + r0 * T, rows * T * 4);
      out.push_back(std::move(b));
    }
    return out;
  }
};

void check(const std::string& kind, int64_t rows) {
  Fixture fx;
  const json& h = fx.hyper;
  fx.policy.plan(rows, fx.T);
  fx.reference.plan(rows, fx.T);
  // kind: the fixture's name, "dpo_<loss>" for DPO's other losses, "kto[_clamp]_g<rows>" for
  // KTO with the KL rows of micro-batches of <rows> rows.
  PreferenceOptions o;
  o.kind = kind.substr(0, kind.find('_'));
  const bool dpo = o.kind == "dpo", kto = o.kind == "kto";
  if (kto) {
    ASSERT_EQ(kind.substr(kind.rfind('_')), "_g" + std::to_string(rows));
    o.beta = h.at("kto_beta").get<double>();
    o.desirable_weight = h.at("kto_desirable_weight").get<double>();
    o.undesirable_weight = h.at("kto_undesirable_weight").get<double>();
    if (kind.find("apo") != std::string::npos) o.kto_loss = KtoLoss::kApoZeroUnpaired;
    // Its own reference (a positive KL estimate), or DPO's (one that clamps to 0).
    if (kind.find("clamp") == std::string::npos)
      for (Param& p : fx.reference.params().params())
        p.value.copy_from(fx.f.get("kto_ref." + p.name));
  } else if (kind == "dpo") {
    o.beta = h.at("dpo_beta").get<double>();
    o.label_smoothing = h.at("dpo_label_smoothing").get<double>();
  } else if (dpo) {
    const std::string loss = kind.substr(4);
    o.dpo_loss = parse_dpo_loss(loss);
    o.beta = h.at(loss + "_beta").get<double>();
  } else if (o.kind == "orpo") {
    o.beta = h.at("orpo_lambda").get<double>();
  } else {
    o.beta = h.at("simpo_beta").get<double>();
    o.gamma = h.at("simpo_gamma").get<double>();
    o.cpo_alpha = h.at("cpo_alpha").get<double>();
    if (kind == "simpo_smooth") {  // TRL's label smoothing, SimPO as published (no NLL term)
      o.label_smoothing = h.at("simpo_label_smoothing").get<double>();
      o.cpo_alpha = 0;
    }
  }
  PreferenceObjective obj(o, dpo || kto ? &fx.reference : nullptr, false, &fx.policy);
  dist::LocalCommunicator one;
  dist::DataParallel dp(one, fx.policy, DistConfig{}, {});
  std::vector<Batch> micro = fx.micro(rows);
  if (kto) {
    const Tensor labels = fx.f.get("kto_labels");
    for (size_t m = 0; m < micro.size(); ++m)
      for (int64_t r = 0; r < rows; ++r)
        micro[m].labels[r] = static_cast<int8_t>(labels.data<int32_t>()[m * rows + r]);
  }
  const double loss = dp.forward_backward(micro, nullptr, &obj);

  const double ref_loss = fx.f.get(kind + ".loss").data<float>()[0];
  EXPECT_NEAR(loss, ref_loss, kTol * std::fabs(ref_loss)) << kind << " loss";
  std::printf("  %s, micro-batches of %ld rows: loss %.7f vs %.7f\n", kind.c_str(),
              static_cast<long>(rows), loss, ref_loss);
  const json m = obj.metrics();
  auto mean = [](const Tensor& t) {
    double s = 0;
    for (int64_t i = 0; i < t.numel(); ++i) s += t.data<float>()[i];
    return s / static_cast<double>(t.numel());
  };
  if (kto && o.kto_loss == KtoLoss::kApoZeroUnpaired) {
    EXPECT_FALSE(m.contains("kl")) << kind;
  } else if (kto) {
    const double kl = fx.f.get(kind + ".kl").data<float>()[0];
    EXPECT_NEAR(m.at("kl").get<double>(), kl, 1e-5) << kind;
    std::printf("  %s: KL estimate %.6f vs %.6f\n", kind.c_str(), m.at("kl").get<double>(), kl);
  }
  if (o.kind != "orpo") {
    const double rc = mean(fx.f.get(kind + ".reward_chosen"));
    const double rr = mean(fx.f.get(kind + ".reward_rejected"));
    EXPECT_NEAR(m.at("reward_chosen").get<double>(), rc, 1e-5 * std::max(1.0, std::fabs(rc)));
    EXPECT_NEAR(m.at("reward_rejected").get<double>(), rr, 1e-5 * std::max(1.0, std::fabs(rr)));
  } else {
    EXPECT_NEAR(m.at("log_odds").get<double>(), mean(fx.f.get("orpo.log_odds")), 1e-5);
  }
  if (!dpo && !kto) {
    EXPECT_NEAR(m.at("nll").get<double>(), fx.f.get(kind + ".nll").data<float>()[0], 1e-4);
  }
  double worst = 0;
  for (Param& p : fx.policy.params().params()) {
    testing::Diff d;
    EXPECT_TRUE(testing::tensors_close(kind + " grad " + p.name, p.grad,
                                       fx.f.get(kind + ".grad." + p.name), kTol, &d));
    worst = std::max(worst, d.err);
  }
  std::printf("  %s: worst gradient error %.2e\n", kind.c_str(), worst);
}

TEST(PreferenceObjective, DpoMatchesPyTorch) { check("dpo", 6); }
TEST(PreferenceObjective, DpoOverMicroBatchesMatchesPyTorch) { check("dpo", 2); }
TEST(PreferenceObjective, OrpoMatchesPyTorch) { check("orpo", 6); }
TEST(PreferenceObjective, OrpoOverMicroBatchesMatchesPyTorch) { check("orpo", 2); }
// TRL's other DPO losses; the hinge's beta puts one pair past the hinge (no gradient).
TEST(PreferenceObjective, DpoHingeMatchesPyTorch) { check("dpo_hinge", 2); }
TEST(PreferenceObjective, IpoMatchesPyTorch) { check("dpo_ipo", 2); }
// SimPO with CPO's NLL term (cpo_alpha > 0), no reference model.
TEST(PreferenceObjective, SimpoMatchesPyTorch) { check("simpo", 6); }
TEST(PreferenceObjective, SimpoOverMicroBatchesMatchesPyTorch) { check("simpo", 2); }
TEST(PreferenceObjective, SimpoWithLabelSmoothingMatchesPyTorch) { check("simpo_smooth", 2); }
// KTO over labelled rows: its KL estimate (each row's prompt with the previous row's response,
// within a micro-batch) positive, in one micro-batch and in three; and one that clamps to 0.
TEST(PreferenceObjective, KtoMatchesPyTorch) { check("kto_g6", 6); }
TEST(PreferenceObjective, KtoOverMicroBatchesMatchesPyTorch) { check("kto_g2", 2); }
TEST(PreferenceObjective, KtoWithANegativeKlEstimateClampsItToZero) { check("kto_clamp_g2", 2); }
// TRL's apo_zero_unpaired loss: no KL estimate.
TEST(PreferenceObjective, KtoApoZeroUnpairedMatchesPyTorch) { check("kto_apo_g2", 2); }

// DPO under LoRA: the reference as the policy with its adapters off (no second model) gives the
// loss and gradients of a separate reference model holding the base weights, bit for bit.
TEST(PreferenceObjective, LoraReferenceIsThePolicyWithoutAdapters) {
  Fixture fx;
  ModelConfig lcfg = fx.cfg;
  lcfg.lora.rank = 4;
  auto run = [&](bool adapters_off, double* loss) {
    Transformer policy(lcfg);
    Rng rng(5);
    for (Param& p : policy.params().params()) {
      if (is_lora_param(p.name)) {  // adapters that change the model (B != 0)
        float* v = p.value.data<float>();
        for (int64_t i = 0; i < p.value.numel(); ++i)
          v[i] = 0.05f * static_cast<float>(rng.normal());
      } else {
        p.value.copy_from(fx.f.get(p.name));
      }
    }
    policy.plan(2, fx.T);
    fx.reference.plan(2, fx.T);
    for (Param& p : fx.reference.params().params()) p.value.copy_from(fx.f.get(p.name));  // base
    PreferenceObjective obj({"dpo", 0.5, 0.0}, adapters_off ? &policy : &fx.reference,
                            adapters_off);
    dist::LocalCommunicator one;
    dist::DataParallel dp(one, policy, DistConfig{}, {});
    *loss = dp.forward_backward(fx.micro(2), nullptr, &obj);
    std::vector<float> grads;
    for (Param& p : policy.params().params())
      if (!p.frozen)
        grads.insert(grads.end(), p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    return grads;
  };
  double separate = 0, base = 0;
  const std::vector<float> a = run(false, &separate), b = run(true, &base);
  EXPECT_EQ(separate, base);
  EXPECT_EQ(a, b);
  EXPECT_GT(a.size(), 0u);
  EXPECT_NE(separate, std::log(2.0));  // the adapters moved the policy off the reference
}

// Knowledge distillation through the trainer's path (DataParallel, the teacher's trunk and the
// fused distillation loss per LM-head chunk) against distill_ref.py; with both models' logits
// soft-capped too (the teacher's head capped, the student's gradient through its cap).
void check_distillation(const std::string& fixture) {
  Safetensors f = testing::open_fixture(fixture);
  const json h = json::parse(f.metadata().at("hyper"));
  ModelConfig cfg = model_preset(h.at("preset").get<std::string>());
  cfg.logit_softcap = h.value("logit_softcap", 0.0);
  Transformer student(cfg), teacher(cfg);
  for (Param& p : student.params().params()) p.value.copy_from(f.get(p.name));
  for (Param& p : teacher.params().params()) p.value.copy_from(f.get("teacher." + p.name));
  Tensor tokens = f.get("tokens"), targets = f.get("targets");
  const int64_t B = tokens.size(0), T = tokens.size(1);
  student.plan(B, T);
  teacher.plan(B, T);
  student.set_distillation(
      {&teacher, h.at("alpha").get<double>(), h.at("temperature").get<double>()});
  Batch b = Batch::make(B, T);
  b.tokens.copy_from(tokens);
  b.targets.copy_from(targets);
  dist::LocalCommunicator one;
  dist::DataParallel dp(one, student, DistConfig{}, {});
  double kl = 0;
  const double loss = dp.forward_backward({b}, nullptr, nullptr, &kl);
  const double ref_loss = f.get("loss").data<float>()[0], ref_kl = f.get("kl").data<float>()[0];
  EXPECT_NEAR(loss, ref_loss, kTol * ref_loss);
  EXPECT_NEAR(kl, ref_kl, kTol * ref_kl);
  std::printf("  loss %.7f vs %.7f, KL %.7f vs %.7f\n", loss, ref_loss, kl, ref_kl);
  double worst = 0;
  for (Param& p : student.params().params()) {
    testing::Diff d;
    EXPECT_TRUE(
        testing::tensors_close("grad " + p.name, p.grad, f.get("grad." + p.name), kTol, &d));
    worst = std::max(worst, d.err);
  }
  std::printf("  worst gradient error %.2e\n", worst);
  // Evaluation stays the student's plain cross-entropy.
  const float ce = student.forward(tokens, targets);
  EXPECT_NE(ce, static_cast<float>(loss));
}
TEST(Distillation, LossKlAndGradientsMatchPyTorch) { check_distillation("distill.safetensors"); }
TEST(Distillation, SoftCappedLogitsMatchPyTorch) {
  check_distillation("distill_capped.safetensors");
}

// A step whose pairs all lack targets on a side has no terms: its metrics are an empty object
// (merged into the step's record), its loss contribution 0.
TEST(PreferenceObjective, AStepWithoutUsablePairsIsEmpty) {
  Fixture fx;
  fx.policy.plan(2, fx.T);
  PreferenceObjective obj({"orpo", 0.1, 0.0}, nullptr);
  std::vector<Batch> micro = fx.micro(2);
  std::fill_n(micro[0].targets.data<int32_t>() + fx.T, fx.T, -100);  // the rejected side
  dist::LocalCommunicator one;
  dist::DataParallel dp(one, fx.policy, DistConfig{}, {});
  EXPECT_EQ(dp.forward_backward({micro[0]}, nullptr, &obj), 0.0);
  json record = {{"step", 1}};
  record.update(obj.metrics());
  EXPECT_EQ(record.size(), 1u);
}

// Policy == reference: every reward is 0 and the DPO loss is log 2 (plain) whatever the data;
// label smoothing does not change it at z = 0.
TEST(PreferenceObjective, DpoStartsAtLog2) {
  for (double smoothing : {0.0, 0.2}) {
    PairTerm t = dpo_pair({-12.5, -3.25, 7, 3, -12.5, -3.25}, 0.1, smoothing);
    EXPECT_DOUBLE_EQ(t.loss, std::log(2.0));
    EXPECT_DOUBLE_EQ(t.reward_chosen, 0.0);
    EXPECT_DOUBLE_EQ(t.dchosen, -0.1 * (0.5 - smoothing));
  }
}

}  // namespace
}  // namespace lmforge
