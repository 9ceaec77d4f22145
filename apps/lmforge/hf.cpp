// Hugging Face interop and inspection:
//   lmforge convert --from-hf DIR --out RUN_DIR     HF model -> weights-only lmforge checkpoint
//                   [--peft ADAPTER_DIR [--keep-adapter]]  (a PEFT LoRA adapter merged in,
//                                                          or kept as LoRA adapters)
//   lmforge export --checkpoint PATH --to-hf DIR    lmforge checkpoint -> HF model directory
//   lmforge info PATH                               architecture, parameters, dtype, tokenizer
#include "lmforge/models/hf.h"

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <cctype>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "commands.h"
#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/config.h"
#include "lmforge/io/dir_lock.h"
#include "lmforge/io/safetensors.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/train/checkpoint.h"
#include "lmforge/train/trainer.h"

namespace lmforge::app {

namespace fs = std::filesystem;

namespace {

// "5GB", "500MB", "2GiB", "2000000" -> bytes (as transformers' max_shard_size: KB/MB/GB decimal,
// KiB/MiB/GiB binary, in any case).
uint64_t parse_size(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  std::string unit = s.substr(i);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double v = 0;
  auto [end, err] = std::from_chars(s.data(), s.data() + i, v);
  const double mult = unit.empty() || unit == "B" ? 1
                      : unit == "KB"              ? 1e3
                      : unit == "MB"              ? 1e6
                      : unit == "GB"              ? 1e9
                      : unit == "KIB"             ? 0x1p10
                      : unit == "MIB"             ? 0x1p20
                      : unit == "GIB"             ? 0x1p30
                                                  : -1;
  // (transformers reads a lower-case "b" after K, M or G as bits: "5Gb" is 625 MB there; refused)
  if (i == 0 || err != std::errc() || end != s.data() + i || mult < 0 || !(v > 0) ||
      !(v * mult < 0x1p63) || (unit.size() == 2 && s.back() == 'b'))
    fail(
        "--max-shard-size: expected a size such as 5GB, 500MB or 2GiB (B in capitals), got "
        "\"{}\"",
        s);
  return static_cast<uint64_t>(v * mult);
}

// The Hugging Face directory whose weights are the LoRA adapters' base, "" when none is: the
// run's init_from hf:DIR, also through the checkpoints it started from that kept those weights
// (LoRA runs, which train the adapters alone, and `convert`'s step-0 checkpoints) — not through
// training of the whole model or a PEFT adapter `convert` merged in.
std::string adapters_base(const std::string& ckpt_dir, int depth = 0) {
  const std::string from = checkpoint_init_from(ckpt_dir);
  if (from.starts_with("hf:")) {
    const size_t peft = from.find(" + peft:");  // convert --peft: merged, or kept as adapters
    if (peft == std::string::npos) return from.substr(3);
    return checkpoint_model_config(ckpt_dir).lora.on() ? from.substr(3, peft - 3) : "";
  }
  if (from.empty() || depth >= 16) return "";
  std::string up;
  try {
    up = resolve_checkpoint(from);
  } catch (const Error&) {
    return "";  // moved or deleted since: the base is not known
  }
  const bool lora = checkpoint_model_config(up).lora.on();
  const int64_t step =
      nlohmann::json::parse(read_file(up + "/state.json")).value("step", int64_t{-1});
  return lora || step == 0 ? adapters_base(up, depth + 1) : "";
}

std::string features(const ModelConfig& m) {
  std::string f = fmt::format("{}, {}, {}", m.norm, m.mlp, m.pos);
  if (m.pos == "rope") {
    f += fmt::format(" (theta {}", m.rope_theta);
    if (m.rope_local_theta > 0) f += fmt::format(", windowed layers {}", m.rope_local_theta);
    if (m.rope_scaling.factor > 0)
      f += fmt::format(", {} scaling x{}", m.rope_scaling.type, m.rope_scaling.factor);
    f += ")";
  }
  if (m.embed_scale) f += ", embeddings x sqrt(C)";
  if (m.bias) f += ", biases";
  if (m.qkv_bias && !m.bias) f += ", q/k/v biases";
  if (m.qk_norm) f += ", q/k norm";
  if (m.norm_offset != 0) f += fmt::format(", norms scale by {:g} + w", m.norm_offset);
  if (m.post_norms) f += ", post norms";
  if (m.attn_scale_dim) f += fmt::format(", scores / sqrt({})", m.attn_scale_dim);
  if (m.attn_softcap > 0) f += fmt::format(", scores capped at {:g}", m.attn_softcap);
  if (m.logit_softcap > 0) f += fmt::format(", logits capped at {:g}", m.logit_softcap);
  if (m.sliding_window)
    f += m.full_attention_every
             ? fmt::format(", sliding window {} (full attention every {} layers)", m.sliding_window,
                           m.full_attention_every)
             : fmt::format(", sliding window {}", m.sliding_window);
  if (m.tie_embeddings) f += ", tied embeddings";
  return f;
}

void print_model(const ModelConfig& m) {
  fmt::print("architecture: {}  L={} C={} NH={} NKV={} HS={} F={} V={} T={}\n", m.arch, m.n_layer,
             m.n_embd, m.n_head, m.kv_heads(), m.head_size(), m.ffn(), m.vocab_size, m.max_seq_len);
  fmt::print("features:     {}\n", features(m));
  int64_t n = m.num_params();
  fmt::print("parameters:   {} ({:.1f}M)\n", n, n / 1e6);
  if (m.lora.on())
    fmt::print(
        "lora:         rank {}, alpha {:g}, on {}{}: {} adapter parameters (the base frozen)\n",
        m.lora.rank, m.lora.alpha, m.lora.targets,
        m.lora.dropout > 0 ? fmt::format(", dropout {:g}", m.lora.dropout) : "",
        m.lora_params(/*adapted=*/true));
}

void print_tokenizer(const Tokenizer& t) {
  auto id = [](int32_t i) { return i < 0 ? std::string("none") : std::to_string(i); };
  fmt::print("tokenizer:    {}, {} ids, bos {}, eos {}, fingerprint {}\n", t.kind(), t.vocab_size(),
             id(t.bos_id()), id(t.eos_id()), t.fingerprint());
}

}  // namespace

std::unique_ptr<Tokenizer> hf_dir_tokenizer(const std::string& dir, const ModelConfig& model) {
  std::unique_ptr<Tokenizer> tok;
  try {
    tok = load_tokenizer(dir);
  } catch (const Error& e) {
    fail("{}: no usable tokenizer in the model directory ({})", dir, e.what());
  }
  if (tok->vocab_size() > model.vocab_size)  // as init_from: hf:DIR checks
    fail("{}: the tokenizer has {} ids but config.json says vocab_size {}", dir, tok->vocab_size(),
         model.vocab_size);
  return tok;
}

namespace {

// convert's --out: made (removed again if the convert fails while it is empty), locked as a
// training run's directory (another convert or a train into it at the same time is refused) and
// without checkpoints.
void take_out_dir(const std::string& out, DirLock& lock) {
  make_directories(out);
  lock.take(out, "--out");
  if (!find_latest_checkpoint(out).empty())
    fail("--out: {} already holds checkpoints; choose a new directory", out);
}

// peft (optional): a PEFT LoRA adapter directory merged into the weights, or with keep_adapter
// held as the checkpoint's LoRA adapters (model.lora_*), to train on with init_from.
void convert(const std::string& from, const std::string& out, const std::string& peft,
             bool keep_adapter) {
  DirLock lock;
  take_out_dir(out, lock);
  HfConfig hc = read_hf_config(from);
  std::unique_ptr<Tokenizer> tok = hf_dir_tokenizer(from, hc.model);
  for (const std::string& n : hc.notes) fmt::print("note: {}\n", n);
  Config cfg;
  cfg.model = hc.model;
  cfg.model.preset.clear();
  cfg.init_from = "hf:" + from;
  if (keep_adapter) cfg.model.lora = peft_lora_config(hc.model, peft);
  Transformer model(cfg.model);
  load_hf_weights(model, from);
  if (keep_adapter)
    load_peft_adapter(model, peft);
  else if (!peft.empty())
    merge_peft_adapter(model, peft);
  if (!peft.empty()) cfg.init_from += " + peft:" + peft;  // where the weights came from
  TrainState st;
  st.init_from = cfg.init_from;
  std::string dir = save_checkpoint(out, model, nullptr, st, config_to_yaml(cfg), 0, *tok);
  lock.keep();
  fmt::print("converted {} ({}, {:.1f}M parameters){} -> {}\n", from, hc.model.arch,
             model.params().numel() / 1e6,
             peft.empty() ? ""
             : keep_adapter
                 ? fmt::format(" with the LoRA adapter {} (rank {}, alpha {:g}, on {})", peft,
                               cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets)
                 : fmt::format(" with the LoRA adapter {} merged", peft),
             dir);
}

// A checkpoint in any form (sharded by N ranks or single-file) -> a single-file checkpoint of
// the same step with the optimizer and training state, which any number of ranks can resume.
void consolidate(const std::string& from, const std::string& out) {
  DirLock lock;
  take_out_dir(out, lock);
  std::string dir = resolve_checkpoint(from);
  Transformer model(checkpoint_model_config(dir));
  TrainState st;
  const nlohmann::json state = nlohmann::json::parse(read_file(dir + "/state.json"));
  const bool weights_only = state.value("weights_only", false);
  // The run's optimizer (AdamW, or Muon with its AdamW part), whose state the checkpoint holds.
  Config run;
  ConfigLoader loader(run);
  loader.load_yaml_text(read_file(dir + "/config.yaml"), dir + "/config.yaml");
  loader.finish();
  run.train.device = "cpu";  // (the state's layout is the same; a GPU run consolidates anywhere)
  AdamW opt(model.params(), optimizer_options(run));
  if (weights_only) {  // the weights and where they came from; there is no run to resume
    load_checkpoint(dir, model, nullptr, nullptr);
    st.step = state.value("step", int64_t{0});
    st.init_from = state.value("init_from", "");
  } else {
    load_checkpoint(dir, model, &opt, &st);
  }
  auto tok = checkpoint_tokenizer(dir);
  std::string saved = save_checkpoint(out, model, weights_only ? nullptr : &opt, st,
                                      read_file(dir + "/config.yaml"), 0, *tok);
  lock.keep();
  fmt::print("consolidated {} (step {}) -> {}\n", dir, st.step, saved);
}

// The export's target: a new or empty directory, or with --force an earlier export's (nothing
// else: never a run, a checkpoint, the checkpoint read or the working directory). Checked before
// the work and again just before the target is replaced (another process may have written it).
void check_export_target(const char* opt, const std::string& out, const fs::path& out_path,
                         const std::string& dir, bool force) {
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec))
    fail("{}: {} exists and is not a directory; choose a directory path", opt, out);
  if (fs::exists(out, ec) && !fs::is_empty(out, ec) && !force)
    fail(
        "{}: {} exists and is not empty; choose a new directory, or pass --force to replace an "
        "earlier export",
        opt, out);
  // --force replaces an earlier export only: a directory of the files one writes, nothing else.
  if (fs::is_directory(out, ec))
    for (const fs::directory_entry& e : fs::directory_iterator(out, ec)) {
      const std::string name = e.path().filename().string();
      const bool exported =
          e.is_regular_file(ec) &&
          (name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") ||
           name == "config.json" || name == "generation_config.json" ||
           name == "adapter_config.json" || name == "tokenizer.json" ||
           name == "tokenizer_config.json" || name == "special_tokens_map.json" ||
           name == "chat_template.jinja" || name == "tokenizer.model" || name == "vocab.json" ||
           name == "merges.txt");
      if (!exported)
        fail(
            "{}: {} holds {}, which an export does not write and --force would delete; export to "
            "a new directory",
            opt, out, name);
    }
  // --force replaces the directory: never one that holds the checkpoint, a run, or this process's
  // working directory.
  auto inside = [](const fs::path& child, const fs::path& parent) {
    const auto rel = child.lexically_relative(parent);
    return !rel.empty() && *rel.begin() != "..";
  };
  const fs::path target = fs::weakly_canonical(out_path, ec);
  for (const fs::path& keep : {fs::weakly_canonical(dir, ec), fs::current_path(ec)})
    if (inside(keep, target))
      fail("{}: {} holds {}, which --force would delete; export to a new directory", opt, out,
           keep.string());
  if (fs::exists(target / "checkpoints", ec) || fs::exists(target / "state.json", ec))
    fail(
        "{}: {} is an lmforge run or checkpoint, which --force would delete; export to a new "
        "directory",
        opt, out);
}

