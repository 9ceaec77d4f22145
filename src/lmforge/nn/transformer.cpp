#include "lmforge/nn/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/cudnn_attention.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/profile.h"
#include "lmforge/core/rng.h"
#include "lmforge/core/stochastic_round.h"
#include "lmforge/models/rope_table.h"

namespace lmforge {

Transformer::Transformer(const ModelConfig& cfg) : Transformer(cfg, std::nullopt) {}

Transformer::Transformer(const ModelConfig& cfg, std::optional<MeasureOnly> measure)
    : cfg_(cfg), measure_(measure) {
  cfg_.validate();
  // Its fp32 weights are written (initialized or loaded) by every user of the model; gradients and
  // optimizer state are training's to check (check_training_fits), and sharded runs never touch
  // most of them.
  if (!measure_)
    check_host_memory(4.0 * static_cast<double>(cfg_.num_params() + cfg_.lora_params()),
                      fmt::format("the model's fp32 weights ({:.0f}M parameters)",
                                  (cfg_.num_params() + cfg_.lora_params()) / 1e6),
                      "choose a smaller model");
  int64_t C = cfg_.n_embd, V = cfg_.vocab_size;
  // Registration order is the parameter order everywhere (init, optimizer, checkpoints).
  tok_emb_ = params_.add("tok_emb.weight", {V, C}, false);
  if (cfg_.pos == "learned") pos_emb_ = params_.add("pos_emb.weight", {cfg_.max_seq_len, C}, false);
  blocks_.resize(cfg_.n_layer);
  for (int64_t l = 0; l < cfg_.n_layer; ++l)
    blocks_[l].declare(params_, "blocks." + std::to_string(l), cfg_, l);
  norm_f_.declare(params_, "norm_f", C, cfg_.norm == "rmsnorm", cfg_.norm_eps, cfg_.bias,
                  cfg_.norm_offset);
  lm_head_ = cfg_.tie_embeddings ? tok_emb_ : params_.add("lm_head.weight", {V, C}, true);
  lm_head_->matmul = true;
  // LoRA: only the adapters train.
  if (cfg_.lora.on())
    for (Param& p : params_.params()) p.frozen = !is_lora_param(p.name);
  if (measure_)
    params_.finalize_layout();
  else
    params_.finalize();
  // Groups: the embeddings, each block ("blocks.<l>."), the rest.
  const auto& ps = params_.params();
  group_begin_.assign(cfg_.n_layer + 3, ps.size());
  group_begin_[0] = 0;
  for (size_t i = ps.size(); i-- > 0;) {
    const std::string& n = ps[i].name;
    if (n.starts_with("blocks.")) {
      int64_t l = std::stoll(n.substr(7, n.find('.', 7) - 7));
      group_begin_[l + 1] = i;
    } else if (!n.starts_with("tok_emb.") && !n.starts_with("pos_emb.")) {
      group_begin_[cfg_.n_layer + 1] = i;
    }
  }
  if (cfg_.n_layer == 0) group_begin_[1] = group_begin_[cfg_.n_layer + 1];
  if (cfg_.pos == "rope") {
    int64_t half = cfg_.head_size() / 2;
    positions_.cos = Tensor::empty({cfg_.max_seq_len, half}, DType::kF32);
    positions_.sin = Tensor::empty({cfg_.max_seq_len, half}, DType::kF32);
    rope_tables(cfg_, positions_.cos, positions_.sin);
    if (cfg_.rope_local_theta > 0) {
      positions_.cos_local = Tensor::empty({cfg_.max_seq_len, half}, DType::kF32);
      positions_.sin_local = Tensor::empty({cfg_.max_seq_len, half}, DType::kF32);
      rope_tables(cfg_, positions_.cos_local, positions_.sin_local, /*local=*/true);
    }
  }
}

bool is_lora_param(const std::string& name) {
  return name.ends_with(".lora_a") || name.ends_with(".lora_b");
}

namespace {
// LoRA's A matrices draw from their own stream (see for_init_values), PEFT's
// kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
Rng lora_stream(uint64_t seed) { return Rng(seed ^ 0x4c6f5241ull); }
float lora_a_value(Rng& rng, int64_t in) {
  return static_cast<float>((2.0 * rng.uniform() - 1.0) / std::sqrt(static_cast<double>(in)));
}
// Whether each row of a layer's lora_a (its modules' A's, stacked) belongs to an adapted module:
// the others start at 0 with their B, which keeps them at 0 (nn/linear.h).
std::vector<bool> lora_a_rows(const ModelConfig& c, const Param& a) {
  const std::vector<bool> on = c.lora_modules(lora_layer_of(a.name));
  std::vector<bool> rows;
  for (bool m : on) rows.insert(rows.end(), static_cast<size_t>(c.lora.rank), m);
  LMF_CHECK(static_cast<int64_t>(rows.size()) == a.shape[0], "{}: {} rows for {} modules", a.name,
            a.shape[0], on.size());
  return rows;
}
}  // namespace

// Calls fn(param, i, value) for every element of every parameter in order, drawing the random
// values from one stream (so a range of them comes out the same as from the whole). LoRA's A
// matrices draw from a second stream, so the other weights are those of the model without
// adapters; its B matrices start at 0.
template <typename Fn>
void Transformer::for_init_values(uint64_t seed, Fn&& fn) const {
  Rng rng(seed), lora_rng = lora_stream(seed);
  const double std = cfg_.init_std, resid_std = std / std::sqrt(2.0 * cfg_.n_layer);
  for (const Param& p : params_.params()) {
    const int64_t n = p.shape.numel();
    bool is_norm = p.name.find("norm") != std::string::npos;
    bool is_bias = p.name.size() > 5 && p.name.ends_with(".bias");
    if (p.name.ends_with(".lora_a")) {
      const std::vector<bool> rows = lora_a_rows(cfg_, p);
      for (int64_t i = 0; i < n; ++i) {
        const float v = lora_a_value(lora_rng, p.shape[1]);
        fn(p, i, rows[i / p.shape[1]] ? v : 0.0f);
      }
    } else if (p.name.ends_with(".lora_b")) {
      fn(p, -1, 0.0f);
    } else if (is_bias || is_norm) {
      // (a norm's scale starts at 1: its weight at 1 - norm_offset)
      fn(p, -1, is_bias ? 0.0f : static_cast<float>(1.0 - cfg_.norm_offset));
    } else {
      bool resid = p.name.ends_with("attn.proj.weight") || p.name.ends_with("mlp.proj.weight");
      double s = resid ? resid_std : std;
      for (int64_t i = 0; i < n; ++i) fn(p, i, static_cast<float>(rng.normal() * s));
    }
  }
}

void Transformer::init_weights(uint64_t seed) {
  params_.invalidate_bf16();
  if (device() == Device::kCPU && params_.bf16_master()) {
    // bf16 master weights on the host: each parameter's values rounded into place as they are
    // made (as use_bf16_master converts them: the same bits), never the whole model in fp32.
    params_.flat_values().zero_();  // (the alignment gaps)
    for_each_init_param(seed, [&](const Param& p, const float* values) {
      cpu::to_bf16(p.value.bf16_data(), values, p.shape.numel());
    });
    return;
  }
  if (device() != Device::kCPU) {  // made on the host, then copied in
    Tensor host = Tensor::zeros({params_.flat_size()}, DType::kF32);  // (alignment gaps: 0)
    for_each_init_param(seed, [&](const Param& p, const float* values) {
      std::copy(values, values + p.shape.numel(), host.data<float>() + params_.offset(p));
    });
    params_.assign_values(host);
    return;
  }
  for_init_values(seed, [](const Param& p, int64_t i, float v) {
    if (i < 0)
      p.value.fill_(v);
    else
      p.value.data<float>()[i] = v;
  });
}

void Transformer::init_adapters(uint64_t seed) {
  for_each_adapter_init(seed, [&](const Param& p, const float* values) {
    Tensor host = Tensor::empty(p.shape, DType::kF32);
    std::copy(values, values + p.shape.numel(), host.data<float>());
    if (p.value.dtype() == DType::kF32)
      p.value.copy_from(host);
    else
      ops::to_bf16(p.value, host.to(p.value.device()));
  });
  params_.invalidate_bf16();
}

void Transformer::for_each_adapter_init(uint64_t seed, const GiveValues& fn) const {
  Rng rng = lora_stream(seed);
  std::vector<float> values;
  for (const Param& p : params_.params()) {
    if (!is_lora_param(p.name)) continue;
    values.assign(static_cast<size_t>(p.shape.numel()), 0.0f);  // B = 0
    if (p.name.ends_with(".lora_a")) {
      const std::vector<bool> rows = lora_a_rows(cfg_, p);
      for (size_t i = 0; i < values.size(); ++i) {
        const float v = lora_a_value(rng, p.shape[1]);
        values[i] = rows[i / p.shape[1]] ? v : 0.0f;
      }
    }
    fn(p, values.data());
  }
}

void Transformer::for_each_init_param(uint64_t seed, const GiveValues& fn) const {
  std::vector<float> values;  // the parameter's so far
  for_init_values(seed, [&](const Param& p, int64_t i, float v) {
    const int64_t n = p.shape.numel();
    if (i <= 0) values.resize(static_cast<size_t>(n));  // a new parameter
    if (i < 0) std::fill(values.begin(), values.end(), v);
    if (i >= 0) values[static_cast<size_t>(i)] = v;
    if (i < 0 || i == n - 1) fn(p, values.data());
  });
}

void Transformer::to(Device device) {
  if (device == this->device()) return;
  params_.to(device);
  for (Tensor* t : {&positions_.cos, &positions_.sin, &positions_.cos_local, &positions_.sin_local})
    if (t->defined()) *t = t->to(device);
  // The activations are not moved: whoever trains or evaluates there plans for its (B, T), and
  // decode() (generation after a GPU run) needs none.
  graph_ = {};
  acts_ = Arena();  // and every view of it, so the memory goes
  block_acts_.clear();
  shared_acts_ = {};
  scratch_ = {};
  nf_ = {};
  noise_ = host_noise_ = Tensor();
  tokens_ = targets_ = pos_ids_ = doc_start_ = host_pos_ids_ = host_doc_start_ = x0_ = nf_out_ =
      logits_ = chunk_ = dlogits16_ = dcap_ = losses_ = lse_sums_ = dres_ = dnf_ = Tensor();
  row_scale_ = host_row_scale_ = group_row_scale_ = kl_ = stats_ = all_stats_ = distill_stats_ =
      all_distill_stats_ = other_kl_ = Tensor();
  group_tokens_ = group_targets_ = group_x0_ = group_nf_ = group_dnf_ = other_losses_ = other_lse_ =
      scale_ = group_scale_ = group_pos_ids_ = group_doc_start_ = Tensor();
  B_ = T_ = 0;
}

void Transformer::plan(int64_t B, int64_t T, Recompute recompute, bool keep_logits) {
  if (T > cfg_.max_seq_len)
    fail(
        "train.seq_len: {} exceeds model.max_seq_len={}; lower train.seq_len or raise "
        "model.max_seq_len",
        T, cfg_.max_seq_len);
  graph_ = {};  // its buffers are about to change
  B_ = B;
  T_ = T;
  recompute_ = recompute;
  keep_logits_ = keep_logits;
  int64_t C = cfg_.n_embd, V = cfg_.vocab_size;
  // Rows per LM-head chunk: at most about 256 MiB of fp32 logits (fewer, larger GEMMs: each chunk
  // reads the whole head and adds into its whole fp32 gradient; on the CPU at GPT-2 8x512, 4 chunks
  // of 1024 rows train 8% faster than 13 of 316 for 200 MiB more), at least 64 rows (the matmul
  // stays efficient), and the rows split evenly between the chunks: a short last chunk is a slow
  // GEMM that still reads the whole head (measured with bench train --profile-steps: GPT-2 at 4x64
  // in one chunk of 256 rows instead of 166 + 90, the LM head's matmuls 8-14% faster).
  // On a GPU, 512 MiB (Llama 3's 128256 columns: 1024-row chunks, not 512-row ones whose GEMMs
  // ran at 440-580 TFLOP/s on an H200) in rows a multiple of 64 (the GEMM tiles' M), the last
  // chunk shorter.
  const bool on_gpu = measure_ ? measure_->gpu : device() != Device::kCPU;
  // (Soft-capped logits keep their chunk's fp32 gradient beside it, dcap_, outside this budget:
  // halving the chunks to fit both in it cost gemma3-270m at 4x64 ~10% of its speed for 256 of
  // its 5400 MiB.)
  const int64_t chunk_bytes = int64_t{on_gpu ? 512 : 256} << 20;
  int64_t most = std::max<int64_t>(64, chunk_bytes / (4 * V));
  // LMFORGE_LOGITS_CHUNK_ROWS=n: at most n rows a chunk (tests: several chunks, a short last one)
  if (const char* e = std::getenv("LMFORGE_LOGITS_CHUNK_ROWS"); e && std::atoll(e) > 0)
    most = std::atoll(e);
  const int64_t N = B * T, chunks = (N + most - 1) / most;
  chunk_rows_ = (N + chunks - 1) / chunks;
  if (on_gpu && chunks > 1) chunk_rows_ = std::min(N, (chunk_rows_ + 63) / 64 * 64);
  block_acts_.assign(cfg_.n_layer, {});
  // bf16 activations where they only feed matmuls (Block::matmul_input_dtype; the final norm's
  // output feeds the LM head).
  const bool bf16_on = measure_ ? measure_->bf16 : bf16();
  const DType mm_in = bf16_on && bf16_acts_ ? DType::kBF16 : DType::kF32;
  // LoRA adds its adapters' products into the matmul outputs: those stay fp32.
  const DType mm_out =
      mm_in == DType::kBF16 && bf16_outs_ && !cfg_.lora.on() ? DType::kBF16 : DType::kF32;
  for (Block& b : blocks_) {
    b.matmul_input_dtype = mm_in;
    b.matmul_output_dtype = mm_out;
    b.matmul_weight_dtype = bf16_on ? DType::kBF16 : DType::kF32;
  }
  const auto layout = [&](Arena& a) {
    tokens_ = a.alloc({B, T}, DType::kI32);
    targets_ = a.alloc({B, T}, DType::kI32);
    pos_ids_ = a.alloc({B, T}, DType::kI32);
    doc_start_ = a.alloc({B, T}, DType::kI32);
    const bool sp = row_shards() > 1;
    group_pos_ids_ = sp ? a.alloc({row_shards() * B, T}, DType::kI32) : Tensor();
    group_doc_start_ = sp ? a.alloc({row_shards() * B, T}, DType::kI32) : Tensor();
    x0_ = a.alloc({B, T, C});
    blocks_[0].plan_shared(a, shared_acts_, B, T, recompute);
    for (int64_t l = 0; l < cfg_.n_layer; ++l)
      blocks_[l].plan(a, block_acts_[l], B, T, recompute, &shared_acts_);
    norm_f_.plan(a, nf_, B * T);
    nf_out_ = a.alloc({B, T, C}, mm_in);
    logits_ = keep_logits ? a.alloc({B, T, V}) : Tensor();
    // bf16: the loss's backward writes dlogits rounded to bf16 for the LM head's matmuls
    // (rows padded to 16 bytes on a GPU, for its fast GEMM kernels), no fp32 dlogits pass.
    // There the fp32 logits' rows are padded to 16 bytes too (GPT-2's 50257 columns would
    // leave the LM head's forward GEMM 4-byte aligned rows: Hopper's TMA kernels need 16).
    const bool gpu = on_gpu;
    const bool bf16_dlogits = !keep_logits && mm_in == DType::kBF16;
    dlogits16_ = bf16_dlogits && !forward_only_
                     ? a.alloc({chunk_rows_, gpu ? (V + 7) / 8 * 8 : V}, DType::kBF16)
                     : Tensor();
    // (Soft-capped logits keep unpadded rows: the cap's backward reads them beside dcap_.)
    const bool capped = cfg_.logit_softcap > 0;
    chunk_ = keep_logits
                 ? Tensor()
                 : a.alloc({chunk_rows_, gpu && bf16_dlogits && !capped ? (V + 3) / 4 * 4 : V});
    dcap_ = capped && !forward_only_ ? a.alloc({chunk_rows_, V}) : Tensor();
    losses_ = a.alloc({B, T});
    lse_sums_ = a.alloc({(B * T + chunk_rows_ - 1) / chunk_rows_}, DType::kF64);
    stats_ = vocab_parallel() ? a.alloc({chunk_rows_, 3}, DType::kF64) : Tensor();
    all_stats_ = vocab_parallel() ? a.alloc({vocab_ranks_, chunk_rows_, 3}, DType::kF64) : Tensor();
    const int64_t group = vocab_parallel() ? row_shards() : 1;  // sequence parallelism's ranks
    group_tokens_ = group_targets_ = group_x0_ = group_nf_ = group_dnf_ = other_losses_ =
        other_lse_ = scale_ = group_scale_ = Tensor();
    if (group > 1) {
      scale_ = a.alloc({1}, DType::kF64);
      group_scale_ = a.alloc({group}, DType::kF64);
      group_tokens_ = a.alloc({group * B, T}, DType::kI32);
      group_targets_ = a.alloc({group * B, T}, DType::kI32);
      group_x0_ = a.alloc({group * B, T, C});
      group_nf_ = a.alloc({group * B, T, C}, mm_in);
      other_losses_ = a.alloc({B * T});
      other_lse_ = a.alloc({(B * T + chunk_rows_ - 1) / chunk_rows_}, DType::kF64);
      if (!forward_only_) group_dnf_ = a.alloc({group * B, T, C});
    }
    if (forward_only_) {  // no backward
      dres_ = dnf_ = Tensor();
      scratch_ = {};
      return;
    }
    dres_ = a.alloc({B, T, C});
    dnf_ = a.alloc({B, T, C});
    const bool att_grads = bf16_att_grads_ >= 0 ? bf16_att_grads_ == 1
                           : measure_ ? measure_->gpu && bf16_on && cfg_.sliding_window == 0 &&
                                            cfg_.head_size() <= 128 &&
                                            cfg_.attn_score().plain(cfg_.head_size())
                                      : cudnn_attention_for(B * row_shards(), T);
    scratch_.plan(a, cfg_, B, T, mm_out, att_grads, row_shards());
  };
  if (measure_) {  // the bytes alone
    Arena bytes = Arena::measuring();
    layout(bytes);
    measured_acts_ = bytes.used();
    return;
  }
  acts_ = Arena::planned(layout, device());
  if (device() != Device::kCPU) {
    host_pos_ids_ = Tensor::empty({B, T}, DType::kI32);
    host_doc_start_ = Tensor::empty({B, T}, DType::kI32);
  }
  positions_.ids = positions_.doc_start = Tensor();
  // (sized for the old (B, T))
  row_scale_ = host_row_scale_ = group_row_scale_ = kl_ = distill_stats_ = all_distill_stats_ =
      other_kl_ = Tensor();
}

bool Transformer::cudnn_attention_for(int64_t B, int64_t T) const {
#ifdef LMFORGE_HAVE_CUDA
  return device() == Device::kCUDA && cfg_.attn_score().plain(cfg_.head_size()) &&
         cuda::cudnn_attention_takes(B, T, cfg_.n_head, cfg_.kv_heads(), cfg_.head_size(),
                                     cfg_.sliding_window);
#else
  (void)B, (void)T;
  return false;
#endif
}

float Transformer::forward(const Tensor& tokens, const Tensor& targets, int32_t ignore_index,
                           const Tensor& doc_ids) {
  const double dloss = stage(tokens, targets, ignore_index, nullptr, doc_ids);
  queue_forward(targets.defined(), dloss);
  return targets.defined() ? read_loss() : 0.0f;
}

float Transformer::forward_backward(const Tensor& tokens, const Tensor& targets, double loss_scale,
                                    int32_t ignore_index, const Tensor& doc_ids) {
  LMF_CHECK(targets.defined(), "forward_backward needs targets");
  LMF_CHECK(!adapters_off_, "training with the LoRA adapters off");
  LMF_CHECK(!forward_only_, "training a model planned for forwards only");
  const double dloss = stage(tokens, targets, ignore_index, &loss_scale, doc_ids);
  stage_noise();
  if (distill_.teacher) distill_.teacher->forward_hidden(tokens, doc_ids);
  run_step(dloss);
  const float loss = read_loss();  // after the backward is queued: the step's one wait for the GPU
  mean_kl_ =
      distill_.teacher && target_count_ ? ops::sum(kl_) / static_cast<double>(target_count_) : 0.0;
  return loss;
}

void Transformer::stage_documents(const Tensor& doc_ids) {
  positions_.ids = positions_.doc_start = Tensor();
  // (sequence parallelism with packed rows: every rank of the group gathers, so every one stages)
  const bool sp = group_pos_ids_.defined() && packed_rows_;
  LMF_CHECK(doc_ids.defined() || !sp, "sequence parallelism with packed rows: no document ids");
  if (!doc_ids.defined()) return;
  LMF_CHECK(doc_ids.shape() == tokens_.shape() && doc_ids.dtype() == DType::kI32 &&
                doc_ids.device() == Device::kCPU,
            "doc_ids {} but planned {} (int32, on the host)", doc_ids.shape().str(),
            tokens_.shape().str());
  const int32_t* d = doc_ids.data<int32_t>();
  // One document per row (padding after it aside: nothing real attends to it) is the plain case.
  // Under sequence parallelism the group's rows are gathered whether or not this rank's are packed
  // (every rank takes part; plain rows' positions are those of unpacked ones).
  bool packed = sp;
  for (int64_t i = 0; i < B_ * T_ && !packed; ++i)
    packed = i % T_ && d[i] >= 0 && d[i - 1] >= 0 && d[i] != d[i - 1];
  if (!packed) return;
  LMF_CHECK(sp || !group_pos_ids_.defined(),
            "packed rows under sequence parallelism need set_packed_rows(true)");
  const bool host = device() == Device::kCPU;
  const Tensor& pos_t = host ? pos_ids_ : host_pos_ids_;
  const Tensor& ds_t = host ? doc_start_ : host_doc_start_;
  int32_t* pos = pos_t.data<int32_t>();
  int32_t* ds = ds_t.data<int32_t>();
  for (int64_t b = 0; b < B_; ++b)
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t i = b * T_ + t;
      // A new document at a row's start, where the id changes, and at each padding token (which
      // sees only itself).
      const bool start = t == 0 || d[i] < 0 || d[i] != d[i - 1];
      ds[i] = start ? static_cast<int32_t>(t) : ds[i - 1];
      pos[i] = static_cast<int32_t>(t) - ds[i];
    }
  if (!host) {
    pos_ids_.copy_from(host_pos_ids_);
    doc_start_.copy_from(host_doc_start_);
  }
  positions_.ids = pos_ids_;
  positions_.doc_start = doc_start_;
  if (!sp) return;
  const PartialSums* group = blocks_[0].partial;
  group->gather(as_words(pos_ids_), as_words(group_pos_ids_));
  group->gather(as_words(doc_start_), as_words(group_doc_start_));
  positions_.ids = group_pos_ids_;
  positions_.doc_start = group_doc_start_;
}

