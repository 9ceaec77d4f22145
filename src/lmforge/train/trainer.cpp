#include "lmforge/train/trainer.h"

#include <fmt/core.h>
#include <omp.h>

#include <chrono>
#include <filesystem>

#include "lmforge/core/error.h"
#include "lmforge/data/loader.h"
#include "lmforge/data/text_shards.h"
#include "lmforge/eval/generate.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/optim/clip.h"
#include "lmforge/optim/schedule.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/checkpoint.h"
#include "lmforge/train/init_from.h"
#include "lmforge/train/metrics.h"

namespace lmforge {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

void validate_train_config(const Config& cfg) {
  const TrainConfig& t = cfg.train;
  auto positive = [](int64_t v, const char* key) {
    if (v <= 0) fail("train.{}: must be positive, got {}", key, v);
  };
  positive(t.steps, "steps");
  positive(t.batch_size, "batch_size");
  positive(t.seq_len, "seq_len");
  positive(t.grad_accum, "grad_accum");
  positive(t.log_every, "log_every");
  if (!(t.lr > 0)) fail("train.lr: must be positive, got {}", t.lr);
  if (t.precision != "fp32")
    fail("train.precision: \"{}\" is not available yet in this build; use fp32", t.precision);
  if (t.device == "cuda")
    fail("train.device: cuda is not available in this build (CPU only); use cpu or auto");
  if (t.device != "cpu" && t.device != "auto")
    fail("train.device: expected cpu, cuda or auto, got \"{}\"", t.device);
  if (t.warmup < 0) fail("train.warmup: must be >= 0, got {}", t.warmup);
}

namespace {

double evaluate(Transformer& model, const Loader& val, int64_t batches, Batch& batch) {
  double sum = 0;
  for (int64_t i = 0; i < batches; ++i) {
    val.sequential(i, batch);
    sum += model.forward(batch.tokens, batch.targets);
  }
  return sum / static_cast<double>(batches);
}

// With init_from the architecture comes from the source; a model key the user set to something
// else is a conflict (keys equal to the source's are fine, so a run's resolved config.yaml, which
// lists them all, loads again).
void adopt_init_model(Config& cfg, const InitSource& src) {
  ModelConfig want = src.model;
  if (src.hf) want.preset.clear();
  auto set = model_fields(cfg.model), from = model_fields(want);
  for (size_t i = 0; i < set.size(); ++i) {
    if (!cfg.keys_given.count("model." + set[i].key) || set[i].key == "init_std") continue;
    std::string v = field_value(set[i]);
    if (v != field_value(from[i]))
      fail(
          "model.{}: {} conflicts with init_from {} ({}); the architecture comes from init_from, "
          "remove model.{} from the config",
          set[i].key, v, src.spec, field_value(from[i]), set[i].key);
  }
  cfg.model = src.model;
  if (src.hf) cfg.model.preset.clear();  // "hf:DIR" is not a preset name a config can load
}

}  // namespace

TrainResult train(Config& cfg, const std::string& resume) {
  validate_train_config(cfg);
  const TrainConfig& t = cfg.train;

  // Initial weights from elsewhere: they fix the architecture and the tokenizer.
  std::unique_ptr<InitSource> init;
  if (!cfg.init_from.empty()) {
    try {
      init = std::make_unique<InitSource>(open_init_source(cfg.init_from));
    } catch (const Error& e) {
      fail("init_from: {}", e.what());
    }
    adopt_init_model(cfg, *init);
  }

  // Tokenizer, and the model's vocabulary from it (0 = the tokenizer's, padded to 64).
  std::unique_ptr<Tokenizer> tokenizer;
  if (init && !cfg.keys_given.count("data.tokenizer")) {
    tokenizer = std::move(init->tokenizer);
  } else
    try {
      std::string spec = cfg.data.tokenizer;
      if (spec.starts_with("bpe:")) {  // train one on data.text (cached)
        int64_t n = 0;
        try {
          n = std::stoll(spec.substr(4));
        } catch (...) {
        }
        if (n < 257) fail("\"{}\": expected bpe:N with N >= 257", spec);
        if (cfg.data.text.empty()) fail("\"{}\" trains on data.text, which is not set", spec);
        spec = bpe_tokenizer_for_text(cfg.data.text, n);
      }
      tokenizer = load_tokenizer(spec);
    } catch (const Error& e) {
      fail("data.tokenizer: {}", e.what());
    }
  if (init && init->tokenizer && tokenizer->fingerprint() != init->tokenizer->fingerprint())
    fail(
        "data.tokenizer: {} differs from the tokenizer of init_from {}; remove data.tokenizer to "
        "use the model's own",
        cfg.data.tokenizer, cfg.init_from);
  if (cfg.model.vocab_size == 0) cfg.model.vocab_size = (tokenizer->vocab_size() + 63) / 64 * 64;
  if (cfg.model.vocab_size < tokenizer->vocab_size())
    fail(
        "model.vocab_size: {} is smaller than the tokenizer's {} ids ({}); set it to 0 to take "
        "the tokenizer's",
        cfg.model.vocab_size, tokenizer->vocab_size(), cfg.data.tokenizer);
  cfg.model.validate();

  // Data.
  std::string train_spec = cfg.data.train, val_spec = cfg.data.val;
  if (!cfg.data.text.empty()) {
    TextShards s = shards_from_text(cfg.data.text, cfg.data.val_fraction, *tokenizer);
    if (train_spec.empty()) train_spec = s.train;
    if (val_spec.empty() && cfg.data.val_fraction > 0) val_spec = s.val;
  }
  if (train_spec.empty())
    fail("data.train: no training data; set data.train (shards) or data.text");
  LoaderOptions lo{t.batch_size, t.seq_len, t.seed + 1, cfg.data.packing};
  lo.pad_token = std::max(tokenizer->eos_id(), 0);
  Loader train_data(parse_data_spec(train_spec, "data.train"), lo);
  train_data.check_tokenizer(*tokenizer, "data.train");
  train_data.check_vocab(cfg.model.vocab_size, "data.train");
  std::unique_ptr<Loader> val_data;
  if (!val_spec.empty()) {
    LoaderOptions vo = lo;
    vo.seed = 0;
    val_data = std::make_unique<Loader>(parse_data_spec(val_spec, "data.val"), vo);
    val_data->check_tokenizer(*tokenizer, "data.val");
    val_data->check_vocab(cfg.model.vocab_size, "data.val");
  }

  // Model and optimizer.
  Transformer model(cfg.model);
  if (init) {
    init->load_weights(model);
    for (const std::string& n : init->notes) fmt::print("note: {}: {}\n", init->path, n);
    fmt::print("init_from {}: loaded {} weights\n", cfg.init_from, cfg.model.arch);
  } else {
    model.init_weights(t.seed);
  }
  model.plan(t.batch_size, t.seq_len);
  AdamW opt(model.params(), {t.beta1, t.beta2, t.eps, t.weight_decay});
  Schedule sched{t.schedule, t.lr, t.min_lr, t.warmup, t.steps};
  sched.at(0);  // rejects an unknown schedule before anything is written

  // Run directory: nothing is written until every check above has passed.
  const std::string& run_dir = cfg.run.dir;
  std::string ckpt;
  if (!resume.empty()) {
    ckpt = resume == "auto" ? find_latest_checkpoint(run_dir) : resolve_checkpoint(resume);
    if (ckpt.empty())
      fail(
          "--resume: no checkpoint in {}/checkpoints; train without --resume first, or pass "
          "--resume=PATH",
          run_dir);
    check_same_architecture(ckpt, cfg.model);
  } else if (!find_latest_checkpoint(run_dir).empty()) {
    fail(
        "run.dir {} already holds checkpoints; pass --resume to continue it, or choose a new "
        "directory with --set run.dir=DIR",
        run_dir);
  }
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) fail("run.dir: cannot create {} ({})", run_dir, ec.message());
  std::string config_yaml = config_to_yaml(cfg);
  write_file_atomic(run_dir + "/config.yaml", config_yaml);

