// Preference objectives (train.objective: dpo | orpo | simpo) over pairs of rows: each preference
// pair is two rows of a batch, 2j its chosen response and 2j+1 its rejected one (the loader's pairs
// mode; `prepare --format preference`), their targets the response tokens only. KTO (kto) over
// single rows, each a desirable or undesirable response (the loader's unpaired mode; Batch::
// labels). From each row's log-likelihood logp (the sum of log p(target) over its targets):
//
//   DPO  (Rafailov et al. 2023; TRL's DPOTrainer): with the frozen reference model's r and
//        d = (logp_c - r_c) - (logp_r - r_r), TRL's loss_type
//          sigmoid  loss = -(1 - s) log sigmoid(beta d) - s log sigmoid(-beta d)  (s: cDPO's
//                   label smoothing)
//          hinge    loss = max(0, 1 - beta d)                     (SLiC, Zhao et al. 2023)
//          ipo      loss = (d - 1 / (2 beta))^2 with mean log-probabilities logp / targets for
//                   logp and r, as TRL computes it (Azar et al. 2023, eq. 17)
//        rewards beta (logp - r) per response; accuracy = chosen reward > rejected reward.
//   ORPO (Hong et al. 2024; TRL's ORPOTrainer): with a = logp / targets (mean per token),
//        log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)),
//        loss = NLL(chosen tokens) - lambda log sigmoid(log_odds)
//        no reference model.
//   SimPO (Meng et al. 2024; TRL's CPOTrainer, loss_type "simpo"): with a = logp / targets and
//        z = beta (a_c - a_r) - gamma,
//        loss = -(1 - s) log sigmoid(z) - s log sigmoid(-z) + alpha NLL(chosen tokens)
//        no reference model; rewards beta a; alpha (TRL's cpo_alpha) 0 is SimPO as published;
//        s TRL's label_smoothing (0 as published).
//   KTO  (Ethayarajh et al. 2024; TRL's KTOTrainer): with the frozen reference's r, the row's
//        log-ratio x = logp - r and z = max(0, mean over the step's KL rows of (logp - r)), a
//        KL row being row i's prompt followed by the response of the nearest earlier row of its
//        micro-batch with another prompt (cyclically; detached), loss per row
//          desirable    w_D (1 - sigmoid(beta (x - z)))
//          undesirable  w_U (1 - sigmoid(beta (z - x)))
//        its mean over the step's rows with targets; rewards beta x.
// Losses are means over the step's pairs (KTO: rows) (those with targets in both rows) across
// micro-batches and ranks; ORPO's and SimPO's NLL is the mean over all chosen target tokens of the
// step (lmforge's token-count normalization; TRL normalizes per micro-batch).
//
// The gradient flows through Transformer::forward_backward_rows: each row's tokens are weighed
// by -d loss / d logp of their row (dist::RowObjective).
#pragma once

#include <array>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lmforge/data/loader.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/nn/transformer.h"

