#include "lmforge/nn/block.h"

#include <algorithm>
#include <tuple>
#include <vector>

#include "lmforge/core/stochastic_round.h"

namespace lmforge {

namespace {
// bf16 mixed precision (train.precision: bf16): the matmul weights have bf16 copies
// (ParamSet::enable_bf16), and attention may then run in bf16 as well (ops::attention_forward).
bool bf16_run(const Linear& l) { return l.weight->value_bf16.defined(); }

// The block's layers with LoRA adapters: their (in, out) and modules (ModelConfig::lora_pieces).
struct LoraLayer {
  int64_t in, out;
  std::vector<int64_t> pieces;
};
std::vector<LoraLayer> lora_layers(const ModelConfig& c) {
  std::vector<LoraLayer> out;
  for (const char* name : {"qkv", "proj", "fc", "down"}) {
    if (!c.lora_adapts(name)) continue;
    std::vector<int64_t> pieces = c.lora_pieces(name);
    int64_t o = 0;
    for (int64_t w : pieces) o += w;
    out.push_back({c.lora_in(name), o, std::move(pieces)});
  }
  return out;
}
// The widest input of a layer with adapters (LoRA's dropout scratch: rows of it), 0 without
// dropout.
int64_t lora_dropout_width(const ModelConfig& c) {
  int64_t w = 0;
  if (c.lora.dropout > 0)
    for (const LoraLayer& l : lora_layers(c)) w = std::max(w, l.in);
  return w;
}
// The adapters' scratch a block needs: the most columns of t (P r), and the most elements of a
// block-diagonal B expansion (P r OC, layers of several modules; 0: none).
std::pair<int64_t, int64_t> lora_scratch(const ModelConfig& c) {
  int64_t width = 0, expansion = 0;
  for (const LoraLayer& l : lora_layers(c)) {
    const auto P = static_cast<int64_t>(l.pieces.size());
    width = std::max(width, P * c.lora.rank);
    if (P > 1) expansion = std::max(expansion, P * c.lora.rank * l.out);
  }
  return {width, expansion};
}
}  // namespace

namespace {
Gate gate_of(const ModelConfig& c) { return c.mlp == "geglu" ? Gate::kGelu : Gate::kSilu; }
}  // namespace

void mlp_activation_forward(const ModelConfig& c, const Tensor& act, const Tensor& fc_out) {
  if (c.gated_mlp())
    ops::glu_forward(act, fc_out, gate_of(c));
  else
    ops::gelu_forward(act, fc_out);
}

void mlp_activation_backward(const ModelConfig& c, const Tensor& dfc, const Tensor& fc_out,
                             const Tensor& dact) {
  if (c.gated_mlp())
    ops::glu_backward(dfc, fc_out, dact, gate_of(c));
  else
    ops::gelu_backward(dfc, fc_out, dact);
}

std::pair<const Tensor*, const Tensor*> rope_of(const ModelConfig& c, const Positions& pos,
                                                int64_t layer) {
  if (c.local_rope(layer)) return {&pos.cos_local, &pos.sin_local};
  return {&pos.cos, &pos.sin};
}

void BlockScratch::plan(Arena& a, const ModelConfig& c, int64_t B, int64_t T,
                        DType matmul_output_dtype, bool bf16_attention_grads, int64_t row_shards) {
  int64_t C = c.n_embd, F = c.ffn();
  dnorm = a.alloc({B, T, C});
  B *= row_shards;  // attention's and the MLP's gradients: the group's rows
  // Attention's gradients in bf16 (written, not added to) only when asked and attention itself is
  // bf16 (not with q/k norms).
  const DType att = bf16_attention_grads && !c.qk_norm ? matmul_output_dtype : DType::kF32;
  dqkv = a.alloc({B, T, c.qkv_dim()}, att);
  if (c.qk_norm) dqkv_raw = a.alloc({B, T, c.qkv_dim()});
  datt = a.alloc({B, T, c.n_head * c.head_size()}, att);
  dfc = a.alloc({B, T, c.fc_width()}, matmul_output_dtype);
  dact = a.alloc({B, T, F});
  if (c.lora.on()) {
    const auto [width, expansion] = lora_scratch(c);
    dlora = a.alloc({B * T, width});
    if (expansion > 0) dlora_b = a.alloc({expansion});
    if (const int64_t w = lora_dropout_width(c); w > 0) dlora_x = a.alloc({B * T, w});
  }
}

void Block::declare(ParamSet& ps, const std::string& p, const ModelConfig& c, int64_t index) {
  cfg = c;
  layer = index;
  int64_t C = c.n_embd, F = c.ffn();
  bool rms = c.norm == "rmsnorm";
  // LoRA adapters' rank for a layer (0: none) and their scale.
  auto rank = [&](const char* layer) { return c.lora_adapts(layer) ? c.lora.rank : 0; };
  const double s = c.lora.on() ? c.lora.scale() : 0;
  norm1.declare(ps, p + ".norm1", C, rms, c.norm_eps, c.bias, c.norm_offset);
  qkv.declare(ps, p + ".attn.qkv", C, c.qkv_dim(), c.has_qkv_bias(), rank("qkv"), s,
              c.lora_pieces("qkv"), c.lora.dropout);
  if (c.qk_norm) {
    q_norm = ps.add(p + ".attn.q_norm.weight", {c.head_size()}, false);
    k_norm = ps.add(p + ".attn.k_norm.weight", {c.head_size()}, false);
  }
  proj.declare(ps, p + ".attn.proj", c.n_head * c.head_size(), C, c.bias, rank("proj"), s, {},
               c.lora.dropout);
  if (c.post_norms)
    post1.declare(ps, p + ".attn.post_norm", C, rms, c.norm_eps, c.bias, c.norm_offset);
  norm2.declare(ps, p + ".norm2", C, rms, c.norm_eps, c.bias, c.norm_offset);
  fc.declare(ps, p + ".mlp.fc", C, c.fc_width(), c.bias, rank("fc"), s, c.lora_pieces("fc"),
             c.lora.dropout);
  down.declare(ps, p + ".mlp.proj", F, C, c.bias, rank("down"), s, {}, c.lora.dropout);
  const int64_t q = c.n_head * c.head_size(), kv = c.kv_heads() * c.head_size();
  qkv.weight->row_blocks = {q, kv, kv};
  if (c.gated_mlp()) fc.weight->row_blocks = {F, F};
  if (c.post_norms)
    post2.declare(ps, p + ".mlp.post_norm", C, rms, c.norm_eps, c.bias, c.norm_offset);
}

Recompute parse_recompute(const std::string& s) {
  if (s == "none") return Recompute::kNone;
  if (s == "selective") return Recompute::kSelective;
  if (s == "full") return Recompute::kFull;
  fail("train.activation_checkpointing: expected none, selective or full, got \"{}\"", s);
}

void Block::recompute(const Acts& a, const Tensor& x, const Positions& pos, Recompute mode) const {
  if (mode == Recompute::kFull) {
    forward(a, x, pos);
  } else if (mode == Recompute::kSelective) {
    norm1.forward(a.n1_out, a.n1, x);
    norm2.forward(a.n2_out, a.n2, a.x_mid);
    mlp_activation_forward(cfg, a.act, a.fc_out);
  }
}

void Block::plan_shared(Arena& a, Acts& s, int64_t B, int64_t T, Recompute mode) const {
  int64_t C = cfg.n_embd;
  if (row_shards() > 1) {  // sequence parallelism's group-row buffers
    s.n_full = a.alloc({B * row_shards(), T, C}, matmul_input_dtype);
    s.full = a.alloc({B * row_shards(), T, C});
  }
  if (const int64_t expansion = lora_scratch(cfg).second; expansion > 0)
    s.lora_b_full = a.alloc({expansion}, matmul_weight_dtype);
  if (const int64_t w = lora_dropout_width(cfg); w > 0)
    s.lora_x = a.alloc({B * row_shards() * T, w});
  if (mode == Recompute::kFull) {
    plan(a, s, B, T, Recompute::kNone, &s);
    return;
  }
  // The residual branches are added to the stream right after the GEMMs that write them and are
  // not read in backward: one buffer serves att_proj and mlp_out in every block. Under post_norms
  // the branches are the norms' inputs, kept per block, and their outputs share one buffer.
  if (cfg.post_norms) {
    s.branch = a.alloc({B, T, C});
    s.att_proj = s.mlp_out = Tensor();  // (kept per block: none from an earlier plan)
  } else
    s.att_proj = s.mlp_out = a.alloc({B, T, C}, matmul_output_dtype);
  if (mode != Recompute::kSelective) return;
  s.n1_out = a.alloc({B, T, C}, matmul_input_dtype);
  s.n2_out = a.alloc({B, T, C}, matmul_input_dtype);
  s.act = a.alloc({B * row_shards(), T, cfg.ffn()}, matmul_input_dtype);
}

void Block::plan(Arena& a, Acts& x, int64_t B, int64_t T, Recompute mode,
                 const Acts* shared) const {
  int64_t C = cfg.n_embd, F = cfg.ffn(), NH = cfg.n_head;
  if (mode == Recompute::kFull) {
    x = *shared;
    x.x_out = a.alloc({B, T, C});
    return;
  }
  if (shared) {  // sequence parallelism's group-row buffers, LoRA's B (see plan_shared)
    x.n_full = shared->n_full;
    x.full = shared->full;
    x.lora_b_full = shared->lora_b_full;
    x.lora_x = shared->lora_x;
    x.branch = shared->branch;
  } else {
    if (const int64_t expansion = lora_scratch(cfg).second; expansion > 0)
      x.lora_b_full = a.alloc({expansion}, matmul_weight_dtype);
    if (const int64_t w = lora_dropout_width(cfg); w > 0)
      x.lora_x = a.alloc({B * row_shards() * T, w});
  }
  // Sequence parallelism: attention and the MLP run on the group's rows.
  const int64_t G = B * row_shards();
  // kSelective: what recompute() rebuilds is shared; the rest (matmul outputs, attention's
  // output and logsumexp) is kept. In either mode the residual branches are shared (see
  // plan_shared).
  const bool sel = mode == Recompute::kSelective;
  auto keep = [&](Tensor Acts::*field, Shape shape) {
    const bool mm_in = field == &Acts::n1_out || field == &Acts::n2_out || field == &Acts::act;
    const bool attn = field == &Acts::qkv || field == &Acts::att;
    const bool mm_out =
        field == &Acts::att_proj || field == &Acts::fc_out || field == &Acts::mlp_out;
    const bool branch = field == &Acts::att_proj || field == &Acts::mlp_out;
    const DType dt = mm_in                      ? matmul_input_dtype
                     : attn                     ? attention_dtype()
                     : branch && cfg.post_norms ? DType::kF32  // (a norm's input)
                     : mm_out                   ? matmul_output_dtype
                                                : DType::kF32;
    x.*field = (sel && mm_in) || (branch && shared && shared->att_proj.defined() && shared != &x)
                   ? shared->*field
                   : a.alloc(shape, dt);
  };
  norm1.plan(a, x.n1, B * T);
  norm2.plan(a, x.n2, B * T);
  if (cfg.post_norms) {
    post1.plan(a, x.p1, B * T);
    post2.plan(a, x.p2, B * T);
    if (!shared || shared == &x) x.branch = a.alloc({B, T, C});  // (else plan_shared's)
  }
  keep(&Acts::n1_out, {B, T, C});
  keep(&Acts::qkv, {G, T, cfg.qkv_dim()});
  if (cfg.qk_norm) {
    keep(&Acts::qkv_raw, {G, T, cfg.qkv_dim()});
    keep(&Acts::rstd_q, {G * T * NH});
    keep(&Acts::rstd_k, {G * T * cfg.kv_heads()});
  }
  keep(&Acts::lse, {G, NH, T});
  keep(&Acts::att, {G, T, NH * cfg.head_size()});
  keep(&Acts::att_proj, {B, T, C});
  keep(&Acts::x_mid, {B, T, C});
  keep(&Acts::n2_out, {B, T, C});
  keep(&Acts::fc_out, {G, T, cfg.fc_width()});
  keep(&Acts::act, {G, T, F});
  keep(&Acts::mlp_out, {B, T, C});
  keep(&Acts::x_out, {B, T, C});
  for (auto [l, t] : {std::pair{&qkv, &Acts::t_qkv},
                      {&proj, &Acts::t_proj},
                      {&fc, &Acts::t_fc},
                      {&down, &Acts::t_down}})
    if (l->has_lora()) x.*t = a.alloc({G * T, l->lora_width()});  // (x A^T: the group's rows)
}

LoraDropout Block::lora_drop(const Linear& l, const Tensor& x, const Tensor& g) const {
  if (!lora_dropping || !l.has_lora()) return {};
  const uint32_t which = &l == &qkv ? 1 : &l == &proj ? 2 : &l == &fc ? 3 : 4;
  return {hash32(lora_drop_key ^ (which * 0x9e3779b9u)), x, g};
}

void Block::forward(const Acts& a, const Tensor& x, const Positions& pos) const {
  int64_t NH = cfg.n_head, NKV = cfg.kv_heads();
  const bool sp = row_shards() > 1;  // sequence parallelism (see PartialSums)
  // A row-parallel layer's output `out` (a residual branch), summed over the ranks under tensor
  // parallelism (this rank's rows of the group's under sequence parallelism).
  auto row_forward = [&](const Linear& l, const Tensor& in, const Tensor& t, const Tensor& out) {
    if (sp) {
      l.forward(a.full, in, t, a.lora_b_full, lora_drop(l, a.lora_x));
      partial->sum_scatter(a.full, out);
    } else {
      l.forward(out, in, t, a.lora_b_full, lora_drop(l, a.lora_x));
      if (partial) partial->sum(out);
    }
  };
  norm1.forward(a.n1_out, a.n1, x);
  if (sp) partial->gather(a.n1_out, a.n_full);
  const Tensor& in1 = sp ? a.n_full : a.n1_out;
  if (cfg.qk_norm) {
    qkv.forward(a.qkv_raw, in1, a.t_qkv, a.lora_b_full, lora_drop(qkv, a.lora_x));
    ops::qk_norm_forward(a.qkv, a.rstd_q, a.rstd_k, a.qkv_raw, q_norm->fp32(), k_norm->fp32(), NH,
                         NKV, cfg.norm_eps, cfg.norm_offset);
  } else {
    qkv.forward(a.qkv, in1, a.t_qkv, a.lora_b_full, lora_drop(qkv, a.lora_x));
  }
  const auto [cos, sin] = rope_of(cfg, pos, layer);
  if (cos->defined()) ops::rope_forward(a.qkv, *cos, *sin, NH, NKV, 0, pos.ids);
  ops::attention_forward(a.att, a.lse, a.qkv, NH, NKV, cfg.window(layer), bf16_run(qkv),
                         pos.doc_start, cfg.attn_score());
  row_forward(proj, a.att, a.t_proj, a.att_proj);
  if (cfg.post_norms) post1.forward(a.branch, a.p1, a.att_proj);
  ops::add(a.x_mid, x, cfg.post_norms ? a.branch : a.att_proj);
  norm2.forward(a.n2_out, a.n2, a.x_mid);
  if (sp) partial->gather(a.n2_out, a.n_full);
  fc.forward(a.fc_out, sp ? a.n_full : a.n2_out, a.t_fc, a.lora_b_full, lora_drop(fc, a.lora_x));
  mlp_activation_forward(cfg, a.act, a.fc_out);
  row_forward(down, a.act, a.t_down, a.mlp_out);
  if (cfg.post_norms) post2.forward(a.branch, a.p2, a.mlp_out);
  ops::add(a.x_out, a.x_mid, cfg.post_norms ? a.branch : a.mlp_out);
}

void Block::backward(const Tensor& dres, const Tensor& x, const Acts& a, const BlockScratch& s,
                     const Positions& pos) const {
  int64_t NH = cfg.n_head, NKV = cfg.kv_heads();
  // Sequence parallelism (see PartialSums): the row-parallel layers' output gradients are the
  // group's rows (gathered into a.full), the column-parallel layers' input gradients partial sums
  // of them (in a.full, then summed into this rank's rows of s.dnorm), their inputs gathered
  // again into a.n_full.
  const bool sp = row_shards() > 1;
  // A column-parallel layer's backward into s.dnorm (written) from its input `in` (a norm's
  // output), summed over the ranks under tensor parallelism.
  auto column_backward = [&](const Linear& l, const Tensor& dout, const Tensor& in,
                             const Tensor& t) {
    if (sp) {
      partial->gather(in, a.n_full);
      l.backward(a.full, dout, a.n_full, t, s.dlora, false, a.lora_b_full, s.dlora_b,
                 lora_drop(l, a.lora_x, s.dlora_x));
      partial->sum_scatter(a.full, s.dnorm);
    } else {
      l.backward(s.dnorm, dout, in, t, s.dlora, false, a.lora_b_full, s.dlora_b,
                 lora_drop(l, a.lora_x, s.dlora_x));
      if (partial) partial->sum(s.dnorm);
    }
  };
  // A branch's output gradient: dres, or under post_norms its norm's input gradient (in s.dnorm,
  // consumed by the branch's last layer before its first layer writes s.dnorm again).
  auto branch_grad = [&](const Norm& post, const Tensor& in, const Norm::Saved& saved) {
    if (!cfg.post_norms) return dres;
    s.dnorm.zero_();
    post.backward(s.dnorm, dres, in, saved);
    return s.dnorm;
  };
  // MLP branch: x_out = x_mid + mlp(norm2(x_mid)); the residual passes dres through unchanged.
  // The scratch gradients dact and dnorm are written by their layer's backward (no zeroing).
  const Tensor dmlp = branch_grad(post2, a.mlp_out, a.p2);
  if (sp) partial->gather(dmlp, a.full);
  down.backward(s.dact, sp ? a.full : dmlp, a.act, a.t_down, s.dlora, false, {}, {},
                lora_drop(down, a.lora_x, s.dlora_x));
  if (s.dfc.dtype() != DType::kBF16) s.dfc.zero_();  // a bf16 one is written, not added to
  mlp_activation_backward(cfg, s.dfc, a.fc_out, s.dact);
  column_backward(fc, s.dfc, a.n2_out, a.t_fc);
  norm2.backward(dres, s.dnorm, a.x_mid, a.n2);  // dres is now d(x_mid)
  // Attention branch: x_mid = x + proj(att).
  if (s.datt.dtype() != DType::kBF16) s.datt.zero_();  // bf16 ones are written (see plan)
  const Tensor datt_proj = branch_grad(post1, a.att_proj, a.p1);
  if (sp) partial->gather(datt_proj, a.full);
  proj.backward(s.datt, sp ? a.full : datt_proj, a.att, a.t_proj, s.dlora, true, {}, {},
                lora_drop(proj, a.lora_x, s.dlora_x));
  if (s.dqkv.dtype() != DType::kBF16) s.dqkv.zero_();
  ops::attention_backward(s.dqkv, s.datt, a.qkv, a.att, a.lse, NH, NKV, cfg.window(layer),
                          bf16_run(qkv), pos.doc_start, cfg.attn_score());
  const auto [cos, sin] = rope_of(cfg, pos, layer);
  if (cos->defined()) ops::rope_backward(s.dqkv, *cos, *sin, NH, NKV, 0, pos.ids);
  if (cfg.qk_norm) {
    s.dqkv_raw.zero_();
    ops::qk_norm_backward(s.dqkv_raw, q_norm->frozen ? Tensor() : q_norm->grad,
                          k_norm->frozen ? Tensor() : k_norm->grad, s.dqkv, a.qkv_raw,
                          q_norm->fp32(), k_norm->fp32(), a.rstd_q, a.rstd_k, NH, NKV,
                          cfg.norm_offset);
  }
  column_backward(qkv, cfg.qk_norm ? s.dqkv_raw : s.dqkv, a.n1_out, a.t_qkv);
  norm1.backward(dres, s.dnorm, x, a.n1);  // dres is now d(x)
}

}  // namespace lmforge