  TrainState st;
  st.init_from = cfg.init_from;
  std::string metrics_path = run_dir + "/metrics.jsonl";
  if (!ckpt.empty()) {
    load_checkpoint(ckpt, model, &opt, &st);
    train_data.set_state(st.loader);
    MetricsWriter::truncate_after(metrics_path, st.step);
    fmt::print("resumed from {} at step {}\n", ckpt, st.step);
  } else {
    fs::remove(metrics_path, ec);
  }
  MetricsWriter metrics(metrics_path);

  fmt::print("model {} ({}): {:.2f}M parameters, L={} C={} NH={} V={}; activations {:.0f} MiB\n",
             cfg.model.preset.empty() ? "custom" : cfg.model.preset, cfg.model.arch,
             model.params().numel() / 1e6, cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head,
             cfg.model.vocab_size, model.activation_bytes() / 1048576.0);
  for (const auto& s : train_data.stats()) {
    std::string cuts = fmt::format("{} cut by chunking", s["cut_by_chunking"].get<int64_t>());
    if (cfg.data.packing == "best_fit")
      cuts = fmt::format("{} cut by packing ({})", s["cut_by_packing"].get<int64_t>(), cuts);
    fmt::print("data: {} (weight {:.2f}): {} samples, {} documents, {}, fill {:.1f}%\n",
               s["source"].get<std::string>(), s["weight"].get<double>(),
               s["samples"].get<int64_t>(), s["documents"].get<int64_t>(), cuts,
               100 * s["fill"].get<double>());
  }
  fmt::print("data: {} training tokens{}; B={} T={} grad_accum={}; {} threads\n",
             train_data.num_tokens(),
             val_data ? fmt::format(", {} validation tokens", val_data->num_tokens()) : "",
             t.batch_size, t.seq_len, t.grad_accum, omp_get_max_threads());
  std::fflush(stdout);

