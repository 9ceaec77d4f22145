#include "lmforge/train/objective.h"

#include <algorithm>
#include <cmath>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {
double sigmoid(double x) {
  return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x));
}
double log_sigmoid(double x) {
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}
}  // namespace

DpoLoss parse_dpo_loss(const std::string& s) {
  if (s == "sigmoid") return DpoLoss::kSigmoid;
  if (s == "hinge") return DpoLoss::kHinge;
  if (s == "ipo") return DpoLoss::kIpo;
  fail("train.dpo_loss: expected sigmoid, hinge or ipo (TRL's loss_type), got \"{}\"", s);
}

PairTerm dpo_pair(const PairLogps& p, double beta, double label_smoothing, DpoLoss loss) {
  // IPO compares mean log-probabilities (TRL divides policy's and reference's by the targets).
  LMF_CHECK(loss != DpoLoss::kIpo || (p.n_chosen > 0 && p.n_rejected > 0), "ipo without targets");
  const double sc = loss == DpoLoss::kIpo ? 1.0 / static_cast<double>(p.n_chosen) : 1.0;
  const double sr = loss == DpoLoss::kIpo ? 1.0 / static_cast<double>(p.n_rejected) : 1.0;
  const double dc = (p.chosen - p.ref_chosen) * sc, dr = (p.rejected - p.ref_rejected) * sr;
  PairTerm t;
  t.reward_chosen = beta * dc;
  t.reward_rejected = beta * dr;
  const double z = t.reward_chosen - t.reward_rejected;  // beta d
  double dd = 0;                                         // d loss / d d
  switch (loss) {
    case DpoLoss::kSigmoid: {
      const double s = label_smoothing;
      t.loss = -(1 - s) * log_sigmoid(z) - s * log_sigmoid(-z);
      dd = beta * (-(1 - s) * sigmoid(-z) + s * sigmoid(z));
      break;
    }
    case DpoLoss::kHinge:
      t.loss = std::max(0.0, 1 - z);
      dd = 1 - z > 0 ? -beta : 0.0;  // torch's relu: no gradient at 0
      break;
    case DpoLoss::kIpo: {
      const double e = (dc - dr) - 1 / (2 * beta);
      t.loss = e * e;
      dd = 2 * e;
      break;
    }
  }
  t.dchosen = dd * sc;
  t.drejected = -dd * sr;
  return t;
}

namespace {
// Mean log-probabilities, kept below 0: log(1 - e^a) is -inf at a = 0 (a response the model
// predicts with probability 1 in fp32).
double mean_logp(double logp, int64_t n) { return std::min(logp / static_cast<double>(n), -1e-7); }
}  // namespace

PairTerm orpo_pair(const PairLogps& p, double lambda) {
  LMF_CHECK(p.n_chosen > 0 && p.n_rejected > 0, "orpo_pair without targets");
  const double a_c = mean_logp(p.chosen, p.n_chosen), a_r = mean_logp(p.rejected, p.n_rejected);
  const double one_minus_c = -std::expm1(a_c), one_minus_r = -std::expm1(a_r);  // 1 - e^a
  PairTerm t;
  t.log_odds = (a_c - a_r) - (std::log(one_minus_c) - std::log(one_minus_r));
  t.loss = -lambda * log_sigmoid(t.log_odds);
  const double dlo = -lambda * sigmoid(-t.log_odds);
  // d log_odds / d a_c = 1 + e^a_c / (1 - e^a_c) = 1 / (1 - e^a_c); likewise -1 / (1 - e^a_r).
  t.dchosen = dlo / one_minus_c / static_cast<double>(p.n_chosen);
  t.drejected = -dlo / one_minus_r / static_cast<double>(p.n_rejected);
  t.reward_chosen = lambda * a_c;  // TRL's ORPO rewards
  t.reward_rejected = lambda * a_r;
  return t;
}

PairTerm simpo_pair(const PairLogps& p, double beta, double gamma, double label_smoothing) {
  LMF_CHECK(p.n_chosen > 0 && p.n_rejected > 0, "simpo_pair without targets");
  const double nc = static_cast<double>(p.n_chosen), nr = static_cast<double>(p.n_rejected);
  PairTerm t;
  t.reward_chosen = beta * (p.chosen / nc);  // TRL's CPO rewards
  t.reward_rejected = beta * (p.rejected / nr);
  const double z = t.reward_chosen - t.reward_rejected - gamma, s = label_smoothing;
  t.loss = -(1 - s) * log_sigmoid(z) - s * log_sigmoid(-z);
  const double dz = -(1 - s) * sigmoid(-z) + s * sigmoid(z);
  t.dchosen = dz * beta / nc;
  t.drejected = -dz * beta / nr;
  return t;
}

