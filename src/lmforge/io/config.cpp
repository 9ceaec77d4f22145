#include "lmforge/io/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <sstream>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/models/presets.h"

namespace lmforge {

std::vector<ConfigField> model_fields(ModelConfig& m) {
  return {
      {"preset", &m.preset,
       "named preset applied before the other model keys; empty = none (the model section's own "
       "defaults, as a resolved config.yaml saves a model from no preset, e.g. hf:DIR)"},
      {"arch", &m.arch,
       "Hugging Face family: gpt2 | llama | mistral | qwen2 | qwen3 | phi3 | gemma | gemma2 | "
       "gemma3"},
      {"vocab_size", &m.vocab_size, "V; 0 = the tokenizer's, padded to a multiple of 64"},
      {"max_seq_len", &m.max_seq_len, "positions"},
      {"n_layer", &m.n_layer, "L"},
      {"n_head", &m.n_head, "NH"},
      {"n_kv_head", &m.n_kv_head, "NKV (0 = n_head)"},
      {"n_embd", &m.n_embd, "C"},
      {"head_dim", &m.head_dim, "HS (0 = n_embd / n_head)"},
      {"ffn_hidden", &m.ffn_hidden, "F (0 = 4*C)"},
      {"norm", &m.norm, "layernorm | rmsnorm"},
      {"norm_eps", &m.norm_eps, ""},
      {"norm_offset", &m.norm_offset,
       "RMSNorms scale by norm_offset + w: 0, or 1 (Gemma; its weights start at 0)"},
      {"mlp", &m.mlp, "gelu | swiglu | geglu"},
      {"pos", &m.pos, "learned | rope"},
      {"rope_theta", &m.rope_theta, ""},
      {"rope_scaling.type", &m.rope_scaling.type,
       "llama3 (Llama 3.1's) | linear (every frequency / factor; Gemma 3 4B+'s full layers)"},
      {"rope_scaling.factor", &m.rope_scaling.factor, "RoPE scaling's factor; 0 = off"},
      {"rope_scaling.low_freq_factor", &m.rope_scaling.low_freq_factor, ""},
      {"rope_scaling.high_freq_factor", &m.rope_scaling.high_freq_factor, ""},
      {"rope_scaling.original_max_position_embeddings",
       &m.rope_scaling.original_max_position_embeddings, ""},
      {"bias", &m.bias, "biases in linear layers and LayerNorm"},
      {"qkv_bias", &m.qkv_bias, "q/k/v biases even when bias is false (Qwen2)"},
      {"qk_norm", &m.qk_norm, "RMSNorm on each q and k head before RoPE (Qwen3)"},
      {"sliding_window", &m.sliding_window, "attend to the last W positions; 0 = all (Mistral)"},
      {"full_attention_every", &m.full_attention_every,
       "with sliding_window: layers N-1, 2N-1, ... attend to all positions, the others through "
       "the window (Gemma 2: 2, Gemma 3: 6); 0 = every layer through it"},
      {"rope_local_theta", &m.rope_local_theta,
       "RoPE base of the sliding-window layers (Gemma 3: 10000); 0 = rope_theta"},
      {"embed_scale", &m.embed_scale, "token embeddings times sqrt(n_embd) (Gemma)"},
      {"post_norms", &m.post_norms,
       "RMSNorm each branch's output before its residual add (Gemma 2 and 3)"},
      {"attn_scale_dim", &m.attn_scale_dim,
       "attention scores scaled by 1 / sqrt(this) (Gemma's query_pre_attn_scalar); 0 = head size"},
      {"attn_softcap", &m.attn_softcap,
       "attention scores soft-capped: cap tanh(s / cap) (Gemma 2: 50); 0 = off"},
      {"logit_softcap", &m.logit_softcap,
       "the LM head's logits soft-capped: cap tanh(z / cap) (Gemma 2: 30); 0 = off"},
      {"tie_embeddings", &m.tie_embeddings, "lm_head shares tok_emb"},
      {"init_std", &m.init_std, ""},
      {"lora_rank", &m.lora.rank, "LoRA adapters' rank; 0 = off (full fine-tuning)"},
      {"lora_alpha", &m.lora.alpha, "LoRA scale numerator: updates are (alpha / rank) B A x"},
      {"lora_dropout", &m.lora.dropout,
       "dropout on the LoRA adapters' input in training (PEFT's lora_dropout); 0 = off"},
      {"lora_targets", &m.lora.targets,
       "layers with adapters: some of qkv, proj, fc, down, or Hugging Face modules (q_proj, ...)"},
  };
}

std::vector<ConfigField> fields(Config& c) {
  std::vector<ConfigField> f;
  for (auto& m : model_fields(c.model)) f.push_back({"model." + m.key, m.ptr, m.help});
  std::vector<ConfigField> rest = {
      {"init_from", &c.init_from,
       "initial weights and tokenizer: hf:DIR (a Hugging Face model) or an lmforge checkpoint"},
      {"data.text", &c.data.text,
       "text file tokenized into shards: the training data when data.train is not set (with "
       "data.train, only what data.tokenizer bpe:N trains on); demo:kjv = the demo corpus"},
      {"data.train", &c.data.train,
       "training shards: file, directory or glob; several mix by weight: a@0.7,b@0.3 (an "
       "entry without @ weighs 1)"},
      {"data.val", &c.data.val, "validation shard(s)"},
      {"data.val_fraction", &c.data.val_fraction,
       "share of data.text held out when data.text is the data; it validates when data.val is "
       "not set"},
      {"data.packing", &c.data.packing,
       "none (chunks) | best_fit (whole documents, each attending only to itself)"},
      {"data.tokenizer", &c.data.tokenizer,
       "byte; bpe:N (train one on data.text, its training share); or a tokenizer file/directory; "
       "with init_from, "
       "unset or empty = the source's (such a run saves \"\"), else one with its vocabulary"},
      {"train.steps", &c.train.steps, "optimizer steps"},
      {"train.batch_size", &c.train.batch_size, "B"},
      {"train.seq_len", &c.train.seq_len, "T"},
      {"train.grad_accum", &c.train.grad_accum, "micro-batches per step"},
      {"train.lr", &c.train.lr, "peak learning rate"},
      {"train.min_lr", &c.train.min_lr, "final learning rate (unset or -1: train.lr / 10)"},
      {"train.schedule", &c.train.schedule,
       "constant | cosine | linear | wsd | one_cycle (docs/config.md)"},
      {"train.warmup", &c.train.warmup, "linear warmup steps (one_cycle: the rising phase)"},
      {"train.decay_fraction", &c.train.decay_fraction, "wsd: share of steps decaying to min_lr"},
      {"train.div_factor", &c.train.div_factor, "one_cycle: first lr = lr / div_factor"},
      {"train.weight_decay", &c.train.weight_decay, "AdamW decoupled decay"},
      {"train.beta1", &c.train.beta1, ""},
      {"train.beta2", &c.train.beta2, ""},
      {"train.eps", &c.train.eps, ""},
      {"train.optimizer", &c.train.optimizer,
       "adamw | muon (Muon for the blocks' matrices, AdamW for embeddings, head and vectors; "
       "torch.optim.Muon)"},
      {"train.muon_lr", &c.train.muon_lr,
       "muon: the peak lr of its matrices, on train.lr's schedule; 0 = train.lr"},
      {"train.muon_momentum", &c.train.muon_momentum, "muon: momentum of its gradient buffer"},
      {"train.muon_nesterov", &c.train.muon_nesterov, "muon: Nesterov momentum"},
      {"train.muon_ns_steps", &c.train.muon_ns_steps, "muon: Newton-Schulz iterations"},
      {"train.muon_adjust_lr", &c.train.muon_adjust_lr,
       "muon: match_rms_adamw (lr x 0.2 sqrt(max(R, C)): AdamW's lr and decay carry over; "
       "Moonlight) | original (lr x sqrt(max(1, R / C)); Keller Jordan's, with a larger "
       "train.muon_lr)"},
      {"train.grad_clip", &c.train.grad_clip, "max global gradient norm; 0 = off"},
      {"train.activation_checkpointing", &c.train.activation_checkpointing,
       "none | selective (recompute norms and MLP activations) | full (whole blocks)"},
      {"train.z_loss", &c.train.z_loss, "z-loss coefficient (mean logsumexp^2); 0 = off"},
      {"train.neftune_alpha", &c.train.neftune_alpha,
       "NEFTune: training adds uniform noise of scale alpha / sqrt(T C) to the embeddings (5 "
       "typical); 0 = off"},
      {"train.objective", &c.train.objective,
       "clm (next-token cross-entropy; SFT on masked shards) | dpo | orpo | simpo (preference "
       "pairs from prepare --format preference) | kto (labelled responses: --format unpaired, "
       "or pairs) | distill (from train.teacher)"},
      {"train.teacher", &c.train.teacher,
       "distill: the teacher model, a checkpoint or run directory or hf:DIR (the same vocabulary)"},
      {"train.distill_alpha", &c.train.distill_alpha,
       "distill: weight of the KL term; the cross-entropy gets 1 - alpha"},
      {"train.distill_temperature", &c.train.distill_temperature,
       "distill: softmax temperature of both models in the KL term"},
      {"train.dpo_beta", &c.train.dpo_beta, "DPO: beta, the KL penalty's strength (0.1 typical)"},
      {"train.dpo_label_smoothing", &c.train.dpo_label_smoothing,
       "DPO: share of preference labels assumed flipped (conservative DPO); 0 = plain DPO"},
      {"train.dpo_loss", &c.train.dpo_loss,
       "DPO: sigmoid (DPO) | hinge (SLiC) | ipo (IPO, on mean log-probabilities); TRL's loss_type"},
      {"train.orpo_lambda", &c.train.orpo_lambda,
       "ORPO: weight of the odds-ratio term (TRL's beta; 0.1 typical)"},
      {"train.simpo_beta", &c.train.simpo_beta,
       "SimPO: beta, the scale of the length-normalized rewards (2 to 2.5 typical)"},
      {"train.simpo_gamma", &c.train.simpo_gamma, "SimPO: gamma, the target reward margin"},
      {"train.simpo_label_smoothing", &c.train.simpo_label_smoothing,
       "SimPO: share of preference labels assumed flipped (TRL's label_smoothing); 0 = SimPO"},
      {"train.cpo_alpha", &c.train.cpo_alpha,
       "SimPO: weight of the chosen responses' NLL (TRL's cpo_alpha); 0 = SimPO as published"},
      {"train.kto_beta", &c.train.kto_beta,
       "KTO: beta, the scale of the rewards and the KL penalty's strength (0.1 typical)"},
      {"train.kto_desirable_weight", &c.train.kto_desirable_weight,
       "KTO: weight of the desirable responses' losses (TRL's desirable_weight)"},
      {"train.kto_undesirable_weight", &c.train.kto_undesirable_weight,
       "KTO: weight of the undesirable responses' losses (TRL's undesirable_weight)"},
      {"train.kto_loss", &c.train.kto_loss,
       "KTO: kto | apo_zero_unpaired (APO-zero: KTO's loss without the KL estimate); TRL's "
       "loss_type"},
      {"train.precompute_ref_logps", &c.train.precompute_ref_logps,
       "DPO: the reference's log-likelihoods of every pair computed once before training, and "
       "the reference model released (under LoRA: no reference forward per step) (TRL's "
       "precompute_ref_log_probs)"},
      {"train.spike_zscore", &c.train.spike_zscore,
       "skip steps whose loss is this many std above the rolling mean (a non-finite loss or grad "
       "norm always skips); 0 = off"},
      {"train.spike_window", &c.train.spike_window,
       "accepted steps in the spike guard's statistics (at least 20 with spike_zscore > 0)"},
      {"train.max_skips", &c.train.max_skips,
       "the run stops when more steps than this are skipped in a row"},
      {"train.inject_fault", &c.train.inject_fault,
       "testing aid: nan@STEP,spike@STEP poisons those steps; kill@STEP / hang@STEP make the "
       "last rank die (SIGKILL) or stop (SIGSTOP) in that step"},
      {"train.precision", &c.train.precision, "fp32 | bf16 (bf16 matmuls, fp32 master weights)"},
      {"train.master_weights", &c.train.master_weights,
       "fp32 | bf16 (bf16 precision only: bf16 weights updated with stochastic rounding)"},
      {"train.device", &c.train.device, "cpu | cuda | auto"},
      {"train.cuda_graphs", &c.train.cuda_graphs,
       "on a GPU, capture the step's forward and backward as a CUDA graph once and replay it "
       "(one process; bit-identical, less launch overhead)"},
      {"train.seed", &c.train.seed, "weights, batches and sampling"},
      {"train.eval_every", &c.train.eval_every, "steps between validation; 0 = never"},
      {"train.eval_batches", &c.train.eval_batches,
       "global batches per validation (batch_size x data-parallel ranks rows each)"},
      {"train.hellaswag", &c.train.hellaswag,
       "HellaSwag JSONL scored at every evaluation (train.eval_every), as llm.c does: "
       "hellaswag_acc and hellaswag_acc_norm in the metrics; empty = off"},
      {"train.hellaswag_limit", &c.train.hellaswag_limit,
       "train.hellaswag: its first N examples only; 0 = all"},
      {"train.patience", &c.train.patience,
       "early stopping after this many evals without improvement; 0 = off"},
      {"train.min_delta", &c.train.min_delta, "val loss improvement that counts"},
      {"train.checkpoint_every", &c.train.checkpoint_every,
       "steps between checkpoints; the last step is always saved (0 = only it)"},
      {"train.keep_last", &c.train.keep_last, "newest checkpoints kept, plus the best; 0 = all"},
      {"train.save_best", &c.train.save_best,
       "a new best validation loss saved at its step (with checkpoint_every > 0)"},
      {"train.log_every", &c.train.log_every, "steps between log lines"},
      {"train.peak_tflops", &c.train.peak_tflops,
       "device peak TFLOP/s; metrics then carry mfu (0 = on a GPU its datasheet bf16 peak where "
       "known, else not reported)"},
      {"train.profile_steps", &c.train.profile_steps,
       "op-level profile of this many steps after the run's first: printed and written to "
       "run.dir/profile.txt (0 = off)"},
      {"run.dir", &c.run.dir, "run directory"},
      {"run.dashboard", &c.run.dashboard,
       "run.dir/dashboard.html: the run's latest metrics and charts in one page that reloads "
       "itself while the run goes on (open it in a browser)"},
      {"dist.strategy", &c.dist.strategy,
       "no-shard (DDP; alias ddp), zero1, grad-shard (ZeRO-2; alias zero2), full-shard (ZeRO-3; "
       "alias zero3) or hybrid"},
      {"dist.bucket_mb", &c.dist.bucket_mb, "gradient bucket size in MiB (communication overlap)"},
      {"dist.offload", &c.dist.offload,
       "optimizer state (and full-shard parameters) in a separate host arena, AdamW on the CPU"},
      {"dist.timeout", &c.dist.timeout,
       "seconds a collective may wait for the other ranks before the job stops"},
      {"dist.ranks_per_node", &c.dist.ranks_per_node,
       "0 = as launched; declares the node size (hybrid shards within a node)"},
      {"dist.backend", &c.dist.backend,
       "auto (NCCL for a model on GPUs, else MPI; none for one process), mpi, nccl or local"},
      {"dist.tensor_parallel", &c.dist.tensor_parallel,
       "ranks that split every block's attention heads and MLP width (Megatron-LM tensor "
       "parallelism): groups of consecutive ranks, data parallelism across the groups under any "
       "dist.strategy (2-D with grad-shard, full-shard, hybrid), with or without dist.offload; "
       "1 = off; see docs/distributed.md"},
      {"dist.sequence_parallel", &c.dist.sequence_parallel,
       "with dist.tensor_parallel: the norms, residual adds, embeddings and LM head on each "
       "rank's own rows, attention and the MLP on the group's (Megatron-LM sequence "
       "parallelism: 1/N of those activations; each rank reads its own slice of the batch)"},
      {"sample.prompt", &c.sample.prompt, "sample after training (empty = none)"},
      {"sample.max_tokens", &c.sample.max_tokens, ""},
      {"sample.temperature", &c.sample.temperature, ""},
      {"sample.top_k", &c.sample.top_k, "0 = off"},
      {"sample.top_p", &c.sample.top_p, "1 = off"},
  };
  f.insert(f.end(), rest.begin(), rest.end());
  return f;
}

namespace {

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

template <typename T>
bool parse_int(const std::string& s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

[[noreturn]] void bad_type(const std::string& source, const std::string& key, const char* want,
                           const std::string& got) {
  fail("{}: {}: expected {}, got \"{}\"", source, key, want, got);
}

const ConfigField* find_field(const std::vector<ConfigField>& fs, const std::string& key) {
  for (auto& f : fs)
    if (f.key == key) return &f;
  return nullptr;
}

[[noreturn]] void unknown_key(const std::vector<ConfigField>& fs, const std::string& key,
                              const std::string& source) {
  // Suggest keys from the same section, so a typo is one glance away from its fix.
  std::string section = key.substr(0, key.find('.') + 1), known;
  for (auto& f : fs)
    if (section.size() > 1 && f.key.starts_with(section))
      known += (known.empty() ? "" : ", ") + f.key;
  if (known.empty())
    known = "model.*, data.*, train.*, run.*, dist.*, sample.*, init_from (see docs/config.md)";
  fail("{}: unknown key \"{}\"; known keys: {}", source, key, known);
}

void flatten(const YAML::Node& node, const std::string& prefix, const std::string& source,
             std::vector<std::pair<std::string, std::string>>& out) {
  if (node.IsMap()) {
    std::set<std::string> seen;  // YAML would keep the last of a repeated key, silently
    for (auto it = node.begin(); it != node.end(); ++it) {
      std::string k = it->first.as<std::string>();
      const std::string key = prefix.empty() ? k : prefix + "." + k;
      if (!seen.insert(k).second)
        fail("{}:{}: \"{}\" is given twice; keep one", source, it->first.Mark().line + 1, key);
      flatten(it->second, key, source, out);
    }
  } else if (node.IsScalar()) {
    out.emplace_back(prefix, node.Scalar());
  } else if (node.IsNull()) {
    out.emplace_back(prefix, "");
  } else {
    fail("{}: {}: expected a single value, got a list", source, prefix);
  }
}

}  // namespace

void assign_field(const ConfigField& f, const std::string& raw, const std::string& source) {
  std::string v = trim(raw);
  std::visit(
      [&](auto* p) {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, std::string>) {
          *p = v;
        } else if constexpr (std::is_same_v<T, bool>) {
          std::string l = v;
          std::transform(l.begin(), l.end(), l.begin(), ::tolower);
          if (l == "true" || l == "yes" || l == "on" || l == "1")
            *p = true;
          else if (l == "false" || l == "no" || l == "off" || l == "0")
            *p = false;
          else
            bad_type(source, f.key, "true or false", v);
        } else if constexpr (std::is_same_v<T, double>) {
          char* end = nullptr;
          double d = std::strtod(v.c_str(), &end);
          if (v.empty() || *end != '\0' || !std::isfinite(d))
            bad_type(source, f.key, "a number", v);
          *p = d;
        } else {
          T x{};
          if (!parse_int(v, &x)) {
            // Accept integral floats written as 1e3.
            char* end = nullptr;
            double d = std::strtod(v.c_str(), &end);
            if (v.empty() || *end != '\0' || d != std::floor(d) || std::fabs(d) > 9e15 ||
                (std::is_unsigned_v<T> && d < 0))
              bad_type(source, f.key,
                       std::is_unsigned_v<T> ? "a non-negative integer" : "an integer", v);
            x = static_cast<T>(d);
          }
          *p = x;
        }
      },
      f.ptr);
}

std::string field_value(const ConfigField& f) {
  return std::visit(
      [](auto* p) -> std::string {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, std::string>)
          return *p;
        else if constexpr (std::is_same_v<T, bool>)
          return *p ? "true" : "false";
        else if constexpr (std::is_same_v<T, double>)
          return fmt::format("{}", *p);
        else
          return std::to_string(*p);
      },
      f.ptr);
}

