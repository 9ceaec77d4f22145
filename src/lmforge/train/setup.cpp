// setup_run: everything a run needs before its first step, from the config (trainer.h):
// init_from's source and the architecture it fixes, the tokenizer, the loaders, the model and,
// per train.objective, DPO's reference or the distillation teacher.
#include <fmt/core.h>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/error.h"
#include "lmforge/data/text_shards.h"
#include "lmforge/dist/data_parallel.h"
#include "lmforge/dist/tensor_parallel.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/checkpoint.h"
#include "lmforge/train/objective.h"
#include "lmforge/train/trainer.h"

namespace lmforge {

void check_training_fits(const ModelConfig& model, const FootprintOptions& o, double activations,
                         int local_ranks) {
  const TrainingFootprint f = training_footprint(model, o);
  const double all = static_cast<double>(model.num_params() + model.lora_params());
  const bool sharded = o.strategy >= static_cast<int>(dist::Strategy::kZero1) && o.shards > 1;
  // The activations' share of the need decides which knob the hint names first.
  const bool activations_lead = activations > f.total();
  const std::string smaller_batch =
      "lower train.batch_size (train.grad_accum keeps the tokens a step) or set "
      "train.activation_checkpointing: full";
  check_host_memory(
      (f.total() + activations) * local_ranks,
      fmt::format(
          "training's weights, gradients and AdamW state ({:.0f}M parameters{}{}) and one "
          "micro-batch's activations ({:.2f} GiB){}",
          all / 1e6,
          sharded
              ? fmt::format(", {} over {} ranks",
                            dist::strategy_name(static_cast<dist::Strategy>(o.strategy)), o.shards)
              : "",
          o.frozen      ? ", and the teacher"
          : o.reference ? ", and the frozen reference model"
                        : "",
          activations / 1073741824.0,
          local_ranks > 1 ? fmt::format(" on each of this node's {} ranks", local_ranks) : ""),
      activations_lead ? smaller_batch + "; lmforge plan shows what fits"
      : o.frozen ? "choose a smaller model or teacher, or shard both over more ranks or nodes "
                   "(dist.strategy: full-shard, dist.tensor_parallel), or " +
                       smaller_batch + "; lmforge plan shows what fits"
      : o.reference
          ? "choose a smaller model, train LoRA adapters (model.lora_rank: the reference is "
            "then the base model, no second copy), or shard it over more ranks or nodes "
            "(dist.strategy), or " +
                smaller_batch + "; lmforge plan shows what fits"
          : "choose a smaller model, or shard it over more ranks or nodes (dist.strategy: "
            "full-shard), or " +
                smaller_batch + "; lmforge plan shows what fits",
      local_ranks);
}

bool keep_resumed_min_lr(Config& cfg, const std::string& ckpt, bool lead) {
  if (cfg.keys_given.count("train.min_lr")) return false;
  std::optional<double> saved_min_lr;
  try {
    Config saved;
    ConfigLoader loader(saved);
    loader.load_yaml_file(ckpt + "/config.yaml");
    loader.finish();
    saved_min_lr = saved.train.min_lr;
  } catch (const Error&) {  // an older config.yaml that no longer reads: the config's value
  }
  if (!saved_min_lr || *saved_min_lr == cfg.train.min_lr) return false;
  const TrainConfig& t = cfg.train;
  if (*saved_min_lr > t.lr && t.schedule != "constant")
    fail(
        "train.lr {:g} is below the train.min_lr {:g} this run decays toward ({}/config.yaml; "
        "unset, train.min_lr keeps it on resume); set train.min_lr too, e.g. --set "
        "train.min_lr={:g}",
        t.lr, *saved_min_lr, ckpt, cfg.train.min_lr);
  if (lead)
    fmt::print(
        "note: train.min_lr {:g} as {}/config.yaml has it (unset, it would be train.lr / 10 = "
        "{:g}); set train.min_lr to change it\n",
        *saved_min_lr, ckpt, cfg.train.min_lr);
  cfg.train.min_lr = *saved_min_lr;
  return true;
}

RunSetup setup_run(Config& cfg, const std::string& resume_from) {
  validate_train_config(cfg);
  const TrainConfig& t = cfg.train;
  // DPO's and KTO's reference model (below), made from init_from's weights
  const bool reference = t.objective == "dpo" || t.objective == "kto";

  // Initial weights from elsewhere: they fix the architecture and the tokenizer.
  RunSetup r;
  std::unique_ptr<InitSource>& init = r.init;
  bool init_stood_in = false;  // by the resumed checkpoint (the note says so)
  if (!cfg.init_from.empty()) {
    try {
      init = std::make_unique<InitSource>(open_init_source(cfg.init_from));
    } catch (const Error& e) {
      // Resumed: the checkpoint holds what the source gave (as torchtitan resumes from the
      // checkpoint alone), but DPO's and KTO's reference, made from the source.
      std::string ckpt;
      if (!resume_from.empty() && !reference)
        ckpt = resume_from == "auto" ? find_latest_checkpoint(cfg.run.dir)
                                     : resolve_checkpoint(resume_from);
      if (ckpt.empty())
        fail("init_from: {}{}", e.what(),
             !resume_from.empty() && reference
                 ? fmt::format(" ({}'s reference model is made from it: restore it to resume)",
                               t.objective)
                 : "");
      init = std::make_unique<InitSource>(open_init_source(ckpt));
      init->spec = cfg.init_from;  // (state.json's init_from stays the run's)
      init_stood_in = true;
      fmt::print(
          "note: init_from {} cannot be read; resuming, its architecture and tokenizer come from "
          "{}\n",
          cfg.init_from, ckpt);
    }
    adopt_init_model(cfg, *init);
    if (t.optimizer == "muon" && cfg.model.lora.on())  // adapters the source carries
      fail(
          "train.optimizer: muon is for whole matrices; init_from {} continues LoRA adapters, "
          "which train with adamw",
          cfg.init_from);
  }

  // Tokenizer, and the model's vocabulary from it (0 = the tokenizer's, padded to 64). With
  // init_from and no data.tokenizer (or an empty one: the resolved config.yaml of such a run), the
  // source's.
  std::unique_ptr<Tokenizer>& tokenizer = r.tokenizer;
  if (init && (!cfg.keys_given.count("data.tokenizer") || cfg.data.tokenizer.empty())) {
    tokenizer = std::move(init->tokenizer);
    cfg.data.tokenizer.clear();  // not the embedded default's, which this run does not use
  } else
    try {
      std::string spec = cfg.data.tokenizer;
      if (spec.empty())
        fail("not set (it may be empty only with init_from); byte, bpe:N or a tokenizer file");
      if (spec.starts_with("bpe:")) {           // train one on data.text (cached)
        const int64_t n = bpe_spec_size(spec);  // (>= 257: validate_train_config)
        if (cfg.data.text.empty()) fail("\"{}\" trains on data.text, which is not set", spec);
        // (on the text's training share where it is split: not where data.train is the data)
        spec = bpe_tokenizer_for_text(cfg.data.text, n,
                                      cfg.data.train.empty() ? cfg.data.val_fraction : 0.0);
      }
      tokenizer = load_tokenizer(spec);
    } catch (const Error& e) {
      fail("data.tokenizer: {}", e.what());
    }
  if (init && init->tokenizer && !same_vocabulary(*tokenizer, *init->tokenizer))
    fail(
        "data.tokenizer: {} differs from the tokenizer of init_from {}; remove data.tokenizer to "
        "use the model's own",
        cfg.data.tokenizer, cfg.init_from);
  if (cfg.model.vocab_size == 0) cfg.model.vocab_size = (tokenizer->vocab_size() + 63) / 64 * 64;
  check_vocab_covers(cfg.model.vocab_size, tokenizer->vocab_size(), cfg.data.tokenizer);
  cfg.model.validate();
  // dist.tensor_parallel: groups of consecutive ranks share each block; the groups are the data
  // parallel ranks (each group reads one slice of the batch).
  const int tp = static_cast<int>(cfg.dist.tensor_parallel);
  validate_rank_count(cfg, dist::rank_info().size);
  const ModelConfig share_config = dist::tensor_parallel_config(cfg.model, tp, vocab_parallel(cfg));

  // Data.
  // data.text is the data when data.train is not set (the embedded default's demo corpus would
  // otherwise validate a fine-tuning run on the Bible); its held-out share validates unless
  // data.val is set.
  std::string train_spec = cfg.data.train, val_spec = cfg.data.val;
  const bool from_text = !cfg.data.text.empty() && train_spec.empty();
  if (from_text) {
    TextShards s = shards_from_text(cfg.data.text, cfg.data.val_fraction, *tokenizer);
    train_spec = s.train;
    if (val_spec.empty() && cfg.data.val_fraction > 0) val_spec = s.val;
  }
  if (train_spec.empty())
    fail("data.train: no training data; set data.train (shards) or data.text");
  // Rows per rank: the batch, or under sequence parallelism this rank's 1/N of its group's.
  const int64_t rows = cfg.dist.sequence_parallel ? t.batch_size / tp : t.batch_size;
  LoaderOptions lo{rows, t.seq_len, loader_seed(t), cfg.data.packing};
  lo.pairs = paired_objective(t.objective);
  lo.unpaired = t.objective == "kto";
  // (sequence parallelism: every rank its own share of the group's rows)
  const int readers = cfg.dist.sequence_parallel ? 1 : tp;
  lo.rank = dist::rank_info().rank / readers;
  lo.world = dist::rank_info().size / readers;
  lo.pad_token = std::max(tokenizer->eos_id(), 0);
  try {
    r.train_data = std::make_unique<Loader>(parse_data_spec(train_spec, "data.train"), lo);
  } catch (const Error& e) {  // (its shard is a cache file: name the text instead)
    if (!from_text) throw;
    fail("data.text: {}: {}", cfg.data.text, e.what());
  }
  if (lo.pairs || lo.unpaired)  // every sample without targets would train on nothing (loss 0)
    for (const auto& st : r.train_data->stats())
      if (st["pairs_without_targets"].get<int64_t>() >= st["samples"].get<int64_t>())
        fail(
            "data.train: {}: no {} has targets within train.seq_len {} (its prompt fills it); "
            "raise train.seq_len or shorten the prompts",
            st["source"].get<std::string>(), lo.unpaired ? "response" : "pair", t.seq_len);
  r.train_data->check_tokenizer(*tokenizer, "data.train");
  r.train_data->check_vocab(cfg.model.vocab_size, "data.train");
  std::unique_ptr<Loader>& val_data = r.val_data;
  if (!val_spec.empty()) {
    LoaderOptions vo = lo;
    vo.seed = 0;
    vo.rank = 0;  // a sequential read: each rank takes its batches of it (dist::eval_rows)
    vo.world = 1;
    try {
      val_data = std::make_unique<Loader>(parse_data_spec(val_spec, "data.val"), vo);
    } catch (const Error& e) {
      if (!from_text || !cfg.data.val.empty()) throw;
      fail("data.text: {}: its held-out share (data.val_fraction {}): {}", cfg.data.text,
           cfg.data.val_fraction, e.what());
    }
    val_data->check_tokenizer(*tokenizer, "data.val");
    val_data->check_vocab(cfg.model.vocab_size, "data.val");
  }

  // Model.
  if (cfg.model.lora.dropout > 0 && !cfg.model.lora.on())
    fail(
        "model.lora_dropout: {} drops the LoRA adapters' input, but the model has none; set "
        "model.lora_rank, or remove model.lora_dropout",
        cfg.model.lora.dropout);
  if (cfg.model.lora.on() && cfg.model.lora.dropout > 0) {  // (after init_from's, as it may set it)
    if (tp > 1)
      fail(
          "model.lora_dropout: not with dist.tensor_parallel yet (the ranks of a group would drop "
          "their shares of an input apart); set model.lora_dropout: 0 or dist.tensor_parallel: 1");
    if (t.cuda_graphs)
      fail(
          "model.lora_dropout: not with train.cuda_graphs (each micro-batch draws a new mask); set "
          "train.cuda_graphs: false or model.lora_dropout: 0");
  }
  if (resolve_device(t.device) == Device::kCUDA) {  // what the CUDA backend cannot run yet
    if (cfg.model.head_size() > 128)
      fail("model: head size {} exceeds the CUDA attention's 128; train it with train.device: cpu",
           cfg.model.head_size());
    if (tp > 1 && t.master_weights == "bf16" && vocab_parallel(cfg))
      fail(
          "train.master_weights: bf16 with dist.tensor_parallel splitting the vocabulary (bf16 "
          "embedding tables in parts) runs on the CPU only; use train.master_weights: fp32 on "
          "GPUs");
  }
  // DPO's (and KTO's) reference: the policy as it starts, never trained. LoRA adapters from a
  // source without them start as a no-op (B = 0): the reference is the policy with its adapters
  // off (PEFT's disable_adapter(); no second model). Otherwise a second model, made the same way
  // as the policy: each rank's share under tensor parallelism, its shard under full-shard.
  const bool reference_is_base =
      reference && cfg.model.lora.on() && !(init && init->model.lora.on());
  if (t.objective == "distill") {
    // The teacher: any model lmforge loads with this run's tokenizer and vocabulary.
    InitSource src;
    try {
      src = open_init_source(t.teacher);
    } catch (const Error& e) {
      fail("train.teacher: {}", e.what());
    }
    if (!same_vocabulary(*src.tokenizer, *tokenizer))
      fail(
          "train.teacher: {} has tokenizer {} ({}) but this run's is {} ({}); distillation needs "
          "the same tokenizer",
          t.teacher, src.tokenizer->kind(), src.tokenizer->fingerprint(), tokenizer->kind(),
          tokenizer->fingerprint());
    if (src.model.vocab_size != cfg.model.vocab_size)
      fail(
          "train.teacher: {} has a vocabulary of {} but the model's is {}; set model.vocab_size: "
          "{}",
          t.teacher, src.model.vocab_size, cfg.model.vocab_size, src.model.vocab_size);
    if (src.model.max_seq_len < t.seq_len)
      fail("train.teacher: {} takes at most {} positions, below train.seq_len {}", t.teacher,
           src.model.max_seq_len, t.seq_len);
    r.teacher_config = src.model;
    r.teacher_source = std::make_unique<InitSource>(std::move(src));
  }
  // Made as the policy is: under tensor parallelism each rank's share (its vocabulary split
  // alike), under full-shard its shard left to a DataParallel of its own (frozen_values).
  ModelConfig teacher_share;
  if (r.teacher_source) try {
      teacher_share = dist::tensor_parallel_config(r.teacher_config, tp, vocab_parallel(cfg));
    } catch (const Error& e) {
      fail("train.teacher: {} cannot be split like the model: {}", t.teacher, e.what());
    }
  // Ranks on the CPU share their node's memory: each holds training_footprint() (its shards).
  const dist::Strategy strategy = dist::parse_strategy(cfg.dist.strategy);
  if (resolve_device(t.device) == Device::kCPU) {
    const dist::RankInfo launch = dist::detect_launch();
    FootprintOptions fo;
    fo.bf16 = t.precision == "bf16";
    fo.bf16_master = t.master_weights == "bf16";
    fo.frozen_bf16 = r.teacher_source && teacher_in_bf16(cfg);
    // precompute_ref_logps releases it before the optimizer's state exists
    fo.reference = (reference && !reference_is_base && !t.precompute_ref_logps) || r.teacher_source;
    fo.frozen = r.teacher_source ? &teacher_share : nullptr;
    fo.strategy = static_cast<int>(strategy);
    // hybrid shards within a node (dist.ranks_per_node declares its size)
    // (tensor parallelism: sharded over the ranks holding the same share)
    fo.shards = (strategy != dist::Strategy::kHybrid ? launch.size
                 : cfg.dist.ranks_per_node > 0       ? static_cast<int>(cfg.dist.ranks_per_node)
                                                     : launch.local_size) /
                tp;
    fo.accumulates = t.grad_accum > 1;
    fo.muon = t.optimizer == "muon";
    fo.muon_bf16 = optimizer_options(cfg).muon.bf16;
    fo.tensor_parallel = tp;
    // One micro-batch's activations beside them, as Transformer::plan will take them (and a
    // frozen model's forwards).
    ActivationShape shape;
    shape.batch = t.batch_size;
    shape.seq = t.seq_len;
    shape.bf16 = fo.bf16;
    shape.recompute = parse_recompute(t.activation_checkpointing);
    shape.tp = tp;
    shape.sequence_parallel = cfg.dist.sequence_parallel;
    shape.whole_vocab = cfg.model.vocab_size;
    double activations = activation_bytes(share_config, shape);
    if (fo.reference)
      activations += activation_bytes(fo.frozen ? *fo.frozen : share_config, shape, true);
    check_training_fits(share_config, fo, activations, launch.local_size);
  }
  // The model: whole, or under tensor parallelism this rank's share, made one parameter at a
  // time from the whole model's values (the seed's, or init_from's); under full-shard the values
  // are left to DataParallel, which makes each rank's shard the same way (RunSetup::values). No
  // rank holds the whole model's values, but a DPO or KTO reference under no-shard, zero1 or
  // grad-shard (held whole, as the policy is), and under LoRA with precomputed reference
  // log-likelihoods the policy until they are scored (below).
  const int tp_rank = dist::rank_info().rank % tp;
  auto stream = [&init, seed = t.seed](const Transformer& layout) -> ValueStream {
    if (init) return init->values(layout, seed);
    return [&layout, seed](const GiveValues& give) { layout.for_each_init_param(seed, give); };
  };
  const Transformer layout(cfg.model, Transformer::MeasureOnly{});
  // shards_later: where the values go for DataParallel to shard them (RunSetup::values).
  auto make = [&](ValueStream* shards_later) {
    auto m = std::make_unique<Transformer>(share_config);  // (cfg.model without tensor parallelism)
    if (tp > 1) {
      dist::set_tensor_parallel_share(cfg.model, *m, tp, tp_rank, stream(layout));
    } else if (shards_later) {
      *shards_later = stream(*m);  // (the model's buffer left unwritten: nothing resident)
    } else {
      // bf16 master weights on the host: the values made bf16 before the load or the seed's
      // initial values write them (fp32 to bf16 as the later conversion would round them), so
      // their fp32 buffer is never resident (GPT-2 124M with LoRA r8 from a checkpoint: a 486 MiB
      // peak, not 671 converting after the load).
      if (t.precision == "bf16" && t.master_weights == "bf16" &&
          resolve_device(t.device) == Device::kCPU)
        m->use_bf16_master(/*convert=*/false);
      if (init) {
        // LoRA adapters the source does not have start from their initial values (B = 0: the
        // source's model); the load replaces everything else.
        if (cfg.model.lora.on()) m->init_adapters(t.seed);
        init->load_weights(*m);
      } else {
        m->init_weights(t.seed);
      }
    }
    return m;
  };
  // (DPO's reference as the policy without its adapters, precomputed before DataParallel shards
  // the values: the policy holds them whole until then)
  const bool full_shard = strategy >= dist::Strategy::kFullShard;
  r.model =
      make(full_shard && !(reference_is_base && t.precompute_ref_logps) ? &r.values : nullptr);
  if (init) {
    for (const std::string& n : init->notes) fmt::print("note: {}: {}\n", init->path, n);
    if (!init_stood_in)
      fmt::print("init_from {}: {} {} weights\n", cfg.init_from,
                 r.values ? "each rank's shard of its"
                 : tp > 1 ? "each rank's share of its"
                          : "loaded",
                 cfg.model.arch);
  }
  if (reference) {
    if (reference_is_base)
      r.reference_is_base = true;
    else  // (under full-shard sharded like the policy: RunSetup::frozen_values)
      r.reference = make(full_shard ? &r.frozen_values : nullptr);
  }
  if (r.teacher_source) {
    const InitSource& from = *r.teacher_source;
    r.teacher = std::make_unique<Transformer>(teacher_share);
    try {
      if (tp > 1) {
        const Transformer whole(from.model, Transformer::MeasureOnly{});
        dist::set_tensor_parallel_share(from.model, *r.teacher, tp, tp_rank,
                                        from.values(whole, t.seed));
      } else if (full_shard) {
        r.frozen_values = from.values(*r.teacher, t.seed);  // (read as DataParallel shards it)
      } else {
        from.load_weights(*r.teacher);
      }
    } catch (const Error& e) {
      fail("train.teacher: {}", e.what());
    }
  }
  // On a GPU: made (or loaded) on the host, then moved there with everything planned after.
  for (Transformer* m : {r.model.get(), r.reference.get(), r.teacher.get()}) {
    if (!m) continue;
    m->to(resolve_device(t.device));
    // Tensor parallelism adds fp32 partial sums: the row-parallel layers' outputs stay fp32.
    if (tp > 1) m->set_bf16_matmul_outputs(false);
    m->set_packed_rows(cfg.data.packing != "none");
    if (t.precision == "bf16") {
      m->enable_bf16();  // the reference computes as the policy does: equal log-likelihoods at 0
      // A distillation teacher, never updated, is held in bf16 alone (its weights rounded once,
      // as Hugging Face trainers load a teacher in the run's dtype): a third of its memory.
      // (Under full-shard without tensor parallelism the values are not written yet: DataParallel
      // makes each rank's bf16 shard from the stream, and the whole buffer stays unwritten.)
      const bool streamed = m == r.model.get() ? bool(r.values) : bool(r.frozen_values);
      if (t.master_weights == "bf16" || (m == r.teacher.get() && teacher_in_bf16(cfg)))
        m->use_bf16_master(/*convert=*/!streamed);
    }
    // The reference and the teacher only run forwards: each block keeps its input alone, no
    // backward buffers nor gradients (the same results, bit for bit, in a fraction of the memory).
    if (m == r.model.get())
      m->plan(rows, t.seq_len, parse_recompute(t.activation_checkpointing));
    else
      m->plan_forward_only(rows, t.seq_len);  // (sequence parallelism: this rank's rows)
  }
  // (Without them the bf16 matmuls run as fp32 GEMMs on the widened operands, as the device line
  // says, unless LMFORGE_BF16_MATMUL=native asks for oneDNN's emulated ones.)
  if (t.precision == "bf16" && r.model->device() == Device::kCPU && !cpu_features().avx512_bf16 &&
      !cpu_features().amx_bf16 && cpu::bf16_matmul_native())
    fmt::print(
        "note: LMFORGE_BF16_MATMUL=native on a CPU without AVX512-BF16 or AMX: oneDNN emulates the "
        "bf16 matmuls; the default (fp32 GEMMs on the widened operands) is expected faster\n");
  r.model->set_cuda_graphs(t.cuda_graphs);
  if (r.teacher)
    r.model->set_distillation({r.teacher.get(), t.distill_alpha, t.distill_temperature});
  return r;
}

}  // namespace lmforge