KtoLoss parse_kto_loss(const std::string& s) {
  if (s == "kto") return KtoLoss::kKto;
  if (s == "apo_zero_unpaired") return KtoLoss::kApoZeroUnpaired;
  fail("train.kto_loss: expected kto or apo_zero_unpaired (TRL's loss_type), got \"{}\"", s);
}

KtoTerm kto_row(double logp, double ref, double kl, bool desirable, double beta, double weight) {
  KtoTerm t;
  const double x = logp - ref;
  t.reward = beta * x;
  // desirable: w (1 - sigmoid(beta (x - kl))); undesirable: w (1 - sigmoid(beta (kl - x))).
  const double z = desirable ? beta * (x - kl) : beta * (kl - x);
  const double sz = sigmoid(z);
  t.loss = weight * sigmoid(-z);                 // 1 - sigmoid(z), without cancellation
  const double dz = -weight * sz * sigmoid(-z);  // d loss / d z
  t.dlogp = desirable ? dz * beta : -dz * beta;
  return t;
}

void kto_kl_rows(const Batch& in, Batch& out, int32_t ignore) {
  const int64_t B = in.tokens.size(0), T = in.tokens.size(1);
  LMF_CHECK(out.tokens.size(0) == B && out.tokens.size(1) == T, "kto_kl_rows: shapes");
  // A row's first and last target positions (-1: none).
  auto span = [&](int64_t r, int64_t& first, int64_t& last) {
    const int32_t* y = in.targets.data<int32_t>() + r * T;
    first = last = -1;
    for (int64_t k = 0; k < T; ++k)
      if (y[k] != ignore) {
        if (first < 0) first = k;
        last = k;
      }
  };
  // Whether rows a and b start with the same prompt (their tokens through the first target's
  // position; fa, fb those positions).
  auto same_prompt = [&](int64_t a, int64_t fa, int64_t b, int64_t fb) {
    return fa == fb &&
           std::equal(in.tokens.data<int32_t>() + a * T, in.tokens.data<int32_t>() + a * T + fa + 1,
                      in.tokens.data<int32_t>() + b * T);
  };
  for (int64_t i = 0; i < B; ++i) {
    int64_t fi, li, fj = -1, lj = -1;
    span(i, fi, li);
    // The partner: the nearest earlier row (cyclically) with a response and another prompt (a
    // pair's two sides, or several responses to one prompt, side by side would make a matched
    // pair); the row before when every row has this prompt.
    int64_t j = (i + B - 1) % B;
    for (int64_t k = 1; k < B && fi >= 0; ++k) {
      const int64_t c = (i + B - k) % B;
      int64_t fc, lc;
      span(c, fc, lc);
      if (fc >= 0 && !same_prompt(i, fi, c, fc)) {
        j = c;
        break;
      }
    }
    span(j, fj, lj);
    int32_t* tok = out.tokens.data<int32_t>() + i * T;
    int32_t* tgt = out.targets.data<int32_t>() + i * T;
    int32_t* pos = out.positions.data<int32_t>() + i * T;
    int32_t* doc = out.doc_ids.data<int32_t>() + i * T;
    std::fill_n(tok, T, 0);
    std::fill_n(tgt, T, ignore);
    std::fill_n(pos, T, 0);
    std::fill_n(doc, T, -1);
    if (fi < 0 || fj < 0) continue;
    // The sequence: row i's tokens [0, fi], then row j's response tokens fj+1 .. lj+1 (the one
    // at fj+1+m is row j's target fj+m when that is a target, else its token fj+1+m).
    const int32_t* ti = in.tokens.data<int32_t>() + i * T;
    const int32_t* tj = in.tokens.data<int32_t>() + j * T;
    const int32_t* yj = in.targets.data<int32_t>() + j * T;
    int64_t t = 0;
    for (; t <= fi; ++t) {
      tok[t] = ti[t];
      pos[t] = static_cast<int32_t>(t);
      doc[t] = 0;
    }
    for (int64_t m = 0; m <= lj - fj && t <= T; ++m, ++t) {
      const bool target = yj[fj + m] != ignore;
      const int32_t id = target ? yj[fj + m] : tj[fj + 1 + m];
      if (target) tgt[t - 1] = id;  // t >= 1: the previous position predicts it
      if (t < T) {
        tok[t] = id;
        pos[t] = static_cast<int32_t>(t);
        doc[t] = 0;
      }
    }
  }
  out.labels.assign(static_cast<size_t>(B), -1);
}

