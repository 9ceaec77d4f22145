#include "lmforge/train/trainer.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <omp.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/error.h"
#include "lmforge/core/interrupt.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/core/profile.h"
#include "lmforge/core/tensor.h"
#include "lmforge/core/utf8.h"
#include "lmforge/data/loader.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/dist/tensor_parallel.h"
#include "lmforge/eval/choices.h"
#include "lmforge/eval/generate.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/dir_lock.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/optim/clip.h"
#include "lmforge/optim/schedule.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/checkpoint.h"
#include "lmforge/train/dashboard.h"
#include "lmforge/train/guard.h"
#include "lmforge/train/init_from.h"
#include "lmforge/train/metrics.h"
#include "lmforge/train/objective.h"
#include "lmforge/train/progress.h"
#include "lmforge/train/run_world.h"

namespace lmforge {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

namespace {

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // Linux: KiB
}

// Poisons this step as a bad batch would: NaN loss and gradients, or a 100x loss and gradients.
void inject_fault(const std::string& kind, dist::DataParallel& dp, double& loss) {
  double f = kind == "nan" ? std::nan("") : 100.0;
  loss *= f;
  dp.scale_grads(f);
}

// The last rank dies (SIGKILL) or stops (SIGSTOP) in the middle of the step: the others must
// stop within dist.timeout naming it.
void inject_rank_failure(const std::string& kind, const dist::Communicator& world) {
  if (world.rank() != world.size() - 1) return;
  std::fflush(nullptr);
  std::raise(kind == "kill" ? SIGKILL : SIGSTOP);
}

}  // namespace