  Batch batch = Batch::make(t.batch_size, t.seq_len);
  TrainResult res;
  auto start = Clock::now();
  const int64_t tokens_per_step = t.batch_size * t.seq_len * t.grad_accum;
  auto checkpoint = [&] {
    st.loader = train_data.state();
    res.last_checkpoint =
        save_checkpoint(run_dir, model, &opt, st, config_yaml, t.keep_last, *tokenizer);
  };

  for (int64_t step = st.step; step < t.steps; ++step) {
    auto t0 = Clock::now();
    double lr = sched.at(step);
    model.params().zero_grad();
    double loss = 0;
    for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
      train_data.next(batch);
      loss += model.forward(batch.tokens, batch.targets) / static_cast<double>(t.grad_accum);
      model.backward(1.0 / static_cast<double>(t.grad_accum));
    }
    double norm = clip_grad_norm(model.params(), t.grad_clip);
    opt.step(lr);
    st.step = step + 1;
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    double tps = tokens_per_step / dt;
    if (step == 0 || res.steps == 0) res.first_loss = loss;
    res.last_loss = loss;
    res.steps = st.step;
    metrics.write({{"step", st.step},
                   {"loss", loss},
                   {"lr", lr},
                   {"grad_norm", norm},
                   {"tokens_per_s", tps},
                   {"elapsed_s", elapsed},
                   {"tokens", st.step * tokens_per_step}});
    if (st.step % t.log_every == 0 || st.step == t.steps) {
      fmt::print("step {:>6}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.0f} tok/s | {:.1f}s\n",
                 st.step, t.steps, loss, lr, norm, tps, elapsed);
      std::fflush(stdout);
    }
    if (!std::isfinite(loss))
      fail("training diverged at step {} (loss {}); lower train.lr or raise train.warmup", st.step,
           loss);
    if (val_data && t.eval_every > 0 && (st.step % t.eval_every == 0 || st.step == t.steps)) {
      double vl = evaluate(model, *val_data, t.eval_batches, batch);
      res.last_val_loss = vl;
      metrics.write({{"step", st.step}, {"val_loss", vl}});
      fmt::print("step {:>6}/{} | val loss {:.4f}\n", st.step, t.steps, vl);
      std::fflush(stdout);
    }
    if (t.checkpoint_every > 0 && st.step % t.checkpoint_every == 0 && st.step != t.steps)
      checkpoint();
  }
  checkpoint();
  fmt::print("saved {}\n", res.last_checkpoint);

  if (!cfg.sample.prompt.empty()) {
    SamplingOptions so{
        cfg.sample.max_tokens, cfg.sample.temperature, cfg.sample.top_k, cfg.sample.top_p, t.seed,
        tokenizer->eos_id(),   tokenizer->vocab_size()};
    fmt::print("--- sample ---\n{}", cfg.sample.prompt);
    generate(model, tokenizer->encode(cfg.sample.prompt, false, true), so, [&](int32_t id) {
      fmt::print("{}", tokenizer->token_bytes(id));
      std::fflush(stdout);
    });
    fmt::print("\n--------------\n");
  }
  return res;
}

}  // namespace lmforge