PreferenceOptions preference_options(const TrainConfig& t) {
  PreferenceOptions o;
  o.kind = t.objective;
  o.beta = t.objective == "dpo"    ? t.dpo_beta
           : t.objective == "orpo" ? t.orpo_lambda
           : t.objective == "kto"  ? t.kto_beta
                                   : t.simpo_beta;
  o.label_smoothing = t.objective == "dpo"     ? t.dpo_label_smoothing
                      : t.objective == "simpo" ? t.simpo_label_smoothing
                                               : 0.0;
  o.dpo_loss = parse_dpo_loss(t.dpo_loss);
  o.gamma = t.simpo_gamma;
  o.cpo_alpha = t.cpo_alpha;
  o.desirable_weight = t.kto_desirable_weight;
  o.undesirable_weight = t.kto_undesirable_weight;
  o.kto_loss = parse_kto_loss(t.kto_loss);
  return o;
}

PreferenceObjective::PreferenceObjective(const PreferenceOptions& o, Transformer* reference,
                                         bool reference_without_adapters, Transformer* policy)
    : o_(o),
      dpo_(o.kind == "dpo"),
      kto_(o.kind == "kto"),
      kl_rows_(kto_ && o.kto_loss == KtoLoss::kKto),
      nll_weight_(o.kind == "orpo"    ? 1.0
                  : o.kind == "simpo" ? o.cpo_alpha
                                      : 0.0),
      ref_(reference),
      ref_adapters_off_(reference_without_adapters),
      policy_(policy) {
  LMF_CHECK(preference_objective(o.kind), "objective {}", o.kind);
  LMF_CHECK(!kto_ || (ref_ && policy_), "KTO needs its reference model and the policy");
  step_.fill(0);
  last_.fill(0);
}

ReferenceTable precompute_reference_logps(Transformer& reference, const Loader& data,
                                          Batch& scratch, const dist::RowRanks& ranks) {
  const int32_t kIgnore = LoaderOptions{}.ignore_index;
  ReferenceTable t;
  int64_t total = 0;
  for (size_t s = 0; s < data.num_sources(); ++s) {
    t.offset.push_back(total);
    total += data.num_samples(static_cast<int>(s));
  }
  t.logp.assign(static_cast<size_t>(2 * total), 0.0);
  std::vector<double> lp;
  const int64_t parts = ranks.parts(), W = ranks.world.size();
  const int64_t group_batches = (data.sequential_batches() + parts - 1) / parts;
  // Every rank runs as many forwards (collectives under tensor parallelism and full-shard): past
  // the end, padding.
  for (int64_t round = 0; round * W < group_batches; ++round) {
    data.sequential(round * W * parts + ranks.index(), scratch);
    reference.forward(scratch.tokens, scratch.targets, kIgnore, scratch.doc_ids);
    reference.row_logps(lp);
    for (size_t j = 0; j < scratch.samples.size(); ++j) {
      const SampleId& id = scratch.samples[j];
      if (id.source < 0) continue;  // padding
      double* out = t.logp.data() + 2 * (t.offset[static_cast<size_t>(id.source)] + id.index);
      out[0] = lp[2 * j];
      out[1] = lp[2 * j + 1];
    }
  }
  // Every entry is written by exactly one rank: the sum is the table.
  if (ranks.world.size() * parts > 1) ranks.sum(t.logp.data(), static_cast<int64_t>(t.logp.size()));
  return t;
}

void PreferenceObjective::reference_logps(const Batch& b, std::vector<double>& logp,
                                          const ReferenceTable* table) {
  if (tables_) {
    LMF_CHECK(table, "a reference table for this batch");
    LMF_CHECK(b.samples.size() * 2 == static_cast<size_t>(b.tokens.size(0)),
              "a batch of {} rows with {} samples", b.tokens.size(0), b.samples.size());
    logp.assign(static_cast<size_t>(b.tokens.size(0)), 0.0);
    for (size_t j = 0; j < b.samples.size(); ++j) {
      if (b.samples[j].source < 0) continue;  // padding: no targets, no term
      const double* v = table->of(b.samples[j]);
      logp[2 * j] = v[0];
      logp[2 * j + 1] = v[1];
    }
    return;
  }
  const int32_t kIgnore = LoaderOptions{}.ignore_index;
  if (ref_adapters_off_) ref_->set_adapters(false);
  try {
    ref_->forward(b.tokens, b.targets, kIgnore, b.doc_ids);
  } catch (...) {
    if (ref_adapters_off_) ref_->set_adapters(true);
    throw;
  }
  if (ref_adapters_off_) ref_->set_adapters(true);
  ref_->row_logps(logp);
}

