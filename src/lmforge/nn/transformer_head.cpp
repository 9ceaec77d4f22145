// The LM head and the loss (Transformer, nn/transformer.h): the chunked head with its fused
// cross-entropy (or distillation) forward and backward, over the whole vocabulary or this rank's
// part of it (tensor parallelism's vocabulary split), and a teacher's head logits.
#include <algorithm>
#include <vector>

#include "lmforge/backend/distill_stats.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {

Tensor Transformer::head_logits(int64_t r0, int64_t R) {
  LMF_CHECK(chunk_.defined() && R <= chunk_rows_, "head_logits: {} rows, planned chunks of {}", R,
            chunk_rows_);
  const Tensor h = vocab_parallel() && group_nf_.defined() ? group_nf_ : nf_out_;
  const int64_t C = cfg_.n_embd;
  const Tensor out = chunk_.slice(0, R);
  head_matmul(out, h.view({h.numel() / C, C}).slice(r0, R));
  return out;
}

void Transformer::head_matmul(const Tensor& logits, const Tensor& h) const {
  ops::linear_forward(logits, h, lm_head_weight(), Tensor());
  if (cfg_.logit_softcap > 0) ops::softcap_forward(logits, cfg_.logit_softcap);
}

Tensor Transformer::capped_grad(const Tensor& dl, int64_t R) const {
  return cfg_.logit_softcap > 0 ? dcap_.slice(0, R) : dl;
}

void Transformer::uncap_grad(const Tensor& dl, const Tensor& g, const Tensor& logits) const {
  if (cfg_.logit_softcap > 0) ops::softcap_backward(dl, g, logits, cfg_.logit_softcap);
}

void Transformer::plan_distillation() {
  const int64_t N = B_ * T_;
  if (kl_.defined() && kl_.numel() == N && kl_.device() == device()) return;
  // Once per plan: the rows' KL terms and with the vocabulary split the statistics (and the KL
  // terms of other ranks' rows under sequence parallelism). (The teacher's logits of a chunk are
  // in its own chunk buffer.)
  kl_ = Tensor::empty({N}, DType::kF32, device());
  const bool split = vocab_parallel();
  distill_stats_ =
      split ? Tensor::empty({chunk_rows_, kDistillStats}, DType::kF64, device()) : Tensor();
  all_distill_stats_ =
      split ? Tensor::empty({vocab_ranks_, chunk_rows_, kDistillStats}, DType::kF64, device())
            : Tensor();
  other_kl_ = split && group_nf_.defined() ? Tensor::empty({N}, DType::kF32, device()) : Tensor();
}

void Transformer::queue_head(bool has_targets, double dloss, bool training,
                             const Tensor& row_scale) {
  const int64_t N = B_ * T_, V = cfg_.vocab_size, C = cfg_.n_embd;
  if (!has_targets) {
    LMF_CHECK(!vocab_parallel(), "logits without targets from a share of the vocabulary");
    head_matmul(logits_, nf_out_);
    return;
  }
  if (vocab_parallel()) {
    LMF_CHECK(!keep_logits_, "kept logits with a share of the vocabulary");
    queue_head_vocab(training, dloss, row_scale);
    return;
  }
  if (training) dnf_.zero_();

  // The LM head and the loss, chunk by chunk; in training each chunk's logits turn into dlogits
  // in place and go straight into d(nf_out) and the LM head's gradient.
  Tensor h = nf_out_.view({N, C}), dh = training ? dnf_.view({N, C}) : Tensor(),
         yt = targets_.view({N}), loss_rows = losses_.view({N});
  Tensor all_logits = keep_logits_ ? logits_.view({N, V}) : Tensor();
  for (int64_t r0 = 0, c = 0; r0 < N; r0 += chunk_rows_, ++c) {
    const int64_t R = std::min(chunk_rows_, N - r0);
    // A GPU's chunk has padded rows (see plan): the GEMM and the loss take V of each.
    Tensor logits = keep_logits_ ? all_logits.slice(r0, R) : chunk_.slice(0, R);
    Tensor hr = h.slice(r0, R), yr = yt.slice(r0, R);
    head_matmul(logits, hr);
    if (!training) {
      ops::softmax_xent_rows(loss_rows.slice(r0, R), logits, yr, ignore_index_,
                             lse_sums_.slice(c, 1), V);
      continue;
    }
    // Training: the loss and dlogits in one pass, dlogits in place (fp32) or straight into bf16
    // for the bf16 matmuls.
    const Tensor dl = dlogits16_.defined() ? dlogits16_.slice(0, R) : logits;
    const Tensor g = capped_grad(dl, R);  // the loss's gradient (before the cap's, if any)
    if (distill_.teacher) {  // the teacher's logits of these rows, then the distillation loss
      plan_distillation();
      const Tensor tl = distill_.teacher->head_logits(r0, R);
      lse_sums_.slice(c, 1).zero_();  // no z-loss
      ops::softmax_distill_forward_backward(loss_rows.slice(r0, R), kl_.slice(r0, R), g, logits, tl,
                                            yr, ignore_index_, dloss, distill_.alpha,
                                            distill_.temperature, V);
    } else {
      ops::softmax_xent_forward_backward(loss_rows.slice(r0, R), lse_sums_.slice(c, 1), g, logits,
                                         yr, ignore_index_, dloss, z_loss_, V,
                                         row_scale.defined() ? row_scale.slice(r0, R) : Tensor());
    }
    uncap_grad(dl, g, logits);
    const bool train_head = !lm_head_->frozen;
    ops::linear_backward(dh.slice(r0, R), train_head ? lm_head_->grad : Tensor(), Tensor(), dl, hr,
                         lm_head_weight(), !train_head || lm_head_->accumulate_grad());
  }
}