namespace lmforge {

// One pair: its rows' log-likelihoods (sums over their targets) and target counts, and the
// reference model's log-likelihoods (DPO).
struct PairLogps {
  double chosen = 0, rejected = 0;
  int64_t n_chosen = 1, n_rejected = 1;
  double ref_chosen = 0, ref_rejected = 0;
};
// One pair's term: its loss and the loss's derivatives with respect to the two rows' logp.
struct PairTerm {
  double loss = 0, dchosen = 0, drejected = 0;
  double reward_chosen = 0, reward_rejected = 0;  // DPO: beta (logp - r); ORPO: lambda a
  double log_odds = 0;                            // ORPO
};

// Whether train.objective trains on preference pairs: dpo, orpo, simpo.
inline bool paired_objective(const std::string& objective) {
  return objective == "dpo" || objective == "orpo" || objective == "simpo";
}
// Whether it is a preference objective (PreferenceObjective): those and kto.
inline bool preference_objective(const std::string& objective) {
  return paired_objective(objective) || objective == "kto";
}

enum class DpoLoss { kSigmoid, kHinge, kIpo };
DpoLoss parse_dpo_loss(const std::string& s);  // sigmoid | hinge | ipo; Error naming train.dpo_loss

PairTerm dpo_pair(const PairLogps& p, double beta, double label_smoothing,
                  DpoLoss loss = DpoLoss::kSigmoid);
// The odds-ratio term alone (the NLL is added per token).
PairTerm orpo_pair(const PairLogps& p, double lambda);
// SimPO's term alone (CPO's NLL, when weighed, is added per token).
PairTerm simpo_pair(const PairLogps& p, double beta, double gamma, double label_smoothing = 0);

// TRL's KTO loss_type: kto, or apo_zero_unpaired (D'Oosterlinck et al. 2024, APO-zero eq. 7:
// desirable w (1 - sigmoid(beta x)), undesirable w sigmoid(beta x): KTO's loss with z = 0, no KL
// rows).
enum class KtoLoss { kKto, kApoZeroUnpaired };
KtoLoss parse_kto_loss(const std::string& s);  // kto | apo_zero_unpaired; Error naming the key
// One KTO row: its loss, d loss / d logp and reward beta (logp - ref), given the step's KL
// estimate kl (0 for apo_zero_unpaired) and the label's weight (w_D or w_U).
struct KtoTerm {
  double loss = 0, dlogp = 0, reward = 0;
};
KtoTerm kto_row(double logp, double ref, double kl, bool desirable, double beta, double weight);
// KTO's KL rows of a batch: row i's prompt (its tokens through the first target's position)
// followed by its partner's response (from its first target through its last, with its loss
// mask), cut to T+1 tokens and padded (targets ignore_index, doc_ids -1). The partner is the
// nearest earlier row, cyclically, with a response and another prompt (row i-1 when all share
// i's prompt). A row whose own or partner's targets are empty has none.
void kto_kl_rows(const Batch& in, Batch& out, int32_t ignore_index);

// DPO's reference log-likelihoods of every pair of a loader's samples, computed once
// (train.precompute_ref_logps, TRL's precompute_ref_log_probs): the reference model is then
// not needed while training. logp[2k], logp[2k + 1]: the chosen and rejected rows of sample k in
// the loader's natural order (sources in turn; Loader::sequential's).
struct ReferenceTable {
  std::vector<int64_t> offset;  // per source: its first sample's natural index
  std::vector<double> logp;
  // The pair's two values of a batch's sample (Batch::samples).
  const double* of(const SampleId& id) const {
    return logp.data() + 2 * (offset[static_cast<size_t>(id.source)] + id.index);
  }
};
// Runs the reference (planned for the loader's batch) over data's samples in natural order;
// with a world of several ranks (ranks.world) each rank computes every world-th batch, under
// sequence parallelism each group every world-th of its batches (its ranks' consecutive ones, each
// rank its own; every rank as many, padding past the end), and a sum over the ranks gives every
// rank the whole table.
ReferenceTable precompute_reference_logps(Transformer& reference, const Loader& data,
                                          Batch& scratch, const dist::RowRanks& ranks);

struct PreferenceOptions {
  std::string kind = "dpo";    // dpo | orpo | simpo | kto
  double beta = 0.1;           // DPO's, SimPO's or KTO's beta, ORPO's lambda
  double label_smoothing = 0;  // DPO (sigmoid loss) and SimPO
  DpoLoss dpo_loss = DpoLoss::kSigmoid;
  double gamma = 0.5;    // SimPO: the target reward margin
  double cpo_alpha = 0;  // SimPO: weight of the chosen responses' NLL (ORPO's is 1)
  double desirable_weight = 1, undesirable_weight = 1;  // KTO: w_D, w_U
  KtoLoss kto_loss = KtoLoss::kKto;
};

// From train.objective and its keys (validated by the trainer).
PreferenceOptions preference_options(const TrainConfig& t);

class PreferenceObjective final : public dist::RowObjective {
 public:
  // reference: DPO's and KTO's frozen reference model, planned for the policy's (B, T); null
  // otherwise. KTO also runs the policy (no gradients) on its KL rows (not apo_zero_unpaired):
  // policy is that model.
  // reference_without_adapters: the reference is the policy itself with its LoRA adapters off
  // (Transformer::set_adapters) while it computes the reference's log-likelihoods.
  PreferenceObjective(const PreferenceOptions& o, Transformer* reference,
                      bool reference_without_adapters = false, Transformer* policy = nullptr);

  void begin(const std::vector<Batch>& micro, const dist::RowRanks& ranks) override;
  double weigh(size_t m, const std::vector<double>& logp, const std::vector<int64_t>& targets,
               std::vector<float>& w) override;
  void end(const dist::RowRanks& ranks) override;
  // The last step's metrics (means over its pairs): reward_chosen, reward_rejected,
  // reward_margin, reward_accuracy; ORPO adds nll and log_odds, SimPO nll. KTO: reward_chosen
  // over the desirable rows, reward_rejected over the undesirable ones, their difference
  // reward_margin, and kl (the step's estimate z).
  nlohmann::json metrics() const { return metrics_of(last_); }