std::vector<int64_t> PreferenceObjective::row_targets(const Batch& b) {
  const int64_t B = b.targets.size(0), T = b.targets.size(1);
  const int32_t kIgnore = LoaderOptions{}.ignore_index;
  const int32_t* y = b.targets.data<int32_t>();
  std::vector<int64_t> n(B, 0);
  for (int64_t i = 0; i < B * T; ++i) n[i / T] += y[i] != kIgnore;
  return n;
}

PairTerm PreferenceObjective::pair(const std::vector<double>& logp,
                                   const std::vector<int64_t>& targets,
                                   const std::vector<double>& ref, size_t j) const {
  const size_t c = 2 * j, r = c + 1;
  const PairLogps p{
      logp[c], logp[r], targets[c], targets[r], dpo_ ? ref[c] : 0.0, dpo_ ? ref[r] : 0.0};
  if (dpo_) return dpo_pair(p, o_.beta, o_.label_smoothing, o_.dpo_loss);
  return o_.kind == "orpo" ? orpo_pair(p, o_.beta)
                           : simpo_pair(p, o_.beta, o_.gamma, o_.label_smoothing);
}

void PreferenceObjective::add(Sums& s, const PairTerm& t, double chosen_logp,
                              int64_t chosen_n) const {
  s[kPairs] += 1;
  s[kPrefLoss] += t.loss;
  s[kRewardC] += t.reward_chosen;
  s[kRewardR] += t.reward_rejected;
  s[kCorrect] += t.reward_chosen > t.reward_rejected;
  s[kLogOdds] += t.log_odds;
  if (!dpo_) {
    s[kNll] -= chosen_logp;
    s[kChosenTokens] += static_cast<double>(chosen_n);
  }
}

double PreferenceObjective::loss_of(const Sums& s) const {
  if (s[kPairs] == 0) return std::nan("");
  double loss = s[kPrefLoss] / s[kPairs];
  if (nll_weight_ != 0) loss += nll_weight_ * s[kNll] / s[kChosenTokens];
  return loss;
}

nlohmann::json PreferenceObjective::metrics_of(const Sums& s, const std::string& prefix) const {
  nlohmann::json j = nlohmann::json::object();  // merged into a record: never null
  if (s[kPairs] == 0) return j;
  const double n = s[kPairs];
  if (kto_) {
    const double nd = s[kDesirable], nu = n - nd;
    if (nd > 0) j[prefix + "reward_chosen"] = s[kRewardC] / nd;
    if (nu > 0) j[prefix + "reward_rejected"] = s[kRewardR] / nu;
    if (nd > 0 && nu > 0) j[prefix + "reward_margin"] = s[kRewardC] / nd - s[kRewardR] / nu;
    if (kl_rows_) j[prefix + "kl"] = s[kKl];
    return j;
  }
  j[prefix + "reward_chosen"] = s[kRewardC] / n;
  j[prefix + "reward_rejected"] = s[kRewardR] / n;
  j[prefix + "reward_margin"] = (s[kRewardC] - s[kRewardR]) / n;
  j[prefix + "reward_accuracy"] = s[kCorrect] / n;
  if (!dpo_) j[prefix + "nll"] = s[kNll] / s[kChosenTokens];
  if (o_.kind == "orpo") j[prefix + "log_odds"] = s[kLogOdds] / n;
  return j;
}