Tensor Transformer::own_position_ids() const {
  return positions_.ids.defined() ? pos_ids_ : Tensor();
}

void Transformer::stage_inputs(const Tensor& tokens, const Tensor& doc_ids) {
  LMF_CHECK(B_ > 0, "forward before plan()");
  LMF_CHECK(tokens.shape() == tokens_.shape(), "tokens {} but planned {}", tokens.shape().str(),
            tokens_.shape().str());
  tokens_.copy_from(tokens);
  stage_documents(doc_ids);
  hooks().before_forward(0);
  params_.sync_bf16();
}

double Transformer::stage(const Tensor& tokens, const Tensor& targets, int32_t ignore_index,
                          const double* loss_scale, const Tensor& doc_ids) {
  stage_inputs(tokens, doc_ids);
  ignore_index_ = ignore_index;
  if (!targets.defined()) {
    LMF_CHECK(keep_logits_, "forward without targets needs plan(B, T, ..., keep_logits=true)");
    return 0.0;
  }
  targets_.copy_from(targets);
  // Targets are counted on the host (the caller's tensor; read back only if it is on a GPU).
  const Tensor host_targets = targets.device() == Device::kCPU ? targets : targets.to(Device::kCPU);
  const int32_t* y = host_targets.data<int32_t>();
  target_count_ = 0;
  row_targets_.assign(B_, 0);
  for (int64_t i = 0; i < B_ * T_; ++i) row_targets_[i / T_] += y[i] != ignore_index;
  for (int64_t n : row_targets_) target_count_ += n;
  return loss_scale && target_count_ ? *loss_scale / static_cast<double>(target_count_) : 0.0;
}

