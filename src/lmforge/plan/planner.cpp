#include "lmforge/plan/planner.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/error.h"
#include "lmforge/data/text_shards.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/dist/tensor_parallel.h"
#include "lmforge/nn/block.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/init_from.h"
#include "lmforge/train/objective.h"
#include "lmforge/train/trainer.h"

namespace lmforge {

namespace {
// The parameter groups DataParallel moves one at a time, in elements: embeddings, head, one block.
struct Groups {
  double embeddings, head, block, all, trained;
};
Groups groups(const ModelConfig& m) {
  Groups g;
  const double C = static_cast<double>(m.n_embd), V = static_cast<double>(m.vocab_size);
  g.all = static_cast<double>(m.num_params() + m.lora_params());
  g.trained = m.lora.on() ? static_cast<double>(m.lora_params()) : g.all;
  g.embeddings = V * C + (m.pos == "learned" ? static_cast<double>(m.max_seq_len) * C : 0);
  g.head = C * (m.norm == "layernorm" && m.bias ? 2 : 1) + (m.tie_embeddings ? 0 : V * C);
  g.block = m.n_layer > 0 ? (g.all - g.embeddings - g.head) / static_cast<double>(m.n_layer) : 0;
  return g;
}

// Muon's matrices (muon_param): their elements, the largest and the largest Gram matrix's; and
// the optimizer state of the rank holding the most when `shards` ranks split it (Muon's matrices
// keep one moment, the rest AdamW's two: the ranks' shares differ).
struct MuonSizes {
  double elements = 0, most = 0, gram = 0, state = 0;
};
MuonSizes muon_sizes(const ModelConfig& m, int shards = 1) {
  const Transformer layout(m, Transformer::MeasureOnly{});  // the parameters, nothing allocated
  const ParamSet& ps = layout.params();
  const dist::ShardLayout cut(ps.flat_size(), std::max(1, shards));
  std::vector<double> state(cut.ranks, 0.0);
  MuonSizes mu;
  for (const Param& p : ps.params()) {
    if (p.frozen) continue;
    const int64_t off = ps.offset(p);
    const std::vector<int64_t> pieces = cut.counts(off, off + p.shape.numel());
    for (int r = 0; r < cut.ranks; ++r)
      state[r] += static_cast<double>(pieces[r]) * (muon_param(p) ? 4 : 8);
    if (!muon_param(p)) continue;
    const double rows = static_cast<double>(p.shape[0]), cols = static_cast<double>(p.shape[1]);
    mu.elements += rows * cols;
    mu.most = std::max(mu.most, rows * cols);
    mu.gram = std::max(mu.gram, std::min(rows, cols) * std::min(rows, cols));
  }
  mu.state = *std::max_element(state.begin(), state.end());
  return mu;
}

// Under LoRA, the most adapter elements one of `shards` ranks holds of the flat space as
// ShardLayout cuts it (grad-/full-shard pack a shard's trained elements alone).
double most_trained_per_shard(const ModelConfig& m, int shards) {
  const Transformer layout(m, Transformer::MeasureOnly{});
  const ParamSet& ps = layout.params();
  const dist::ShardLayout cut(ps.flat_size(), std::max(1, shards));
  std::vector<double> held(cut.ranks, 0.0);
  for (const Param& p : ps.params()) {
    if (p.frozen) continue;
    const int64_t off = ps.offset(p);
    const std::vector<int64_t> pieces = cut.counts(off, off + p.shape.numel());
    for (int r = 0; r < cut.ranks; ++r) held[r] += static_cast<double>(pieces[r]);
  }
  return *std::max_element(held.begin(), held.end());
}

}  // namespace

TrainingFootprint training_footprint(const ModelConfig& m, const FootprintOptions& o) {
  using dist::Strategy;
  const Groups g = groups(m);
  const double workspace = g.embeddings + g.head + 2 * g.block;  // gather buffers alike
  const auto s = static_cast<Strategy>(o.strategy);
  const double n = std::max(1, o.shards);
  const double value_bytes = o.bf16_master ? 2 : 4;
  TrainingFootprint f;
  if (s >= Strategy::kFullShard) {
    f.values = g.all / n * value_bytes;
    f.gather = workspace * (4 + (o.bf16 ? 2 : 0));
  } else {
    f.values = g.all * value_bytes + (o.bf16 && !o.bf16_master ? g.all * 2 : 0);
  }
  if (s >= Strategy::kGradShard && m.lora.on()) {  // the adapters' alone: all in the blocks
    const double shard = most_trained_per_shard(m, o.shards);
    f.gradients = shard * 4 * (o.accumulates ? 2 : 1) +
                  2 * g.trained / static_cast<double>(std::max<int64_t>(1, m.n_layer)) * 4;
  } else {
    f.gradients = s >= Strategy::kGradShard
                      ? g.all / n * 4 * (o.accumulates ? 2 : 1) + workspace * 4
                      : g.trained * 4;
  }
  // AdamW's moments, and under bf16 master weights LoRA's adapters' fp32 masters
  // (AdamWOptions::fp32_masters)
  const double state_bytes = 8 + (o.bf16_master && m.lora.on() ? 4 : 0);
  // (sharded under LoRA: the rank holding the most adapters, as ShardLayout cuts the flat space)
  f.optimizer = s >= Strategy::kZero1 && m.lora.on()
                    ? most_trained_per_shard(m, o.shards) * state_bytes
                    : g.trained * state_bytes / (s >= Strategy::kZero1 ? n : 1);
  if (o.muon) {  // the most state a rank holds (all of it under no-shard), + the Newton-Schulz
                 // workspace (for whole matrices: the whole model's under tensor parallelism,
                 // with a share's direction beside them)
    const MuonSizes mu = muon_sizes(m, s >= Strategy::kZero1 ? o.shards : 1);
    ModelConfig whole = m;
    if (o.tensor_parallel > 1) {
      whole.head_dim = m.head_size();
      whole.n_head = m.n_head * o.tensor_parallel;
      whole.n_kv_head = m.kv_heads() * o.tensor_parallel;
      whole.ffn_hidden = m.ffn() * o.tensor_parallel;
    }
    const MuonSizes w = o.tensor_parallel > 1 ? muon_sizes(whole) : mu;
    // X, its next iterate, the Gram matrix and its polynomial in fp32 (X and the two Gram-sized
    // ones also in bf16 for bf16 products); under tensor parallelism a round's shares of the
    // direction (one per rank of the group), another rank's whole matrix, and the gather's
    // staging of the group's shares.
    f.optimizer = mu.state + 2 * (w.most + w.gram) * 4 +
                  (o.muon_bf16 ? (w.most + 2 * w.gram) * 2 : 0) +
                  (o.tensor_parallel > 1 ? 4 * (2 * o.tensor_parallel * mu.most + w.most) : 0);
  }
  if (o.reference) {  // (under full-shard sharded like the values, with gather buffers of its own)
    const ModelConfig& fm = o.frozen ? *o.frozen : m;
    const Groups gf = groups(fm);
    const bool bf16_values = o.bf16_master || o.frozen_bf16;
    f.reference =
        s >= Strategy::kFullShard
            ? gf.all / n * (bf16_values ? 2 : 4) +
                  (gf.embeddings + gf.head + 2 * gf.block) * (4 + (o.bf16 ? 2 : 0))
            : static_cast<double>(fm.num_params()) * (bf16_values ? 2 : 4 + (o.bf16 ? 2 : 0));
  }
  return f;
}

namespace {
std::string gib(double bytes) { return fmt::format("{:.2f}", bytes / 1073741824.0); }

std::string duration(double s) {
  if (s < 120) return fmt::format("{:.0f} s", s);
  if (s < 7200) return fmt::format("{:.1f} min", s / 60);
  if (s < 172800) return fmt::format("{:.1f} h", s / 3600);
  return fmt::format("{:.1f} days", s / 86400);
}
}  // namespace

double step_traffic_bytes(const ModelConfig& m, const FootprintOptions& o, int ranks,
                          int64_t grad_accum) {
  using dist::Strategy;
  const Groups g = groups(m);
  const auto s = static_cast<Strategy>(o.strategy);
  const double n = s == Strategy::kHybrid ? o.shards : ranks;
  if (n <= 1 && s != Strategy::kHybrid) return 0;
  const double k = (n - 1) / n, mb = static_cast<double>(grad_accum);
  const double grads = 4 * g.trained;                // fp32 gradients
  const double value_bytes = o.bf16_master ? 2 : 4;  // gathered values
  const double updates = value_bytes * g.trained;    // zero1/grad-shard's all-gather
  const double L = static_cast<double>(m.n_layer);
  const double edges = value_bytes * (g.embeddings + g.head);  // gathered once a step
  // Blocks gathered: the first micro-batch's forward all of them, each backward all but the last
  // two (still in the two buffers); a later micro-batch's forward all but the first two (left in
  // them by the backward before).
  const double inner = std::max(0.0, L - 2);
  const double blocks = value_bytes * g.block * (L + inner + (mb - 1) * 2 * inner);
  // Muon over shards: every matrix's update direction all-gathered (fp32) each step.
  const double muon = o.muon ? k * 4 * muon_sizes(m).elements : 0;
  double bytes = muon;
  // Forwards without a backward gather every block but those of the first two still in the
  // buffers from the forward before (its last two): the policy's (its first forward of a step
  // then takes the place of the training one's, as a later forward), and the reference's (a
  // frozen model: DataParallel keeps its edges from the first step on).
  auto kept = [](double layers) { return std::min({2.0, layers, std::max(0.0, 4.0 - layers)}); };
  const ModelConfig& fm = o.frozen ? *o.frozen : m;
  const double Lf = static_cast<double>(fm.n_layer);
  const double frozen_bytes = o.bf16_master || o.frozen_bf16 ? 2 : 4;
  const double forwards_only =
      mb * (value_bytes * g.block * (L - kept(L)) * o.policy_forwards +
            (o.reference ? frozen_bytes * groups(fm).block * (Lf - kept(Lf)) * o.reference_forwards
                         : 0));
  switch (s) {
    case Strategy::kNoShard:
      return 2 * k * grads;
    case Strategy::kZero1:
      return bytes + 2 * k * grads + k * updates;
    case Strategy::kGradShard:
      return bytes + mb * k * grads + k * updates;
    default:  // full-shard, and hybrid within a node
      bytes += mb * k * grads + k * (edges + blocks + forwards_only);
  }
  if (s == Strategy::kHybrid && ranks > n) {  // the node's shard all-reduced across the nodes
    const double nodes = ranks / n;
    bytes += 2 * (nodes - 1) / nodes * 4 * g.trained / n;
  }
  return bytes;
}

double tensor_parallel_traffic_bytes(const ModelConfig& m, int64_t batch, int64_t seq, int tp,
                                     int64_t grad_accum, const TensorParallelTraffic& o) {
  if (tp <= 1) return 0;
  const double L = static_cast<double>(m.n_layer), k = (tp - 1.0) / tp;
  const double elements = static_cast<double>(batch * seq * m.n_embd);  // a rank's (B, T, C)
  // Muon: each matrix's shares of the update direction all-gathered once a step (by the ranks
  // holding a piece of it under sharded data parallelism: about 1/data_shards of the matrices).
  // (each direction all-gathered, and broadcast orthogonalized from the rank that took it)
  const double muon = 4.0 * o.muon_elements * ((tp - 1.0) / tp + 1.0) / std::max(1, o.data_shards);
  if (!o.sequence_parallel) {
    const double forwards = 1.0 + static_cast<double>(o.extra_forwards);
    double sums = ((o.full_recompute ? 6.0 : 4.0) + 2.0 * (forwards - 1)) * L;
    double gathered = 0;  // the loss's row statistics
    if (o.vocab_parallel) {
      sums += forwards + 1;  // the embeddings' every forward, the head's input gradient once
      gathered = (forwards + (o.rows_weighed ? 1 : 0)) * static_cast<double>(batch * seq) *
                 (o.teacher ? 40.0 : 24.0) * (tp - 1);
    }
    // The teacher's forward: 2 sums a block (and its embeddings') of its own width.
    const double teacher =
        o.teacher ? (2.0 * static_cast<double>(o.teacher->n_layer) + (o.vocab_parallel ? 1 : 0)) *
                        4.0 * static_cast<double>(batch * seq * o.teacher->n_embd) * 2.0 * k
                  : 0.0;
    return static_cast<double>(grad_accum) *
               (sums * 4.0 * elements * 2.0 * k + gathered + teacher) +
           muon;
  }
  // Each collective moves the group's tp B rows: (tp - 1) of a rank's bytes.
  const double in = o.bf16_inputs ? 2.0 : 4.0, extra = static_cast<double>(o.extra_forwards);
  const double norm_gathers = o.full_recompute ? 6.0 : 4.0, fp32_ops = o.full_recompute ? 8.0 : 6.0;
  double per_micro = L * ((norm_gathers + 2.0 * extra) * in + (fp32_ops + 2.0 * extra) * 4.0) *
                     elements * (tp - 1);
  // The gradients of the parameters fed by a rank's own rows, all-reduced once a step.
  const Groups g = groups(m);
  const double norm = static_cast<double>(m.n_embd) * (m.norm == "layernorm" && m.bias ? 2 : 1);
  double rows_fed = g.embeddings + g.head + (m.post_norms ? 4.0 : 2.0) * L * norm;
  if (o.vocab_parallel) {
    // The group's rows embedded and scored by every rank: the tokens' and targets' gathers (4
    // bytes a row each), the embeddings' reduce-scatter, the final norm's outputs gathered, the
    // loss statistics (24 bytes a row of the group's) and the ranks' loss scales (8 bytes each),
    // and in backward the head's input gradient reduce-scattered and the output gradients
    // gathered for the embeddings'; which are no longer summed once a step (nor the head's).
    const double rows = static_cast<double>(batch * seq);
    per_micro +=
        (8.0 * rows + (4.0 + in + 8.0) * elements + (o.teacher ? 40.0 : 24.0) * tp * rows + 8.0) *
        (tp - 1);
    // An extra forward: its tokens and targets, embeddings, final norm and loss statistics. A
    // per-row objective's first pass of the head: the final norm's outputs, the targets and the
    // statistics again, and then the rows' weights (4 bytes a row's token).
    per_micro += extra * (8.0 * rows + (4.0 + in) * elements + 24.0 * tp * rows) * (tp - 1);
    if (o.rows_weighed) per_micro += (8.0 * rows + in * elements + 24.0 * tp * rows) * (tp - 1);
    rows_fed -= static_cast<double>(m.vocab_size * m.n_embd) * (m.tie_embeddings ? 1 : 2);
  }
  if (o.teacher) {  // its forward's gathers and reduce-scatters per block, of its own width
    const double te = static_cast<double>(batch * seq * o.teacher->n_embd);
    per_micro += static_cast<double>(o.teacher->n_layer) * (2.0 * in + 2.0 * 4.0) * te * (tp - 1);
    // (its tokens gathered, its embeddings reduce-scattered, its final norm's outputs gathered)
    if (o.vocab_parallel)
      per_micro += (4.0 * static_cast<double>(batch * seq) + (4.0 + in) * te) * (tp - 1);
  }
  const double forwards = 1.0 + extra + (o.teacher ? 1 : 0);  // (each gathers the positions)
  if (o.packed_rows) per_micro += forwards * 8.0 * static_cast<double>(batch * seq) * (tp - 1);
  if (o.kl_rows) per_micro += 8.0 * static_cast<double>(batch * seq) * (tp - 1);
  return static_cast<double>(grad_accum) * per_micro +
         2.0 * k * 4.0 * rows_fed / std::max(1, o.data_shards) + muon;
}

double activation_bytes(const ModelConfig& model, const ActivationShape& s, bool forward_only) {
  // tp > 1: a share's, whose row-parallel outputs stay fp32 (as the trainer plans it); under
  // sequence parallelism its attention and MLP on the group's rows.
  struct RowShards final : PartialSums {
    int64_t n = 1;
    void sum(const Tensor&) const override {}
    int64_t row_shards() const override { return n; }
  };
  Transformer measure(model, Transformer::MeasureOnly{s.bf16, s.gpu});
  RowShards shards;
  shards.n = s.sequence_parallel ? s.tp : 1;
  if (s.tp > 1) {
    measure.set_bf16_matmul_outputs(false);
    measure.set_partial_sums(&shards, true);
    // (a share of the vocabulary: with its loss statistics' buffers and, under sequence
    // parallelism, the group's rows for the embeddings and head)
    if (s.whole_vocab > 0 && model.vocab_size != s.whole_vocab)
      measure.set_vocab_parallel(&shards, 0, s.whole_vocab, s.tp, true);
  }
  const int64_t rows = s.sequence_parallel ? s.batch / s.tp : s.batch;
  if (forward_only)
    measure.plan_forward_only(rows, s.seq);
  else
    measure.plan(rows, s.seq, s.recompute);
  return static_cast<double>(measure.activation_bytes());
}

Plan make_plan(const Config& cfg, const PlanOptions& o) {
  const TrainConfig& t = cfg.train;
  if (o.ranks < 1) fail("--ranks: must be at least 1, got {}", o.ranks);
  const int per_node = o.ranks_per_node > 0 ? o.ranks_per_node : o.ranks;
  if (o.ranks % per_node != 0)
    fail("--ranks-per-node: {} does not divide --ranks {}", per_node, o.ranks);
  if (!(o.mfu > 0 && o.mfu <= 1)) fail("--mfu: must be in (0, 1], got {}", o.mfu);
  validate_train_config(cfg);  // (what train refuses: a batch of 0 divided by zero here)
  check_early_stopping(cfg);
  Plan p;
  p.options = o;
  p.model = cfg.model;
  if (!cfg.init_from.empty()) {  // the source's architecture, as train takes it
    std::optional<InitSource> src;
    try {
      src.emplace(open_init_source(cfg.init_from));
    } catch (const Error& e) {
      fail("init_from: {}", e.what());
    }
    Config c = cfg;
    adopt_init_model(c, *src);
    p.model = c.model;
  }
  // The tokenizer's ids (as train takes them: not with init_from, whose model has its vocabulary):
  // the model's vocabulary where it is 0 (padded to 64), which must hold them otherwise.
  if (cfg.init_from.empty() || p.model.vocab_size == 0) {
    const std::string& spec = cfg.data.tokenizer;
    int64_t v = 0;
    bool exact = true;  // v is the tokenizer's size, not a bound
    if (spec.starts_with("bpe:")) {
      // (the one a run trained already, cached: merges may run out before N; else at most N)
      v = bpe_spec_size(spec);
      exact = false;
      if (v >= 257 && !cfg.data.text.empty()) try {
          const std::string cached = bpe_tokenizer_for_text(
              cfg.data.text, v, cfg.data.train.empty() ? cfg.data.val_fraction : 0.0, false);
          if (!cached.empty()) v = load_tokenizer(cached)->vocab_size(), exact = true;
        } catch (const std::exception&) {  // (no such text: train says so)
        }
    } else {
      try {
        v = load_tokenizer(spec)->vocab_size();
      } catch (const Error& e) {
        // (with model.vocab_size set the tokenizer need not be here: planning a cluster's run
        // on a laptop; train checks it. A file that is here must load.)
        std::error_code ec;
        if (p.model.vocab_size == 0 || spec == "byte" || std::filesystem::exists(spec, ec))
          fail("data.tokenizer: {}", e.what());
        fmt::print(stderr,
                   "lmforge: note: data.tokenizer {} is not here; planned with "
                   "model.vocab_size {}\n",
                   spec, p.model.vocab_size);
        exact = false;
      }
    }
    if (v <= 0 && p.model.vocab_size == 0)
      fail("data.tokenizer: \"{}\": expected bpe:N, byte or a tokenizer file", spec);
    if (p.model.vocab_size == 0) p.model.vocab_size = (v + 63) / 64 * 64;
    if (exact) check_vocab_covers(p.model.vocab_size, v, spec);
  }
  p.model.validate();
  const ModelConfig& m = p.model;
  p.batch = t.batch_size;
  p.seq = t.seq_len;
  p.grad_accum = t.grad_accum;
  p.steps = t.steps;
  p.recompute = t.activation_checkpointing;
  const Groups g = groups(m);
  p.params = g.all;
  p.trained = g.trained;
  p.flops_per_token = m.flops_per_token(t.seq_len);
  // Distillation's teacher: its architecture from train.teacher, held as a reference is; its
  // forward's FLOPs join the student's.
  std::optional<ModelConfig> teacher;
  if (t.objective == "distill") try {
      teacher = open_init_source(t.teacher).model;
    } catch (const Error& e) {
      fail("train.teacher: {}", e.what());
    }
  if (teacher) p.flops_per_token += teacher->forward_flops_per_token(t.seq_len);
  // DPO's and KTO's reference forwards (unless precomputed before the first step), and KTO's KL
  // rows through the policy and the reference: forwards of the model's shape beside each step's.
  if (t.objective == "dpo" || t.objective == "kto") {
    const bool kl = t.objective == "kto" && t.kto_loss == "kto";
    const int forwards = (t.precompute_ref_logps ? 0 : kl ? 2 : 1) + (kl ? 1 : 0);  // (DPO's alone)
    p.flops_per_token += forwards * m.forward_flops_per_token(t.seq_len);
  }
  p.tokens_per_step = static_cast<double>(t.batch_size * t.seq_len * t.grad_accum) * o.ranks;
  p.tokens = p.tokens_per_step * static_cast<double>(t.steps);
  if (o.tflops > 0) p.seconds = p.tokens * p.flops_per_token / (o.ranks * o.tflops * 1e12 * o.mfu);

  // The activations of one micro-batch, as the training model would plan them (measured).
  const bool bf16 = t.precision == "bf16";
  const bool gpu = t.device == "cuda" || (t.device == "auto" && cuda::available());
  const Recompute recompute = parse_recompute(t.activation_checkpointing);
  auto measure_activations = [&](const ModelConfig& model, int tp, bool sp,
                                 bool forward_only = false) {
    return activation_bytes(model,
                            {.batch = t.batch_size,
                             .seq = t.seq_len,
                             .bf16 = bf16,
                             .gpu = gpu,
                             .recompute = recompute,
                             .tp = tp,
                             .sequence_parallel = sp,
                             .whole_vocab = m.vocab_size},
                            forward_only);
  };

  const bool reference = t.objective == "dpo" || t.objective == "kto";
  FootprintOptions base;  // what every row shares
  base.bf16 = bf16;
  base.bf16_master = t.master_weights == "bf16";
  base.reference = (reference && !m.lora.on() && !t.precompute_ref_logps) || teacher;
  base.frozen = teacher ? &*teacher : nullptr;
  {  // (these rows without tensor parallelism, whatever the config's)
    Config one = cfg;
    one.model = m;
    one.dist.tensor_parallel = 1;
    base.frozen_bf16 = teacher_in_bf16(one);
  }
  // (under LoRA the reference is the policy with its adapters off)
  const bool kl_rows = t.objective == "kto" && t.kto_loss == "kto";
  const int reference_forwards = teacher                                ? 1
                                 : reference && !t.precompute_ref_logps ? (kl_rows ? 2 : 1)
                                                                        : 0;
  base.reference_forwards = base.reference ? reference_forwards : 0;
  // One micro-batch's activations: the model's, and a frozen model's forwards beside them.
  auto activations_of = [&](const ModelConfig& model, const ModelConfig* frozen, int tp, bool sp) {
    return measure_activations(model, tp, sp) +
           (base.reference ? measure_activations(frozen ? *frozen : model, tp, sp, true) : 0.0);
  };
  const double activations = activations_of(m, base.frozen, 1, false);
  base.policy_forwards = (kl_rows ? 1 : 0) + (base.reference ? 0 : reference_forwards);
  base.accumulates = t.grad_accum > 1;
  std::vector<dist::Strategy> order = {dist::Strategy::kNoShard, dist::Strategy::kZero1,
                                       dist::Strategy::kGradShard, dist::Strategy::kFullShard};
  if (per_node < o.ranks) order.push_back(dist::Strategy::kHybrid);
  for (dist::Strategy s : order) {
    StrategyPlan sp;
    sp.strategy = static_cast<int>(s);
    FootprintOptions fo = base;
    fo.strategy = sp.strategy;
    fo.shards = s == dist::Strategy::kHybrid ? per_node : o.ranks;
    fo.muon = t.optimizer == "muon";
    fo.muon_bf16 = fo.muon && bf16 && gpu;  // a GPU's (a CPU's with AMX or Zen 4 too)
    sp.state = training_footprint(m, fo);
    sp.activations = activations;
    sp.runtime = gpu ? 0 : kCpuRuntimeBytes;
    sp.sent_bytes = step_traffic_bytes(m, fo, o.ranks, t.grad_accum);
    sp.fits = o.memory_bytes > 0 && sp.total() <= o.memory_bytes;
    p.strategies.push_back(sp);
  }
  // Tensor parallelism: groups of tp ranks within a node (powers of two dividing the model's
  // heads and MLP width), no-shard across the groups, and where there are several groups also
  // full-shard across them ("-fsdp": 2-D parallelism); only where the run could use it. With
  // sequence parallelism too ("tpN-sp", where the run allows it).
  Config probe = cfg;
  probe.model = m;
  // The forwards over the group besides the step's own: DPO's reference (unless precomputed),
  // KTO's KL rows (the policy and the reference) and reference (a share of the policy with its
  // adapters off under LoRA: the same partial sums).
  // (KTO's loss apo_zero_unpaired has no KL rows: its reference alone)
  const int64_t extra_forwards = kl_rows                                           ? 3
                                 : t.objective == "kto"                            ? 1
                                 : t.objective == "dpo" && !t.precompute_ref_logps ? 1
                                                                                   : 0;
  for (int tp = 2; tp <= per_node && o.ranks % tp == 0; tp *= 2)
    for (bool seq : {false, true})
      for (dist::Strategy across : {dist::Strategy::kNoShard, dist::Strategy::kFullShard}) {
        if (across != dist::Strategy::kNoShard && o.ranks == tp) continue;  // one group
        probe.dist.tensor_parallel = tp;
        probe.dist.sequence_parallel = seq;
        probe.dist.strategy = dist::strategy_name(across);
        ModelConfig share, teacher_share;
        try {
          validate_train_config(probe);
          share = dist::tensor_parallel_config(m, tp, vocab_parallel(probe));
          if (teacher)
            teacher_share = dist::tensor_parallel_config(*teacher, tp, vocab_parallel(probe));
        } catch (const Error&) {
          continue;
        }
        StrategyPlan sp;
        sp.strategy = static_cast<int>(across);
        sp.tensor_parallel = tp;
        sp.sequence_parallel = seq;
        sp.runtime = gpu ? 0 : kCpuRuntimeBytes;
        FootprintOptions fo = base;  // (the reference's share, where there is one)
        fo.strategy = sp.strategy;
        fo.shards = o.ranks / tp;
        fo.tensor_parallel = tp;
        fo.frozen = teacher ? &teacher_share : nullptr;
        fo.frozen_bf16 = teacher_in_bf16(probe);
        sp.state = training_footprint(share, fo);
        sp.activations = activations_of(share, fo.frozen, tp, seq);
        TensorParallelTraffic traffic;
        traffic.full_recompute = recompute == Recompute::kFull;
        traffic.sequence_parallel = seq;
        traffic.bf16_inputs = bf16;
        traffic.extra_forwards = extra_forwards;
        traffic.kl_rows = seq && kl_rows;
        traffic.data_shards = across == dist::Strategy::kNoShard ? 1 : o.ranks / tp;
        traffic.vocab_parallel = vocab_parallel(probe);
        traffic.rows_weighed = preference_objective(t.objective);
        traffic.packed_rows = seq && cfg.data.packing != "none";
        traffic.teacher = teacher ? &*teacher : nullptr;
        traffic.muon_elements = fo.muon ? muon_sizes(m).elements : 0;
        sp.sent_bytes = step_traffic_bytes(share, fo, o.ranks / tp, t.grad_accum) +
                        tensor_parallel_traffic_bytes(m, seq ? t.batch_size / tp : t.batch_size,
                                                      t.seq_len, tp, t.grad_accum, traffic);
        sp.fits = o.memory_bytes > 0 && sp.total() <= o.memory_bytes;
        p.strategies.push_back(sp);
      }
  // The least communication per token among those that fit (ties: the earlier, less sharded): a
  // tensor-parallel group of N ranks trains 1/N of the tokens of N data-parallel ranks per step
  // (with sequence parallelism too: its ranks split the group's batch).
  auto per_token = [](const StrategyPlan& sp) { return sp.sent_bytes * sp.tensor_parallel; };
  for (size_t i = 0; i < p.strategies.size(); ++i)
    if (p.strategies[i].fits &&
        (p.recommended < 0 ||
         per_token(p.strategies[i]) < per_token(p.strategies[p.recommended]) * (1 - 1e-9)))
      p.recommended = static_cast<int>(i);
  return p;
}

namespace {
// A row's name: the strategy, or "tpN" for tensor parallelism in groups of N ("-sp": sequence
// parallelism; "-fsdp": full-shard across the groups, else no-shard).
std::string name(const StrategyPlan& sp) {
  if (sp.tensor_parallel > 1)
    return fmt::format("tp{}{}{}", sp.tensor_parallel, sp.sequence_parallel ? "-sp" : "",
                       sp.strategy == static_cast<int>(dist::Strategy::kFullShard) ? "-fsdp" : "");
  return dist::strategy_name(static_cast<dist::Strategy>(sp.strategy));
}
}  // namespace

std::string format_plan(const Plan& p) {
  const ModelConfig& m = p.model;
  const PlanOptions& o = p.options;
  const int per_node = o.ranks_per_node > 0 ? o.ranks_per_node : o.ranks;
  std::string s;
  s += fmt::format(
      "model: {:.1f}M parameters ({:.1f}M trained), L={} C={} NH={} V={}; {:.2f} GFLOP per "
      "token of training at T={}\n",
      p.params / 1e6, p.trained / 1e6, m.n_layer, m.n_embd, m.n_head, m.vocab_size,
      p.flops_per_token / 1e9, p.seq);
  s += fmt::format(
      "batch: {} x {} tokens x {} micro-batch(es) per rank, {} rank(s) ({} node(s) of {}): {:.0f} "
      "tokens per step (under tpN each group of N ranks shares one batch: 1/N of them); {} steps "
      "= {:.3g} tokens\n",
      p.batch, p.seq, p.grad_accum, o.ranks, o.ranks / per_node, per_node, p.tokens_per_step,
      p.steps, p.tokens);
  s += fmt::format("per rank, GiB (activations: {}){}\n", p.recompute,
                   o.memory_bytes > 0 ? fmt::format("; {} GiB each", gib(o.memory_bytes)) : "");
  s += fmt::format("  {:<12} {:>8} {:>8} {:>8} {:>9} {:>9} {:>11} {:>7} {:>8} {:>6} {:>12}\n",
                   "strategy", "values", "gather", "grads", "optimizer", "reference", "activations",
                   "runtime", "total", "fits", "sent/step");
  for (const StrategyPlan& sp : p.strategies)
    s += fmt::format("  {:<12} {:>8} {:>8} {:>8} {:>9} {:>9} {:>11} {:>7} {:>8} {:>6} {:>8} GiB\n",
                     name(sp), gib(sp.state.values), gib(sp.state.gather), gib(sp.state.gradients),
                     gib(sp.state.optimizer), gib(sp.state.reference), gib(sp.activations),
                     gib(sp.runtime), gib(sp.total()),
                     o.memory_bytes > 0 ? (sp.fits ? "yes" : "no") : "?", gib(sp.sent_bytes));
  if (p.recommended >= 0 && p.strategies[p.recommended].tensor_parallel > 1)
    s += fmt::format(
        "recommended: dist.tensor_parallel: {}{} with dist.strategy: {} (fits, and sends the "
        "least per token)\n",
        p.strategies[p.recommended].tensor_parallel,
        p.strategies[p.recommended].sequence_parallel ? ", dist.sequence_parallel: true" : "",
        dist::strategy_name(static_cast<dist::Strategy>(p.strategies[p.recommended].strategy)));
  else if (p.recommended >= 0)
    s += fmt::format(
        "recommended: dist.strategy: {} (fits, and sends the least per token)\n",
        dist::strategy_name(static_cast<dist::Strategy>(p.strategies[p.recommended].strategy)));
  else if (o.memory_bytes > 0)
    s += "recommended: none fits; use more ranks, a smaller micro-batch (train.batch_size with "
         "train.grad_accum), train.activation_checkpointing: full, or bf16 master weights\n";
  if (p.seconds > 0)
    s += fmt::format(
        "time: {:.3g} FLOP at {:.1f} TFLOP/s x {:.0f}% MFU per rank on {} rank(s): {} "
        "(compute only)\n",
        p.tokens * p.flops_per_token, o.tflops, o.mfu * 100, o.ranks, duration(p.seconds));
  return s;
}

}  // namespace lmforge
