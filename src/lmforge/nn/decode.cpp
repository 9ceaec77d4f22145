// Inference through the same parameters with a KV cache: each call runs n new tokens (the
// prompt, then one at a time), appends their keys/values to the cache and returns the last
// token's logits. Several sequences (segments, each with its cache) run in one call share every
// matmul: a batch's decoding step reads the weights once. Buffers here are per call (generation
// is not a training step).
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
  const DecodeSegment seg{&cache, tokens, n, pos0};
  return decode({&seg, 1}).view({cfg_.vocab_size});
}

Tensor Transformer::decode(std::span<const DecodeSegment> segs) {
  LMF_CHECK(device() == Device::kCPU, "decode runs on the CPU: call to(Device::kCPU) first");
  params_.sync_bf16();
  cpu::keep_freed_heap();  // (this call's buffers: no fresh pages zeroed by the kernel each token)
  const int64_t S = static_cast<int64_t>(segs.size());
  int64_t n = 0;  // all segments' tokens: the rows of every matmul
  for (const DecodeSegment& g : segs) {
    LMF_CHECK(g.n > 0 && g.pos0 + g.n <= g.cache->max_len, "decode: n={} pos0={} cache {}", g.n,
              g.pos0, g.cache->max_len);
    n += g.n;
  }
  LMF_CHECK(S > 0, "decode: no segments");
  const int64_t C = cfg_.n_embd, NH = cfg_.n_head, NKV = cfg_.kv_heads(), HS = cfg_.head_size();
  const int64_t Cq = cfg_.qkv_dim(), F = cfg_.ffn();
  Tensor tok = Tensor::empty({n}, DType::kI32);
  Tensor x = Tensor::empty({1, n, C}, DType::kF32), x_mid = Tensor::empty({1, n, C}, DType::kF32);
  Tensor h = Tensor::empty({1, n, C}, DType::kF32), o = Tensor::empty({1, n, C}, DType::kF32);
  Tensor qkv = Tensor::empty({1, n, Cq}, DType::kF32);
  Tensor att = Tensor::empty({1, n, NH * HS}, DType::kF32);
  Tensor fc = Tensor::empty({1, n, cfg_.fc_width()}, DType::kF32);
  Tensor normed = cfg_.post_norms ? Tensor::empty({1, n, C}, DType::kF32) : Tensor();
  Tensor act = Tensor::empty({1, n, F}, DType::kF32);
  Tensor lse = Tensor::empty({NH * n}, DType::kF32);  // (a whole prompt's, unused after)
  Norm::Saved saved{Tensor::empty({n}, DType::kF32), Tensor::empty({n}, DType::kF32)};
  // Segment g's rows of a (1, n, D) activation, as (1, g.n, D).
  std::vector<int64_t> row0(S);
  for (int64_t g = 0, r = 0; g < S; r += segs[g].n, ++g) row0[g] = r;
  auto rows = [&](const Tensor& t, int64_t g) {
    const int64_t D = t.size(2);
    return t.view({n, D}).slice(row0[g], segs[g].n).view({1, segs[g].n, D});
  };

  for (int64_t g = 0; g < S; ++g) {
    std::memcpy(tok.data<int32_t>() + row0[g], segs[g].tokens, segs[g].n * sizeof(int32_t));
    ops::embedding_forward(rows(x, g), tok.slice(row0[g], segs[g].n).view({1, segs[g].n}),
                           tok_emb_->value,
                           pos_emb_ ? pos_emb_->value.slice(segs[g].pos0, segs[g].n) : Tensor());
  }
  if (cfg_.embed_scale) ops::scale(x, embed_scale());
  // A branch's output onto the stream: dst = src + (post_norms ? post(o) : o).
  auto add_branch = [&](const Tensor& dst, const Tensor& src, const Norm& post) {
    if (cfg_.post_norms) post.forward(normed, saved, o);
    ops::add(dst, src, cfg_.post_norms ? normed : o);
  };
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    const Block& b = blocks_[l];
    const auto [cos, sin] = rope_of(cfg_, positions_, l);
    const int64_t window = cfg_.window(l);
    b.norm1.forward(h, saved, x);
    b.qkv.forward(qkv, h);
    if (cfg_.qk_norm) {
      Tensor raw = qkv.clone();
      Tensor rq = Tensor::empty({n * NH}, DType::kF32), rk = Tensor::empty({n * NKV}, DType::kF32);
      ops::qk_norm_forward(qkv, rq, rk, raw, b.q_norm->fp32(), b.k_norm->fp32(), NH, NKV,
                           cfg_.norm_eps, cfg_.norm_offset);
    }
    for (int64_t g = 0; g < S; ++g) {
      const DecodeSegment& seg = segs[g];
      KvCache& cache = *seg.cache;
      const Tensor q_g = rows(qkv, g), att_g = rows(att, g);
      if (cos->defined()) ops::rope_forward(q_g, *cos, *sin, NH, NKV, seg.pos0);
      const float* q = q_g.data<float>();
      // The segment's keys and values into its cache (rounded to bf16 in a bf16 cache), then
      // attention over it.
      auto attend = [&](auto* kc, auto* vc) {
        auto put = [](auto* dst, const float* src, int64_t len) {
          if constexpr (std::is_same_v<std::remove_pointer_t<decltype(dst)>, float>)
            std::memcpy(dst, src, len * sizeof(float));
          else
            cpu::to_bf16_serial(dst, src, len);
        };
        for (int64_t i = 0; i < seg.n; ++i)
          for (int64_t kvh = 0; kvh < NKV; ++kvh) {
            const int64_t at = (kvh * cache.max_len + seg.pos0 + i) * HS;
            put(kc + at, q + i * Cq + (NH + kvh) * HS, HS);
            put(vc + at, q + i * Cq + (NH + NKV + kvh) * HS, HS);
          }
        if (seg.pos0 == 0 && seg.n > 1)  // a whole prompt: the training forward's tiled attention
          ops::attention_forward(att_g, lse.slice(0, NH * seg.n).view({1, NH, seg.n}), q_g, NH, NKV,
                                 window, false, {}, cfg_.attn_score());
        else
          cpu::attention_decode(att_g.data<float>(), q, Cq, kc, vc, seg.n, seg.pos0, cache.max_len,
                                NH, NKV, HS, window, cfg_.attn_score());
      };
      if (cache.k[l].dtype() == DType::kBF16)
        attend(cache.k[l].bf16_data(), cache.v[l].bf16_data());
      else
        attend(cache.k[l].data<float>(), cache.v[l].data<float>());
    }
    b.proj.forward(o, att);
    add_branch(x_mid, x, b.post1);
    b.norm2.forward(h, saved, x_mid);
    b.fc.forward(fc, h);
    mlp_activation_forward(cfg_, act, fc);
    b.down.forward(o, act);
    add_branch(x, x_mid, b.post2);
  }
  // Each segment's last token: the final norm and the LM head over those S rows.
  Tensor last = Tensor::empty({S, C}, DType::kF32);
  for (int64_t g = 0; g < S; ++g)
    std::memcpy(last.data<float>() + g * C, x.data<float>() + (row0[g] + segs[g].n - 1) * C,
                C * sizeof(float));
  Tensor hl = Tensor::empty({S, C}, DType::kF32);
  Norm::Saved s1{Tensor::empty({S}, DType::kF32), Tensor::empty({S}, DType::kF32)};
  norm_f_.forward(hl, s1, last);
  Tensor logits = Tensor::empty({S, cfg_.vocab_size}, DType::kF32);
  head_matmul(logits, hl);
  return logits;
}

}  // namespace lmforge
