#include "lmforge/dist/data_parallel.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "lmforge/backend/ops.h"
#include "lmforge/core/error.h"
#include "lmforge/optim/clip.h"

namespace lmforge::dist {

Strategy parse_strategy(const std::string& s) {
  if (s == "no-shard" || s == "ddp") return Strategy::kNoShard;
  if (s == "zero1") return Strategy::kZero1;
  if (s == "grad-shard" || s == "zero2") return Strategy::kGradShard;
  if (s == "full-shard" || s == "zero3") return Strategy::kFullShard;
  if (s == "hybrid") return Strategy::kHybrid;
  fail(
      "dist.strategy: expected no-shard (ddp), zero1, grad-shard (zero2), full-shard (zero3) or "
      "hybrid, got \"{}\"",
      s);
}

const char* strategy_name(Strategy s) {
  static const char* const names[] = {"no-shard", "zero1", "grad-shard", "full-shard", "hybrid"};
  return names[static_cast<int>(s)];
}

ShardLayout::ShardLayout(int64_t n_, int ranks_) : n(n_), ranks(ranks_) {
  per_rank = (n + ranks - 1) / ranks;
  per_rank = (per_rank + 15) / 16 * 16;  // 64-byte aligned shard starts
}

std::vector<int64_t> ShardLayout::counts(int64_t lo, int64_t hi) const {
  std::vector<int64_t> c(ranks);
  for (int r = 0; r < ranks; ++r)
    c[r] = std::max<int64_t>(0, std::min(hi, end(r)) - std::max(lo, begin(r)));
  return c;
}

namespace {
constexpr int64_t kPackAlign = 16;  // packed gradient runs start 64-byte aligned, as ParamSet's

Tensor flat_view(const Tensor& t, int64_t start, int64_t len) {
  return t.view({t.numel()}).slice(start, len);
}
}  // namespace

DataParallel::DataParallel(Communicator& world, Transformer& model, const DistConfig& cfg,
                           const AdamWOptions& opt, const ValueStream& init)
    : counted_(world),
      world_(counted_),
      shard_comm_(&counted_),
      model_(model),
      ps_(model.params()),
      strategy_(parse_strategy(cfg.strategy)) {
  if (!(cfg.bucket_mb > 0)) fail("dist.bucket_mb: must be positive, got {}", cfg.bucket_mb);
  if (strategy_ == Strategy::kHybrid) {
    const RankInfo& ri = rank_info();
    node_comm_ = world_.split(ri.node, world_.rank());
    // Across nodes, the ranks holding the same shard: the same place in their node's group (the
    // launcher's local rank agrees only when ranks sit in consecutive blocks per node).
    cross_comm_ = world_.split(node_comm_->rank(), world_.rank());
    shard_comm_ = node_comm_.get();
    // Every node's group must be alike, or the shard layouts (and so the cross-node
    // all-reduces) differ between nodes.
    std::vector<double> sizes(world_.size(), 0.0);
    sizes[world_.rank()] = node_comm_->size();
    world_.all_reduce(sizes.data(), static_cast<int64_t>(sizes.size()))->wait();
    if (std::adjacent_find(sizes.begin(), sizes.end(), std::not_equal_to<>()) != sizes.end()) {
      std::string placed;
      for (size_t r = 0; r < sizes.size(); ++r)
        placed += fmt::format("{}rank {}: {}", r ? ", " : "", r, sizes[r]);
      fail(
          "dist.strategy: hybrid needs the same number of ranks on every node, but the launcher "
          "placed them unevenly (the size of each rank's node: {}); launch the same number of "
          "tasks per node, or set dist.ranks_per_node",
          placed);
    }
  }
  const bool values_sharded = strategy_ >= Strategy::kFullShard;
  trainable_ = ps_.trainable_ranges();
  const bool trains = !trainable_.empty();  // (a frozen model: its values alone)
  const bool bf16 = model.bf16();
  // bf16 master weights: the value shard is bf16 and blocks are gathered as 2-byte elements.
  const bool master16 = ps_.bf16_master();
  const int64_t n = ps_.flat_size();
  const Device device = model.device();  // buffers live beside the model's
  layout_ = ShardLayout(n, shard_comm_->size());
  my_lo_ = layout_.begin(shard_comm_->rank());
  my_hi_ = layout_.end(shard_comm_->rank());
  const int64_t mine = my_hi_ - my_lo_;

  // Buckets: groups in the order their gradients become final (head, blocks from the last, then
  // the embeddings), merged while under bucket_mb; each covers a contiguous flat range. Under
  // grad-/full-shard every group is its own bucket, reduce-scattered from its gradient buffer.
  const int64_t G = model.num_groups();
  const int64_t bucket_elems =
      grad_sharded() ? 1 : std::max<int64_t>(1, static_cast<int64_t>(cfg.bucket_mb * 262144));
  bucket_of_group_.assign(G, -1);
  for (int64_t g = G - 1; g >= 0; --g) {
    if (group_hi(g) == group_lo(g)) continue;
    if (buckets_.empty() || buckets_.back().hi - buckets_.back().lo >= bucket_elems) {
      buckets_.emplace_back();
      buckets_.back().hi = group_hi(g);
    }
    Bucket& b = buckets_.back();
    b.lo = group_lo(g);
    ++b.groups;
    bucket_of_group_[g] = static_cast<int>(buckets_.size()) - 1;
  }
  for (Bucket& b : buckets_)
    for (const auto& [lo, hi] : trainable_)
      if (std::max(lo, b.lo) < std::min(hi, b.hi))
        b.ranges.emplace_back(std::max(lo, b.lo), std::min(hi, b.hi));

  int64_t block = 0;  // the largest block, in elements
  for (int64_t g = 1; g + 1 < G; ++g) block = std::max(block, group_hi(g) - group_lo(g));
  if (grad_sharded()) {
    // Gradients packed: the trained elements alone (under LoRA the adapters'; else everything).
    shard_pack_ = PackedRange(my_lo_, my_hi_, trainable_, kPackAlign);
    int64_t block_trained = 0;  // the most a block trains
    for (int64_t g = 0; g < G; ++g) {
      group_pack_.emplace_back(group_lo(g), group_hi(g), trainable_, kPackAlign);
      if (g > 0 && g + 1 < G) block_trained = std::max(block_trained, group_pack_.back().size());
    }
    shard_arena_ = Arena::planned(
        [&](Arena& a) {
          if (trains) {
            gshard_ = a.alloc({shard_pack_.size()});
            rs_tmp_ = a.alloc({shard_pack_.size()});
          }
          vshard_ =
              values_sharded ? a.alloc({mine}, master16 ? DType::kBF16 : DType::kF32) : Tensor();
        },
        device);
    // The backward writes each group's gradients into a small workspace instead of a
    // whole-model buffer: the embeddings and the head for the micro-batch, blocks in two
    // alternating buffers, each reused once its reduce-scatter has completed.
    if (trains)
      grad_ws_ = Arena::planned(
          [&](Arena& a) {
            edge_grad_[0] = a.alloc({group_pack_[0].size()});
            edge_grad_[1] = a.alloc({group_pack_[G - 1].size()});
            block_grad_[0] = a.alloc({block_trained});
            block_grad_[1] = a.alloc({block_trained});
          },
          device);
    ps_.release_grads();
  }
  LMF_CHECK(!init || values_sharded, "initial values streamed to {}: only full-shard takes them",
            strategy_name(strategy_));
  if (values_sharded) {
    if (!init) {
      vshard_.copy_from(flat_view(ps_.flat_values(), my_lo_, mine));
    } else {  // made on the host, one parameter at a time, then copied to where the shard lives
      Tensor host = Tensor::zeros({mine}, DType::kF32);  // (alignment gaps: 0)
      float* out = host.data<float>();
      ps_.take_stream(init, [&](const Param& q, const Param& p, const float* values) {
        LMF_CHECK(q.shape == p.shape, "initial values for {}: shaped {}", p.name, p.shape.str());
        const int64_t off = ps_.offset(q), n = q.shape.numel();
        const int64_t a = std::max(off, my_lo_), z = std::min(off + n, my_hi_);
        if (a < z) std::copy(values + (a - off), values + (z - off), out + (a - my_lo_));
      });
      if (master16) {  // rounded to nearest even, as ParamSet::use_bf16_master does
        Tensor h16 = Tensor::empty({mine}, DType::kBF16);
        ops::to_bf16(h16, host);
        host = h16;
      }
      vshard_.copy_from(host);
    }
    if (bf16) ps_.use_external_bf16();  // bf16 copies of the gathered groups only
    ps_.release_values();
    gather_ = Arena::planned(
        [&](Arena& a) {
          embed_buf_ = a.alloc({group_hi(0) - group_lo(0)});
          tail_buf_ = a.alloc({group_hi(G - 1) - group_lo(G - 1)});
          block_buf_[0] = a.alloc({block});
          block_buf_[1] = a.alloc({block});
          if (!bf16) return;
          embed_bf16_ = a.alloc({group_hi(0) - group_lo(0)}, DType::kBF16);
          tail_bf16_ = a.alloc({group_hi(G - 1) - group_lo(G - 1)}, DType::kBF16);
          block_bf16_[0] = a.alloc({block}, DType::kBF16);
          block_bf16_[1] = a.alloc({block}, DType::kBF16);
        },
        device);
  } else if (world_.size() > 1) {  // everyone starts from rank 0's weights
    Tensor v = ps_.flat_values();
    world_.broadcast(v.raw(), static_cast<int64_t>(v.nbytes()), 0)->wait();
    ps_.invalidate_bf16();
  }

  std::vector<OptSlot> slots;
  switch (strategy_) {
    case Strategy::kNoShard:
      slots = whole_slots(ps_);
      break;
    case Strategy::kZero1:
      slots = shard_slots(ps_.flat_values(), ps_.flat_grads(), &ps_.grad_pack());
      break;
    case Strategy::kGradShard:
      slots = shard_slots(ps_.flat_values(), gshard_, &shard_pack_);
      break;
    default:
      slots = shard_slots(vshard_, gshard_, &shard_pack_);
  }
  offload_ = cfg.offload;
  if (cfg.offload) {
    device_slots_ = slots;
    host_ = Arena::planned(
        [&](Arena& a) {
          host_slots_.clear();
          for (const OptSlot& d : device_slots_)
            host_slots_.push_back({d.param, d.begin, d.len, a.alloc({d.len}, d.value.dtype()),
                                   a.alloc({d.len}), Tensor()});
        },
        Device::kCPU);
    refresh_master();
    slots = host_slots_;
  }
  opt_ = std::make_unique<AdamW>(ps_, std::move(slots), opt);
  if (opt.muon.on && strategy_ != Strategy::kNoShard)  // each matrix's direction, whole
    opt_->set_muon_gather([this](const Param& p, const Tensor& whole) {
      gather_param(p, nullptr, whole.data<float>());  // (this rank's piece in place)
    });
  model.set_hooks(this);
}

DataParallel::~DataParallel() {
  model_.set_hooks(nullptr);
  works_.clear();  // Work destructors wait
}

int64_t DataParallel::group_lo(int64_t g) const {
  const auto& ps = ps_.params();
  size_t i = g < model_.num_groups() ? model_.group_begin(g) : ps.size();
  return i < ps.size() ? ps_.offset(ps[i]) : ps_.flat_size();
}

// The pieces of this rank's range [my_lo_, my_hi_) per parameter. `values` is a flat tensor
// covering either the whole space or just the shard (by its size); `grads` the trained elements
// as `packed` lays them out (the model's whole gradient buffer, or this rank's shard).
std::vector<OptSlot> DataParallel::shard_slots(const Tensor& values, const Tensor& grads,
                                               const PackedRange* packed) {
  const int64_t vbase = values.numel() == my_hi_ - my_lo_ ? my_lo_ : 0;
  std::vector<OptSlot> out;
  for (Param& p : ps_.params()) {
    const int64_t off = ps_.offset(p), numel = p.shape.numel();
    const int64_t lo = std::max(off, my_lo_), hi = std::min(off + numel, my_hi_);
    if (lo >= hi || p.frozen) continue;  // frozen (LoRA's base): no optimizer state
    OptSlot s{&p,
              lo - off,
              hi - lo,
              flat_view(values, lo - vbase, hi - lo),
              flat_view(grads, packed->at(lo), hi - lo),
              Tensor()};
    out.push_back(std::move(s));
  }
  return out;
}

int64_t eval_rows(const RowRanks& ranks, const Loader& val, int64_t& batches) {
  const int64_t per = ranks.world.size() * ranks.parts();
  batches = std::min(batches, (val.sequential_batches() + per - 1) / per);
  return per;
}

void RowRanks::sum(double* v, int64_t n) const {
  world.all_reduce(v, n)->wait();
  if (group) group->sum_over_group(v, n);
}

void RowRanks::gather_rows(const Tensor& mine, const Tensor& all) const {
  LMF_CHECK(mine.dtype() == DType::kI32 && all.dtype() == DType::kI32 &&
                all.numel() == mine.numel() * parts(),
            "gather_rows: {} rows of {} ranks into {}", mine.shape().str(), parts(),
            all.shape().str());
  if (group)
    group->gather(as_words(mine), as_words(all));
  else
    all.copy_from(mine);
}

double DataParallel::forward_backward(const std::vector<Batch>& micro, double* mean_lse_sq,
                                      RowObjective* objective, double* mean_kl) {
  grad_scale_ = 1.0;                                     // new gradients: no clipping decided yet
  const int32_t kIgnore = LoaderOptions{}.ignore_index;  // what the loader writes
  const std::vector<int64_t> counts = target_counts(micro, kIgnore);
  double targets = 0;
  for (int64_t c : counts) targets += static_cast<double>(c);
  world_.all_reduce(&targets, 1)->wait();     // over all ranks and micro-batches
  if (tp_) tp_->sum_over_group(&targets, 1);  // sequence parallelism: each rank's own rows
  if (objective) objective->begin(micro, row_ranks());

  double sums[3] = {0, 0, 0};  // loss, lse^2, KL: token-weighted over this rank's share
  for (size_t m = 0; m < micro.size(); ++m) {
    const bool last = m + 1 == micro.size();
    sync_ = grad_sharded() || last;  // DDP and zero1 accumulate locally until the last
    if (grad_sharded()) {            // the edges' gradient buffers for this micro-batch
      const int64_t G = model_.num_groups();
      for (int e = 0; e < 2; ++e) {
        zero_workspace(edge_grad_[e], e ? G - 1 : 0);
        point_group(e ? G - 1 : 0, edge_grad_[e], /*grad=*/true);
      }
    } else if (m == 0) {
      ps_.zero_grad();
    }
    first_micro_ = m == 0;  // reduce-scatter straight into the accumulator
    for (Bucket& b : buckets_) b.pending = b.groups;
    double share = targets > 0 ? static_cast<double>(counts[m]) / targets : 0.0;
    if (objective) {
      model_.forward_backward_rows(
          micro[m].tokens, micro[m].targets,
          [&](const std::vector<double>& logp, std::vector<float>& w) {
            sums[0] += objective->weigh(m, logp, model_.row_targets(), w);
          },
          kIgnore, micro[m].doc_ids);
    } else {
      double l = model_.forward_backward(micro[m].tokens, micro[m].targets, share, kIgnore,
                                         micro[m].doc_ids);
      sums[0] += l * share;
      sums[1] += model_.mean_lse_sq() * share;
      sums[2] += model_.mean_kl() * share;
    }
    const auto t0 = std::chrono::steady_clock::now();
    drain();
    grad_wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (grad_sharded() && m > 0) {
      if (gshard_.numel() > 0) ops::accumulate(gshard_, rs_tmp_);
      rs_tmp_used_ = true;
    }
  }
  sync_ = false;
  all_reduce_across_nodes();
  world_.all_reduce(sums, 3)->wait();
  if (tp_) {  // sequence parallelism: the ranks' own rows' shares, and their gradients
    tp_->sum_over_group(sums, 3);
    tp_->sum_partial_grads(gshard_, grad_sharded() ? &shard_pack_ : nullptr);
  }
  if (objective) objective->end(row_ranks());
  if (mean_lse_sq) *mean_lse_sq = sums[1];
  if (mean_kl) *mean_kl = sums[2];
  return sums[0];
}

void DataParallel::grads_ready(int64_t group) {
  if (!sync_ || bucket_of_group_[group] < 0) return;
  Bucket& b = buckets_[bucket_of_group_[group]];
  if (--b.pending == 0) launch(b, group);
  for (WorkPtr& w : works_) w->test();  // lets MPI progress while the backward goes on
}

void DataParallel::launch(Bucket& b, int64_t group) {
  if (!grad_sharded()) {
    float* g = ps_.flat_grads().data<float>();
    for (const auto& [lo, hi] : b.ranges)
      works_.push_back(world_.all_reduce(g + ps_.grad_pack().at(lo), hi - lo));
    return;
  }
  // One group per bucket, its gradients packed in its workspace buffer: each trained range (the
  // whole group but under LoRA) reduce-scattered into the ranks' packed shards of it.
  const int64_t G = model_.num_groups();
  const bool edge = group == 0 || group == G - 1;
  const Tensor& buf = edge ? edge_grad_[group ? 1 : 0] : block_grad_[group % 2];
  float* out = (first_micro_ ? gshard_ : rs_tmp_).data<float>();
  for (const auto& [lo, hi] : b.ranges) {
    const int64_t a = std::max(lo, my_lo_);  // this rank's first element, if it has any
    const int64_t at = a < std::min(hi, my_hi_) ? shard_pack_.at(a) : 0;
    WorkPtr w = shard_comm_->reduce_scatter(buf.data<float>() + group_pack_[group].at(lo), out + at,
                                            layout_.counts(lo, hi));
    (edge ? works_ : block_grad_work_[group % 2]).push_back(std::move(w));
  }
}

void DataParallel::zero_workspace(const Tensor& buf, int64_t group) {
  const int64_t n = group_pack_[group].size();
  if (n > 0) buf.slice(0, n).zero_();
}

// Hybrid: the node's shard accumulators summed across the nodes (their trained ranges).
void DataParallel::all_reduce_across_nodes() {
  if (strategy_ != Strategy::kHybrid) return;
  if (gshard_.numel() > 0) cross_comm_->all_reduce(gshard_.data<float>(), gshard_.numel())->wait();
}

double DataParallel::time_gradient_collectives() {
  const int64_t G = model_.num_groups();
  double best = 0;
  for (int run = 0; run < 2; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    first_micro_ = true;  // grad-/full-shard: into the accumulator, which the step overwrites
    for (size_t i = 0; i < buckets_.size(); ++i) {
      int64_t g = G - 1;  // the bucket's last group (its groups, in backward order)
      while (bucket_of_group_[g] != static_cast<int>(i)) --g;
      launch(buckets_[i], g - buckets_[i].groups + 1);
    }
    drain();
    all_reduce_across_nodes();
    best = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return best;
}

void DataParallel::drain() {
  for (WorkPtr& w : works_) w->wait();
  works_.clear();
  for (std::vector<WorkPtr>& ws : block_grad_work_) {
    for (WorkPtr& w : ws) w->wait();
    ws.clear();
  }
}

double DataParallel::clip_grad_norm(double max_norm) {
  double norm = 0;
  if (tp_ && grad_sharded()) {
    norm = tp_->grad_norm(gshard_, &shard_pack_, shard_comm_);
  } else if (tp_) {
    norm = tp_->grad_norm();
  } else if (grad_sharded()) {
    double ss = ops::sum_squares(gshard_);
    shard_comm_->all_reduce(&ss, 1)->wait();  // hybrid: the shards of one node cover everything
    norm = std::sqrt(ss);
  } else {
    norm = grad_norm(ps_);
  }
  grad_scale_ = clip_coef(norm, max_norm);
  return norm;
}

void DataParallel::set_tensor_parallel(TensorParallel* tp) {
  tp_ = tp;
  if (tp && opt_->muon()) opt_->set_muon_shares(tp->muon_shares(model_.device()));
}

Tensor DataParallel::whole_param(const Param& p, int what) {
  LMF_CHECK(what >= 0 && what <= 3, "whole_param: values, moments or masters, got {}", what);
  if (what == 2 && opt_->muon() && muon_param(p)) return Tensor();  // (no second moment)
  const int64_t off = ps_.offset(p), n = p.shape.numel();
  const bool pieces = what == 0 ? sharded_values() : strategy_ != Strategy::kNoShard;
  const auto& slots = opt_->slots();
  size_t k = 0;  // this rank's slot of p, if any
  while (what > 0 && k < slots.size() && slots[k].param != &p) ++k;
  const bool held = what > 0 && k < slots.size();
  LMF_CHECK(what == 0 || held || pieces, "whole_param: {} has no AdamW state", p.name);
  auto moment = [&] { return what == 1 ? opt_->m(k) : what == 2 ? opt_->v(k) : opt_->master(k); };
  auto fp32 = [&](const Tensor& v) {  // bf16 master weights widened (exact), where they are
    if (v.dtype() == DType::kF32) return v;
    Tensor w = Tensor::empty({v.numel()}, DType::kF32, v.device());
    ops::from_bf16(w, v);
    return w;
  };
  if (!pieces) return what > 0 ? moment().view({n}) : fp32(p.value.view({n}));
  // (dist.offload: the moments are gathered where they are, on the host)
  Tensor out =
      Tensor::empty({n}, DType::kF32, what > 0 && offload() ? Device::kCPU : model_.device());
  Tensor piece;  // this rank's piece of p's values, fp32
  if (what == 0) {
    const int64_t a = std::clamp(off, my_lo_, my_hi_), z = std::clamp(off + n, my_lo_, my_hi_);
    piece = fp32(vshard_.slice(a - my_lo_, z - a));
  }
  const float* mine = what == 0 ? piece.data<float>()
                      : held    ? moment().data<float>()
                                : out.data<float>();
  gather_param(p, mine, out.data<float>());
  return out;
}

void DataParallel::gather_param(const Param& p, const float* mine, float* out) {
  const int64_t off = ps_.offset(p);
  shard_comm_->all_gather(mine, out, layout_.counts(off, off + p.shape.numel()))->wait();
}

void DataParallel::take_optimizer(const AdamW& whole) {
  const auto& mine = opt_->slots();
  size_t i = 0;
  for (size_t k = 0; k < mine.size(); ++k) {
    while (i < whole.slots().size() && whole.slots()[i].param != mine[k].param) ++i;
    LMF_CHECK(i < whole.slots().size(), "take_optimizer: no state for {}", mine[k].param->name);
    const std::pair<const Tensor&, const Tensor&> state[] = {
        {whole.m(i), opt_->m(k)}, {whole.v(i), opt_->v(k)}, {whole.master(i), opt_->master(k)}};
    for (const auto& [from, to] : state) {
      if (!from.defined() || !to.defined()) continue;  // (Muon's matrices: no v; fp32 masters)
      to.copy_from(from.view({from.numel()}).slice(mine[k].begin, mine[k].len));
    }
  }
  opt_->set_steps_taken(whole.steps_taken());
}

void DataParallel::scale_grads(double f) {
  if (grad_sharded())  // (the trained elements alone, packed)
    ops::scale(gshard_, f);
  else
    for (Param& p : ps_.params())
      if (!p.frozen) ops::scale(p.grad, f);
}

void DataParallel::refresh_master() {
  for (size_t i = 0; i < host_slots_.size(); ++i)
    host_slots_[i].value.copy_from(device_slots_[i].value.view({device_slots_[i].len}));
}

void DataParallel::step(double lr) {
  for (size_t i = 0; i < host_slots_.size(); ++i)  // offload: gradients to the host
    host_slots_[i].grad.copy_from(device_slots_[i].grad.view({device_slots_[i].len}));
  opt_->step(lr, grad_scale_);
  grad_scale_ = 1.0;
  for (size_t i = 0; i < host_slots_.size(); ++i)  // and the new values back
    device_slots_[i].value.view({device_slots_[i].len}).copy_from(host_slots_[i].value);
  if (offload()) ps_.invalidate_bf16();
  if (strategy_ == Strategy::kZero1 || strategy_ == Strategy::kGradShard) {
    // The updated parameters (all of them but under LoRA), each rank's in place.
    const Tensor v = ps_.flat_values();  // fp32, or bf16 master weights
    for (const auto& [lo, hi] : trainable_) {
      if (v.dtype() == DType::kBF16)
        world_.all_gather(nullptr, v.bf16_data() + lo, layout_.counts(lo, hi))->wait();
      else
        world_.all_gather(nullptr, v.data<float>() + lo, layout_.counts(lo, hi))->wait();
    }
    ps_.invalidate_bf16();  // only the shard's copies were rewritten
  } else if (sharded_values()) {
    slot_block_[0] = slot_block_[1] = -1;  // gathered blocks are stale now
    edges_gathered_ = false;
  }
}

double DataParallel::evaluate(const Loader& val, int64_t batches, Batch& batch) {
  // Token-weighted like the training loss (a batch's mean times its targets), over at most the
  // whole validation set once. `batches` global batches, split as training's are (eval_rows):
  // the same rows whatever the number of ranks, for the same global batch.
  const int32_t kIgnore = LoaderOptions{}.ignore_index;
  const RowRanks ranks = row_ranks();
  const int64_t per = eval_rows(ranks, val, batches);
  double sums[2] = {0, 0};  // loss x targets, targets
  for (int64_t i = 0; i < batches; ++i) {
    val.sequential(i * per + ranks.index(), batch);  // (past the end: padding without targets)
    const double n = static_cast<double>(target_counts({batch}, kIgnore)[0]);
    if (n == 0 && per == 1) continue;  // (several ranks: every one runs every forward)
    const double loss = model_.forward(batch.tokens, batch.targets, kIgnore, batch.doc_ids);
    if (n > 0) sums[0] += loss * n;
    sums[1] += n;
  }
  if (per > 1) ranks.sum(sums, 2);
  return sums[1] > 0 ? sums[0] / sums[1] : std::nan("");
}

// Full-shard: group g's values, all-gathered from the shards into its buffer.
void DataParallel::gather(int64_t g, bool wait) {
  const int64_t G = model_.num_groups();
  // Into the fp32 buffer, or with bf16 master weights the bf16 one (the values themselves).
  auto start = [&](const Tensor& buf, const Tensor& buf16) {
    const int64_t lo = group_lo(g), hi = group_hi(g);
    return gather_values(std::clamp(lo, my_lo_, my_hi_) - my_lo_,
                         vshard_.dtype() == DType::kBF16 ? buf16 : buf, layout_.counts(lo, hi));
  };
  if (g == 0 || g == G - 1) {  // the edges: gathered together, kept for the step
    if (edges_gathered_) return;
    g = 0;  // start() reads g: the embeddings first, whichever edge was asked for
    edge_work_[0] = start(embed_buf_, embed_bf16_);
    g = G - 1;
    edge_work_[1] = start(tail_buf_, tail_bf16_);
    for (WorkPtr& w : edge_work_) w->wait();
    point_group(0, embed_buf_, false, embed_bf16_);
    point_group(G - 1, tail_buf_, false, tail_bf16_);
    edges_gathered_ = true;
    return;
  }
  const int slot = static_cast<int>(g % 2);
  if (slot_block_[slot] != g) {
    if (slot_work_[slot]) slot_work_[slot]->wait();
    slot_work_[slot] = start(block_buf_[slot], block_bf16_[slot]);
    slot_block_[slot] = g;
  }
  if (wait) {
    if (slot_work_[slot]) slot_work_[slot]->wait();
    slot_work_[slot].reset();
    point_group(g, block_buf_[slot], false, block_bf16_[slot]);
  }
}

WorkPtr DataParallel::gather_values(int64_t at, const Tensor& out,
                                    const std::vector<int64_t>& counts) {
  LMF_CHECK(out.dtype() == vshard_.dtype(), "gather_values: {} into {}",
            dtype_name(vshard_.dtype()), dtype_name(out.dtype()));
  if (vshard_.dtype() == DType::kBF16)
    return shard_comm_->all_gather(vshard_.bf16_data() + at, out.bf16_data(), counts);
  return shard_comm_->all_gather(vshard_.data<float>() + at, out.data<float>(), counts);
}

void DataParallel::point_group(int64_t g, const Tensor& buf, bool grad, const Tensor& bf16) {
  const int64_t lo = group_lo(g);
  auto& ps = ps_.params();
  for (size_t i = model_.group_begin(g); i < model_.group_begin(g + 1) && i < ps.size(); ++i) {
    Param& p = ps[i];
    if (grad) {  // packed: the trained parameters' gradients alone (frozen ones have none)
      p.grad = p.frozen
                   ? Tensor()
                   : Tensor(buf.storage(), buf.byte_offset() + group_pack_[g].at(ps_.offset(p)) * 4,
                            p.shape, DType::kF32);
      continue;
    }
    const int64_t at = ps_.offset(p) - lo;
    const Tensor f32 =
        Tensor(buf.storage(), buf.byte_offset() + at * sizeof(float), p.shape, DType::kF32);
    if (vshard_.dtype() == DType::kBF16) {  // bf16 masters: gathered into `bf16`
      p.value = Tensor(bf16.storage(), bf16.byte_offset() + at * 2, p.shape, DType::kBF16);
      if (p.matmul) p.value_bf16 = p.value;
      if (p.shape.ndim() == 1) {  // norm weights and biases: read in fp32 (ParamSet)
        p.value_f32 = f32;
        ops::from_bf16(p.value_f32, p.value);
      }
      continue;
    }
    p.value = f32;
    if (bf16.defined() && p.matmul) {  // the group's bf16 matmul weights, from its new values
      p.value_bf16 = Tensor(bf16.storage(), bf16.byte_offset() + at * 2, p.shape, DType::kBF16);
      ops::to_bf16(p.value_bf16, p.value);
    }
  }
}

void DataParallel::before_forward(int64_t g) {
  if (!sharded_values()) return;
  const int64_t G = model_.num_groups();
  if (g == 0 || g == G - 1) {
    gather(g, true);
    if (g == 0 && G > 2) gather(1, false);  // prefetch the first block
    return;
  }
  gather(g, true);
  if (g + 1 < G - 1) gather(g + 1, false);
}

void DataParallel::before_backward(int64_t g) {
  if (grad_sharded() && sync_) {  // block g's gradients into a free workspace buffer
    const int slot = static_cast<int>(g % 2);
    for (WorkPtr& w : block_grad_work_[slot]) w->wait();
    block_grad_work_[slot].clear();
    zero_workspace(block_grad_[slot], g);
    point_group(g, block_grad_[slot], /*grad=*/true);
  }
  if (!sharded_values()) return;
  gather(g, true);
  if (g - 1 >= 1) gather(g - 1, false);
}

void DataParallel::assign_values(const Tensor& values) {
  LMF_CHECK(values.numel() == layout_.n, "assign_values: {} values for {}", values.numel(),
            layout_.n);
  if (sharded_values())
    vshard_.copy_from(values.view({layout_.n}).slice(my_lo_, my_hi_ - my_lo_));
  else
    ps_.assign_values(values);
  refresh_master();
}

void DataParallel::gather_full_model() {
  if (!sharded_values()) return;
  ps_.allocate_values();
  world_.barrier();
  gather_values(0, ps_.flat_values(), layout_.counts(0, layout_.n))->wait();
  if (ps_.has_bf16()) ps_.enable_bf16();  // whole-model bf16 copies again, made from it
  model_.set_hooks(nullptr);              // the model now reads its own full buffer
}

size_t DataParallel::parameter_bytes() const {
  return sharded_values() ? vshard_.nbytes() : ps_.value_bytes();
}

size_t DataParallel::gradient_bytes() const {
  return ps_.grad_bytes() + grad_ws_.capacity() +
         (grad_sharded() ? gshard_.nbytes() + (rs_tmp_used_ ? rs_tmp_.nbytes() : 0) : 0);
}

}  // namespace lmforge::dist
