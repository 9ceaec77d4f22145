// lmforge bench train --model PRESET --batch B --seq T --steps N --precision fp32|bf16
// Times full training steps (forward, backward, AdamW) on random tokens; the first step is a
// warm-up and not counted. --profile-steps N adds N steps with the op-level profile
// (core/profile.h) and prints its table. The last line is "... <number> tok/s" for bench/ scripts.
#include <fmt/core.h>
#include <omp.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <optional>
#include <vector>

#include "commands.h"
#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/cpu_features.h"
#include "lmforge/core/profile.h"
#include "lmforge/core/rng.h"
#include "lmforge/data/loader.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/config.h"
#include "lmforge/models/presets.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/optim/adamw.h"
#include "lmforge/optim/clip.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/objective.h"
#include "lmforge/train/trainer.h"

namespace lmforge::app {

namespace {

// lmforge bench tokenizer --tokenizer PATH FILE [--repeat N]: single-thread encode throughput
// of the whole file as documents of ~4 KB (split at newlines), then the batch API on all cores.
void add_bench_tokenizer(CLI::App& bench) {
  struct Opts {
    std::string tokenizer, file;
    int repeat = 3;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = bench.add_subcommand("tokenizer", "Encode throughput (MB/s) of a tokenizer");
  cmd->add_option("--tokenizer", o->tokenizer, "Tokenizer file")->required();
  cmd->add_option("file", o->file, "Text to encode")->required();
  cmd->add_option("--repeat", o->repeat, "Timed passes (best is reported)")
      ->check(in_range(1))
      ->capture_default_str();
  cmd->callback([o] {
    auto tok = load_tokenizer(o->tokenizer);
    std::string text = read_file(o->file);
    std::vector<std::string_view> docs;
    for (size_t pos = 0; pos < text.size();) {
      size_t end = text.find('\n', std::min(text.size(), pos + 4096));
      end = end == std::string::npos ? text.size() : end + 1;
      docs.emplace_back(text.data() + pos, end - pos);
      pos = end;
    }
    double mb = text.size() / 1e6;
    // Each pass gets a freshly loaded tokenizer, so its piece cache starts cold, as the peer's
    // (which has none) does; loading is not timed.
    auto best_of = [&](auto&& fn) {
      double best = 1e30;
      for (int r = 0; r < std::max(1, o->repeat); ++r) {
        tok = load_tokenizer(o->tokenizer);
        auto t0 = std::chrono::steady_clock::now();
        fn();
        best = std::min(
            best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      return best;
    };
    size_t n_ids = 0;
    double t1 = best_of([&] {
      n_ids = 0;
      for (auto d : docs) n_ids += tok->encode(d).size();
    });
    double tn = best_of([&] { tok->encode_batch(docs); });
    fmt::print("{} tokens, {} documents, {:.2f} MB\n", n_ids, docs.size(), mb);
    fmt::print("lmforge batch ({} threads): {:.2f} MB/s\n", omp_get_max_threads(), mb / tn);
    fmt::print("lmforge {} single thread: {:.2f} MB/s\n", tok->kind(), mb / t1);
  });
}

// lmforge bench loader --data SPEC --batch B --seq T [--packing best_fit]: batches per second.
void add_bench_loader(CLI::App& bench) {
  struct Opts {
    std::string data, packing = "none";
    int64_t batch = 8, seq = 512, batches = 2000;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = bench.add_subcommand("loader", "Batches per second of the data loader");
  cmd->add_option("--data", o->data, "Shards, as data.train")->required();
  cmd->add_option("--batch", o->batch, "B")->capture_default_str();
  cmd->add_option("--seq", o->seq, "T")->capture_default_str();
  cmd->add_option("--packing", o->packing, "none | best_fit")->capture_default_str();
  cmd->add_option("--batches", o->batches, "Batches to time")
      ->check(in_range(1))
      ->capture_default_str();
  cmd->callback([o] {
    LoaderOptions lo{o->batch, o->seq, 1, o->packing};
    auto t0 = std::chrono::steady_clock::now();
    Loader loader(parse_data_spec(o->data, "--data"), lo);
    double plan = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    Batch b = Batch::make(o->batch, o->seq);
    t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < o->batches; ++i) loader.next(b);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("plan {:.3f}s; {}\n", plan, loader.stats().dump());
    fmt::print("lmforge loader B={} T={} {}: {:.0f} batches/s, {:.0f} tok/s\n", o->batch, o->seq,
               o->packing, o->batches / dt, o->batches * o->batch * o->seq / dt);
  });
}

// lmforge bench matmul [--shape MxNxK ...]: the matmul ceiling of this machine through the same
// oneDNN calls training uses, fp32 (sgemm), bf16 (brgemm: AMX / AVX512-BF16) and bf16 widened to
// fp32 (sgemm), with fp32 output, GFLOP/s over ~1 s per shape. Default shapes are GPT-2 124M's
// (qkv, LM head, MLP).
void add_bench_matmul(CLI::App& bench) {
  auto shapes = std::make_shared<std::vector<std::string>>(
      std::vector<std::string>{"256x2304x768", "256x50304x768", "4096x3072x768", "4096x768x3072"});
  CLI::App* cmd = bench.add_subcommand("matmul", "fp32 and bf16 matmul GFLOP/s (oneDNN)");
  cmd->add_option("--shape", *shapes, "MxNxK (repeatable)")->capture_default_str();
  cmd->callback([shapes] {
    fmt::print("bench matmul: {} threads, {} [{}]\n", omp_get_max_threads(), cpu_features().brand,
               cpu_features().summary());
    double best16 = 0;
    for (const std::string& s : *shapes) {
      int64_t M = 0, N = 0, K = 0;
      int used = 0;
      if (std::sscanf(s.c_str(), "%ldx%ldx%ld%n", &M, &N, &K, &used) != 3 ||
          used != static_cast<int>(s.size()) || M <= 0 || N <= 0 || K <= 0 || M > (1 << 24) ||
          N > (1 << 24) || K > (1 << 24))
        fail("--shape: expected MxNxK with sizes from 1 to 16777216, got \"{}\"", s);
      // fp32 and bf16 copies of A, B and C
      check_host_memory(6.0 * static_cast<double>(M * K + K * N + M * N),
                        fmt::format("a {} matmul's operands", s), "choose a smaller --shape");
      std::vector<float> a(M * K, 0.5f), b(K * N, 0.25f), c(M * N);
      std::vector<uint16_t> a16(M * K), b16(K * N);
      cpu::to_bf16(a16.data(), a.data(), M * K);
      cpu::to_bf16(b16.data(), b.data(), K * N);
      auto time = [&](auto&& f) {
        f();  // warm-up (creates the primitive)
        int64_t n = 0;
        auto t0 = std::chrono::steady_clock::now();
        double el = 0;
        while (el < 1.0) {
          f();
          ++n;
          el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        return 2.0 * M * N * K * n / el / 1e9;
      };
      // Weights as the linear layers hold them: (N, K) row-major, used transposed.
      double f32 = time([&] {
        cpu::gemm<float>(false, true, M, N, K, 1.0f, a.data(), K, b.data(), K, 0.0f, c.data(), N);
      });
      auto bf16 = [&](cpu::Bf16Matmul mode) {
        const cpu::Bf16MatmulScope scope(mode);
        return time([&] {
          cpu::gemm_bf16(false, true, M, N, K, a16.data(), K, b16.data(), K, nullptr, false,
                         c.data(), N);
        });
      };
      const double native = bf16(cpu::Bf16Matmul::kNative),
                   widened = bf16(cpu::Bf16Matmul::kWidened);
      best16 = std::max(best16, cpu::bf16_matmul_native() ? native : widened);
      fmt::print(
          "matmul {}x{}x{}: fp32 {:.1f} GFLOP/s, bf16 {:.1f} GFLOP/s (widened to fp32 {:.1f})\n", M,
          N, K, f32, native, widened);
    }
    // The ceiling of bf16 matmuls as training runs them: natively, or widened where this CPU
    // multiplies bf16 slower than fp32 (cpu::bf16_matmul_native).
    fmt::print("lmforge matmul bf16 ceiling: {:.1f} GFLOP/s ({})\n", best16,
               cpu::bf16_matmul_native() ? "native bf16 products" : "widened to fp32");
  });
}

// --set model.KEY=VALUE on the preset's config (a model key, as train's --set takes it).
void set_model_key(ModelConfig& mc, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || !assignment.starts_with("model."))
    fail("--set: expected model.KEY=VALUE (a model key of the preset), got \"{}\"", assignment);
  const std::string key = assignment.substr(6, eq - 6);
  for (const ConfigField& f : model_fields(mc))
    if (f.key == key) return assign_field(f, assignment.substr(eq + 1), "--set");
  fail("--set: unknown model key \"model.{}\" (docs/config.md lists them)", key);
}

}  // namespace

void add_bench(CLI::App& app) {
  struct Opts {
    std::vector<std::string> sets;
    std::string model = "gpt2";
    int64_t batch = 4, seq = 64, steps = 5, profile_steps = 0, lora_rank = 0;
    double lora_dropout = 0;
    bool cuda_graphs = false;
    std::string precision = "fp32", master_weights = "fp32", recompute = "none", device = "cpu",
                activations = "bf16", outputs = "bf16", objective = "clm", teacher;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  CLI::App* cmd = bench->add_subcommand("train", "Time training steps of a preset on random data");
  cmd->add_option("--model", o->model, "Model preset")->capture_default_str();
  cmd->add_option("--set", o->sets,
                  "A model key over the preset's, e.g. --set model.logit_softcap=30 (repeatable)")
      ->type_name("model.KEY=VALUE");
  cmd->add_option("--batch", o->batch, "B")->capture_default_str();
  cmd->add_option("--seq", o->seq, "T")->capture_default_str();
  cmd->add_option("--steps", o->steps, "Timed steps (after one warm-up step)")
      ->capture_default_str();
  cmd->add_option("--precision", o->precision, "fp32 | bf16")->capture_default_str();
  cmd->add_option("--master-weights", o->master_weights,
                  "fp32 | bf16 (with --precision bf16; as train.master_weights)")
      ->capture_default_str();
  cmd->add_option("--matmul-inputs", o->activations,
                  "bf16 | fp32: under --precision bf16, the activations that only feed matmuls "
                  "stored in bf16 (default) or fp32 (for comparison)")
      ->capture_default_str();
  cmd->add_option("--matmul-outputs", o->outputs,
                  "bf16 | fp32: with bf16 matmul inputs, the matmuls' outputs (qkv, attention, "
                  "fc, the residual branches) stored in bf16 (default) or fp32 (for comparison)")
      ->capture_default_str();
  cmd->add_option("--activation-checkpointing", o->recompute, "none | selective | full")
      ->capture_default_str();
  cmd->add_option("--lora-rank", o->lora_rank,
                  "LoRA adapters of this rank on every block layer (as model.lora_rank; the rest "
                  "frozen); 0 = full training")
      ->capture_default_str();
  cmd->add_option("--lora-dropout", o->lora_dropout,
                  "With --lora-rank: dropout on the adapters' input (as model.lora_dropout)")
      ->capture_default_str();
  cmd->add_option("--objective", o->objective,
                  "clm | dpo | distill (as train.objective; dpo: rows 2j, 2j+1 a pair, a "
                  "reference model's forward, or with --lora-rank the model's without adapters; "
                  "distill: from --teacher, alpha 0.5, temperature 2)")
      ->capture_default_str();
  cmd->add_option("--teacher", o->teacher,
                  "--objective distill: the teacher's preset (its own random weights; default "
                  "the model's), with the model's vocabulary");
  cmd->add_option("--device", o->device, "cpu | cuda | auto (as train.device)")
      ->capture_default_str();
  cmd->add_flag("--cuda-graphs", o->cuda_graphs,
                "On a GPU: the step's forward and backward captured as a CUDA graph and replayed "
                "(as train.cuda_graphs; a second warm-up step captures it)");
  cmd->add_option("--profile-steps", o->profile_steps,
                  "After the timed steps, this many more with the op-level profile on; prints "
                  "where a step's time goes, op by op")
      ->capture_default_str();
  cmd->callback([o] {
    set_oom_hint(kTrainingOomHint);
    if (o->precision != "fp32" && o->precision != "bf16")
      fail("--precision: expected fp32 or bf16, got \"{}\"", o->precision);
    if (o->master_weights != "fp32" && !(o->master_weights == "bf16" && o->precision == "bf16"))
      fail("--master-weights: fp32, or bf16 with --precision bf16; got \"{}\"", o->master_weights);
    if (o->steps <= 0 || o->batch <= 0 || o->seq <= 0 || o->profile_steps < 0)
      fail("--batch, --seq and --steps must be positive, --profile-steps at least 0");
    if (o->objective != "clm" && o->objective != "dpo" && o->objective != "distill")
      fail("--objective: expected clm, dpo or distill, got \"{}\"", o->objective);
    if (!o->teacher.empty() && o->objective != "distill")
      fail("--teacher: only with --objective distill");
    if (o->objective == "dpo" && o->batch % 2)
      fail("--batch: {} is odd; a DPO pair takes two rows", o->batch);
    ModelConfig mc = model_preset(o->model);
    mc.lora.rank = o->lora_rank;
    mc.lora.dropout = o->lora_dropout;
    for (const std::string& s : o->sets) set_model_key(mc, s);
    if (o->lora_dropout != 0 && o->lora_rank == 0) fail("--lora-dropout: only with --lora-rank");
    if (o->lora_dropout > 0 && o->cuda_graphs)
      fail("--lora-dropout: not with --cuda-graphs (each micro-batch draws a new mask)");
    mc.validate();  // the rank and dropout
    // (distill: the teacher as the trainer holds it, in bf16 alone under bf16)
    const std::optional<ModelConfig> tc =
        o->objective == "distill"
            ? std::optional(model_preset(o->teacher.empty() ? o->model : o->teacher))
            : std::nullopt;
    if (tc && tc->vocab_size != mc.vocab_size)
      fail("--teacher: {} has a vocabulary of {}, the model's is {}", o->teacher, tc->vocab_size,
           mc.vocab_size);
    if (resolve_device(o->device) == Device::kCPU) {
      const ActivationShape shape{.batch = o->batch,
                                  .seq = o->seq,
                                  .bf16 = o->precision == "bf16",
                                  .recompute = parse_recompute(o->recompute)};
      check_training_fits(mc,
                          {.bf16 = o->precision == "bf16",
                           .bf16_master = o->master_weights == "bf16",
                           .reference = tc.has_value(),
                           .frozen = tc ? &*tc : nullptr,
                           .frozen_bf16 = tc && o->precision == "bf16"},
                          activation_bytes(mc, shape) +
                              (tc ? activation_bytes(*tc, shape, /*forward_only=*/true) : 0.0));
    }
    Transformer model(mc);
    // bf16 master weights on the host: made in bf16 (as the trainer makes them), never in fp32.
    const bool host_masters16 =
        o->master_weights == "bf16" && resolve_device(o->device) == Device::kCPU;
    if (host_masters16) model.use_bf16_master(/*convert=*/false);
    model.init_weights(1);
    model.to(resolve_device(o->device));
    const bool gpu = model.device() == Device::kCUDA;
    if (o->precision == "bf16") model.enable_bf16();
    if (o->master_weights == "bf16") model.use_bf16_master();
    if (o->activations != "bf16" && o->activations != "fp32")
      fail("--matmul-inputs: expected bf16 or fp32, got \"{}\"", o->activations);
    model.set_bf16_activations(o->activations == "bf16");
    if (o->outputs != "bf16" && o->outputs != "fp32")
      fail("--matmul-outputs: expected bf16 or fp32, got \"{}\"", o->outputs);
    model.set_bf16_matmul_outputs(o->outputs == "bf16");
    if (o->cuda_graphs && !gpu) fail("--cuda-graphs: needs --device cuda (a GPU)");
    model.set_cuda_graphs(o->cuda_graphs);
    model.plan(o->batch, o->seq, parse_recompute(o->recompute));
    // DPO: the reference, as the trainer makes it (a second model; under LoRA the model itself
    // with its adapters off).
    std::unique_ptr<Transformer> reference;
    std::unique_ptr<PreferenceObjective> dpo;
    dist::LocalCommunicator one;
    const dist::RowRanks ranks{one};
    if (o->objective == "dpo") {
      if (!mc.lora.on()) {
        reference = std::make_unique<Transformer>(mc);
        reference->init_weights(1);
        reference->to(model.device());
        if (o->precision == "bf16") reference->enable_bf16();
        reference->plan_forward_only(o->batch, o->seq);  // as the trainer's
      }
      dpo = std::make_unique<PreferenceObjective>(PreferenceOptions{"dpo", 0.1, 0.0},
                                                  reference ? reference.get() : &model, !reference);
    }
    // Distillation: the teacher as the trainer makes it (frozen, planned for forwards only).
    std::unique_ptr<Transformer> teacher;
    if (tc) {
      teacher = std::make_unique<Transformer>(*tc);
      teacher->init_weights(2);
      teacher->to(model.device());
      if (o->precision == "bf16") {  // (held in bf16 alone, as the trainer holds it)
        teacher->enable_bf16();
        teacher->use_bf16_master();
      }
      teacher->plan_forward_only(o->batch, o->seq);
      model.set_distillation({teacher.get(), 0.5, 2.0});
    }
    AdamWOptions adamw;
    adamw.fp32_masters = mc.lora.on();  // (as the trainer's optimizer_options)
    AdamW opt(model.params(), adamw);
    Tensor tok = Tensor::empty({o->batch, o->seq}, DType::kI32);
    Tensor tgt = Tensor::empty({o->batch, o->seq}, DType::kI32);
    Rng rng(1);
    for (int64_t i = 0; i < tok.numel(); ++i) {
      tok.data<int32_t>()[i] = static_cast<int32_t>(rng.below(mc.vocab_size));
      tgt.data<int32_t>()[i] = static_cast<int32_t>(rng.below(mc.vocab_size));
    }
    if (gpu)
      fmt::print("bench train: {} ({:.1f}M params) B={} T={} {}, {}\n", o->model,
                 model.params().numel() / 1e6, o->batch, o->seq, o->precision, cuda::device_name());
    else
      fmt::print("bench train: {} ({:.1f}M params) B={} T={} {}, {} threads, {} [{}]\n", o->model,
                 model.params().numel() / 1e6, o->batch, o->seq, o->precision,
                 omp_get_max_threads(), cpu_features().brand, cpu_features().summary());
    auto step = [&] {  // one training step, waited for; its seconds
      auto t0 = std::chrono::steady_clock::now();
      model.params().zero_grad();
      float loss = 0;
      if (dpo) {
        Batch b{tok, tgt, Tensor(), Tensor(), {}, {}};
        dpo->begin({b}, ranks);
        model.forward_backward_rows(
            tok, tgt, [&](const std::vector<double>& logp, std::vector<float>& w) {
              loss = static_cast<float>(dpo->weigh(0, logp, model.row_targets(), w));
            });
      } else {
        loss = model.forward_backward(tok, tgt);
      }
      opt.step(1e-4, clip_coef(grad_norm(model.params()), 1.0));
      if (gpu) cuda::synchronize();  // the step's kernels, not just their launches
      return std::pair(
          loss, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    };
    double total = 0;
    const int64_t warm = o->cuda_graphs ? 2 : 1;  // with graphs, the second step captures
    for (int64_t s = 0; s < warm + o->steps; ++s) {
      auto [loss, dt] = step();
      if (s >= warm) total += dt;
      fmt::print("step {} loss {:.4f} {:.3f}s{}\n", s, loss, dt, s < warm ? " (warm-up)" : "");
      std::fflush(stdout);
    }
    if (o->profile_steps > 0) {  // apart from the timed steps: profiling costs a little
      profile::enable(true);
      double profiled = 0;
      for (int64_t s = 0; s < o->profile_steps; ++s) profiled += step().second;
      fmt::print("{}", profile::report(o->profile_steps, profiled / o->profile_steps));
      profile::enable(false);
    }
    double tps = static_cast<double>(o->batch * o->seq * o->steps) / total;
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    fmt::print(
        "activations ({}): {:.0f} MiB planned; weights {:.0f} MiB ({} master weights); peak "
        "resident {:.0f} MiB\n",
        o->recompute, model.activation_bytes() / 1048576.0,
        model.params().weight_bytes() / 1048576.0, o->master_weights, u.ru_maxrss / 1024.0);
    if (model.logits_chunk_rows() >= o->batch * o->seq)  // (the batch's rows fit one chunk)
      fmt::print("LM head + loss in one chunk of all {} rows: {:.0f} MiB of logits\n",
                 model.logits_chunk_rows(), model.chunk_logits_bytes() / 1048576.0);
    else
      fmt::print(
          "LM head + loss in chunks of {} rows: {:.0f} MiB of logits instead of {:.0f} MiB\n",
          model.logits_chunk_rows(), model.chunk_logits_bytes() / 1048576.0,
          model.full_logits_bytes() / 1048576.0);
    // (with a teacher, its forward too)
    const double fpt = mc.flops_per_token(o->seq) +
                       (teacher ? teacher->config().forward_flops_per_token(o->seq) : 0.0);
    fmt::print("{:.3f} GFLOP per token{}, {:.1f} GFLOP/s achieved\n", fpt / 1e9,
               teacher ? " (with the teacher's forward)" : "", fpt * tps / 1e9);
    if (gpu) {
      const double peak = cuda::datasheet_bf16_tflops();
      fmt::print("peak GPU memory {:.0f} MiB (allocated by lmforge){}\n",
                 cuda::peak_allocated() / 1048576.0,
                 peak > 0 ? fmt::format("; MFU {:.1f}% of {:.1f} TFLOP/s",
                                        100 * fpt * tps / 1e12 / peak, peak)
                          : "");
    }
    fmt::print(
        "lmforge {} B={} T={} {}{}{}: {:.1f} tok/s\n", o->model, o->batch, o->seq, o->precision,
        o->lora_rank
            ? fmt::format("+lora{}{}", o->lora_rank,
                          o->lora_dropout > 0 ? fmt::format("-dropout{:g}", o->lora_dropout) : "")
            : "",
        dpo ? "+dpo"
        : teacher
            ? fmt::format("+distill({})",
                          teacher->config().preset.empty() ? o->model : teacher->config().preset)
            : "",
        tps);
  });
  add_bench_tokenizer(*bench);
  add_bench_loader(*bench);
  add_bench_matmul(*bench);
}

}  // namespace lmforge::app
