#include "lmforge/nn/block.h"

#include <omp.h>

namespace lmforge {

void BlockScratch::plan(Arena& a, const ModelConfig& c, int64_t B, int64_t T) {
  int64_t C = c.n_embd, F = c.ffn();
  dnorm = a.alloc({B, T, C});
  dqkv = a.alloc({B, T, c.qkv_dim()});
  if (c.qk_norm) dqkv_raw = a.alloc({B, T, c.qkv_dim()});
  datt = a.alloc({B, T, C});
  dfc = a.alloc({B, T, c.mlp == "swiglu" ? 2 * F : F});
  dact = a.alloc({B, T, F});
  attn = a.alloc({static_cast<int64_t>(omp_get_max_threads()), T, T});
}

void Block::declare(ParamSet& ps, const std::string& p, const ModelConfig& c) {
  cfg = c;
  int64_t C = c.n_embd, F = c.ffn();
  bool rms = c.norm == "rmsnorm";
  norm1.declare(ps, p + ".norm1", C, rms, c.norm_eps, c.bias);
  qkv.declare(ps, p + ".attn.qkv", C, c.qkv_dim(), c.has_qkv_bias());
  if (c.qk_norm) {
    q_norm = ps.add(p + ".attn.q_norm.weight", {c.head_size()}, false);
    k_norm = ps.add(p + ".attn.k_norm.weight", {c.head_size()}, false);
  }
  proj.declare(ps, p + ".attn.proj", c.n_head * c.head_size(), C, c.bias);
  norm2.declare(ps, p + ".norm2", C, rms, c.norm_eps, c.bias);
  fc.declare(ps, p + ".mlp.fc", C, c.mlp == "swiglu" ? 2 * F : F, c.bias);
  down.declare(ps, p + ".mlp.proj", F, C, c.bias);
}

void Block::plan(Arena& a, Acts& x, int64_t B, int64_t T) const {
  int64_t C = cfg.n_embd, F = cfg.ffn(), NH = cfg.n_head;
  norm1.plan(a, x.n1, B * T);
  norm2.plan(a, x.n2, B * T);
  x.n1_out = a.alloc({B, T, C});
  x.qkv = a.alloc({B, T, cfg.qkv_dim()});
  if (cfg.qk_norm) {
    x.qkv_raw = a.alloc({B, T, cfg.qkv_dim()});
    x.rstd_q = a.alloc({B * T * NH});
    x.rstd_k = a.alloc({B * T * cfg.kv_heads()});
  }
  x.probs = a.alloc({B, NH, T, T});
  x.att = a.alloc({B, T, NH * cfg.head_size()});
  x.att_proj = a.alloc({B, T, C});
  x.x_mid = a.alloc({B, T, C});
  x.n2_out = a.alloc({B, T, C});
  x.fc_out = a.alloc({B, T, cfg.mlp == "swiglu" ? 2 * F : F});
  x.act = a.alloc({B, T, F});
  x.mlp_out = a.alloc({B, T, C});
  x.x_out = a.alloc({B, T, C});
}

void Block::forward(const Acts& a, const Tensor& x, const RopeTables& rope) const {
  int64_t NH = cfg.n_head, NKV = cfg.kv_heads();
  norm1.forward(a.n1_out, a.n1, x);
  if (cfg.qk_norm) {
    qkv.forward(a.qkv_raw, a.n1_out);
    ops::qk_norm_forward(a.qkv, a.rstd_q, a.rstd_k, a.qkv_raw, q_norm->value, k_norm->value, NH,
                         NKV, cfg.norm_eps);
  } else {
    qkv.forward(a.qkv, a.n1_out);
  }
  if (rope.cos.defined()) ops::rope_forward(a.qkv, rope.cos, rope.sin, NH, NKV, 0);
  ops::attention_forward(a.att, a.probs, a.qkv, NH, NKV, cfg.sliding_window);
  proj.forward(a.att_proj, a.att);
  ops::add(a.x_mid, x, a.att_proj);
  norm2.forward(a.n2_out, a.n2, a.x_mid);
  fc.forward(a.fc_out, a.n2_out);
  if (cfg.mlp == "swiglu")
    ops::swiglu_forward(a.act, a.fc_out);
  else
    ops::gelu_forward(a.act, a.fc_out);
  down.forward(a.mlp_out, a.act);
  ops::add(a.x_out, a.x_mid, a.mlp_out);
}

void Block::backward(const Tensor& dres, const Tensor& x, const Acts& a, const BlockScratch& s,
                     const RopeTables& rope) const {
  int64_t NH = cfg.n_head, NKV = cfg.kv_heads();
  // MLP branch: x_out = x_mid + mlp(norm2(x_mid)); the residual passes dres through unchanged.
  s.dact.zero_();
  down.backward(s.dact, dres, a.act);
  s.dfc.zero_();
  if (cfg.mlp == "swiglu")
    ops::swiglu_backward(s.dfc, a.fc_out, s.dact);
  else
    ops::gelu_backward(s.dfc, a.fc_out, s.dact);
  s.dnorm.zero_();
  fc.backward(s.dnorm, s.dfc, a.n2_out);
  norm2.backward(dres, s.dnorm, a.x_mid, a.n2);  // dres is now d(x_mid)
  // Attention branch: x_mid = x + proj(att).
  s.datt.zero_();
  proj.backward(s.datt, dres, a.att);
  s.dqkv.zero_();
  ops::attention_backward(s.dqkv, s.attn, s.datt, a.qkv, a.probs, NH, NKV, cfg.sliding_window);
  if (rope.cos.defined()) ops::rope_backward(s.dqkv, rope.cos, rope.sin, NH, NKV, 0);
  s.dnorm.zero_();
  if (cfg.qk_norm) {
    s.dqkv_raw.zero_();
    ops::qk_norm_backward(s.dqkv_raw, q_norm->grad, k_norm->grad, s.dqkv, a.qkv_raw, q_norm->value,
                          k_norm->value, a.rstd_q, a.rstd_k, NH, NKV);
    qkv.backward(s.dnorm, s.dqkv_raw, a.n1_out);
  } else {
    qkv.backward(s.dnorm, s.dqkv, a.n1_out);
  }
  norm1.backward(dres, s.dnorm, x, a.n1);  // dres is now d(x)
}

}  // namespace lmforge