void PreferenceObjective::add_kto_rows(Sums& s, const std::vector<int8_t>& labels,
                                       const std::vector<double>& logp,
                                       const std::vector<int64_t>& targets,
                                       const std::vector<double>& ref, double kl, double scale,
                                       std::vector<float>* w, double* share) const {
  LMF_CHECK(labels.size() == logp.size(), "KTO: {} labels for {} rows", labels.size(), logp.size());
  for (size_t r = 0; r < logp.size(); ++r) {
    if (w) (*w)[r] = 0;
    if (targets[r] == 0 || labels[r] < 0) continue;  // no response: no term
    const bool desirable = labels[r] == 1;
    const KtoTerm t = kto_row(logp[r], ref[r], kl, desirable, o_.beta,
                              desirable ? o_.desirable_weight : o_.undesirable_weight);
    s[kPairs] += 1;
    s[kPrefLoss] += t.loss;
    if (desirable) {
      s[kDesirable] += 1;
      s[kRewardC] += t.reward;
    } else {
      s[kRewardR] += t.reward;
    }
    if (w) (*w)[r] = static_cast<float>(-t.dlogp * scale);
    if (share) *share += t.loss * scale;
  }
}

double PreferenceObjective::kl_estimate(const double sums[2]) {
  return sums[1] > 0 ? std::max(0.0, sums[0] / sums[1]) : 0.0;  // no KL rows: no estimate, 0
}

void PreferenceObjective::kl_sums(Transformer& policy, const Batch& b, const dist::RowRanks* ranks,
                                  double sums[2]) {
  const int32_t kIgnore = LoaderOptions{}.ignore_index;
  const int64_t B = b.tokens.size(0), T = b.tokens.size(1), P = ranks ? ranks->parts() : 1;
  auto sized = [](Batch& x, int64_t rows, int64_t T) {
    if (!x.tokens.defined() || x.tokens.size(0) != rows || x.tokens.size(1) != T)
      x = Batch::make(rows, T);  // once per shape
  };
  sized(kl_batch_, B, T);
  if (P == 1) {
    kto_kl_rows(b, kl_batch_, kIgnore);
  } else {  // the group's KL rows, this rank's part of them
    sized(group_batch_, P * B, T);
    sized(group_kl_, P * B, T);
    ranks->gather_rows(b.tokens, group_batch_.tokens);
    ranks->gather_rows(b.targets, group_batch_.targets);
    kto_kl_rows(group_batch_, group_kl_, kIgnore);
    const int64_t r0 = ranks->part() * B;
    for (Tensor Batch::*f : {&Batch::tokens, &Batch::targets, &Batch::positions, &Batch::doc_ids})
      (kl_batch_.*f).copy_from((group_kl_.*f).slice(r0, B));
    kl_batch_.labels.assign(static_cast<size_t>(B), -1);
  }
  const std::vector<int64_t> n = row_targets(kl_batch_);
  std::vector<double> lp, rl;
  policy.forward(kl_batch_.tokens, kl_batch_.targets, kIgnore, kl_batch_.doc_ids);
  policy.row_logps(lp);
  reference_logps(kl_batch_, rl);
  for (int64_t r = 0; r < B; ++r)
    if (n[r] > 0) {
      sums[0] += lp[r] - rl[r];
      sums[1] += 1;
    }
}

void PreferenceObjective::begin(const std::vector<Batch>& micro, const dist::RowRanks& ranks) {
  ref_logp_.assign(micro.size(), {});
  if (kto_) {
    // Rows with a label and targets; the KL rows' sum of logp - r and their count. The KL rows
    // run before the policy's training forwards (the policy as it is before this step).
    double sums[3] = {0, 0, 0};
    labels_.assign(micro.size(), {});
    for (size_t m = 0; m < micro.size(); ++m) {
      const Batch& b = micro[m];
      const std::vector<int64_t> n = row_targets(b);
      LMF_CHECK(b.labels.size() == n.size(), "KTO batch without labels");
      labels_[m] = b.labels;
      for (size_t r = 0; r < n.size(); ++r) sums[0] += n[r] > 0 && b.labels[r] >= 0;
      reference_logps(b, ref_logp_[m]);
      if (kl_rows_) kl_sums(*policy_, b, &ranks, sums + 1);
    }
    ranks.sum(sums, 3);
    pairs_ = sums[0];
    kl_ = kl_estimate(sums + 1);
    step_.fill(0);
    return;
  }
  LMF_CHECK(!dpo_ || has_reference(), "DPO needs its reference model or its tables");
  double counts[2] = {0, 0};  // pairs with targets in both rows; their chosen targets
  for (size_t m = 0; m < micro.size(); ++m) {
    const Batch& b = micro[m];
    const std::vector<int64_t> n = row_targets(b);
    LMF_CHECK(n.size() % 2 == 0, "preference pairs need an even batch, got {} rows", n.size());
    for (size_t j = 0; 2 * j < n.size(); ++j)
      if (n[2 * j] > 0 && n[2 * j + 1] > 0) {
        counts[0] += 1;
        counts[1] += static_cast<double>(n[2 * j]);
      }
    if (has_reference()) reference_logps(b, ref_logp_[m], &train_ref_);  // before the policy's
  }
  ranks.sum(counts, 2);
  pairs_ = counts[0];
  chosen_tokens_ = counts[1];
  step_.fill(0);
}