void Transformer::forward_hidden(const Tensor& tokens, const Tensor& doc_ids) {
  stage_inputs(tokens, doc_ids);
  queue_trunk(/*training=*/false);
  // (a share of the vocabulary under sequence parallelism scores the group's rows)
  if (vocab_parallel() && group_nf_.defined()) vocab_sums_->gather(nf_out_, group_nf_);
}

void Transformer::row_logps(std::vector<double>& logp) const {
  const Tensor l = losses_.device() == Device::kCPU ? losses_ : losses_.to(Device::kCPU);
  const float* p = l.data<float>();  // 0 where the target is ignored
  logp.assign(B_, 0.0);
  for (int64_t i = 0; i < B_ * T_; ++i) logp[i / T_] -= p[i];
}

void Transformer::forward_backward_rows(const Tensor& tokens, const Tensor& targets,
                                        const RowWeigher& weigh, int32_t ignore_index,
                                        const Tensor& doc_ids) {
  LMF_CHECK(targets.defined(), "forward_backward_rows needs targets");
  LMF_CHECK(!adapters_off_, "training with the LoRA adapters off");
  LMF_CHECK(!forward_only_, "training a model planned for forwards only");
  LMF_CHECK(z_loss_ == 0, "a per-row objective with the z-loss");
  const double one = 1.0;
  stage(tokens, targets, ignore_index, &one, doc_ids);
  stage_noise();
  graph_.last_dloss = std::nan("");  // not captured: the weights change every call
  queue_trunk(/*training=*/true);
  queue_head(true, 0.0, /*training=*/false);  // the losses alone, for the weights
  std::vector<double> logp;
  row_logps(logp);
  std::vector<float> w(B_, 0.0f);
  weigh(logp, w);
  LMF_CHECK(static_cast<int64_t>(w.size()) == B_, "weigh gave {} weights for {} rows", w.size(),
            B_);
  if (!row_scale_.defined() || row_scale_.numel() != B_ * T_ || row_scale_.device() != device()) {
    row_scale_ = Tensor::empty({B_ * T_}, DType::kF32, device());  // once per plan
    host_row_scale_ = device() == Device::kCPU ? row_scale_ : Tensor::empty({B_ * T_}, DType::kF32);
    // (vocabulary and sequence parallelism: this rank's columns of the group's rows need theirs)
    if (group_tokens_.defined())
      group_row_scale_ = Tensor::empty({row_shards() * B_ * T_}, DType::kF32, device());
  }
  float* h = host_row_scale_.data<float>();
  for (int64_t i = 0; i < B_ * T_; ++i) h[i] = w[i / T_];
  if (device() != Device::kCPU) row_scale_.copy_from(host_row_scale_);
  queue_head(true, 1.0, /*training=*/true, row_scale_);
  backward_blocks();
  read_loss();  // the mean cross-entropy and lse^2 of the rows, as forward_backward
}