  // DPO: the reference's log-likelihoods from tables (train, and val for evaluate; see
  // precompute_reference_logps) rather than the reference model, which may then be released.
  void use_reference_tables(ReferenceTable train, ReferenceTable val) {
    tables_ = true;
    train_ref_ = std::move(train);
    val_ref_ = std::move(val);
    ref_ = nullptr;
  }

  // Validation: the loss over the pairs of the first `batches` batches of val (each rank the
  // whole set; under sequence parallelism (ranks.group) a group's batch is its ranks' consecutive
  // ones, each rank 1/N of its rows, as training splits them); metrics (optional) receives the
  // same means as metrics(), prefixed "val_".
  double evaluate(Transformer& policy, const Loader& val, int64_t batches, Batch& batch,
                  nlohmann::json* metrics = nullptr, const dist::RowRanks* ranks = nullptr);

 private:
  // Sums over pairs (and ORPO's chosen tokens; KTO: rows, kDesirable of them desirable).
  enum Sum {
    kPairs,
    kChosenTokens,
    kPrefLoss,
    kNll,
    kRewardC,
    kRewardR,
    kCorrect,
    kLogOdds,
    kDesirable,
    kKl,  // KTO: the KL estimate z (set once, not summed)
    kN
  };
  using Sums = std::array<double, kN>;
  PairTerm pair(const std::vector<double>& logp, const std::vector<int64_t>& targets,
                const std::vector<double>& ref, size_t j) const;
  void add(Sums& s, const PairTerm& t, double chosen_logp, int64_t chosen_n) const;
  double loss_of(const Sums& s) const;
  nlohmann::json metrics_of(const Sums& s, const std::string& prefix = "") const;
  static std::vector<int64_t> row_targets(const Batch& b);
  // KTO: the terms of a batch's rows (labels: Batch::labels) with the KL estimate kl, into s;
  // with w, each row's weight scale * (-d loss / d logp) and share += scale * its loss.
  void add_kto_rows(Sums& s, const std::vector<int8_t>& labels, const std::vector<double>& logp,
                    const std::vector<int64_t>& targets, const std::vector<double>& ref, double kl,
                    double scale, std::vector<float>* w, double* share) const;
  // KTO: sums[0] += the batch's KL rows' logp - r (policy, reference), sums[1] += their count.
  // Under sequence parallelism the KL rows are those of the group's batch (its tokens and
  // targets gathered: the rows and partners of tensor parallelism alone), this rank's part of
  // them.
  void kl_sums(Transformer& policy, const Batch& b, const dist::RowRanks* ranks, double sums[2]);
  // KTO: z = max(0, sums[0] / sums[1]) from kl_sums' sums; 0 without KL rows.
  static double kl_estimate(const double sums[2]);
  // DPO and KTO: the reference's log-likelihoods come from a model or from tables.
  bool has_reference() const { return ref_ != nullptr || tables_; }

  PreferenceOptions o_;
  bool dpo_, kto_, kl_rows_;  // kl_rows_: KTO's KL estimate (not apo_zero_unpaired)
  double nll_weight_;  // of the chosen responses' mean NLL over the step: ORPO 1, SimPO alpha
  Transformer* ref_;
  bool ref_adapters_off_;
  Transformer* policy_;                      // KTO: the policy's KL-row log-likelihoods
  Batch kl_batch_;                           // KTO: a micro-batch's KL rows
  Batch group_batch_, group_kl_;             // ... and its group's rows (sequence parallelism)
  std::vector<std::vector<int8_t>> labels_;  // KTO: per micro-batch of the step, per row
  double kl_ = 0;                            // KTO: the step's KL estimate
  // The reference's log-likelihoods of a batch's rows: from the model, or (tables) from the
  // table of its samples.
  void reference_logps(const Batch& b, std::vector<double>& logp,
                       const ReferenceTable* table = nullptr);
  bool tables_ = false;
  ReferenceTable train_ref_, val_ref_;
  std::vector<std::vector<double>> ref_logp_;  // per micro-batch of the step, per row
  double pairs_ = 0, chosen_tokens_ = 0;       // the step's, over all ranks (KTO: rows)
  Sums step_, last_;
};

}  // namespace lmforge
