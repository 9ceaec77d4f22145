#include "lmforge/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>
#include <utility>

#include "lmforge/backend/ops.h"

namespace lmforge {

bool muon_param(const Param& p) {
  return p.shape.ndim() == 2 && !p.frozen && p.name.starts_with("blocks.");
}

std::vector<OptSlot> whole_slots(ParamSet& ps) {
  std::vector<OptSlot> out;
  for (Param& p : ps.params())
    if (!p.frozen) out.push_back({&p, 0, p.shape.numel(), p.value, p.grad, p.value_bf16});
  return out;
}

AdamW::AdamW(ParamSet& params, const AdamWOptions& opt) : AdamW(params, whole_slots(params), opt) {}

AdamW::AdamW(ParamSet& params, std::vector<OptSlot> slots, const AdamWOptions& opt)
    : params_(params), opt_(opt), slots_(std::move(slots)) {
  // The moments live where the slots' values do (the GPU; the host under dist.offload).
  const Device device = slots_.empty() ? Device::kCPU : slots_[0].value.device();
  muon_slot_.assign(params_.params().size(), -1);
  std::unordered_map<const Param*, size_t> index;
  for (const Param& p : params_.params()) index.emplace(&p, index.size());
  for (size_t i = 0; i < slots_.size(); ++i) {
    const OptSlot& s = slots_[i];
    if (!opt_.muon.on || !muon_param(*s.param)) continue;
    LMF_CHECK(s.value.dtype() == DType::kF32, "Muon steps fp32 matrices, but {} is {}",
              s.param->name, dtype_name(s.value.dtype()));
    const auto at = index.find(s.param);
    LMF_CHECK(at != index.end(), "AdamW: slot {} is not a parameter of its set", s.param->name);
    muon_slot_[at->second] = static_cast<int64_t>(i);
  }
  state_ = Arena::planned(
      [&](Arena& a) {
        m_.clear();
        v_.clear();
        w_.clear();
        for (const OptSlot& s : slots_) {
          Shape shape = s.whole() ? s.param->shape : Shape{s.len};
          m_.push_back(a.alloc(shape, DType::kF32));
          const bool muon = opt_.muon.on && muon_param(*s.param);  // no second moment
          v_.push_back(muon ? Tensor() : a.alloc(shape, DType::kF32));
          const bool master = opt_.fp32_masters && s.value.dtype() == DType::kBF16;
          w_.push_back(master ? a.alloc(shape, DType::kF32) : Tensor());
        }
      },
      device);
  // Decided by the set, not by this rank's slots (a shard may hold frozen weights alone): every
  // rank of a collective save then names the same tensors.
  masters_ = opt_.fp32_masters && params_.bf16_master();
  masters_from_values();
  plan_muon_workspace(device);
}

void AdamW::masters_from_values() {
  for (size_t i = 0; i < slots_.size(); ++i)
    if (w_[i].defined()) ops::from_bf16(w_[i].view({slots_[i].len}), slots_[i].value);
}

// Muon's largest matrix and Gram matrix, in elements: of every Muon matrix in the set (a rank
// holding pieces gathers each whole), or of the whole matrices they are shares of.
void AdamW::plan_muon_workspace(Device device) {
  int64_t most = 0, most_gram = 0, share = 0;
  for (const Param& p : params_.params()) {
    if (!opt_.muon.on || !muon_param(p)) continue;
    const Shape w = shares_.whole_shape ? shares_.whole_shape(p) : p.shape;
    const int64_t side = std::min(w[0], w[1]);
    most = std::max(most, w.numel());
    most_gram = std::max(most_gram, side * side);
    share = std::max(share, p.shape.numel());
  }
  ns_x_ = ns_next_ = ns_gram_ = ns_poly_ = ns_x16_ = ns_gram16_ = ns_poly16_ = ns_share_ =
      ns_other_ = Tensor();
  ns_arena_ = Arena::planned(
      [&](Arena& a) {
        if (most == 0) return;
        ns_x_ = a.alloc({most});
        ns_next_ = a.alloc({most});
        ns_gram_ = a.alloc({most_gram});
        ns_poly_ = a.alloc({most_gram});
        if (shares_.whole_shape) {
          ns_share_ = a.alloc({share * shares_.ranks});
          if (shares_.ranks > 1) ns_other_ = a.alloc({most});
        }
        if (!opt_.muon.bf16) return;
        ns_x16_ = a.alloc({most}, DType::kBF16);
        ns_gram16_ = a.alloc({most_gram}, DType::kBF16);
        ns_poly16_ = a.alloc({most_gram}, DType::kBF16);
      },
      device);
}

void AdamW::set_muon_shares(MuonShares shares) {
  LMF_CHECK(shares.whole_shape && shares.gather && shares.take &&
                (shares.ranks == 1 || shares.broadcast) && shares.rank >= 0 &&
                shares.rank < shares.ranks,
            "set_muon_shares: its functions, rank {} of {}", shares.rank, shares.ranks);
  shares_ = std::move(shares);
  plan_muon_workspace(slots_.empty() ? Device::kCPU : slots_[0].value.device());
}

// torch.optim.Muon's step for one matrix W (R, C) with gradient g:
//   buf = mu buf + (1 - mu) g;  u = nesterov ? (1 - mu) g + mu buf : buf;
//   X = u / max(|u|_F, eps), then ns_steps times (the wide orientation; a tall X iterates on
//   X^T X from the right, which is the same as torch's transposing it):
//     A = X X^T;  X = a X + (b A + c A^2) X;
//   W = (1 - lr wd) W - lr_adj X.
// The fused attn.qkv and gated mlp.fc are each the projections stacked (Param::row_blocks): every
// block steps as its own matrix (orthogonalize, muon_apply), as torch.optim.Muon over a Hugging
// Face Llama's q_proj, k_proj, v_proj, gate_proj and up_proj, and the nanoGPT speedrun's q, k, v.
void AdamW::muon_direction(size_t i, const Tensor& x, double grad_scale) {
  const OptSlot& s = slots_[i];
  const MuonOptions& mo = opt_.muon;
  const Tensor g = s.grad.view({s.len}), buf = m_[i].view({s.len});
  const Tensor u = x.view({x.numel()}).slice(s.begin, s.len);
  ops::axpby(buf, mo.momentum, g, (1 - mo.momentum) * grad_scale);
  u.copy_from(buf);
  if (mo.nesterov) ops::axpby(u, mo.momentum, g, (1 - mo.momentum) * grad_scale);
}

void AdamW::newton_schulz(Tensor& x, Tensor& next, int64_t R, int64_t C) {
  const MuonOptions& mo = opt_.muon;
  const int64_t k = std::min(R, C);
  const bool tall = R > C;
  const Tensor gram = ns_gram_.slice(0, k * k).view({k, k});
  const Tensor poly = ns_poly_.slice(0, k * k).view({k, k});
  // With bf16 products, t rounded to bf16 in place (its bf16 copy, in buf16, is what selects the
  // bf16 matmul as a product's weight operand): as in torch's iteration, X and A = XX^T are each
  // rounded once and used so everywhere, in the products and in the sums (a mix of a rounded and
  // an unrounded X or A lands about twice as far from float64's result). Without, t itself.
  auto rounded = [&](const Tensor& t, const Tensor& buf16) {
    if (!mo.bf16) return t;
    Tensor t16 = buf16.slice(0, t.numel()).view(t.shape());
    ops::to_bf16(t16, t);
    ops::from_bf16(t, t16);
    return t16;
  };
  ops::scale(x, 1.0 / std::max(std::sqrt(ops::sum_squares(x)), mo.eps));
  for (int it = 0; it < mo.ns_steps; ++it) {
    const Tensor xw = rounded(x, ns_x16_);  // (wide: X is a weight twice)
    // gram = X^T X (tall: a weight gradient's product) or X X^T (wide).
    if (tall)
      ops::linear_backward({}, gram, {}, x, x,
                           mo.bf16 ? ns_gram16_.slice(0, k * k).view({k, k}) : gram,
                           /*dweight_accumulate=*/false);
    else
      ops::linear_forward(gram, x, xw, {});
    // gram gram^T = gram^2 (symmetric)
    ops::linear_forward(poly, gram, rounded(gram, ns_gram16_), {});
    ops::axpby(poly, mo.c, gram, mo.b);  // b gram + c gram^2, symmetric too
    if (tall) {
      Tensor poly16 = mo.bf16 ? ns_poly16_.slice(0, k * k).view({k, k}) : poly;
      if (mo.bf16) ops::to_bf16(poly16, poly);
      ops::linear_forward(next, x, poly16, {});  // X poly^T = X poly
    } else {  // poly X, as an input gradient (dout poly, weight X)
      ops::linear_backward(next, {}, {}, poly, /*inp: its shape only*/ next, xw,
                           /*dweight_accumulate=*/true, /*dinp_accumulate=*/false);
    }
    ops::axpby(next, 1.0, x, mo.a);
    std::swap(x, next);
  }
}

namespace {
// The row blocks of p (Param::row_blocks; all its rows when none), as rows of p.
std::vector<int64_t> row_blocks(const Param& p) {
  if (p.row_blocks.empty()) return {p.shape[0]};
  int64_t rows = 0;
  for (int64_t r : p.row_blocks) rows += r;
  LMF_CHECK(rows == p.shape[0], "{}: row blocks of {} rows in a matrix of {}", p.name, rows,
            p.shape[0]);
  return p.row_blocks;
}

// The rows of the whole matrix w per row of p: 1, or under tensor parallelism the group's size
// where p holds a share of w's rows (each of its blocks a share of the whole's same block).
int64_t rows_scale(const Param& p, const Shape& w) {
  LMF_CHECK(w[0] % p.shape[0] == 0, "{}: {} is not a share of the rows of {}", p.name,
            p.shape.str(), w.str());
  return w[0] / p.shape[0];
}
}  // namespace

void AdamW::orthogonalize(const Param& p, Tensor& X, Tensor& next, const Shape& w) {
  const int64_t C = w[1], scale = rows_scale(p, w);
  const Tensor x = X.view({w.numel()}), n = next.view({w.numel()});
  bool traded = false;
  int64_t row = 0;
  for (int64_t rows : row_blocks(p)) {
    rows *= scale;
    Tensor xb = x.slice(row * C, rows * C).view({rows, C});
    Tensor nb = n.slice(row * C, rows * C).view({rows, C});
    const void* was = xb.raw();
    newton_schulz(xb, nb, rows, C);
    traded = xb.raw() != was;  // (the same for every block: the same number of iterations)
    row += rows;
  }
  if (traded) std::swap(X, next);
}

void AdamW::muon_apply(size_t i, const Tensor& x, double lr, const Shape& w) {
  const OptSlot& s = slots_[i];
  const Param& p = *s.param;
  const MuonOptions& mo = opt_.muon;
  const double muon_lr = lr * mo.lr_ratio;
  const double wd = p.decay ? opt_.weight_decay : 0.0;
  const int64_t C = w[1], cols = p.shape[1], scale = rows_scale(p, w);
  const Tensor value = s.value.view({s.len}), dir = x.view({x.numel()});
  int64_t at = 0;  // the block's first element in p's layout
  for (const int64_t rows : row_blocks(p)) {
    const auto R = static_cast<double>(rows * scale);  // the block's rows in the matrix Muon saw
    const double ratio = mo.match_rms_adamw ? 0.2 * std::sqrt(std::max(R, static_cast<double>(C)))
                                            : std::sqrt(std::max(1.0, R / C));
    // The part of the block in the slot.
    const int64_t begin = std::max(at, s.begin), end = std::min(at + rows * cols, s.begin + s.len);
    if (begin < end)
      ops::axpby(value.slice(begin - s.begin, end - begin), 1 - muon_lr * wd,
                 dir.slice(begin, end - begin), -muon_lr * ratio);
    at += rows * cols;
  }
}

// Every Muon matrix of the set in order: its direction from this rank's slot (if any), gathered
// whole when slots are pieces, orthogonalized and applied to the slot. Under tensor parallelism the
// group's ranks take turns: the matrices this rank holds go in rounds of the group's size, the
// k-th of round r orthogonalized by rank (k + r) mod N (muon_rounds: the owners rotate, so that
// no rank always takes the same kind of matrix).
void AdamW::muon_steps(double lr, double grad_scale) {
  const auto& ps = params_.params();
  const bool shares = static_cast<bool>(shares_.whole_shape);
  std::vector<std::pair<size_t, int64_t>> round;  // (parameter, slot) of this round's matrices
  int rounds = 0;
  for (size_t j = 0; j < ps.size(); ++j) {
    const Param& p = ps[j];
    if (!muon_param(p)) continue;
    const int64_t i = muon_slot_[j];
    if (i < 0 && !muon_gather_) continue;  // (frozen: no slot anywhere)
    // This rank's direction of p (of its share under tensor parallelism), whole once gathered
    // over the ranks holding its pieces; then the matrix Muon sees (the whole model's, assembled
    // from the group's shares), orthogonalized, and this rank's part of it applied.
    const int64_t n = p.shape.numel();
    const int64_t k = static_cast<int64_t>(round.size());  // (its place in the round)
    const Tensor x =
        (shares ? ns_share_.slice(k * (ns_share_.numel() / shares_.ranks), n) : ns_x_.slice(0, n));
    if (i >= 0) muon_direction(i, x, grad_scale);
    if (muon_gather_) muon_gather_(p, x);
    LMF_CHECK(i < 0 || muon_gather_ || slots_[i].whole(),
              "Muon over a piece of {} needs set_muon_gather", p.name);
    if (i < 0) continue;  // (the ranks of a tensor-parallel group hold the same pieces)
    if (shares_.ranks > 1) {
      round.emplace_back(j, i);
      if (static_cast<int>(round.size()) == shares_.ranks) {
        muon_rounds(round, rounds++, lr);
        round.clear();
      }
      continue;
    }
    const Shape w = shares ? shares_.whole_shape(p) : p.shape;
    const int64_t R = w[0], C = w[1];
    Tensor X = ns_x_.slice(0, R * C).view({R, C}), next = ns_next_.slice(0, R * C).view({R, C});
    if (shares) shares_.gather(p, x, X.view({R * C}));
    orthogonalize(p, X, next, w);  // (X may now be the other buffer)
    if (shares) shares_.take(p, X.view({R * C}), x);
    muon_apply(i, shares ? x : X.view({R * C}), lr, w);
  }
  if (!round.empty()) muon_rounds(round, rounds, lr);
}

void AdamW::muon_rounds(const std::vector<std::pair<size_t, int64_t>>& matrices, int r, double lr) {
  // Every matrix of the round gathered whole on every rank (a collective; this rank keeps its
  // own: the matrix at its place in the round, if there is one), orthogonalized by its rank, and
  // broadcast from there: each rank takes its share of each and applies it.
  const auto& ps = params_.params();
  auto share_of = [&](size_t k) {  // (the round's k-th, at k times the largest share)
    return ns_share_.slice(static_cast<int64_t>(k) * (ns_share_.numel() / shares_.ranks),
                           ps[matrices[k].first].shape.numel());
  };
  auto whole_of = [&](size_t k) { return shares_.whole_shape(ps[matrices[k].first]); };
  // The k-th matrix's rank: (k + r) mod N; this rank's matrix: the one at (rank - r) mod N.
  const int N = shares_.ranks;
  const size_t own = static_cast<size_t>(((shares_.rank - r) % N + N) % N);
  for (size_t k = 0; k < matrices.size(); ++k)
    shares_.gather(ps[matrices[k].first], share_of(k),
                   (k == own ? ns_x_ : ns_other_).slice(0, whole_of(k).numel()));
  Tensor result;  // this rank's matrix, orthogonalized
  if (own < matrices.size()) {
    const Shape w = whole_of(own);
    const int64_t R = w[0], C = w[1];
    Tensor X = ns_x_.slice(0, R * C).view({R, C}), next = ns_next_.slice(0, R * C).view({R, C});
    orthogonalize(ps[matrices[own].first], X, next, w);  // (X may now be the other buffer)
    result = X.view({R * C});
  }
  for (size_t k = 0; k < matrices.size(); ++k) {
    const Shape w = whole_of(k);
    const Tensor whole = k == own ? result : ns_other_.slice(0, w.numel());
    shares_.broadcast(whole, static_cast<int>((static_cast<int>(k) + r) % N));
    const Param& p = ps[matrices[k].first];
    shares_.take(p, whole, share_of(k));
    muon_apply(static_cast<size_t>(matrices[k].second), share_of(k), lr, w);
  }
}

void AdamW::step(double lr, double grad_scale) {
  ++t_;
  bool refreshed = true, masters = false;
  if (opt_.muon.on) muon_steps(lr, grad_scale);
  std::vector<ops::AdamwItem>& items = items_;
  items.clear();
  for (size_t i = 0; i < slots_.size(); ++i) {
    const OptSlot& s = slots_[i];
    if (!v_[i].defined()) {  // Muon (muon_steps): its bf16 copy converted, when beside it
      const Tensor& bf16 = s.param->value_bf16;
      if (bf16.defined() && s.whole() && s.value.raw() == s.param->value.raw())
        ops::to_bf16(bf16, s.value.view(s.param->shape));
      else
        refreshed = refreshed && !bf16.defined();
      continue;
    }
    // bf16 master weights are their own bf16 copies, rounded stochastically by the update; their
    // fp32 working copies (1-D parameters) are refreshed before the next forward. With an fp32
    // master the update runs on it and writes the value as its bf16 copy (rounded to nearest),
    // the master first widened from the value wherever the two disagree.
    const bool master16 = s.value.dtype() == DType::kBF16;
    LMF_CHECK(!s.param->value.defined() || s.param->value.dtype() == s.value.dtype(),
              "AdamW over {} was made before ParamSet::use_bf16_master; make it after",
              s.param->name);
    masters = masters || master16;
    // A whole parameter's bf16 copy may be enabled after the optimizer was made; it is written
    // here only where it lives beside the slot (not from dist.offload's host copy of a GPU
    // model: those copies are reconverted on use).
    const Tensor& bf16 = master16 ? Tensor() : s.whole() ? s.param->value_bf16 : s.value_bf16;
    const bool beside = bf16.defined() && bf16.device() == s.value.device();
    refreshed = refreshed && (beside || !bf16.defined());
    if (w_[i].defined()) {
      items.push_back({w_[i].view({s.len}), s.grad, m_[i], v_[i], s.value, s.param->decay,
                       params_.offset(*s.param) + s.begin, /*keep_master=*/true});
      continue;
    }
    items.push_back({s.value, s.grad, m_[i], v_[i], beside ? bf16 : Tensor(), s.param->decay,
                     params_.offset(*s.param) + s.begin});
  }
  // All AdamW slots at once (one launch on a GPU).
  if (!items.empty())
    ops::adamw_update_all(items, lr, opt_.beta1, opt_.beta2, opt_.eps, opt_.weight_decay, t_,
                          grad_scale, opt_.seed);
  if (masters)
    params_.invalidate_bf16();
  else if (params_.has_bf16() && refreshed)
    params_.bf16_refreshed();
}

}  // namespace lmforge