TrainResult train(Config& cfg, const ResumeOptions& resume) {
  const TrainConfig& t = cfg.train;
  validate_train_config(cfg);
  // Ctrl-C or SIGTERM from here on is noted, not fatal (core/interrupt.h): during the set-up (a
  // checkpoint or init_from loading, the run directory written) the run stops before its first
  // step, saying so; during the last save, once it is saved.
  catch_interrupts();

  // Ranks: one process, or those mpirun/srun/lmforge launch started. Only rank 0 prints and
  // writes the run directory's files (checkpoints: every rank its shard).
  // A torchrun launch of a model on GPUs makes the NCCL world directly (TCP rendezvous).
  std::unique_ptr<dist::Communicator> world =
      make_world(cfg, resolve_device(t.device) == Device::kCUDA);
  const bool lead = world->rank() == 0;
  check_same_config(*world, cfg);
  if (t.cuda_graphs && world->size() > 1)
    fail(
        "train.cuda_graphs: one process only for now ({} ranks: the gradient all-reduce runs "
        "between the layers' kernels); set train.cuda_graphs: false",
        world->size());
  // A model on GPUs: one GPU per rank (by local rank), and its gradients and shards go over NCCL,
  // bootstrapped through the host world (which keeps the run directory's barriers).
  std::unique_ptr<dist::Communicator> gpu_world = make_gpu_world(*world, cfg);
  dist::Communicator& comm = gpu_world ? *gpu_world : *world;
  if (t.cuda_graphs && comm.backend() == "nccl")
    fail(
        "train.cuda_graphs: not with the NCCL world of dist.backend: nccl (its collectives run "
        "between the layers' kernels); set dist.backend: auto or train.cuda_graphs: false");
  if (!lead && !std::freopen("/dev/null", "w", stdout))
    fail("cannot silence the standard output of rank {}", world->rank());

  RunSetup setup = setup_run(cfg, resume.from);
  Transformer& model = *setup.model;
  // A step's micro-batches are all read before it (4 int32 tensors of B x T each, and the rest).
  check_host_memory((16.0 * static_cast<double>(model.planned_batch() * t.seq_len) + 256.0) *
                        static_cast<double>(t.grad_accum),
                    fmt::format("train.grad_accum's {} micro-batches", t.grad_accum),
                    "lower train.grad_accum (a step holds every micro-batch's tokens)");
  Loader& train_data = *setup.train_data;
  std::unique_ptr<Loader>& val_data = setup.val_data;
  // Early stopping counts validation losses: with nothing to evaluate on, it would never fire.
  check_early_stopping(cfg);
  if (t.patience > 0 && !val_data)
    fail(
        "train.patience: early stopping counts validation losses, but this run has no validation "
        "data; set data.val (or data.val_fraction with data.text), or train.patience: 0");
  std::unique_ptr<Tokenizer>& tokenizer = setup.tokenizer;
  // The model trained: `model`, or under tensor parallelism the whole that each rank's share is
  // part of (its vocabulary for token ids, its shape for generation).
  const ModelConfig& whole_config = cfg.dist.tensor_parallel > 1 ? cfg.model : model.config();
  if (!cfg.sample.prompt.empty())  // sampled after training: a prompt that cannot fit fails now
    check_generate(whole_config, tokenizer->encode(cfg.sample.prompt, false, true),
                   sampling_options(cfg, tokenizer.get()), /*config_keys=*/true);
  // dist.tensor_parallel: groups of consecutive ranks each hold one share of the model
  // (dist/tensor_parallel.h); data parallelism runs across the groups, over the ranks holding the
  // same share. Checkpoints and the end's sample take the whole model (gathered on rank 0, one
  // parameter at a time).
  const int tp_size = static_cast<int>(cfg.dist.tensor_parallel);
  std::unique_ptr<dist::Communicator> tp_comm, dp_comm;
  std::unique_ptr<dist::TensorParallel> tp, ref_tp;
  if (tp_size > 1) {
    tp_comm = comm.split(comm.rank() / tp_size, comm.rank());
    dp_comm = comm.split(comm.rank() % tp_size, comm.rank());
    tp = std::make_unique<dist::TensorParallel>(*tp_comm, cfg.model, model,
                                                cfg.dist.sequence_parallel);
    // DPO's and KTO's reference, distillation's teacher: its share, summed over the same group
    if (Transformer* frozen = setup.frozen())
      ref_tp = std::make_unique<dist::TensorParallel>(
          *tp_comm, setup.teacher ? setup.teacher_config : cfg.model, *frozen,
          cfg.dist.sequence_parallel);
  }
  if (tp && lead && tp_size > dist::rank_info().local_size)
    fmt::print(
        "note: dist.tensor_parallel: groups of {} ranks span nodes of {}: their partial sums "
        "cross the network in every block; groups within a node are faster\n",
        tp_size, dist::rank_info().local_size);
  dist::Communicator& dp_world = dp_comm ? *dp_comm : comm;
  // The reference (or the teacher) under full-shard (or hybrid): its values sharded as the
  // policy's, over the same ranks, each block gathered for its forwards (no gradients, no
  // optimizer state).
  std::unique_ptr<dist::DataParallel> ref_dp;
  if (setup.frozen() && dist::parse_strategy(cfg.dist.strategy) >= dist::Strategy::kFullShard) {
    DistConfig rc = cfg.dist;
    rc.offload = false;
    ref_dp = std::make_unique<dist::DataParallel>(dp_world, *setup.frozen(), rc, AdamWOptions{},
                                                  setup.frozen_values);
  }
  setup.frozen_values = {};
  setup.teacher_source.reset();  // (its values are in place: the teacher's tokenizer not needed)
  // The reference's (or teacher's) weights as this rank holds them (its share under tensor
  // parallelism; its shard and gather buffers under full-shard), for the log.
  auto reference_held = [&] {
    const double held = static_cast<double>(setup.frozen()->params().numel()) *
                        (setup.frozen()->params().bf16_master() ? 2 : 4) / 1048576.0;
    const std::string share = tp ? fmt::format(" (this rank's 1/{} share)", tp->size()) : "";
    if (!ref_dp) return fmt::format("{:.2f} MiB of weights{}", held, share);
    return fmt::format(
        "{:.2f} MiB of weights{}: a shard of {:.2f} MiB (+ {:.2f} MiB of gather buffers)", held,
        share, ref_dp->parameter_bytes() / 1048576.0, ref_dp->gather_buffer_bytes() / 1048576.0);
  };
  // The ranks reading their own slice of each batch: the data-parallel ones, and under sequence
  // parallelism every rank.
  const int64_t readers = tp && tp->sequence_parallel() ? comm.size() : dp_world.size();
  // train.precompute_ref_logps: DPO's reference log-likelihoods of every pair once, before the
  // optimizer's state is allocated; then a separate reference model is released, and under LoRA
  // (the reference is the policy with its adapters off) the steps save its forward.
  std::optional<std::pair<ReferenceTable, ReferenceTable>> ref_tables;
  if (t.precompute_ref_logps) {
    Transformer& ref = setup.reference ? *setup.reference : model;
    LMF_CHECK(setup.reference || setup.reference_is_base, "DPO without a reference model");
    const auto t0 = Clock::now();
    Batch scratch = Batch::make(model.planned_batch(), t.seq_len);
    if (!setup.reference) model.set_adapters(false);
    // (the data-parallel ranks split the pairs; a tensor-parallel group scores the same ones, or
    // under sequence parallelism each rank its own rows of them)
    const dist::RowRanks split{tp ? dp_world : *world,
                               tp && tp->sequence_parallel() ? tp.get() : nullptr};
    ReferenceTable train_ref = precompute_reference_logps(ref, train_data, scratch, split);
    ReferenceTable val_ref;
    if (val_data) val_ref = precompute_reference_logps(ref, *val_data, scratch, split);
    model.set_adapters(true);
    std::string released = "the policy without its LoRA adapters";
    if (setup.reference) {
      released = fmt::format("the reference model ({}) released", reference_held());
      ref_dp.reset();
      ref_tp.reset();
      setup.reference.reset();
    }
    fmt::print(
        "reference: log-likelihoods of {} training and {} validation pairs in {:.1f} s; {}\n",
        train_ref.logp.size() / 2, val_ref.logp.size() / 2,
        std::chrono::duration<double>(Clock::now() - t0).count(), released);
    ref_tables.emplace(std::move(train_ref), std::move(val_ref));
  }
  dist::DataParallel dp(dp_world, model, cfg.dist, optimizer_options(cfg), setup.values);
  dp.set_tensor_parallel(tp.get());
  AdamW& opt = dp.optimizer();
  // Tensor parallelism: the whole model's parameter p (its values, or AdamW's moments and fp32
  // masters: what 1, 2, 3), made whole on rank 0 one at a time (collective over every rank: the
  // group's shares, each first whole over the ranks sharding it); checkpoints stream them into
  // their files.
  std::optional<Transformer> whole_layout;
  if (tp) whole_layout.emplace(cfg.model, Transformer::MeasureOnly{});
  auto whole_param = [&](const Param& p, int what) {
    const Param* q = model.params().find(p.name);
    LMF_CHECK(q, "parameter {} is not in this rank's share", p.name);
    return tp->gather_param(
        *q, what, [&](const Param& x, int w) { return dp.whole_param(x, w); },
        /*writes=*/dp_world.rank() == 0);
  };
  Schedule sched = make_schedule(t);  // validated before anything is written
  // train.hellaswag: its examples read and tokenized once, in rows of the training shape.
  std::vector<ChoiceItem> hs_items;
  ChoiceRows hs_rows;
  if (!t.hellaswag.empty()) {
    try {
      hs_items = read_hellaswag(t.hellaswag, t.hellaswag_limit);
    } catch (const Error& e) {
      fail("train.hellaswag: {}", e.what());
    }
    try {
      hs_rows = choice_rows(*tokenizer, hs_items, t.seq_len, whole_config.vocab_size,
                            choices_take_bos(whole_config));
    } catch (const Error& e) {
      fail("train.hellaswag: {}: {} (train.seq_len {})", t.hellaswag, e.what(), t.seq_len);
    }
  }

  // Run directory: nothing is written until every check above has passed (but its lock, where
  // it exists: before a resume picks its checkpoint).
  const std::string& run_dir = cfg.run.dir;
  DirLock run_dir_lock;
  if (lead && fs::is_directory(run_dir)) run_dir_lock.take(run_dir);
  std::string ckpt;
  if (resume.from.empty() && (resume.start_step >= 0 || resume.reset_optimizer))
    fail("{}: only with --resume (it changes how a run continues from a checkpoint)",
         resume.start_step >= 0 ? "--start-step" : "--reset-optimizer");
  if (resume.start_step > t.steps)
    fail("--start-step: {} is past train.steps ({}); raise train.steps", resume.start_step,
         t.steps);
  if (!resume.from.empty()) {
    // Rank 0 picks the checkpoint and every other rank verifies that one: a rank choosing on its
    // own could fall back to an older step (a file it failed to read) and train from other weights.
    if (lead)
      ckpt =
          resume.from == "auto" ? find_latest_checkpoint(run_dir) : resolve_checkpoint(resume.from);
    ckpt = broadcast_string(*world, ckpt);
    if (!lead && !ckpt.empty()) resolve_checkpoint(ckpt);
    if (ckpt.empty())
      fail(
          "--resume: no checkpoint in {}/checkpoints; train without --resume first, or pass "
          "--resume=PATH",
          run_dir);
    check_same_architecture(ckpt, cfg.model);
    check_same_tokenizer(ckpt, *tokenizer);
    if (keep_resumed_min_lr(cfg, ckpt, lead)) sched = make_schedule(t);
  } else if (has_checkpoints(run_dir)) {
    fail(
        "run.dir {} already holds checkpoints; pass --resume to continue it, or choose a new "
        "directory with --set run.dir=DIR",
        run_dir);
  }
  std::string config_yaml = config_to_yaml(cfg);
  if (lead) {
    try {
      make_directories(run_dir);  // (removed again if the run fails while it is empty)
    } catch (const fs::filesystem_error& e) {
      fail("run.dir: cannot create {} ({})", run_dir, e.code().message());
    }
    run_dir_lock.take(run_dir);
  }

  TrainState st;
  st.init_from = cfg.init_from;
  std::string metrics_path = run_dir + "/metrics.jsonl";
  if (!ckpt.empty()) {
    // Each rank reads its own part of the checkpoint's tensors: under tensor parallelism its
    // share's elements, and of those the optimizer state's (and under full-shard the values')
    // pieces its shard holds.
    const ShareOfWhole share =
        tp ? dist::tensor_parallel_share_of(cfg.model, tp->size(), tp->rank(), tp->vocab_parallel())
           : ShareOfWhole();
    load_checkpoint(ckpt, model, resume.reset_optimizer ? nullptr : &opt, &st, share);
    if (dp.sharded_values())
      load_checkpoint_values(ckpt, model.params(), dp.layout().begin(dp.shard_rank()),
                             dp.value_shard(), share, /*resuming=*/!resume.reset_optimizer);
    dp.refresh_master();  // dist.offload's host copy of the loaded values
    // Another train.seed would reorder the epoch under the saved position (samples seen twice,
    // others never). Checkpoints before the seed was saved: unchecked.
    if (const auto seed = st.loader.find("seed"); seed != st.loader.end() &&
                                                  seed->is_number_unsigned() &&
                                                  seed->get<uint64_t>() != loader_seed(t))
      fail(
          "{}/state.json: the data order was drawn with train.seed {} but train.seed is {}; "
          "resume with --set train.seed={}, or start a new run from the checkpoint with init_from",
          ckpt, seed->get<uint64_t>() - 1, t.seed, seed->get<uint64_t>() - 1);
    try {
      train_data.set_state(st.loader);
    } catch (const Error& e) {
      fail("{}/state.json: {}", ckpt, e.what());
    }
    if (st.step > t.steps && resume.start_step < 0)
      fail("--resume: {} is at step {}, past train.steps ({}); raise train.steps", ckpt, st.step,
           t.steps);
    const int64_t saved_step = st.step;
    if (resume.start_step >= 0) st.step = resume.start_step;
    // Records and checkpoints past the checkpoint belong to the continuation this resume
    // abandons: the checkpoints are moved aside now, so that a crash before the next save does
    // not make --resume take them.
    if (lead) {
      MetricsWriter::truncate_after(metrics_path, std::min(saved_step, st.step));
      prune_checkpoints(run_dir, saved_step, /*keep_last=*/0);
    }
    fmt::print(
        "resumed from {} at step {}{}{}\n", ckpt, saved_step,
        st.step != saved_step ? fmt::format(", continuing as if {} steps were done", st.step) : "",
        resume.reset_optimizer ? "; optimizer state reset" : "");
  } else if (lead) {
    MetricsWriter::remove(metrics_path);  // and an earlier run's TensorBoard events
  }
  // Read: this run's own prunes may take the checkpoints it resumed or started from (held for
  // reading by resolve_checkpoint).
  release_checkpoint_reads();
  // (after the checkpoint's checks: a resume refused leaves the run's config.yaml as it was)
  if (lead) write_file_atomic(run_dir + "/config.yaml", config_yaml);
  world->barrier();  // rank 0 has made the run directory
  std::optional<MetricsWriter> metrics;
  if (lead) metrics.emplace(metrics_path, /*tensorboard_run_dir=*/run_dir);
  // run.dashboard: run_dir/dashboard.html, from the history so far (a resume's kept records).
  std::optional<Dashboard> dashboard;
  if (lead && cfg.run.dashboard) {
    dashboard.emplace(run_dir + "/dashboard.html", run_dir, t.steps);
    if (std::filesystem::exists(metrics_path)) {
      std::ifstream kept(metrics_path, std::ios::binary);  // (a line at a time)
      for (std::string line; std::getline(kept, line);) {
        auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (!j.is_discarded()) dashboard->add(j);
      }
    }
  }
  // A run ended by an error (too many skipped steps, a failed rank) leaves the page saying so,
  // with every record it had, not the last throttled write still claiming to be live.
  struct DashboardOnError {
    std::optional<Dashboard>& d;
    const int uncaught = std::uncaught_exceptions();
    ~DashboardOnError() {
      if (!d || std::uncaught_exceptions() <= uncaught) return;
      try {
        d->write("failed (see the run's error)");
      } catch (...) {  // (unwinding already: the run's own error is the one to report)
      }
    }
  } dashboard_on_error{dashboard};
  // metrics.jsonl (a non-finite number as null), TensorBoard (as it is), the dashboard.
  auto record_metrics = [&](const json& record) {
    if (metrics) metrics->write(record);
    if (dashboard) dashboard->add(with_nulls(record));
  };

  fmt::print(
      "model {} ({}): {:.2f}M parameters, L={} C={} NH={} V={}; activations {:.0f} MiB{}\n",
      cfg.model.preset.empty() ? "custom" : cfg.model.preset, cfg.model.arch,
      (tp ? cfg.model.num_params() : model.params().numel()) / 1e6, cfg.model.n_layer,
      cfg.model.n_embd, cfg.model.n_head, cfg.model.vocab_size,
      model.activation_bytes() / 1048576.0,
      tp ? fmt::format(" (a rank's share: {:.2f}M parameters)", model.params().numel() / 1e6) : "");
  if (cfg.model.lora.on())
    fmt::print(
        "LoRA rank {} alpha {} on {}{}: {:.3f}M trainable parameters ({:.2f}%), the rest "
        "frozen\n",
        cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets,
        cfg.model.lora.dropout > 0 ? fmt::format(", dropout {:g}", cfg.model.lora.dropout) : "",
        cfg.model.lora_params(/*adapted=*/true) / 1e6,
        100.0 * static_cast<double>(cfg.model.lora_params(/*adapted=*/true)) /
            static_cast<double>(model.params().numel()));
  for (const auto& s : train_data.stats()) {
    std::string cuts = fmt::format("{} cut by chunking", s["cut_by_chunking"].get<int64_t>());
    if (cfg.data.packing == "best_fit")
      cuts = fmt::format("{} cut by packing ({})", s["cut_by_packing"].get<int64_t>(), cuts);
    if (t.objective == "kto") {
      cuts = fmt::format("{} responses cut to train.seq_len", s["cut_by_packing"].get<int64_t>());
      if (const int64_t empty = s["pairs_without_targets"].get<int64_t>(); empty > 0)
        cuts += fmt::format(
            "; warning: {} responses have no targets (the prompt fills train.seq_len) and count "
            "for nothing",
            empty);
    } else if (preference_objective(t.objective)) {
      cuts = fmt::format("{} pairs cut to train.seq_len", s["cut_by_packing"].get<int64_t>());
      if (const int64_t empty = s["pairs_without_targets"].get<int64_t>(); empty > 0)
        cuts += fmt::format(
            "; warning: {} pairs have a side without targets (the prompt fills train.seq_len) and "
            "count for nothing",
            empty);
    }
    fmt::print("data: {} (weight {:.2f}): {} samples, {} documents, {}, fill {:.1f}%\n",
               s["source"].get<std::string>(), s["weight"].get<double>(),
               s["samples"].get<int64_t>(), s["documents"].get<int64_t>(), cuts,
               100 * s["fill"].get<double>());
  }
  fmt::print("data: {} training tokens{}; B={} T={} grad_accum={}; {} threads\n",
             train_data.num_tokens(),
             val_data ? fmt::format(", {} validation tokens", val_data->num_tokens()) : "",
             t.batch_size, t.seq_len, t.grad_accum, omp_get_max_threads());
  if (world->size() > 1 || comm.backend() == "nccl") {
    const dist::RankInfo& ri = dist::rank_info();
    const std::string over = world.get() == &comm ? comm.backend()
                                                  : fmt::format("{} (tensors over {})",
                                                                world->backend(), comm.backend());
    fmt::print(
        "dist: {} ranks ({} node(s) x {}) over {}, {}{}; global batch {} sequences per step\n",
        world->size(), ri.nodes, ri.local_size, over, dist::strategy_name(dp.strategy()),
        tp ? fmt::format(" over {} groups of {} tensor-parallel ranks{}", dp_world.size(), tp_size,
                         tp->sequence_parallel() ? " (sequence-parallel)" : "")
           : "",
        model.planned_batch() * t.grad_accum * readers);
  }
  // Communication: each step's traffic (comm_mib) and the time spent waiting for gradient
  // collectives after the backward passes (comm_wait_s), against the same collectives timed
  // alone: the share hidden behind the backward (docs/distributed.md, "communication").
  double comm_alone_s = 0, comm_mib_sum = 0, comm_wait_sum = 0;
  int64_t comm_steps = 0;
  double tp_mib_sum = 0;  // tensor parallelism's partial sums, per step
  int64_t tp_steps = 0;
  if (dp_world.size() > 1) {
    comm_alone_s = dp.time_gradient_collectives() *
                   (dp.strategy() >= dist::Strategy::kGradShard ? t.grad_accum : 1);
    fmt::print("dist: a step's gradient collectives take {:.3f} s alone (timed at start-up)\n",
               comm_alone_s);
  }
  std::fflush(stdout);

  // train.objective dpo | orpo | simpo | kto: the loss over preference pairs or labelled
  // responses (train/objective.h).
  std::unique_ptr<PreferenceObjective> objective;
  if (preference_objective(t.objective)) {
    const PreferenceOptions po = preference_options(t);
    objective = std::make_unique<PreferenceObjective>(
        po, setup.reference_is_base ? &model : setup.reference.get(),
        /*reference_without_adapters=*/setup.reference_is_base, &model);
    if (ref_tables)
      objective->use_reference_tables(std::move(ref_tables->first), std::move(ref_tables->second));
    std::string what =
        t.objective == "dpo"    ? fmt::format("{} loss, beta {}", t.dpo_loss, po.beta)
        : t.objective == "orpo" ? fmt::format("lambda {}", po.beta)
        : t.objective == "kto"
            ? fmt::format("{} loss, beta {}, desirable weight {}, undesirable weight {}",
                          t.kto_loss, po.beta, po.desirable_weight, po.undesirable_weight)
            : fmt::format("beta {} gamma {} cpo_alpha {}", po.beta, po.gamma, po.cpo_alpha);
    fmt::print("objective: {} ({}){}\n", t.objective, what,
               ref_tables                ? "; reference log-likelihoods precomputed"
               : setup.reference_is_base ? "; reference model: the policy without its LoRA adapters"
               : setup.reference         ? fmt::format("; reference model {}", reference_held())
                                         : "");
  }
  if (setup.teacher)
    fmt::print("objective: distill from {} ({:.2f}M parameters, {}), alpha {} temperature {}\n",
               t.teacher, setup.teacher_config.num_params() / 1e6, reference_held(),
               t.distill_alpha, t.distill_temperature);
  const int64_t rows = model.planned_batch();  // t.batch_size, or 1/N of it (sequence parallel)
  Batch batch = Batch::make(rows, t.seq_len);
  std::vector<Batch> micro(t.grad_accum);
  for (Batch& b : micro) b = Batch::make(rows, t.seq_len);
  model.set_z_loss(t.z_loss);
  SpikeGuard guard({t.spike_zscore, t.spike_window});
  guard.set_state(st.guard);
  EvalHistory evals(st.evals);
  const std::map<int64_t, std::string> faults = parse_faults(t.inject_fault);
  TrainResult res;
  auto start = Clock::now();
  Progress progress(t.steps, st.step, t.log_every);
  const int64_t tokens_per_step = model.planned_batch() * t.seq_len * t.grad_accum * readers;
  // Counted across resumes (which may change the batch, accumulation or ranks); checkpoints that
  // did not record them count the steps done at today's step size.
  if (st.tokens < 0) st.tokens = st.step * tokens_per_step;
  const double elapsed_before = st.elapsed_s;
  const double flops_per_token = cfg.model.flops_per_token(t.seq_len);
  const bool on_gpu = model.device() == Device::kCUDA;
  const double peak_tflops = t.peak_tflops > 0 ? t.peak_tflops
                             : on_gpu          ? cuda::datasheet_bf16_tflops()
                                               : 0.0;
  if (on_gpu)
    fmt::print("device: cuda, {}{}\n", cuda::device_name(),
               peak_tflops > 0 ? fmt::format(" (MFU against {:.1f} TFLOP/s)", peak_tflops) : "");
  else
    fmt::print("device: cpu, {} [{}], {} threads{}\n", cpu_features().brand,
               cpu_features().summary(), omp_get_max_threads(),
               t.precision != "bf16"       ? ""
               : cpu::bf16_matmul_native() ? "; bf16 matmuls in bf16"
                                           : "; bf16 matmuls as fp32 GEMMs on the widened operands "
                                             "(this CPU multiplies bf16 slower than fp32; "
                                             "LMFORGE_BF16_MATMUL=native overrides)");
  int64_t saved_step = -1;  // the step of the checkpoint last saved in this process
  auto checkpoint = [&] {
    st.loader = train_data.state();
    st.guard = guard.state();
    st.evals = evals.state();
    CheckpointShards shards;
    shards.comm = world.get();
    shards.index = dp.shard_rank();
    shards.count = dp.layout().ranks;
    shards.writes = dist::rank_info().node == 0 || dp.strategy() != dist::Strategy::kHybrid;
    shards.optimizer_sharded = dp.strategy() != dist::Strategy::kNoShard && !tp;
    if (dp.sharded_values() && !tp) {
      shards.values = &dp.value_shard();
      shards.values_lo = dp.layout().begin(dp.shard_rank());
    }
    if (tp) {  // the whole model, streamed by rank 0
      shards.whole_param = whole_param;
      shards.values_dtype = model.params().bf16_master() ? DType::kBF16 : DType::kF32;
    }
    res.last_checkpoint = save_checkpoint(run_dir, tp ? *whole_layout : model, &opt, st,
                                          config_yaml, t.keep_last, *tokenizer, &shards);
    saved_step = st.step;
    run_dir_lock.keep();  // (a run with checkpoints keeps its lock file)
  };

  // train.profile_steps: the op-level profile of the steps after this run's first (rank 0's).
  const int64_t profile_from = st.step + 1, profile_to = st.step + t.profile_steps;
  int64_t profiled = 0;
  double profiled_s = 0;
  auto report_profile = [&] {
    const std::string table = profile::report(profiled, profiled_s / profiled);
    profile::enable(false);
    progress.message(table.substr(0, table.size() - 1));
    write_file_atomic((std::filesystem::path(run_dir) / "profile.txt").string(), table);
    profiled = 0;
  };

  // Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved, the run says how to go on. Under
  // several processes (mpirun and srun pass the signal to every rank, each at its own moment of a
  // step) the ranks agree after every step whether any has one, so that all stop after the same
  // step and save it together: 16 bytes over the host world, outside the counted traffic.
  auto stop_signal = [&world]() -> int {
    if (world->size() == 1) return interrupted();
    double noted[2] = {interrupted() == SIGINT ? 1.0 : 0.0, interrupted() == SIGTERM ? 1.0 : 0.0};
    world->all_reduce(noted, 2)->wait();
    return noted[1] > 0 ? SIGTERM : noted[0] > 0 ? SIGINT : 0;
  };
  int stopped_by = 0;
  // A run resumed after it stopped early stays stopped (as a finished one resumed does nothing).
  bool early_stopped = t.patience > 0 && evals.bad() >= t.patience;
  if (early_stopped)
    progress.message(fmt::format(
        "early stopping: reached before this resume (val loss not below {:.4f} by more than {} "
        "for {} evaluations, best {:.4f} at step {}); nothing to train: raise train.patience to "
        "go on",
        evals.reference(), t.min_delta, evals.bad(), evals.best(), evals.best_step()));
  else if (st.step >= t.steps)
    progress.message(fmt::format(
        "nothing to train: the run finished at step {} (train.steps); raise train.steps to go on",
        st.step));
  // A signal during the set-up: no step, and a checkpoint of step 0, or none when resumed (the one
  // resumed from stays as it was: --reset-optimizer's fresh state is not saved over it).
  if (st.step < t.steps && !early_stopped && (stopped_by = stop_signal()) && !ckpt.empty()) {
    res.last_checkpoint = ckpt;
    saved_step = st.step;
  }
  for (int64_t step = st.step; step < t.steps && !early_stopped && !stopped_by; ++step) {
    const bool profiling = lead && step >= profile_from && step <= profile_to;
    if (profiling) profile::enable(true, /*keep=*/step > profile_from);
    auto t0 = Clock::now();
    double lr = sched.at(step);
    dist::set_context(fmt::format("step {}", step + 1));
    for (Batch& b : micro) train_data.next(b);
    auto fault = faults.find(step + 1);
    if (fault != faults.end() && (fault->second == "kill" || fault->second == "hang"))
      inject_rank_failure(fault->second, *world);
    double lse_sq = 0;
    // NEFTune's noise: drawn from (seed, step, reader, micro-batch), so a resumed run draws the
    // same (the ranks of a tensor-parallel group share rows, and noise, unless sequence-parallel).
    // LoRA's dropout masks likewise (each rank its own: tensor parallelism is refused with it).
    const uint64_t step_key =
        t.seed * 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(step) << 20 ^
        static_cast<uint64_t>(tp && !tp->sequence_parallel() ? world->rank() / tp_size
                                                             : world->rank());
    if (t.neftune_alpha > 0) model.set_neftune(t.neftune_alpha, step_key);
    if (cfg.model.lora.dropout > 0) model.set_lora_dropout_key(step_key ^ 0x6c6f7261ull);
    double kl = 0;
    const dist::CommStats comm0 = dp.comm_stats();
    // (the reference's gathers under full-shard)
    const double ref_comm0 = ref_dp ? ref_dp->comm_stats().bus_bytes : 0;
    // (tensor parallelism's partial sums, the reference's included)
    auto tp_bytes = [&] {
      return (tp ? tp->comm_stats().bus_bytes : 0) + (ref_tp ? ref_tp->comm_stats().bus_bytes : 0);
    };
    const double tp_bytes0 = tp_bytes();
    const double wait0 = dp.grad_wait_s();
    double loss = dp.forward_backward(micro, &lse_sq, objective.get(), &kl);
    if (fault != faults.end() && (fault->second == "nan" || fault->second == "spike"))
      inject_fault(fault->second, dp, loss);
    double norm = dp.clip_grad_norm(t.grad_clip);
    SpikeGuard::Verdict verdict = guard.check(loss, norm);
    if (verdict == SpikeGuard::Verdict::kOk) dp.step(lr);
    dist::CommStats comm = dp.comm_stats();
    comm -= comm0;
    if (ref_dp) comm.bus_bytes += ref_dp->comm_stats().bus_bytes - ref_comm0;
    st.step = step + 1;
    st.val_loss.reset();
    if (profiling && on_gpu) cuda::synchronize();  // the step's kernels, for the profile's shares
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (profiling) {
      profile::enable(false, /*keep=*/true);  // evaluation and checkpoints are not steps
      profiled_s += dt;
      if (++profiled == t.profile_steps) report_profile();
    }
    st.elapsed_s = elapsed_before + std::chrono::duration<double>(Clock::now() - start).count();
    st.tokens += tokens_per_step;
    double tps = tokens_per_step / dt;
    if (step == 0 || res.steps == 0) res.first_loss = loss;
    res.last_loss = loss;
    res.steps = st.step;
    json record = {{"step", st.step},    {"loss", loss},        {"lr", lr},
                   {"grad_norm", norm},  {"tokens_per_s", tps}, {"elapsed_s", st.elapsed_s},
                   {"tokens", st.tokens}};
    if (t.z_loss > 0) record["z_loss"] = t.z_loss * lse_sq;
    if (objective) record.update(objective->metrics());
    if (setup.teacher) record["kl"] = kl;
    if (dp_world.size() > 1) {
      record["comm_mib"] = comm.bus_bytes / 1048576.0;
      record["comm_wait_s"] = dp.grad_wait_s() - wait0;
      comm_mib_sum += comm.bus_bytes / 1048576.0;
      comm_wait_sum += dp.grad_wait_s() - wait0;
      ++comm_steps;
    }
    if (tp) {
      record["tp_comm_mib"] = (tp_bytes() - tp_bytes0) / 1048576.0;
      tp_mib_sum += record["tp_comm_mib"].get<double>();
      ++tp_steps;
    }
    const double tflops = flops_per_token * tps / 1e12;
    record["tflops"] = tflops;
    // tflops is the job's (tokens of every rank); the peak is one GPU's.
    if (peak_tflops > 0) record["mfu"] = tflops / (peak_tflops * world->size());
    record["mem_mib"] = peak_rss_mib();
    if (on_gpu) record["gpu_mem_mib"] = cuda::peak_allocated() / 1048576.0;
    if (verdict != SpikeGuard::Verdict::kOk) {
      record["skipped"] = verdict_name(verdict);
      record["skipped_total"] = guard.skipped();
    }
    record_metrics(record);
    progress.step(st.step, loss, lr, norm, tps);
    if (verdict != SpikeGuard::Verdict::kOk) {
      progress.message(fmt::format(
          "step {:>6}/{} | skipped ({}: loss {:.4g}, grad norm {:.4g}, z {:.1f}); {} in a row",
          st.step, t.steps, verdict_name(verdict), loss, norm, guard.last_zscore(),
          guard.consecutive()));
      if (guard.consecutive() > t.max_skips)
        fail(
            "training stopped at step {}: {} steps in a row were skipped as non-finite or "
            "spikes (train.max_skips={}); lower train.lr, raise train.warmup or resume from an "
            "earlier checkpoint",
            st.step, guard.consecutive(), t.max_skips);
    }
    bool stop = false, new_best = false;
    if (val_data && t.eval_every > 0 && (st.step % t.eval_every == 0 || st.step == t.steps)) {
      json val_record = {{"step", st.step}};
      double vl = 0;
      std::string detail;
      if (objective) {
        json m;
        const dist::RowRanks ranks = dp.row_ranks();
        vl = objective->evaluate(model, *val_data, t.eval_batches, batch, &m, &ranks);
        val_record.update(m);
        if (m.contains("val_reward_accuracy"))
          detail = fmt::format(" | reward accuracy {:.3f} | margin {:.4f}",
                               m["val_reward_accuracy"].get<double>(),
                               m["val_reward_margin"].get<double>());
        else if (m.contains("val_reward_margin"))  // KTO: no pairs to rank
          detail = fmt::format(" | reward margin {:.4f} | kl {:.4f}",
                               m["val_reward_margin"].get<double>(), m.value("val_kl", 0.0));
      } else {
        vl = dp.evaluate(*val_data, t.eval_batches, batch);
        val_record["val_ppl"] = std::exp(vl);
        detail = fmt::format(" | ppl {:.2f}", std::exp(vl));
      }
      val_record["val_loss"] = vl;
      res.last_val_loss = vl;
      st.val_loss = vl;  // saved with this step's checkpoint; picks checkpoints/best
      new_best = evals.add(st.step, vl, t.min_delta);
      record_metrics(val_record);
      progress.message(fmt::format("step {:>6}/{} | val loss {:.4f}{}{}", st.step, t.steps, vl,
                                   detail, new_best ? " | best" : ""));
      if (t.patience > 0 && evals.bad() >= t.patience) {
        progress.message(fmt::format(
            "early stopping at step {}: val loss has not gone below {:.4f} by more than {} for "
            "{} evaluations (best {:.4f} at step {})",
            st.step, evals.reference(), t.min_delta, evals.bad(), evals.best(), evals.best_step()));
        stop = true;
      }
    }
    if (!hs_items.empty() && t.eval_every > 0 &&
        (st.step % t.eval_every == 0 || st.step == t.steps)) {
      const ChoiceResult r = score_rows(model, hs_items, hs_rows);
      record_metrics(
          {{"step", st.step}, {"hellaswag_acc", r.acc()}, {"hellaswag_acc_norm", r.acc_norm()}});
      progress.message(
          fmt::format("step {:>6}/{} | hellaswag acc {:.4f} | acc_norm {:.4f} ({} "
                      "examples)",
                      st.step, t.steps, r.acc(), r.acc_norm(), hs_items.size()));
    }
    if ((early_stopped = stop)) break;
    // A new best validation loss is saved too (as nanoGPT and Lightning's ModelCheckpoint), so
    // that checkpoints/best names it.
    if (t.checkpoint_every > 0 && st.step != t.steps &&
        (st.step % t.checkpoint_every == 0 || (new_best && t.save_best)))
      checkpoint();
    if ((stopped_by = stop_signal())) break;
  }
  // A signal noted during the last step, or with early stopping, leaves a finished run.
  if (st.step < t.steps && !early_stopped) res.interrupted = stopped_by;
  if (lead && guard.consecutive() > 0)  // the weights these steps left are the run's last
    fmt::print(stderr,
               "lmforge: warning: the run ended with its last {} step(s) skipped (non-finite or a "
               "spike: train.max_skips not reached); the weights may have diverged: resume from an "
               "earlier checkpoint with a lower train.lr or a longer train.warmup\n",
               guard.consecutive());
  if (profiled > 0) report_profile();  // the run ended (or stopped early) before N steps
  progress.finish();
  fmt::print("peak resident memory {:.0f} MiB (activations planned: {:.0f} MiB)\n", peak_rss_mib(),
             model.activation_bytes() / 1048576.0);
  if (on_gpu)
    fmt::print("peak GPU memory {:.0f} MiB (allocated by lmforge)\n",
               cuda::peak_allocated() / 1048576.0);
  if (world->size() > 1 || dp.strategy() != dist::Strategy::kNoShard)
    fmt::print(
        "dist: {} per rank (rank 0): optimizer state {} bytes, parameters {} bytes (+ {} bytes "
        "of gather buffers), gradients {} bytes\n",
        dist::strategy_name(dp.strategy()), dp.optimizer_bytes(), dp.parameter_bytes(),
        dp.gather_buffer_bytes(), dp.gradient_bytes());
  if (comm_steps > 0) {
    const double wait = comm_wait_sum / static_cast<double>(comm_steps);
    fmt::print(
        "dist: per step and rank {:.1f} MiB sent (ring algorithm's bytes); gradient collectives "
        "waited for after the backward {:.3f} s of {:.3f} s alone: {:.0f}% hidden behind it\n",
        comm_mib_sum / static_cast<double>(comm_steps), wait, comm_alone_s,
        comm_alone_s > 0 ? 100.0 * std::clamp(1.0 - wait / comm_alone_s, 0.0, 1.0) : 0.0);
  }
  if (tp && tp_steps > 0)
    fmt::print(
        "dist.tensor_parallel: {} ranks per group; per step and rank {:.1f} MiB of partial sums "
        "sent (ring algorithm's bytes)\n",
        tp->size(), tp_mib_sum / static_cast<double>(tp_steps));
  if (dp.offload())
    fmt::print("dist.offload: AdamW master values and gradients in a host arena of {} bytes\n",
               dp.host_bytes());
  res.stopped_early = st.step < t.steps;
  if (dashboard)
    dashboard->write(res.interrupted ? "interrupted (continue with --resume)"
                     : early_stopped ? "stopped early"
                                     : "finished");
  if (saved_step != st.step) checkpoint();
  fmt::print("saved {}\n", res.last_checkpoint);
  // From here on (the sample) a signal ends the process as usual; one noted since the last step
  // (during the last save) skips the sample of the finished run.
  const bool stop_now = res.interrupted || stop_signal();
  release_interrupts();
  if (stop_now) return res;  // no sample: the run is to be continued, or was stopped
  // full-shard: the whole model again, for sampling (only then: it is a whole copy per rank)
  if (!cfg.sample.prompt.empty()) dp.gather_full_model();
  std::unique_ptr<Transformer> whole;
  if (tp && !cfg.sample.prompt.empty()) {  // tensor parallelism: likewise (values only)
    if (lead) {
      whole = std::make_unique<Transformer>(cfg.model);
      whole->params().release_grads();  // values only
    }
    for (const Param& p : whole_layout->params().params()) {
      const Tensor v = whole_param(p, 0);
      if (lead) whole->params().find(p.name)->value.copy_from(v);
    }
    if (lead) whole->params().invalidate_bf16();
  }
  if (lead && !cfg.sample.prompt.empty()) print_run_sample(whole ? *whole : model, cfg, *tokenizer);
  return res;
}

}  // namespace lmforge
