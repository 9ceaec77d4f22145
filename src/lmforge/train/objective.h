// Preference objectives (train.objective: dpo | orpo | simpo) over pairs of rows: each preference
// pair is two rows of a batch, 2j its chosen response and 2j+1 its rejected one (the loader's pairs
// mode; `prepare --format preference`), their targets the response tokens only. From each row's
// log-likelihood logp (the sum of log p(target) over its targets):
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
// Losses are means over the step's pairs (those with targets in both rows) across micro-batches
// and ranks; ORPO's and SimPO's NLL is the mean over all chosen target tokens of the step
// (lmforge's token-count normalization; TRL normalizes per micro-batch).
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
inline bool preference_objective(const std::string& objective) {
  return objective == "dpo" || objective == "orpo" || objective == "simpo";
}

enum class DpoLoss { kSigmoid, kHinge, kIpo };
DpoLoss parse_dpo_loss(const std::string& s);  // sigmoid | hinge | ipo; Error naming train.dpo_loss

PairTerm dpo_pair(const PairLogps& p, double beta, double label_smoothing,
                  DpoLoss loss = DpoLoss::kSigmoid);
// The odds-ratio term alone (the NLL is added per token).
PairTerm orpo_pair(const PairLogps& p, double lambda);
// SimPO's term alone (CPO's NLL, when weighed, is added per token).
PairTerm simpo_pair(const PairLogps& p, double beta, double gamma, double label_smoothing = 0);

struct PreferenceOptions {
  std::string kind = "dpo";    // dpo | orpo | simpo
  double beta = 0.1;           // DPO's or SimPO's beta, ORPO's lambda
  double label_smoothing = 0;  // DPO (sigmoid loss) and SimPO
  DpoLoss dpo_loss = DpoLoss::kSigmoid;
  double gamma = 0.5;    // SimPO: the target reward margin
  double cpo_alpha = 0;  // SimPO: weight of the chosen responses' NLL (ORPO's is 1)
};

// From train.objective and its keys (validated by the trainer).
PreferenceOptions preference_options(const TrainConfig& t);

class PreferenceObjective final : public dist::RowObjective {
 public:
  // reference: DPO's frozen reference model, planned for the policy's (B, T); null otherwise.
  // reference_without_adapters: the reference is the policy itself with its LoRA adapters off
  // (Transformer::set_adapters) while it computes the reference's log-likelihoods.
  PreferenceObjective(const PreferenceOptions& o, Transformer* reference,
                      bool reference_without_adapters = false);

  void begin(const std::vector<Batch>& micro, dist::Communicator& world) override;
  double weigh(size_t m, const std::vector<double>& logp, const std::vector<int64_t>& targets,
               std::vector<float>& w) override;
  void end(dist::Communicator& world) override;
  // The last step's metrics (means over its pairs): reward_chosen, reward_rejected,
  // reward_margin, reward_accuracy; ORPO adds nll and log_odds, SimPO nll.
  nlohmann::json metrics() const { return metrics_of(last_); }

  // Validation: the loss over the pairs of the first `batches` batches of val (each rank the
  // whole set); metrics (optional) receives the same means as metrics(), prefixed "val_".
  double evaluate(Transformer& policy, const Loader& val, int64_t batches, Batch& batch,
                  nlohmann::json* metrics = nullptr);

 private:
  // Sums over pairs (and ORPO's chosen tokens).
  enum Sum { kPairs, kChosenTokens, kPrefLoss, kNll, kRewardC, kRewardR, kCorrect, kLogOdds, kN };
  using Sums = std::array<double, kN>;
  PairTerm pair(const std::vector<double>& logp, const std::vector<int64_t>& targets,
                const std::vector<double>& ref, size_t j) const;
  void add(Sums& s, const PairTerm& t, double chosen_logp, int64_t chosen_n) const;
  double loss_of(const Sums& s) const;
  nlohmann::json metrics_of(const Sums& s, const std::string& prefix = "") const;
  static std::vector<int64_t> row_targets(const Batch& b);

  PreferenceOptions o_;
  bool dpo_;
  double nll_weight_;  // of the chosen responses' mean NLL over the step: ORPO 1, SimPO alpha
  Transformer* ref_;
  bool ref_adapters_off_;
  // The reference's log-likelihoods of a batch's rows.
  void reference_logps(const Batch& b, std::vector<double>& logp);
  std::vector<std::vector<double>> ref_logp_;  // per micro-batch of the step, per row
  double pairs_ = 0, chosen_tokens_ = 0;       // the step's, over all ranks
  Sums step_, last_;
};

}  // namespace lmforge
