#include "lmforge/dist/tensor_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>

#include "lmforge/core/error.h"

namespace lmforge::dist {

namespace {

using Run = ShareRun;  // [whole, whole + len) of the whole's tensor is [share, ...) of r's

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// How a parameter is split, by its name: the one place that knows.
enum class Role {
  kQkvRows,     // attn.qkv weight and bias: this rank's q, k and v heads (rows)
  kFcRows,      // mlp.fc weight and bias: its hidden units (gelu), or gate and up (swiglu)
  kLoraOut,     // LoRA's B^T (r, out) of qkv or fc: each row split as the layer's bias
  kInColumns,   // attn.proj and mlp.proj weights, and their LoRA A (r, K): by input columns
  kRowBias,     // the row-parallel biases: replicated, gradients from whole outputs
  kPartial,     // replicated, gradients partial on each rank: q/k norms (its heads), LoRA's
                // A of qkv and fc (its outputs), B^T of proj and mlp.proj (its inputs)
  kVocabRows,   // the token embeddings and LM head under vocabulary parallelism: its rows
  kReplicated,  // the rest (embeddings, norms, head): under sequence parallelism their
                // gradients come from each rank's own rows
};
Role role(const std::string& name, bool vocab_parallel) {
  auto any = [&](std::initializer_list<const char*> suffixes) {
    for (const char* x : suffixes)
      if (ends_with(name, x)) return true;
    return false;
  };
  if (any({".attn.qkv.weight", ".attn.qkv.bias"})) return Role::kQkvRows;
  if (any({".mlp.fc.weight", ".mlp.fc.bias"})) return Role::kFcRows;
  if (any({".attn.qkv.lora_b", ".mlp.fc.lora_b"})) return Role::kLoraOut;
  if (any({".attn.proj.weight", ".mlp.proj.weight", ".attn.proj.lora_a", ".mlp.proj.lora_a"}))
    return Role::kInColumns;
  if (any({".attn.proj.bias", ".mlp.proj.bias"})) return Role::kRowBias;
  if (any({".attn.q_norm.weight", ".attn.k_norm.weight", ".attn.qkv.lora_a", ".mlp.fc.lora_a",
           ".attn.proj.lora_b", ".mlp.proj.lora_b"}))
    return Role::kPartial;
  if (vocab_parallel && (name == "tok_emb.weight" || name == "lm_head.weight"))
    return Role::kVocabRows;
  return Role::kReplicated;
}

// Whether a share of `whole`'s model whose token embeddings have `share_vocab` rows holds a
// part of the vocabulary (tensor_parallel_config's vocab_parallel).
bool splits_vocab(int64_t share_vocab, const ModelConfig& whole) {
  return share_vocab != whole.vocab_size;
}

// Rank r of tp's runs of parameter `name`, shaped `shape` in the whole model `c` (vocab: split
// by vocabulary too).
std::vector<Run> share_runs(const std::string& name, const Shape& shape, const ModelConfig& c,
                            int tp, int r, bool vocab) {
  const int64_t HS = c.head_size(), NH = c.n_head, NKV = c.kv_heads(), F = c.ffn();
  const int64_t nh = NH / tp, nkv = NKV / tp, f = F / tp;
  const int64_t width = shape.ndim() == 2 ? shape[1] : 1;  // a row's elements (1: a bias)
  std::vector<Run> runs;
  switch (role(name, vocab)) {
    case Role::kQkvRows:  // [q heads | k heads | v heads] by rows: this rank's heads of each
      runs.push_back({r * nh * HS * width, 0, nh * HS * width});
      runs.push_back({(NH + r * nkv) * HS * width, nh * HS * width, nkv * HS * width});
      runs.push_back(
          {(NH + NKV + r * nkv) * HS * width, (nh + nkv) * HS * width, nkv * HS * width});
      break;
    case Role::kFcRows:
      runs.push_back({r * f * width, 0, f * width});  // gelu's hidden units, or swiglu's gate
      if (c.gated_mlp()) runs.push_back({(F + r * f) * width, f * width, f * width});  // up
      break;
    case Role::kLoraOut: {  // each of the r rows as the layer's bias
      const int64_t out = shape[1];
      const std::string bias = name.substr(0, name.size() - 7) + ".bias";  // "<layer>.lora_b"
      const std::vector<Run> one = share_runs(bias, Shape{out}, c, tp, r, vocab);
      int64_t share = 0;
      for (const Run& run : one) share += run.len;
      for (int64_t row = 0; row < shape[0]; ++row)
        for (const Run& run : one)
          runs.push_back({row * out + run.whole, row * share + run.share, run.len});
      break;
    }
    case Role::kVocabRows: {  // (V, C): this rank's rows
      const int64_t v = shape[0] / tp;
      runs.push_back({r * v * width, 0, v * width});
      break;
    }
    case Role::kInColumns: {  // (rows, K): each row's slice of this rank's inputs
      const int64_t K = shape[1], k = K / tp;
      for (int64_t row = 0; row < shape[0]; ++row) runs.push_back({row * K + r * k, row * k, k});
      break;
    }
    default:
      runs.push_back({0, 0, shape.numel()});
  }
  return runs;
}

Tensor on_host(const Tensor& t) { return t.device() == Device::kCPU ? t : t.to(Device::kCPU); }

// The whole model's parameter shapes, by name (a layout: nothing allocated).
std::shared_ptr<const std::map<std::string, Shape>> whole_shapes(const ModelConfig& whole) {
  auto shapes = std::make_shared<std::map<std::string, Shape>>();
  const Transformer layout(whole, Transformer::MeasureOnly{});
  for (const Param& p : layout.params().params()) (*shapes)[p.name] = p.shape;
  return shapes;
}

}  // namespace

ModelConfig tensor_parallel_config(const ModelConfig& whole, int tp, bool vocab_parallel) {
  if (tp < 1) fail("dist.tensor_parallel: expected 1 or more ranks, got {}", tp);
  ModelConfig c = whole;
  if (tp == 1) return c;
  auto divides = [&](int64_t n, const char* what) {
    if (n % tp != 0)
      fail(
          "dist.tensor_parallel: {} does not divide the model's {} ({}): each rank holds an "
          "equal share; choose a divisor of {}",
          tp, what, n, n);
  };
  divides(whole.n_head, "attention heads (model.n_head)");
  divides(whole.kv_heads(), "key/value heads (model.n_kv_head)");
  divides(whole.ffn(), "MLP width (model.ffn_hidden)");
  c.head_dim = whole.head_size();
  c.n_head = whole.n_head / tp;
  c.n_kv_head = whole.kv_heads() / tp;
  c.ffn_hidden = whole.ffn() / tp;
  if (vocab_parallel) {
    divides(whole.vocab_size, "vocabulary (model.vocab_size)");
    c.vocab_size = whole.vocab_size / tp;
  }
  return c;
}

ShareOfWhole tensor_parallel_share_of(const ModelConfig& whole, int tp, int r,
                                      bool vocab_parallel) {
  return [shapes = whole_shapes(whole), whole, tp, r, vocab_parallel](const Param& p) {
    auto it = shapes->find(p.name);
    LMF_CHECK(it != shapes->end(), "parameter {} is not in the whole model", p.name);
    return ParamShare{it->second, share_runs(p.name, it->second, whole, tp, r, vocab_parallel)};
  };
}

bool tensor_parallel_replicated(const std::string& name, bool vocab_parallel) {
  const Role k = role(name, vocab_parallel);
  return k == Role::kRowBias || k == Role::kPartial || k == Role::kReplicated;
}

void set_tensor_parallel_share(const ModelConfig& whole, Transformer& share, int tp, int r,
                               const ValueStream& values) {
  ParamSet& sp = share.params();
  Tensor host = Tensor::zeros({sp.flat_size()}, DType::kF32);  // (alignment gaps: 0)
  float* out = host.data<float>();
  const bool vocab = splits_vocab(share.config().vocab_size, whole);
  sp.take_stream(values, [&](const Param& q, const Param& p, const float* v) {
    for (const Run& run : share_runs(p.name, p.shape, whole, tp, r, vocab))
      std::memcpy(out + sp.offset(q) + run.share, v + run.whole, sizeof(float) * run.len);
  });
  sp.assign_values(host);
}

TensorParallel::TensorParallel(Communicator& tp, const ModelConfig& whole, Transformer& model,
                               bool sequence_parallel)
    : comm_(tp),
      whole_(whole),
      model_(model),
      sequence_parallel_(sequence_parallel),
      vocab_parallel_(splits_vocab(model.config().vocab_size, whole)),
      whole_shapes_(whole_shapes(whole)) {
  model_.set_partial_sums(this, /*adds_bias=*/tp.rank() == 0);
  if (vocab_parallel_) {
    const int64_t v = model.config().vocab_size;
    model_.set_vocab_parallel(this, tp.rank() * v, whole.vocab_size, tp.size(),
                              /*adds_positions=*/tp.rank() == 0);
  }
}

// (The share stays set up for its partial sums: it is not used without them.)
TensorParallel::~TensorParallel() = default;

void TensorParallel::sum(const Tensor& t) const {
  LMF_CHECK(t.dtype() == DType::kF32, "tensor parallelism sums fp32 partial sums, got {}",
            dtype_name(t.dtype()));
  comm_.all_reduce(t.data<float>(), t.numel())->wait();
}

void TensorParallel::gather(const Tensor& local, const Tensor& all) const {
  LMF_CHECK(all.numel() == local.numel() * size() && all.dtype() == local.dtype(),
            "tensor parallelism: gather {} ranks' {} into {}", size(), local.shape().str(),
            all.shape().str());
  const std::vector<int64_t> counts(size(), local.numel());
  if (local.dtype() == DType::kBF16)
    comm_.all_gather(local.bf16_data(), all.bf16_data(), counts)->wait();
  else
    comm_.all_gather(local.data<float>(), all.data<float>(), counts)->wait();
}

void TensorParallel::sum_scatter(const Tensor& all, const Tensor& local) const {
  LMF_CHECK(all.numel() == local.numel() * size() && all.dtype() == DType::kF32 &&
                local.dtype() == DType::kF32,
            "sequence parallelism: sum {} into {} rows of {} (fp32)", all.shape().str(), size(),
            local.shape().str());
  comm_
      .reduce_scatter(all.data<float>(), local.data<float>(),
                      std::vector<int64_t>(size(), local.numel()))
      ->wait();
}

void TensorParallel::sum_over_group(double* v, int64_t n) {
  if (sequence_parallel_) comm_.all_reduce(v, n)->wait();
}

template <typename F>
void TensorParallel::for_each_grad(const Tensor& shard, const PackedRange* pack, F&& f) {
  const ParamSet& ps = model_.params();
  for (const Param& p : ps.params()) {
    if (p.frozen) continue;
    if (!pack) {
      f(p, p.grad);
      continue;
    }
    const int64_t off = ps.offset(p);
    const int64_t lo = std::max(off, pack->lo()), hi = std::min(off + p.shape.numel(), pack->hi());
    if (lo < hi) f(p, shard.slice(pack->at(lo), hi - lo));
  }
}

void TensorParallel::sum_partial_grads(const Tensor& shard, const PackedRange* pack) {
  for_each_grad(shard, pack, [&](const Param& p, const Tensor& g) {
    const Role k = role(p.name, vocab_parallel_);
    if (k == Role::kPartial || (sequence_parallel_ && k == Role::kReplicated))
      comm_.all_reduce(g.data<float>(), g.numel())->wait();
  });
}

double TensorParallel::grad_norm(const Tensor& shard, const PackedRange* pack,
                                 Communicator* shards) {
  double ss = 0;
  for_each_grad(shard, pack, [&](const Param& p, const Tensor& g) {
    if (rank() == 0 || !tensor_parallel_replicated(p.name, vocab_parallel_))
      ss += ops::sum_squares(g);
  });
  if (shards) shards->all_reduce(&ss, 1)->wait();
  comm_.all_reduce(&ss, 1)->wait();
  return std::sqrt(ss);
}

void TensorParallel::assemble(const Tensor& mine, const std::vector<std::vector<Run>>& runs,
                              const Tensor& out) {
  // In pieces of at most 4M elements per rank through a staging buffer where `mine` is (NCCL moves
  // device memory), each piece copied to the host and its runs placed into out: a few times
  // 16 MiB beside the whole parameter.
  const int n = size();
  const int64_t numel = mine.numel(), piece = std::min<int64_t>(numel, int64_t{1} << 22);
  if (numel == 0) return;
  const Tensor staging = Tensor::empty({piece * n}, DType::kF32, mine.device());
  for (int64_t at = 0; at < numel; at += piece) {
    const int64_t len = std::min(piece, numel - at);
    comm_.all_gather(mine.data<float>() + at, staging.data<float>(), std::vector<int64_t>(n, len))
        ->wait();
    if (!out.defined()) continue;
    const Tensor host = on_host(staging.slice(0, len * n));
    for (int r = 0; r < n; ++r)
      for (const Run& run : runs[r]) {  // its elements in [at, at + len) of rank r's share
        const int64_t a = std::max(run.share, at), z = std::min(run.share + run.len, at + len);
        if (a < z)
          std::memcpy(out.data<float>() + run.whole + (a - run.share),
                      host.data<float>() + r * len + (a - at), sizeof(float) * (z - a));
      }
  }
}

Tensor TensorParallel::gather_param(const Param& q, int what, const Take& take, bool writes) {
  const int n = size();
  const bool lead = writes && rank() == 0;
  const Tensor mine = take(q, what);  // (collective over the ranks sharding this share)
  if (!writes || !mine.defined()) return Tensor();  // (Muon's matrices: no second moment)
  const int64_t len = q.shape.numel();
  LMF_CHECK(mine.dtype() == DType::kF32 && mine.numel() == len,
            "tensor parallelism gathers fp32 parameters whole: {}", q.name);
  const Shape& shape = whole_shapes_->at(q.name);
  const Tensor out = lead ? Tensor::empty(shape, DType::kF32) : Tensor();
  if (tensor_parallel_replicated(q.name, vocab_parallel_)) {
    // Rank 0's, its values first checked equal on every rank of the group (a 40-bit hash of each
    // rank's bits, summed over the group: exact in a double for up to 8192 ranks).
    const Tensor host = on_host(mine.view({len}));
    if (what == 0) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(host.data<float>());
      uint64_t h = 1469598103934665603ull;  // FNV-1a
      for (size_t b = 0; b < sizeof(float) * static_cast<size_t>(len); ++b)
        h = (h ^ bytes[b]) * 1099511628211ull;
      double sums[1] = {static_cast<double>(h >> 24)};
      comm_.all_reduce(sums, 1)->wait();
      LMF_CHECK(!lead || sums[0] == static_cast<double>(h >> 24) * n,
                "tensor parallelism: replicated parameter {} differs between the group's ranks",
                q.name);
    }
    if (lead) out.view({len}).copy_from(host);
    return out;
  }
  std::vector<std::vector<Run>> runs(n);
  if (lead)
    for (int r = 0; r < n; ++r) runs[r] = share_runs(q.name, shape, whole_, n, r, vocab_parallel_);
  assemble(mine.view({len}), runs, out);  // (every rank's share, in pieces)
  return out;
}