// --to-hf DIR (peft false) or --to-peft DIR (the LoRA adapters alone, as PEFT saves them).
void export_hf(const std::string& checkpoint, const std::string& out_arg, const std::string& dtype,
               const std::string& shard, bool force, bool peft) {
  const char* opt = peft ? "--to-peft" : "--to-hf";
  // DIR/ and DIR name the same directory; the temporary goes beside it, not inside.
  fs::path out_path = fs::path(out_arg).lexically_normal();
  if (!out_path.has_filename()) out_path = out_path.parent_path();
  const std::string out = out_path.string();
  DType dt = dtype == "fp32" ? DType::kF32 : dtype == "bf16" ? DType::kBF16 : DType::kI32;
  if (dt == DType::kI32) fail("--dtype: expected fp32 or bf16, got \"{}\"", dtype);
  uint64_t max_shard = parse_size(shard);
  std::string dir = resolve_checkpoint(checkpoint);
  ModelConfig mc = checkpoint_model_config(dir);
  hf_config_json(mc, -1, -1, dt);  // fails on an inexpressible model before any work
  if (peft && !mc.lora.on())
    fail("--to-peft: {} has no LoRA adapters (model.lora_rank 0); export it whole with --to-hf",
         dir);
  check_export_target(opt, out, out_path, dir, force);
  std::error_code ec;
  Transformer model(mc);
  load_checkpoint(dir, model, nullptr, nullptr);
  auto tok = checkpoint_tokenizer(dir);
  const std::string from = checkpoint_init_from(dir);
  const std::string base_model = peft ? adapters_base(dir) : "";
  if (peft && !base_model.empty()) {
    // PEFT names the adapters after the base's modules: a Gemma 3 image-text model holds the text
    // model under model.language_model (and its vision tower has q_proj's too).
    std::ifstream in(fs::path(base_model) / "config.json");
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("model_type") && j["model_type"] == "gemma3")
      fail(
          "--to-peft: the run started from {}, a Gemma 3 image-text model, whose modules PEFT's "
          "adapter keys would not name; export the merged text model with --to-hf instead",
          base_model);
  }
  // Written beside the target and renamed, so a failure leaves no half-written model; the
  // target's missing parents made first (removed again on failure while empty), as convert's.
  if (const fs::path parent = out_path.parent_path(); !parent.empty()) {
    try {
      make_directories(parent.string());
    } catch (const fs::filesystem_error& e) {
      fail("{}: cannot create {} ({}); check the path and its permissions", opt, parent.string(),
           e.code().message());
    }
  }
  const std::string tmp = fresh_temp_dir(out + ".lmforge-export");
  try {
    if (peft)
      save_peft_adapter(model, tmp, base_model, dt);
    else
      save_hf_model(model, tok.get(), tmp, dt, max_shard);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  // Without --force, only onto nothing or an empty directory (rename() refuses a non-empty one:
  // another export, or a run, that appeared meanwhile is never deleted).
  try {
    check_export_target(opt, out, out_path, dir, force);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  if (force) fs::remove_all(out, ec);
  fs::rename(tmp, out, ec);
  if (ec && !force && fs::exists(out) && !fs::is_empty(out)) {
    fs::remove_all(tmp, ec);
    fail(
        "{}: {} was written by another process while exporting (it was new or empty); export "
        "again to a new directory, or pass --force to replace an earlier export",
        opt, out);
  }
  if (ec) {
    forget_temp(tmp);  // (kept: the user's to move)
    fail("{}: cannot move {} to {} ({}; the export is complete there); {}", opt, tmp, out,
         ec.message(),
         fs::exists(out) ? fmt::format("export into a new directory inside it (e.g. {}/model): a "
                                       "mount point or a directory in use cannot be replaced",
                                       out)
                         : std::string("check that its parent directory is writable"));
  }
  if (peft) {
    fmt::print(
        "exported the LoRA adapters of {} (rank {}, alpha {}, {:.2f}M parameters, {}) -> {}\n", dir,
        mc.lora.rank, mc.lora.alpha, mc.lora_params(/*adapted=*/true) / 1e6, dtype, out);
    fmt::print("base model: {}\n",
               base_model.empty()
                   ? fmt::format("not a HF directory (init_from {}); export that with --to-hf",
                                 from.empty() ? "none" : from)
                   : base_model);
    return;
  }
  fmt::print("exported {} ({}, {:.1f}M parameters, {}) -> {}\n", dir, mc.arch,
             model.params().numel() / 1e6, dtype, out);
}

void info(const std::string& path) {
  std::error_code ec;
  fs::path p(path);
  if (fs::is_directory(p, ec) && fs::exists(p / "config.json", ec) &&
      !fs::exists(p / "state.json", ec)) {
    HfConfig hc = read_hf_config(path);
    SafetensorsSet set = SafetensorsSet::open(path);
    std::set<std::string> dtypes;
    for (const std::string& n : set.names()) dtypes.insert(set.info(n).dtype);
    fmt::print("path:         {}\n", path);
    fmt::print("format:       Hugging Face ({} file{})\n", set.files().size(),
               set.files().size() == 1 ? "" : "s");
    print_model(hc.model);
    fmt::print("dtype:        {}\n", fmt::join(dtypes, ", "));
    for (const std::string& n : hc.notes) fmt::print("note:         {}\n", n);
    try {
      print_tokenizer(*load_tokenizer(path));
    } catch (const Error& e) {
      fmt::print("tokenizer:    none usable ({})\n", e.what());
    }
    return;
  }
  std::string dir = resolve_checkpoint(path);
  ModelConfig mc = checkpoint_model_config(dir);
  fmt::print("path:         {}\n", dir);
  std::string from = checkpoint_init_from(dir);
  fmt::print("format:       lmforge checkpoint{}\n", from.empty() ? "" : ", init_from " + from);
  print_model(mc);
  fmt::print("dtype:        {}\n", fmt::join(checkpoint_dtypes(dir), ", "));
  print_tokenizer(*checkpoint_tokenizer(dir));
}

}  // namespace

