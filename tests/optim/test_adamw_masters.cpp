// LoRA under bf16 master weights (AdamWOptions::fp32_masters): the frozen weights are bf16 alone
// and the adapters' bf16 values keep fp32 masters in AdamW's state. Their training must be that
// of fp32 master weights with bf16 copies, bit for bit (the same fp32 update, the copy rounded to
// nearest), where bf16 master weights alone round each update stochastically; and a value written
// by anything but the optimizer (a load) must be taken up by its master (ops::keep_master), while
// the elements it did not write keep theirs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/rng.h"
#include "lmforge/nn/params.h"
#include "lmforge/optim/adamw.h"

namespace lmforge {
namespace {

// A LoRA-shaped set: a frozen matmul weight, two adapters (matmul weights), a trained 1-D bias.
struct LoraSet {
  ParamSet ps;
  Param *base, *a, *b, *bias;
  LoraSet() {
    base = ps.add("base.weight", {32, 24}, true);
    a = ps.add("base.lora_a", {8, 24}, true);
    b = ps.add("base.lora_b", {8, 32}, true);
    bias = ps.add("base.bias", {32}, false);
    base->matmul = a->matmul = b->matmul = true;
    base->frozen = true;
    ps.finalize();
    Rng rng(5);  // bf16-representable values: either set starts from the same weights
    for (Param* p : {base, a, b, bias}) {
      float* v = p->value.data<float>();
      for (int64_t i = 0; i < p->shape.numel(); ++i)
        v[i] = bf16_to_fp32(fp32_to_bf16(static_cast<float>(rng.normal() * 0.5)));
    }
    ps.enable_bf16();
    ps.sync_bf16();
  }
  void grads(uint64_t seed) {
    Rng rng(seed);
    for (Param* p : {a, b, bias}) {
      float* g = p->grad.data<float>();
      for (int64_t i = 0; i < p->shape.numel(); ++i) g[i] = static_cast<float>(rng.normal());
    }
  }
};

// The bf16 values of a bf16-master set (or the bf16 copies of an fp32-master one) of p.
std::vector<uint16_t> bf16_of(const Param& p) {
  const Tensor& t = p.value.dtype() == DType::kBF16 ? p.value : p.value_bf16;
  std::vector<uint16_t> out(p.shape.numel());
  if (t.defined()) {
    std::memcpy(out.data(), t.raw(), out.size() * 2);
  } else {  // a 1-D fp32 parameter: its value rounded as the copies are
    for (size_t i = 0; i < out.size(); ++i) out[i] = fp32_to_bf16_ftz(p.value.data<float>()[i]);
  }
  return out;
}

const Tensor& master_of(const AdamW& opt, const Param* p) {
  for (size_t i = 0; i < opt.slots().size(); ++i)
    if (opt.slots()[i].param == p) return opt.master(i);
  static const Tensor none;
  return none;
}

constexpr AdamWOptions kOpt{.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};

TEST(AdamWMasters, AdaptersTrainAsUnderFp32MasterWeights) {
  LoraSet f, h, sr;  // fp32 masters; bf16 values with fp32 masters; bf16 values alone
  h.ps.use_bf16_master();
  sr.ps.use_bf16_master();
  const std::vector<uint16_t> base0 = bf16_of(*h.base);
  AdamW of(f.ps, kOpt);
  AdamWOptions with = kOpt;
  with.fp32_masters = true;
  AdamW oh(h.ps, with), osr(sr.ps, kOpt);
  EXPECT_TRUE(oh.keeps_masters());
  EXPECT_FALSE(osr.keeps_masters());
  EXPECT_FALSE(of.keeps_masters());               // (fp32 values need none)
  EXPECT_FALSE(master_of(oh, h.base).defined());  // (frozen: no slot)
  // The moments and a master per adapter element: 12 bytes each, against 8.
  EXPECT_GE(oh.state_bytes(), osr.state_bytes() + 4 * (8 * 24 + 8 * 32 + 32));
  for (int step = 1; step <= 6; ++step) {
    for (LoraSet* s : {&f, &h, &sr}) s->grads(100 + step);
    of.step(1e-2);
    oh.step(1e-2);
    osr.step(1e-2);
  }
  int sr_differs = 0;
  for (auto [pf, ph, ps] :
       {std::tuple{f.a, h.a, sr.a}, {f.b, h.b, sr.b}, {f.bias, h.bias, sr.bias}}) {
    EXPECT_EQ(bf16_of(*ph), bf16_of(*pf)) << ph->name << ": the values are fp32 masters' copies";
    const Tensor& w = master_of(oh, ph);
    ASSERT_TRUE(w.defined()) << ph->name;
    EXPECT_EQ(std::memcmp(w.raw(), pf->value.raw(), pf->value.nbytes()), 0)
        << ph->name << ": the masters are the fp32 master weights";
    sr_differs += bf16_of(*ps) != bf16_of(*pf);
  }
  EXPECT_EQ(bf16_of(*h.base), base0) << "the frozen weight never moves";
  // Without masters each update rounds stochastically: the values leave fp32 masters' copies.
  EXPECT_EQ(sr_differs, 3);
}

// A load writes some adapter values between steps: their masters take them up (widened), the
// other elements keep their masters; training then goes on as fp32 master weights given the same
// values would.
TEST(AdamWMasters, ValuesWrittenElsewhereAreTakenUp) {
  LoraSet f, h;
  h.ps.use_bf16_master();
  AdamWOptions with = kOpt;
  with.fp32_masters = true;
  AdamW of(f.ps, kOpt), oh(h.ps, with);
  for (int step = 1; step <= 3; ++step) {
    f.grads(7 + step);
    h.grads(7 + step);
    of.step(1e-2);
    oh.step(1e-2);
  }
  // Every other element of lora_a rewritten (as a load would): in bf16 for h, widened for f.
  Rng rng(11);
  for (int64_t i = 0; i < h.a->shape.numel(); i += 2) {
    const uint16_t x = fp32_to_bf16(static_cast<float>(rng.normal()));
    h.a->value.bf16_data()[i] = x;
    f.a->value.data<float>()[i] = bf16_to_fp32(x);
  }
  f.ps.invalidate_bf16();
  f.ps.sync_bf16();
  for (int step = 4; step <= 6; ++step) {
    f.grads(7 + step);
    h.grads(7 + step);
    of.step(1e-2);
    oh.step(1e-2);
  }
  for (auto [pf, ph] : {std::pair{f.a, h.a}, {f.b, h.b}, {f.bias, h.bias}}) {
    EXPECT_EQ(bf16_of(*ph), bf16_of(*pf)) << ph->name;
    const Tensor& w = master_of(oh, ph);
    EXPECT_EQ(std::memcmp(w.raw(), pf->value.raw(), pf->value.nbytes()), 0) << ph->name;
  }
}

TEST(AdamWMasters, KeepMasterWidensOnlyWhereTheValueDisagrees) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // master, value (bf16 of), expected master afterwards
  const float one_up = std::nextafter(1.0f, 2.0f);  // rounds to 1
  const std::vector<std::tuple<float, uint16_t, float>> cases = {
      {one_up, fp32_to_bf16(1.0f), one_up},  // rounds to the value: kept
      {one_up, fp32_to_bf16(2.0f), 2.0f},    // another value: widened
      {1e-40f, 0x0000, 1e-40f},              // a denormal rounds to +0 (ftz): kept
      {1e-40f, fp32_to_bf16(-3.5f), -3.5f},  //
      {nan, fp32_to_bf16(0.25f), 0.25f},     // NaN master, finite value: widened
      {-0.0f, 0x8000, -0.0f},                // signed zero kept
      {0.0f, 0x8000, -0.0f},                 // +0 does not round to -0
  };
  const int64_t n = static_cast<int64_t>(cases.size());
  Tensor w = Tensor::empty({n}, DType::kF32), v = Tensor::empty({n}, DType::kBF16);
  for (int64_t i = 0; i < n; ++i) {
    w.data<float>()[i] = std::get<0>(cases[i]);
    v.bf16_data()[i] = std::get<1>(cases[i]);
  }
  ops::keep_master(w, v);
  for (int64_t i = 0; i < n; ++i) {
    const float got = w.data<float>()[i], want = std::get<2>(cases[i]);
    EXPECT_EQ(std::memcmp(&got, &want, 4), 0) << "case " << i << ": " << got << " vs " << want;
  }
}

}  // namespace
}  // namespace lmforge