double PreferenceObjective::weigh(size_t m, const std::vector<double>& logp,
                                  const std::vector<int64_t>& targets, std::vector<float>& w) {
  static const std::vector<double> no_ref;
  const std::vector<double>& ref = has_reference() ? ref_logp_[m] : no_ref;
  double share = 0;
  if (kto_) {
    add_kto_rows(step_, labels_[m], logp, targets, ref, kl_, pairs_ > 0 ? 1 / pairs_ : 0.0, &w,
                 &share);
    return share;
  }
  for (size_t j = 0; 2 * j < logp.size(); ++j) {
    const size_t c = 2 * j, r = c + 1;
    w[c] = w[r] = 0;
    if (targets[c] == 0 || targets[r] == 0) continue;  // a pair without a response: no term
    const PairTerm t = pair(logp, targets, ref, j);
    add(step_, t, logp[c], targets[c]);
    // The row's tokens are weighed by d loss / d (their cross-entropy) = -d loss / d logp.
    double wc = -t.dchosen / pairs_, wr = -t.drejected / pairs_;
    share += t.loss / pairs_;
    if (nll_weight_ != 0) {  // the NLL of the chosen tokens, over all of the step's
      wc += nll_weight_ / chosen_tokens_;
      share -= nll_weight_ * logp[c] / chosen_tokens_;
    }
    w[c] = static_cast<float>(wc);
    w[r] = static_cast<float>(wr);
  }
  return share;
}

void PreferenceObjective::end(const dist::RowRanks& ranks) {
  ranks.sum(step_.data(), kN);
  if (kto_) step_[kKl] = kl_;
  last_ = step_;
}

double PreferenceObjective::evaluate(Transformer& policy, const Loader& val, int64_t batches,
                                     Batch& batch, nlohmann::json* metrics,
                                     const dist::RowRanks* ranks) {
  LMF_CHECK(!dpo_ || has_reference(), "DPO needs its reference model or its tables");
  const int32_t kIgnore = LoaderOptions{}.ignore_index;
  // (several ranks: each scores its rows of every global batch, every rank runs every forward,
  // past the end on padding; then the sums over them)
  const int64_t per = ranks ? eval_rows(*ranks, val, batches) : 1,
                index = ranks ? ranks->index() : 0;
  if (!ranks) batches = std::min(batches, val.sequential_batches());
  auto group_sum = [&](double* v, int n) {
    if (per > 1) ranks->sum(v, n);
  };
  Sums s;
  s.fill(0);
  std::vector<double> logp, ref;
  // KTO: one KL estimate over the whole set (as training's over its step), so the rows are kept
  // until it is known.
  struct Rows {
    std::vector<double> logp, ref;
    std::vector<int64_t> n;
    std::vector<int8_t> labels;
  };
  std::vector<Rows> kept;
  double ks[2] = {0, 0};
  for (int64_t i = 0; i < batches; ++i) {
    val.sequential(i * per + index, batch);
    const std::vector<int64_t> n = row_targets(batch);
    policy.forward(batch.tokens, batch.targets, kIgnore, batch.doc_ids);
    policy.row_logps(logp);
    if (has_reference()) reference_logps(batch, ref, &val_ref_);
    if (kto_) {
      kept.push_back({logp, ref, n, batch.labels});
      if (kl_rows_) kl_sums(policy, batch, ranks, ks);
      continue;
    }
    for (size_t j = 0; 2 * j < n.size(); ++j)
      if (n[2 * j] > 0 && n[2 * j + 1] > 0) add(s, pair(logp, n, ref, j), logp[2 * j], n[2 * j]);
  }
  if (kto_) {
    group_sum(ks, 2);
    for (const Rows& r : kept)
      add_kto_rows(s, r.labels, r.logp, r.n, r.ref, kl_estimate(ks), 0, nullptr, nullptr);
  }
  group_sum(s.data(), kN);
  if (kto_) s[kKl] = kl_estimate(ks);  // (the group's estimate, set once: not summed)
  if (metrics) *metrics = metrics_of(s, "val_");
  return loss_of(s);
}

}  // namespace lmforge