void ConfigLoader::load_yaml_text(const std::string& text, const std::string& source, bool base) {
  YAML::Node root;
  try {
    std::vector<YAML::Node> docs = YAML::LoadAll(text);
    std::erase_if(docs, [](const YAML::Node& d) { return d.IsNull(); });  // (a trailing ---)
    if (docs.size() > 1)
      fail("{}: holds {} YAML documents (separated by ---); a config is one", source, docs.size());
    if (!docs.empty()) root = docs[0];
  } catch (const YAML::Exception& e) {
    std::string msg;  // (yaml-cpp quotes the offending byte as it is: a newline, a raw 0xff)
    for (unsigned char c : e.msg)
      msg += c >= 0x20 && c < 0x7f ? std::string(1, static_cast<char>(c))
                                   : fmt::format("\\x{:02x}", c);
    fail("{}:{}: invalid YAML ({})", source, e.mark.line + 1, msg);
  }
  if (root.IsNull()) return;
  if (!root.IsMap()) fail("{}: expected a mapping of sections (model:, train:, ...)", source);
  std::vector<std::pair<std::string, std::string>> kv;
  flatten(root, "", source, kv);
  for (auto& [k, v] : kv) pending_.push_back({k, v, source, base, /*yaml=*/true});
}

void ConfigLoader::load_yaml_file(const std::string& path) {
  load_yaml_text(read_file(path), path);
}