void Transformer::queue_head_vocab(bool training, double dloss, Tensor row_scale) {
  // This rank's columns of the logits of the rows the loss needs: its own, or under sequence
  // parallelism the group's (P blocks of N rows, rank k's k-th), chunk by chunk; each chunk's row
  // statistics gathered over the group, then the loss and the gradient of these columns (the
  // losses and lse^2 sums of other ranks' rows go to scratch: each rank reports its own).
  const int64_t N = B_ * T_, C = cfg_.n_embd, V = cfg_.vocab_size;
  const int64_t P = group_tokens_.defined() ? row_shards() : 1, me = vocab_begin_ / V;
  Tensor h = nf_out_.view({N, C}), y = targets_.view({N});
  Tensor dh = training ? dnf_.view({N, C}) : Tensor();
  if (training) dnf_.zero_();
  std::vector<double> scales(P, dloss);  // each block's rows' loss scale (its rank's)
  if (P > 1) {
    vocab_sums_->gather(nf_out_, group_nf_);
    vocab_sums_->gather(as_words(targets_), as_words(group_targets_));
    h = group_nf_.view({P * N, C});
    y = group_targets_.view({P * N});
    if (training) {
      group_dnf_.zero_();
      dh = group_dnf_.view({P * N, C});
      // (a rank without targets of its own has scale 0; the others' rows need theirs)
      Tensor one = Tensor::empty({1}, DType::kF64);
      one.data<double>()[0] = dloss;
      scale_.copy_from(one);
      vocab_sums_->gather(as_words(scale_), as_words(group_scale_));
      const Tensor all =
          group_scale_.device() == Device::kCPU ? group_scale_ : group_scale_.to(Device::kCPU);
      for (int64_t k = 0; k < P; ++k) scales[k] = all.data<double>()[k];
      if (row_scale.defined()) {  // every rank's rows' weights (forward_backward_rows)
        LMF_CHECK(row_scale.numel() == N && group_row_scale_.numel() == P * N,
                  "per-row weights of {} rows for {} ranks' {}", row_scale.numel(), P, N);
        vocab_sums_->gather(row_scale, group_row_scale_);
        row_scale = group_row_scale_;
      }
    }
  }
  const bool train_head = !lm_head_->frozen;
  if (training && distill_.teacher) {
    const Transformer& t = *distill_.teacher;
    LMF_CHECK(t.config().vocab_size == V && t.vocab_parallel() && t.vocab_begin_ == vocab_begin_ &&
                  t.row_shards() == row_shards(),
              "distillation with columns [{}, {}) of the vocabulary over {} row shards: the "
              "teacher's must match",
              vocab_begin_, vocab_begin_ + V, row_shards());
    plan_distillation();
  }
  for (int64_t k = 0; k < P; ++k) {
    const bool own = P == 1 || k == me;
    const Tensor losses = own ? losses_.view({N}) : other_losses_,
                 lse = own ? lse_sums_ : other_lse_;
    for (int64_t r0 = 0, c = 0; r0 < N; r0 += chunk_rows_, ++c) {
      const int64_t R = std::min(chunk_rows_, N - r0), at = k * N + r0;
      const Tensor logits = chunk_.slice(0, R), hr = h.slice(at, R), yr = y.slice(at, R);
      head_matmul(logits, hr);
      const Tensor dl = !training              ? Tensor()
                        : dlogits16_.defined() ? dlogits16_.slice(0, R)
                                               : logits;
      const Tensor g = training ? capped_grad(dl, R) : Tensor();
      if (training && distill_.teacher) {
        // Distillation: this rank's columns of the teacher's logits of the same rows, both
        // models' statistics gathered, then the loss and these columns' gradient.
        const Tensor tl = distill_.teacher->head_logits(at, R);
        const int64_t S = kDistillStats;
        const Tensor mine = distill_stats_.slice(0, R),
                     all = all_distill_stats_.view({all_distill_stats_.numel()})
                               .slice(0, vocab_ranks_ * R * S);
        ops::softmax_distill_stats(mine, logits, tl, yr, ignore_index_, vocab_begin_, vocab_total_,
                                   distill_.temperature, V);
        vocab_sums_->gather(as_words(mine), as_words(all));
        lse.slice(c, 1).zero_();  // no z-loss
        ops::softmax_distill_parallel(losses.slice(r0, R), (own ? kl_ : other_kl_).slice(r0, R), g,
                                      logits, tl, yr, all, ignore_index_, scales[k], distill_.alpha,
                                      distill_.temperature, vocab_begin_, V);
      } else {
        const Tensor mine = stats_.slice(0, R),
                     all = all_stats_.view({all_stats_.numel()}).slice(0, vocab_ranks_ * R * 3);
        // (a GPU's chunk has padded rows: the loss takes V of each)
        ops::softmax_xent_stats(mine, logits, yr, ignore_index_, vocab_begin_, vocab_total_, V);
        vocab_sums_->gather(as_words(mine), as_words(all));  // (fp64 as pairs of words)
        ops::softmax_xent_parallel(losses.slice(r0, R), lse.slice(c, 1), g, logits, yr, all,
                                   ignore_index_, scales[k], z_loss_, vocab_begin_,
                                   row_scale.defined() ? row_scale.slice(at, R) : Tensor(), V);
        if (!training) continue;
      }
      uncap_grad(dl, g, logits);
      ops::linear_backward(dh.slice(at, R), train_head ? lm_head_->grad : Tensor(), Tensor(), dl,
                           hr, lm_head_weight(), !train_head || lm_head_->accumulate_grad());
    }
  }
  // Each rank's columns give part of every row's input gradient, as a row-parallel layer's.
  if (!training) return;
  if (P > 1)
    vocab_sums_->sum_scatter(group_dnf_, dnf_);
  else
    vocab_sums_->sum(dnf_);
}

