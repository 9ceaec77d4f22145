// Inference through the same parameters with a KV cache: each call runs n new tokens (the
// prompt, then one at a time), appends their keys/values to the cache and returns the last
// token's logits. Buffers here are per call (generation is not a training step).
#include <cstring>
#include <type_traits>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {

KvCache Transformer::make_cache(int64_t max_len) const {
  if (max_len > cfg_.max_seq_len)
    fail("generate: {} positions exceed model.max_seq_len={}; lower --max-tokens or the prompt",
         max_len, cfg_.max_seq_len);
  KvCache c;
  c.max_len = max_len;
  const DType dt = bf16() ? DType::kBF16 : DType::kF32;
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    c.k.push_back(Tensor::empty({cfg_.kv_heads(), max_len, cfg_.head_size()}, dt));
    c.v.push_back(Tensor::empty({cfg_.kv_heads(), max_len, cfg_.head_size()}, dt));
  }
  return c;
}

Tensor Transformer::decode(KvCache& cache, const int32_t* tokens, int64_t n, int64_t pos0) {
  LMF_CHECK(device() == Device::kCPU, "decode runs on the CPU: call to(Device::kCPU) first");
  params_.sync_bf16();
  LMF_CHECK(n > 0 && pos0 + n <= cache.max_len, "decode: n={} pos0={} cache {}", n, pos0,
            cache.max_len);
  const int64_t C = cfg_.n_embd, NH = cfg_.n_head, NKV = cfg_.kv_heads(), HS = cfg_.head_size();
  const int64_t Cq = cfg_.qkv_dim(), F = cfg_.ffn();
  const bool swiglu = cfg_.mlp == "swiglu";
  Tensor tok = Tensor::empty({1, n}, DType::kI32);
  std::memcpy(tok.raw(), tokens, n * sizeof(int32_t));
  Tensor x = Tensor::empty({1, n, C}, DType::kF32), x_mid = Tensor::empty({1, n, C}, DType::kF32);
  Tensor h = Tensor::empty({1, n, C}, DType::kF32), o = Tensor::empty({1, n, C}, DType::kF32);
  Tensor qkv = Tensor::empty({1, n, Cq}, DType::kF32);
  Tensor att = Tensor::empty({1, n, NH * HS}, DType::kF32);
  Tensor fc = Tensor::empty({1, n, swiglu ? 2 * F : F}, DType::kF32);
  Tensor act = Tensor::empty({1, n, F}, DType::kF32);
  Tensor lse = Tensor::empty({1, NH, pos0 == 0 && n > 1 ? n : 1}, DType::kF32);
  Norm::Saved saved{Tensor::empty({n}, DType::kF32), Tensor::empty({n}, DType::kF32)};

  ops::embedding_forward(x, tok, tok_emb_->value,
                         pos_emb_ ? pos_emb_->value.slice(pos0, n) : Tensor());
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    const Block& b = blocks_[l];
    b.norm1.forward(h, saved, x);
    b.qkv.forward(qkv, h);
    if (cfg_.qk_norm) {
      Tensor raw = qkv.clone();
      Tensor rq = Tensor::empty({n * NH}, DType::kF32), rk = Tensor::empty({n * NKV}, DType::kF32);
      ops::qk_norm_forward(qkv, rq, rk, raw, b.q_norm->fp32(), b.k_norm->fp32(), NH, NKV,
                           cfg_.norm_eps);
    }
    if (positions_.cos.defined())
      ops::rope_forward(qkv, positions_.cos, positions_.sin, NH, NKV, pos0);
    float* q = qkv.data<float>();
    // This call's keys and values into the cache (rounded to bf16 in a bf16 cache), then
    // attention over it.
    auto attend = [&](auto* kc, auto* vc) {
      auto put = [](auto* dst, const float* src, int64_t len) {
        if constexpr (std::is_same_v<std::remove_pointer_t<decltype(dst)>, float>)
          std::memcpy(dst, src, len * sizeof(float));
        else
          cpu::to_bf16_serial(dst, src, len);
      };
      for (int64_t i = 0; i < n; ++i)
        for (int64_t kvh = 0; kvh < NKV; ++kvh) {
          put(kc + (kvh * cache.max_len + pos0 + i) * HS, q + i * Cq + (NH + kvh) * HS, HS);
          put(vc + (kvh * cache.max_len + pos0 + i) * HS, q + i * Cq + (NH + NKV + kvh) * HS, HS);
        }
      if (pos0 == 0 && n > 1)  // a whole prompt: the training forward's tiled attention
        ops::attention_forward(att, lse, qkv, NH, NKV, cfg_.sliding_window);
      else
        cpu::attention_decode(att.data<float>(), q, Cq, kc, vc, n, pos0, cache.max_len, NH, NKV, HS,
                              cfg_.sliding_window);
    };
    if (cache.k[l].dtype() == DType::kBF16)
      attend(cache.k[l].bf16_data(), cache.v[l].bf16_data());
    else
      attend(cache.k[l].data<float>(), cache.v[l].data<float>());
    b.proj.forward(o, att);
    ops::add(x_mid, x, o);
    b.norm2.forward(h, saved, x_mid);
    b.fc.forward(fc, h);
    if (swiglu)
      ops::swiglu_forward(act, fc);
    else
      ops::gelu_forward(act, fc);
    b.down.forward(o, act);
    ops::add(x, x_mid, o);
  }
  Tensor last = x.view({n, C}).slice(n - 1, 1);
  Tensor hl = Tensor::empty({1, C}, DType::kF32);
  Norm::Saved s1{Tensor::empty({1}, DType::kF32), Tensor::empty({1}, DType::kF32)};
  norm_f_.forward(hl, s1, last);
  Tensor logits = Tensor::empty({1, cfg_.vocab_size}, DType::kF32);
  ops::linear_forward(logits, hl, lm_head_weight(), Tensor());
  return logits.view({cfg_.vocab_size});
}

}  // namespace lmforge