void Transformer::stage_noise() {
  if (neftune_alpha_ <= 0) return;
  if (!noise_.defined() || noise_.shape() != x0_.shape() || noise_.device() != device()) {
    noise_ = Tensor::empty(x0_.shape(), DType::kF32, device());  // once per plan
    host_noise_ = device() == Device::kCPU ? noise_ : Tensor::empty(x0_.shape(), DType::kF32);
  }
  const double bound = neftune_alpha_ / std::sqrt(static_cast<double>(T_ * cfg_.n_embd));
  Rng rng(neftune_key_ * 0xbf58476d1ce4e5b9ull + ++neftune_calls_);
  float* n = host_noise_.data<float>();
  for (int64_t i = 0; i < host_noise_.numel(); ++i)
    n[i] = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
  if (device() != Device::kCPU) noise_.copy_from(host_noise_);
}

void Transformer::queue_forward(bool has_targets, double dloss, bool training) {
  queue_trunk(training);
  queue_head(has_targets, dloss, training);
}

void Transformer::queue_trunk(bool training) {
  const bool positions = pos_emb_ && adds_positions_;
  if (group_tokens_.defined()) {
    // Vocabulary and sequence parallelism: the group's rows embedded from this rank's part of
    // the vocabulary (each token's row is one rank's), summed into each rank's own rows.
    vocab_sums_->gather(as_words(tokens_), as_words(group_tokens_));
    ops::embedding_forward(group_x0_, group_tokens_, tok_emb_->value,
                           positions ? pos_emb_->value : Tensor(), positions_.ids, vocab_begin_,
                           vocab_total_);  // (the group's position ids, when packed)
    vocab_sums_->sum_scatter(group_x0_, x0_);
  } else {
    ops::embedding_forward(x0_, tokens_, tok_emb_->value, positions ? pos_emb_->value : Tensor(),
                           own_position_ids(), vocab_begin_, vocab_total_);
    if (vocab_parallel()) vocab_sums_->sum(x0_);  // each token's row from the rank holding it
  }
  if (cfg_.embed_scale) ops::scale(x0_, embed_scale());  // Gemma (with rope: tokens alone)
  if (training && neftune_alpha_ > 0) ops::accumulate(x0_, noise_);  // NEFTune
  // LoRA's dropout: a mask for each training forward, drawn from (key, call, layer); the
  // blocks keep it for their backward (and recompute).
  const bool drop = training && cfg_.lora.on() && cfg_.lora.dropout > 0;
  const uint32_t call = drop ? sr_key(lora_drop_key_, ++lora_drop_calls_, 0) : 0;
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    blocks_[l].lora_dropping = drop;
    blocks_[l].lora_drop_key = drop ? hash32(call ^ static_cast<uint32_t>(l) * 0x85ebca6bu) : 0;
  }
  const Tensor* x = &x0_;
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    hooks().before_forward(l + 1);
    blocks_[l].forward(block_acts_[l], *x, positions_);
    x = &block_acts_[l].x_out;
  }
  hooks().before_forward(cfg_.n_layer + 1);
  norm_f_.forward(nf_out_, nf_, *x);
}

