#include "lmforge/nn/transformer.h"

#include <cmath>

#include "lmforge/core/rng.h"
#include "lmforge/models/rope_table.h"

namespace lmforge {

Transformer::Transformer(const ModelConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  int64_t C = cfg_.n_embd, V = cfg_.vocab_size;
  // Registration order is the parameter order everywhere (init, optimizer, checkpoints).
  tok_emb_ = params_.add("tok_emb.weight", {V, C}, false);
  if (cfg_.pos == "learned") pos_emb_ = params_.add("pos_emb.weight", {cfg_.max_seq_len, C}, false);
  blocks_.resize(cfg_.n_layer);
  for (int64_t l = 0; l < cfg_.n_layer; ++l)
    blocks_[l].declare(params_, "blocks." + std::to_string(l), cfg_);
  norm_f_.declare(params_, "norm_f", C, cfg_.norm == "rmsnorm", cfg_.norm_eps, cfg_.bias);
  lm_head_ = cfg_.tie_embeddings ? tok_emb_ : params_.add("lm_head.weight", {V, C}, true);
  lm_head_->matmul = true;
  params_.finalize();
  if (cfg_.pos == "rope") {
    int64_t half = cfg_.head_size() / 2;
    rope_.cos = Tensor::empty({cfg_.max_seq_len, half}, DType::kF32);
    rope_.sin = Tensor::empty({cfg_.max_seq_len, half}, DType::kF32);
    rope_tables(cfg_, rope_.cos, rope_.sin);
  }
}

void Transformer::init_weights(uint64_t seed) {
  Rng rng(seed);
  const double std = cfg_.init_std, resid_std = std / std::sqrt(2.0 * cfg_.n_layer);
  for (Param& p : params_.params()) {
    float* w = p.value.data<float>();
    int64_t n = p.value.numel();
    bool is_norm = p.name.find("norm") != std::string::npos;
    bool is_bias = p.name.size() > 5 && p.name.ends_with(".bias");
    if (is_bias) {
      p.value.zero_();
    } else if (is_norm) {
      p.value.fill_(1.0);
    } else {
      bool resid = p.name.ends_with("attn.proj.weight") || p.name.ends_with("mlp.proj.weight");
      double s = resid ? resid_std : std;
      for (int64_t i = 0; i < n; ++i) w[i] = static_cast<float>(rng.normal() * s);
    }
  }
}

void Transformer::plan(int64_t B, int64_t T, Recompute recompute) {
  if (T > cfg_.max_seq_len)
    fail(
        "train.seq_len: {} exceeds model.max_seq_len={}; lower train.seq_len or raise "
        "model.max_seq_len",
        T, cfg_.max_seq_len);
  B_ = B;
  T_ = T;
  recompute_ = recompute;
  int64_t C = cfg_.n_embd, V = cfg_.vocab_size;
  block_acts_.assign(cfg_.n_layer, {});
  acts_ = Arena::planned([&](Arena& a) {
    tokens_ = a.alloc({B, T}, DType::kI32);
    targets_ = a.alloc({B, T}, DType::kI32);
    x0_ = a.alloc({B, T, C});
    blocks_[0].plan_shared(a, shared_acts_, B, T, recompute);
    for (int64_t l = 0; l < cfg_.n_layer; ++l)
      blocks_[l].plan(a, block_acts_[l], B, T, recompute, &shared_acts_);
    norm_f_.plan(a, nf_, B * T);
    nf_out_ = a.alloc({B, T, C});
    logits_ = a.alloc({B, T, V});
    losses_ = a.alloc({B, T});
    dres_ = a.alloc({B, T, C});
    dnf_ = a.alloc({B, T, C});
    scratch_.plan(a, cfg_, B, T);
  });
}

float Transformer::forward(const Tensor& tokens, const Tensor& targets, int32_t ignore_index) {
  LMF_CHECK(B_ > 0, "forward before plan()");
  LMF_CHECK(tokens.shape() == tokens_.shape(), "tokens {} but planned {}", tokens.shape().str(),
            tokens_.shape().str());
  tokens_.copy_from(tokens);
  have_targets_ = targets.defined();
  if (have_targets_) targets_.copy_from(targets);
  ignore_index_ = ignore_index;
  params_.sync_bf16();

  ops::embedding_forward(x0_, tokens_, tok_emb_->value, pos_emb_ ? pos_emb_->value : Tensor());
  const Tensor* x = &x0_;
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    blocks_[l].forward(block_acts_[l], *x, rope_);
    x = &block_acts_[l].x_out;
  }
  norm_f_.forward(nf_out_, nf_, *x);
  ops::linear_forward(logits_, nf_out_, lm_head_weight(), Tensor());
  if (!have_targets_) return 0.0f;
  target_count_ = 0;
  const int32_t* y = targets_.data<int32_t>();
  for (int64_t i = 0; i < targets_.numel(); ++i) target_count_ += y[i] != ignore_index_;
  return static_cast<float>(
      ops::softmax_xent_forward(losses_, logits_, targets_, ignore_index_, &mean_lse_sq_));
}

void Transformer::backward(double loss_scale) {
  LMF_CHECK(have_targets_, "backward() needs forward() with targets");
  double dloss = target_count_ ? loss_scale / static_cast<double>(target_count_) : 0.0;
  ops::softmax_xent_backward(logits_, logits_, targets_, dloss, ignore_index_, z_loss_);
  Tensor& dlogits = logits_;
  dnf_.zero_();
  ops::linear_backward(dnf_, lm_head_->grad, Tensor(), dlogits, nf_out_, lm_head_weight());
  const Tensor& x_last = cfg_.n_layer ? block_acts_.back().x_out : x0_;
  dres_.zero_();
  norm_f_.backward(dres_, dnf_, x_last, nf_);
  for (int64_t l = cfg_.n_layer - 1; l >= 0; --l) {
    const Tensor& x_in = l ? block_acts_[l - 1].x_out : x0_;
    blocks_[l].recompute(block_acts_[l], x_in, rope_, recompute_);
    blocks_[l].backward(dres_, x_in, block_acts_[l], scratch_, rope_);
  }
  ops::embedding_backward(tok_emb_->grad, pos_emb_ ? pos_emb_->grad : Tensor(), dres_, tokens_);
  have_targets_ = false;  // logits now hold dlogits
}

}  // namespace lmforge