AdamW::MuonShares TensorParallel::muon_shares(Device device) {
  // The whole model's shapes of the share's Muon matrices, and a buffer for every rank's share
  // of the largest (allocated once: a step allocates nothing).
  const auto shapes = whole_shapes_;
  int64_t most = 0;
  for (const Param& q : model_.params().params())
    if (muon_param(q)) most = std::max(most, q.shape.numel());
  auto staging = std::make_shared<Tensor>(Tensor::empty({most * size()}, DType::kF32, device));
  muon_staging_bytes_ = staging->nbytes();
  AdamW::MuonShares m;
  m.whole_shape = [shapes](const Param& p) { return shapes->at(p.name); };
  m.gather = [this, shapes, staging](const Param& p, const Tensor& x, const Tensor& whole) {
    const int n = size();
    const int64_t len = x.numel();
    const Tensor all = staging->slice(0, len * n);
    comm_.all_gather(x.data<float>(), all.data<float>(), std::vector<int64_t>(n, len))->wait();
    for (int r = 0; r < n; ++r)
      for (const Run& run : share_runs(p.name, shapes->at(p.name), whole_, n, r, vocab_parallel_))
        whole.slice(run.whole, run.len).copy_from(all.slice(r * len + run.share, run.len));
  };
  m.take = [this, shapes](const Param& p, const Tensor& whole, const Tensor& x) {
    for (const Run& run :
         share_runs(p.name, shapes->at(p.name), whole_, size(), rank(), vocab_parallel_))
      x.slice(run.share, run.len).copy_from(whole.slice(run.whole, run.len));
  };
  // (the group's ranks take turns at the Newton-Schulz iterations)
  m.ranks = size();
  m.rank = rank();
  m.broadcast = [this](const Tensor& whole, int root) {
    comm_.broadcast(whole.raw(), static_cast<int64_t>(whole.nbytes()), root)->wait();
  };
  return m;
}

}  // namespace lmforge::dist