void Transformer::set_vocab_parallel(const PartialSums* sums, int64_t begin, int64_t total,
                                     int64_t ranks, bool adds_positions) {
  LMF_CHECK(ranks == 1 || (sums && begin >= 0 && begin + cfg_.vocab_size <= total),
            "vocabulary parallelism: rows [{}, {}) of {}", begin, begin + cfg_.vocab_size, total);
  const bool planned_for = vocab_parallel() == (ranks > 1) && vocab_ranks_ == ranks;
  vocab_sums_ = ranks > 1 ? sums : nullptr;
  vocab_begin_ = ranks > 1 ? begin : 0;
  vocab_total_ = ranks > 1 ? total : 0;
  vocab_ranks_ = ranks;
  adds_positions_ = ranks == 1 || adds_positions;
  graph_ = {};
  if (B_ > 0 && !planned_for) plan(B_, T_, recompute_, keep_logits_);  // its statistics' buffers
}

float Transformer::read_loss() {
  // The loss (one reduction of the rows) and the chunks' lse^2 sums.
  const double sum = ops::sum(losses_);
  const Tensor lse = lse_sums_.device() == Device::kCPU ? lse_sums_ : lse_sums_.to(Device::kCPU);
  double lse_sq = 0;
  for (int64_t c = 0; c < lse.numel(); ++c) lse_sq += lse.data<double>()[c];
  mean_lse_sq_ = target_count_ ? lse_sq / static_cast<double>(target_count_) : 0.0;
  return target_count_ ? static_cast<float>(sum / static_cast<double>(target_count_)) : 0.0f;
}

}  // namespace lmforge