void ConfigLoader::set(const std::string& assignment, const std::string& source) {
  size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    fail("{} {}: expected KEY=VALUE, e.g. --set train.lr=3e-4", source, assignment);
  pending_.push_back({trim(assignment.substr(0, eq)), assignment.substr(eq + 1), source});
}

void ConfigLoader::finish() {
  std::vector<ConfigField> fs = fields(cfg_);
  // A section with nothing under it ("train:" alone in a file) sets nothing; with a value, or
  // from --set, it is a mistake.
  std::erase_if(pending_, [&](const Assignment& a) {
    const bool section =
        !find_field(fs, a.key) && std::any_of(fs.begin(), fs.end(), [&](const ConfigField& f) {
          return f.key.starts_with(a.key + ".");
        });
    if (section && (!a.yaml || !trim(a.value).empty()))
      fail("{}: {}: a section, expected its keys under it (e.g. {}.KEY: VALUE), got \"{}\"",
           a.source, a.key, a.key, a.value);
    return section;
  });
  for (auto& a : pending_)
    if (!find_field(fs, a.key)) unknown_key(fs, a.key, a.source);
  // The preset replaces the whole model section; explicit model keys then override it. An empty
  // one (a resolved config.yaml of a model from no preset) leaves the section's own defaults.
  for (auto it = pending_.rbegin(); it != pending_.rend(); ++it)
    if (it->key == "model.preset") {
      std::string name = trim(it->value);
      try {
        cfg_.model = name.empty() ? ModelConfig() : model_preset(name);
      } catch (const Error& e) {
        fail("{}: {}", it->source, e.what());
      }
      break;
    }
  for (auto& a : pending_) {
    if (a.key != "model.preset") assign_field(*find_field(fs, a.key), a.value, a.source);
    if (!a.base) cfg_.keys_given.insert(a.key);
  }
  pending_.clear();
  // Unset: a tenth of the peak, whatever the peak (nanoGPT's and Chinchilla's); saved resolved.
  if (cfg_.train.min_lr == -1) cfg_.train.min_lr = cfg_.train.lr / 10;
}

std::string config_to_yaml(Config& cfg) {
  // Emit nested sections in field order: "a.b.c: v" becomes a: { b: { c: v } }.
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::vector<std::string> open;
  for (auto& f : fields(cfg)) {
    std::vector<std::string> parts;
    std::stringstream ss(f.key);
    for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
    size_t common = 0;
    while (common < open.size() && common + 1 < parts.size() && open[common] == parts[common])
      ++common;
    while (open.size() > common) {
      out << YAML::EndMap;
      open.pop_back();
    }
    for (size_t i = common; i + 1 < parts.size(); ++i) {
      out << YAML::Key << parts[i] << YAML::Value << YAML::BeginMap;
      open.push_back(parts[i]);
    }
    out << YAML::Key << parts.back() << YAML::Value;
    if (std::holds_alternative<std::string*>(f.ptr))
      out << YAML::DoubleQuoted << field_value(f);
    else
      out << field_value(f);
  }
  while (!open.empty()) {
    out << YAML::EndMap;
    open.pop_back();
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace lmforge