void add_hf(CLI::App& app) {
  struct Opts {
    std::string from, out, checkpoint, to, peft, merge_peft, dtype = "fp32", shard = "5GB", path;
    bool force = false, keep_adapter = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand(
      "convert", "Hugging Face model directory or sharded checkpoint -> lmforge checkpoint");
  auto* hf =
      c->add_option("--from-hf", o->from, "Local HF model directory (config.json, *.safetensors)");
  c->add_option("--from-checkpoint", o->checkpoint,
                "A checkpoint (e.g. sharded by several ranks): one single-file checkpoint of the "
                "same step, optimizer and training state")
      ->excludes(hf);
  auto* peft = c->add_option("--peft", o->merge_peft,
                             "With --from-hf: a PEFT LoRA adapter directory to merge into the "
                             "weights (as PEFT's merge_and_unload)")
                   ->needs(hf);
  c->add_flag("--keep-adapter", o->keep_adapter,
              "With --peft: keep the adapter as the checkpoint's LoRA adapters instead of merging "
              "it (to train it further with init_from, or export it again with --to-peft)")
      ->needs(peft);
  c->add_option("--out", o->out, "Run directory to hold the checkpoint")->required();
  c->callback([o] {
    if (!o->checkpoint.empty())
      consolidate(o->checkpoint, o->out);
    else if (!o->from.empty())
      convert(o->from, o->out, o->merge_peft, o->keep_adapter);
    else
      fail("convert: give --from-hf DIR or --from-checkpoint DIR");
  });

  CLI::App* e = app.add_subcommand(
      "export", "lmforge checkpoint -> Hugging Face model directory (or PEFT LoRA adapter)");
  e->add_option("--checkpoint", o->checkpoint, "Checkpoint or run directory")->required();
  auto* to_hf = e->add_option("--to-hf", o->to, "Output directory (LoRA adapters merged)");
  e->add_option("--to-peft", o->peft,
                "Output directory for a LoRA checkpoint's adapters alone, as PEFT saves them "
                "(adapter_config.json, adapter_model.safetensors)")
      ->excludes(to_hf);
  e->add_option("--dtype", o->dtype, "fp32 | bf16")->capture_default_str();
  e->add_option("--max-shard-size", o->shard, "Shard the weights past this size (e.g. 5GB)")
      ->capture_default_str();
  e->add_flag("--force", o->force, "Replace a non-empty output directory");
  e->callback([o] {
    if (o->to.empty() && o->peft.empty()) fail("export: give --to-hf DIR or --to-peft DIR");
    const bool peft = !o->peft.empty();
    export_hf(o->checkpoint, peft ? o->peft : o->to, o->dtype, o->shard, o->force, peft);
  });

  CLI::App* i = app.add_subcommand("info", "Describe a checkpoint, run or HF model directory");
  i->add_option("path", o->path, "Checkpoint, run directory or HF model directory")->required();
  i->callback([o] { info(o->path); });
}

}  // namespace lmforge::app