void Transformer::queue_step(double dloss) {
  queue_forward(true, dloss, /*training=*/true);
  backward_blocks();
}

void Transformer::run_step(double dloss) {
  if (!cuda_graphs_ || device() != Device::kCUDA || profile::enabled() || !hooks().graph_safe() ||
      tensor_parallel() || distill_.teacher) {
    queue_step(dloss);
    return;
  }
  // The graph replays the kernels exactly as captured: the same buffers (fixed by plan()), the
  // same loss scale (a kernel argument) and no device buffer freed since (a scratch buffer it
  // reads may have been regrown elsewhere). A call with a new scale runs eagerly, and captures
  // when the next call has the same one (pretraining: every call after the first).
  // Packed or not changes which kernels run (the document starts' buffers are fixed).
  const bool packed = positions_.doc_start.defined();
  const bool current = graph_.exec && graph_.dloss == dloss && graph_.ignore == ignore_index_ &&
                       graph_.packed == packed && graph_.frees == cuda::frees();
  if (current) {
    cuda::graph_launch(graph_.exec);
    ++graph_.launches;
  } else if (dloss == graph_.last_dloss && graph_.failures < 2) {
    graph_.reset();
    cuda::begin_capture();
    std::string why;
    try {
      queue_step(dloss);
    } catch (const Error& e) {
      why = e.what();  // the capture may be intact but is only part of the step: dropped below
    } catch (...) {
      cuda::graph_destroy(cuda::end_capture());  // the stream out of capture mode, then on
      throw;
    }
    graph_.exec = cuda::end_capture();
    if (graph_.exec && why.empty()) {
      graph_.dloss = dloss;
      graph_.ignore = ignore_index_;
      graph_.packed = packed;
      graph_.frees = cuda::frees();
      ++graph_.captures;
      cuda::graph_launch(graph_.exec);
      ++graph_.launches;
    } else {
      // Nothing of the capture ran: the step eagerly (an error repeats there, as without
      // graphs). Twice failed, graphs stay off.
      graph_.reset();
      if (++graph_.failures == 2)
        fmt::print(stderr,
                   "warning: train.cuda_graphs: the step could not be captured ({}); "
                   "running without CUDA graphs\n",
                   why.empty() ? "cudaStreamEndCapture failed" : why);
      queue_step(dloss);
    }
  } else {
    queue_step(dloss);
  }
  graph_.last_dloss = dloss;
}

void Transformer::set_partial_sums(const PartialSums* sums, bool adds_bias) {
  const int64_t shards = row_shards();
  for (Block& b : blocks_) {
    b.partial = sums;
    b.proj.bias_elsewhere = b.down.bias_elsewhere = sums && !adds_bias;
  }
  graph_ = {};
  if (B_ > 0 && row_shards() != shards) plan(B_, T_, recompute_, keep_logits_);
}

void Transformer::grads_ready(int64_t g) {
  // A gradient no GEMM wrote this step (ParamSet::zero_grad left it unwritten) is zero.
  for (size_t i = group_begin_[g]; i < group_begin_[g + 1]; ++i) params_.params()[i].settle_grad();
  hooks().grads_ready(g);
}

void Transformer::backward_blocks() {
  const Tensor& x_last = cfg_.n_layer ? block_acts_.back().x_out : x0_;
  dres_.zero_();
  norm_f_.backward(dres_, dnf_, x_last, nf_);
  grads_ready(cfg_.n_layer + 1);
  for (int64_t l = cfg_.n_layer - 1; l >= 0; --l) {
    const Tensor& x_in = l ? block_acts_[l - 1].x_out : x0_;
    hooks().before_backward(l + 1);
    blocks_[l].recompute(block_acts_[l], x_in, positions_, recompute_);
    blocks_[l].backward(dres_, x_in, block_acts_[l], scratch_, positions_);
    grads_ready(l + 1);
  }
  if (!tok_emb_->frozen) {    // LoRA freezes both tables
    tok_emb_->settle_grad();  // tied: the LM head's gradient is in it already
    if (cfg_.embed_scale) ops::scale(dres_, embed_scale());
    if (group_tokens_.defined()) {
      // Vocabulary and sequence parallelism: this rank's rows of the table from the group's
      // output gradients (gathered); the positions' from its own rows (summed over the group
      // after the step, as every replicated parameter its rows feed).
      vocab_sums_->gather(dres_, group_x0_);
      ops::embedding_backward(tok_emb_->grad, Tensor(), group_x0_, group_tokens_, {}, vocab_begin_,
                              vocab_total_);
      if (pos_emb_)
        ops::embedding_backward(Tensor(), pos_emb_->grad, dres_, tokens_, own_position_ids(), 0,
                                vocab_total_);
    } else {
      ops::embedding_backward(tok_emb_->grad, pos_emb_ ? pos_emb_->grad : Tensor(), dres_, tokens_,
                              own_position_ids(), vocab_begin_, vocab_total_);
    }
  }
  grads_ready(0);
}

Transformer::StepGraph& Transformer::StepGraph::operator=(const StepGraph&) {
  reset();
  failures = 0;
  last_dloss = std::nan("");
  return *this;
}

void Transformer::StepGraph::reset() {
  cuda::graph_destroy(exec);
  exec = nullptr;
}

}  // namespace lmforge
