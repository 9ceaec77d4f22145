#include "lmforge/train/checkpoint.h"

#include <fcntl.h>
#include <fmt/core.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "lmforge/backend/ops.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/config.h"
#include "lmforge/io/safetensors.h"
#include "lmforge/train/checkpoint_dir.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "lmforge-checkpoint";
constexpr int kVersion = 1;

json read_state(const std::string& ckpt_dir) {
  std::string path = ckpt_dir + "/state.json";
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail("{}: corrupt checkpoint state ({}); resume from an earlier checkpoint", path, e.what());
  }
  if (!j.is_object())
    fail("{}: corrupt checkpoint state (not a JSON object); resume from an earlier checkpoint",
         path);
  if (j.value("format", "") != kFormat)
    fail("{}: not an lmforge checkpoint (format \"{}\")", path, j.value("format", ""));
  if (j.value("version", 0) != kVersion)
    fail("{}: checkpoint version {} is not supported (this lmforge reads {})", path,
         j.value("version", 0), kVersion);
  return j;
}

std::string rank_file(const char* stem, int index, int count) {
  return fmt::format("{}-rank-{:05d}-of-{:05d}.safetensors", stem, index, count);
}

// The files holding a checkpoint's model ("model") or optimizer ("optimizer") tensors: the
// single file, else every rank file.
std::vector<Safetensors> open_pieces(const std::string& dir, const std::string& stem) {
  std::vector<Safetensors> out;
  std::error_code ec;
  if (fs::exists(dir + "/" + stem + ".safetensors", ec)) {
    out.push_back(Safetensors::open(dir + "/" + stem + ".safetensors"));
    return out;
  }
  std::vector<std::string> paths;
  for (auto& e : fs::directory_iterator(dir))
    if (const std::string n = e.path().filename().string();
        n.starts_with(stem + "-rank-") && n.ends_with(".safetensors"))
      paths.push_back(e.path());
  std::sort(paths.begin(), paths.end());
  if (paths.empty())
    fail("{}: no {}.safetensors (or {}-rank-*.safetensors); the checkpoint is incomplete", dir,
         stem, stem);
  // "<stem>-rank-0000i-of-0000N.safetensors": every i of one N, each once.
  const auto name_of = [&](size_t i, size_t n) {
    return fmt::format("{}-rank-{:05d}-of-{:05d}.safetensors", stem, i, n);
  };
  auto count_in = [](const std::string& path) -> size_t {  // the N of "-of-N"
    const std::string name = fs::path(path).filename().string();
    const size_t of = name.find("-of-");
    return of == std::string::npos ? 0 : std::strtoull(name.c_str() + of + 4, nullptr, 10);
  };
  const size_t n = count_in(paths[0]);
  for (const std::string& p : paths)
    if (n == 0 || count_in(p) != n || paths.size() > n)
      fail("{}: {} {}-rank files, not the ranks of one run ({}); the checkpoint is corrupt", dir,
           paths.size(), stem, fs::path(p).filename().string());
  for (size_t i = 0; i < n; ++i)
    if (i >= paths.size() || fs::path(paths[i]).filename() != name_of(i, n))
      fail("{}: {} is missing (it holds {} of the {} {}-rank files); the checkpoint is incomplete",
           dir, name_of(i, n), paths.size(), n, stem);
  for (const std::string& p : paths) out.push_back(Safetensors::open(p));
  return out;
}

// Fills out (a flat fp32 or bf16 tensor) with the flat elements [lo, lo + out.numel()) of tensors
// prefix + <parameter name>, whole or in slices (metadata "begin.<name>"), from the files.
// share: where a part of each tensor (a tensor-parallel share: ps is its layout) lies in the
// files' whole tensors; empty: ps is the whole model's.
// without_adapters: the files are of a model without LoRA adapters (init_from under LoRA): the
// adapters' elements keep the values out has.
void fill_flat(const std::vector<Safetensors>& files, const std::string& prefix, const ParamSet& ps,
               int64_t lo, const Tensor& out, const ShareOfWhole& share = {},
               bool without_adapters = false) {
  if (out.device() != Device::kCPU) {  // a GPU buffer: filled on the host, copied in one piece
    Tensor host = Tensor::empty(out.shape(), out.dtype());
    if (without_adapters) host.copy_from(out);
    fill_flat(files, prefix, ps, lo, host, share, without_adapters);
    out.copy_from(host);
    return;
  }
  // Values are fp32, or bf16 under bf16 master weights; a checkpoint of the other kind converts
  // (bf16 to fp32 exactly, fp32 to bf16 rounding to nearest even), so a run may change
  // train.master_weights on resume.
  LMF_CHECK(out.dtype() == DType::kF32 || out.dtype() == DType::kBF16, "fill_flat into {}",
            dtype_name(out.dtype()));
  const size_t esize = dtype_size(out.dtype());
  const int64_t hi = lo + out.numel();
  char* dst = static_cast<char*>(out.raw());
  for (const Param& p : ps.params()) {
    const int64_t off = ps.offset(p), numel = p.shape.numel();
    if (std::min(hi, off + numel) <= std::max(lo, off)) continue;
    const ParamShare place = share ? share(p) : ParamShare{p.shape, {{0, 0, numel}}};
    const int64_t whole_numel = place.whole_shape.numel();
    // The runs' parts inside [lo, hi): elements [w, w + n) of the whole tensor go to out[o...].
    struct Want {
      int64_t w, o, n;
    };
    std::vector<Want> wants;
    int64_t want = 0;
    for (const ShareRun& run : place.runs) {
      const int64_t a = std::max(lo, off + run.share), z = std::min(hi, off + run.share + run.len);
      if (a >= z) continue;
      wants.push_back({run.whole + (a - off - run.share), a - lo, z - a});
      want += z - a;
    }
    const std::string name = prefix + p.name;
    int64_t got = 0;
    for (const Safetensors& f : files) {
      if (!f.has(name)) continue;
      const std::string& stored = f.info(name).dtype;
      if (stored != "F32" && stored != "BF16")
        fail("{}: tensor {} is stored as {}; lmforge checkpoints hold F32 or BF16 values", f.path(),
             name, stored);
      // Same dtype: a view. bf16 into fp32 widens exactly; fp32 into bf16 rounds as every other
      // fp32 -> bf16 conversion of weights does (ops::to_bf16: nearest even, denormals to zero).
      const bool same = stored == (out.dtype() == DType::kF32 ? "F32" : "BF16");
      Tensor t = same || out.dtype() == DType::kBF16 ? f.get(name) : f.load(name, DType::kF32);
      auto b = f.metadata().find("begin." + name);
      int64_t begin = 0;
      if (b != f.metadata().end()) {
        char* end = nullptr;
        begin = std::strtoll(b->second.c_str(), &end, 10);
        if (b->second.empty() || *end != '\0')
          fail("{}: metadata begin.{} is \"{}\", not an element offset; the checkpoint is corrupt",
               f.path(), name, b->second);
      }
      const bool mismatch = (b == f.metadata().end() && !(t.shape() == place.whole_shape)) ||
                            begin < 0 || begin + t.numel() > whole_numel;
      if (mismatch && name.ends_with(".lora_a") && t.ndim() == 2 && place.whole_shape.ndim() == 2 &&
          t.size(1) == place.whole_shape[1] && place.whole_shape[0] % t.size(0) == 0 &&
          place.whole_shape[0] > t.size(0))
        fail(
            "{}: tensor {} is {} but the model needs {}: the checkpoint is from an lmforge whose "
            "fused layers shared one LoRA A; train it again, or export it with --to-hf (merged) "
            "from that version",
            f.path(), name, t.shape().str(), place.whole_shape.str());
      if (mismatch)
        fail(
            "{}: tensor {} is {} {} but the model needs {}; the checkpoint is from another "
            "architecture",
            f.path(), name, t.shape().str(), stored, place.whole_shape.str());
      const Tensor flat = t.view({t.numel()});
      for (const Want& w : wants) {  // this file's elements [begin, begin + t.numel())
        const int64_t a = std::max(w.w, begin), z = std::min(w.w + w.n, begin + t.numel());
        if (a >= z) continue;
        const int64_t to = w.o + (a - w.w);
        if (t.dtype() == out.dtype())
          std::memcpy(dst + to * esize, static_cast<const char*>(t.raw()) + (a - begin) * esize,
                      static_cast<size_t>(z - a) * esize);
        else  // an fp32 checkpoint into bf16 master weights
          ops::to_bf16(out.slice(to, z - a), flat.slice(a - begin, z - a));
        got += z - a;
      }
      f.release(name);  // copied: its pages need not stay resident
    }
    if (without_adapters && is_lora_param(p.name)) continue;
    if (got != want)
      fail(
          "{}: tensor {} is missing or incomplete; the checkpoint is corrupt or from another model",
          files.size() == 1 ? files[0].path()
          : files.empty()
              ? std::string("checkpoint")
              : fmt::format("{} (its {} rank files)",
                            fs::path(files[0].path()).parent_path().string(), files.size()),
          name);
  }
}

// A model in state.json that its model files do not hold (an edited state.json, the files of
// another run) stops here, before a model of that size is made: the files' elements (whole
// tensors, or every rank's slices of them) number the model's parameters.
void check_model_files(const std::string& ckpt_dir, const ModelConfig& mc) {
  int64_t stored = 0, adapters = 0;
  for (const Safetensors& f : open_pieces(ckpt_dir, "model"))
    for (const std::string& name : f.names()) {
      int64_t n = 1;
      for (uint64_t d : f.info(name).shape) n *= static_cast<int64_t>(d);
      stored += n;
      if (is_lora_param(name)) adapters += n;
    }
  // (adapters of another layout alone: the load names it, e.g. the fused layers' one shared A)
  if (mc.lora.on() && stored - adapters == mc.num_params()) return;
  const int64_t want = mc.num_params() + mc.lora_params();
  if (stored != want)
    fail(
        "{}/state.json: its model (n_layer={}, n_embd={}, vocab_size={}: {} parameters) is not "
        "the one its model files hold ({} values); the checkpoint is corrupt, resume from an "
        "earlier one",
        ckpt_dir, mc.n_layer, mc.n_embd, mc.vocab_size, want, stored);
}

}  // namespace

std::string save_checkpoint(const std::string& run_dir, const Transformer& model, const AdamW* opt,
                            const TrainState& st, const std::string& config_yaml, int64_t keep_last,
                            const Tokenizer& tok, const CheckpointShards* shards) {
  const CheckpointShards one;
  const CheckpointShards& sh = shards ? *shards : one;
  const bool lead = !sh.comm || sh.comm->rank() == 0;
  auto barrier = [&] {
    if (sh.comm) sh.comm->barrier();
  };
  fs::path dir = fs::path(run_dir) / "checkpoints";
  std::string name = fmt::format("step-{:08d}", st.step);
  fs::path final_dir = dir / name, tmp = dir / (name + ".tmp");
  std::error_code ec;
  if (lead) {
    if (!fs::is_directory(dir, ec)) {
      make_directories(dir.string());  // (removed again if the save fails: core/leftovers.h)
      checkpoint_dir::sync_path(run_dir, true);
    }
    for (auto& e : fs::directory_iterator(dir)) {  // left by a save or prune that was killed
      std::string n = e.path().filename().string();
      if (n.starts_with("step-") && n.ends_with(".tmp")) fs::remove_all(e.path(), ec);
    }
    note_temp(tmp.string(), [&] { fs::create_directories(tmp); });
  }
  // A save that fails (a full disk) leaves no step-N.tmp holding the space until the next save
  // removes it: rank 0 removes what it made.
  struct RemoveOnFailure {
    fs::path dir;
    bool on;
    int uncaught = std::uncaught_exceptions();
    ~RemoveOnFailure() {
      std::error_code ec;
      if (on && std::uncaught_exceptions() > uncaught) fs::remove_all(dir, ec);
    }
  } remove_on_failure{tmp, lead};
  barrier();

  const ParamSet& ps = model.params();
  // Tensor parallelism: the tensors rank 0 writes, in order, each made by a collective.
  std::vector<std::pair<const Param*, int>> made;
  if (sh.whole_param) {
    for (const Param& p : ps.params()) made.emplace_back(&p, 0);
    if (opt)
      for (const Param& p : ps.params()) {
        if (p.frozen) continue;
        made.emplace_back(&p, 1);
        if (!(opt->muon() && muon_param(p))) made.emplace_back(&p, 2);  // (Muon's: no v)
        if (opt->keeps_masters()) made.emplace_back(&p, 3);             // (fp32 masters)
      }
  }
  if (sh.whole_param && !lead) {
    for (const auto& [p, what] : made) sh.whole_param(*p, what);
  } else if (sh.whole_param) {
    SafetensorsWriter mw, ow;
    for (const auto& [p, what] : made) {
      static const char* const prefix[] = {"", "m.", "v.", "w."};
      const DType dtype = what == 0 ? sh.values_dtype : DType::kF32;
      (what == 0 ? mw : ow).add(prefix[what] + p->name, dtype, p->shape, [&sh, p = p, what, dtype] {
        const Tensor whole = sh.whole_param(*p, what);
        if (dtype == DType::kF32) return whole;
        // bf16 values widened: their top halves, exactly (subnormals kept, as one process's)
        Tensor narrow = Tensor::empty(whole.shape(), dtype);
        const float* f = whole.data<float>();
        uint16_t* h = static_cast<uint16_t*>(narrow.raw());
        for (int64_t i = 0; i < whole.numel(); ++i) {
          uint32_t u;
          std::memcpy(&u, f + i, 4);
          h[i] = static_cast<uint16_t>(u >> 16);
        }
        return narrow;
      });
    }
    mw.metadata["format"] = "pt";
    mw.write((tmp / "model.safetensors").string());
    if (opt) ow.write((tmp / "optimizer.safetensors").string());
  } else if (sh.values) {  // each writer its slices of the values
    if (sh.writes) {
      SafetensorsWriter mw;
      const int64_t lo = sh.values_lo, hi = lo + sh.values->numel();
      for (const Param& p : ps.params()) {
        const int64_t off = ps.offset(p), numel = p.shape.numel();
        const int64_t a = std::max(lo, off), z = std::min(hi, off + numel);
        if (a >= z) continue;
        mw.add(p.name, sh.values->slice(a - lo, z - a));
        mw.metadata["begin." + p.name] = std::to_string(a - off);
      }
      mw.write((tmp / rank_file("model", sh.index, sh.count)).string());
    }
  } else if (lead) {
    SafetensorsWriter mw;
    for (const Param& p : ps.params()) mw.add(p.name, p.value);
    mw.metadata["format"] = "pt";
    mw.write((tmp / "model.safetensors").string());
  }
  if (opt && !sh.whole_param && (sh.optimizer_sharded ? sh.writes : lead)) {
    SafetensorsWriter ow;
    for (size_t i = 0; i < opt->slots().size(); ++i) {
      const OptSlot& s = opt->slots()[i];
      const std::string& n = s.param->name;
      // (Muon's matrices have no v; only bf16 values under fp32_masters have a master, w)
      for (const auto& [prefix, t] :
           {std::pair{"m.", &opt->m(i)}, {"v.", &opt->v(i)}, {"w.", &opt->master(i)}}) {
        if (!t->defined()) continue;
        ow.add(prefix + n, *t);
        if (sh.optimizer_sharded) ow.metadata["begin." + (prefix + n)] = std::to_string(s.begin);
      }
    }
    ow.write((tmp / (sh.optimizer_sharded ? rank_file("optimizer", sh.index, sh.count)
                                          : std::string("optimizer.safetensors")))
                 .string());
  }
  barrier();  // every piece is written
  if (!lead) {
    barrier();  // rank 0 finished the save
    return final_dir.string();
  }

  ModelConfig mc = model.config();
  json jm = json::object();
  for (auto& f : model_fields(mc)) jm[f.key] = field_value(f);
  json j = {{"format", kFormat},
            {"version", kVersion},
            {"step", st.step},
            {"optimizer_steps", opt ? opt->steps_taken() : 0},
            {"optimizer", opt ? opt->name() : "none"},
            {"weights_only", opt == nullptr},
            {"muon_row_blocks", opt && opt->muon()},
            {"shards", sh.values || sh.optimizer_sharded ? sh.count : 1},
            {"init_from", st.init_from},
            {"val_loss", st.val_loss ? json(*st.val_loss) : json(nullptr)},
            {"guard", st.guard},
            {"evals", st.evals},
            {"tokens", st.tokens},
            {"elapsed_s", st.elapsed_s},
            {"loader", st.loader},
            {"model", jm},
            {"tokenizer",
             {{"kind", tok.kind()},
              {"fingerprint", tok.fingerprint()},
              {"vocab_size", tok.vocab_size()}}}};
  copy_tokenizer_files(tok, (tmp / "tokenizer").string());
  write_file_atomic((tmp / "config.yaml").string(), config_yaml);
  write_file_atomic((tmp / "state.json").string(), j.dump(2) + "\n");
  std::vector<std::string> shard_files;
  for (int i = 0; i < sh.count; ++i) {
    if (sh.values) shard_files.push_back(rank_file("model", i, sh.count));
    if (opt && sh.optimizer_sharded) shard_files.push_back(rank_file("optimizer", i, sh.count));
  }
  checkpoint_dir::write_manifest(tmp, shard_files);
  // Complete from here: a failure in the swap below must not remove it (the step's only copy
  // once the old one is moved aside); the next save tidies what is left.
  remove_on_failure.on = false;
  forget_temp(tmp.string());

  // A checkpoint of the same step (a finished run resumed, an abandoned continuation) is swapped
  // with the new one in one atomic step where the filesystem can (renameat2 RENAME_EXCHANGE), so
  // a kill never leaves the step without a complete checkpoint; else it is moved aside first
  // (rename() does not replace a non-empty directory).
  fs::path old = dir / (name + ".old.tmp");
  if (fs::exists(final_dir, ec)) {
    if (renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0)
      old = tmp;  // now holds the replaced checkpoint
    else
      fs::rename(final_dir, old);
  }
  if (old != tmp) fs::rename(tmp, final_dir);
  checkpoint_dir::sync_path(dir, true);
  fs::remove_all(old, ec);
  prune_checkpoints(run_dir, st.step, keep_last);
  barrier();
  return final_dir.string();
}

ModelConfig checkpoint_model_config(const std::string& ckpt_dir) {
  json j = read_state(ckpt_dir);
  ModelConfig mc;
  // Keys added since the first checkpoints, whose defaults are what a model saved before them
  // computes (LoRA: none; Gemma's switches: off).
  auto later = [](const std::string& k) {
    return k.starts_with("lora_") || k == "full_attention_every" || k == "rope_local_theta" ||
           k == "embed_scale" || k == "post_norms" || k == "norm_offset" || k == "attn_scale_dim" ||
           k == "attn_softcap" || k == "logit_softcap" || k == "rope_scaling.type";
  };
  try {
    for (auto& f : model_fields(mc)) {
      if (!j.at("model").contains(f.key)) {
        if (later(f.key)) continue;
        fail("model.{} missing", f.key);
      }
      assign_field(f, j["model"][f.key].get<std::string>(), ckpt_dir + "/state.json");
    }
    mc.validate();
  } catch (const std::exception& e) {  // json's, or a value no model has
    const std::string what = e.what(), path = ckpt_dir + "/state.json";
    fail("{}{}; the checkpoint is corrupt", what.starts_with(path) ? "" : path + ": ", what);
  }
  check_model_files(ckpt_dir, mc);
  return mc;
}

void check_same_architecture(const std::string& ckpt_dir, const ModelConfig& cfg) {
  ModelConfig saved = checkpoint_model_config(ckpt_dir), cur = cfg;
  auto a = model_fields(saved), b = model_fields(cur);
  for (size_t i = 0; i < a.size(); ++i) {
    // (lora_dropout: a training knob, not the architecture)
    if (a[i].key == "preset" || a[i].key == "init_std" || a[i].key == "lora_dropout") continue;
    if (field_value(a[i]) != field_value(b[i]))
      fail(
          "{}: checkpoint has model.{}={} but the config says {}; resume with the config it was "
          "trained with (its config.yaml) or start a new run.dir",
          ckpt_dir, a[i].key, field_value(a[i]), field_value(b[i]));
  }
}

void check_same_tokenizer(const std::string& ckpt_dir, const Tokenizer& tok) {
  const json j = read_state(ckpt_dir);
  if (!j.contains("tokenizer") || !j["tokenizer"].is_object()) return;  // (not recorded early on)
  const std::string kind = j["tokenizer"].value("kind", ""),
                    fp = j["tokenizer"].value("fingerprint", "");
  if (fp != tok.fingerprint())
    fail(
        "{}: trained with tokenizer {} (fingerprint {}) but this run's is {} ({}); resume with "
        "the data.tokenizer it was trained with (its config.yaml; a bpe:N trained before "
        "2026-12-07 learnt from the held-out share too: --set data.tokenizer={}/tokenizer) or "
        "start a new run.dir",
        ckpt_dir, kind, fp, tok.kind(), tok.fingerprint(), ckpt_dir);
}

std::unique_ptr<Tokenizer> checkpoint_tokenizer(const std::string& ckpt_dir) {
  json j = read_state(ckpt_dir);
  std::string kind = j.contains("tokenizer") ? j["tokenizer"].value("kind", "byte") : "byte";
  auto tok = load_tokenizer(kind == "byte" ? "byte" : ckpt_dir + "/tokenizer");
  if (j.contains("tokenizer") && j["tokenizer"].value("fingerprint", "") != tok->fingerprint())
    fail(
        "{}/tokenizer: its files do not match the fingerprint in state.json; the checkpoint is "
        "corrupt",
        ckpt_dir);
  return tok;
}

namespace {
void load_checkpoint_state(const std::string& ckpt_dir, Transformer& model, AdamW* opt,
                           TrainState* st, const ShareOfWhole& share);
}  // namespace

void load_checkpoint(const std::string& ckpt_dir, Transformer& model, AdamW* opt, TrainState* st,
                     const ShareOfWhole& share) {
  try {
    load_checkpoint_state(ckpt_dir, model, opt, st, share);
  } catch (const json::exception& e) {  // a field of the wrong type or missing
    fail("{}/state.json: {}; the checkpoint is corrupt, resume from an earlier one", ckpt_dir,
         e.what());
  }
}

namespace {
void load_checkpoint_state(const std::string& ckpt_dir, Transformer& model, AdamW* opt,
                           TrainState* st, const ShareOfWhole& share) {
  json j = read_state(ckpt_dir);
  ParamSet& ps = model.params();
  if ((opt || st) && j.value("weights_only", false))
    fail(
        "{}: a weights-only checkpoint (no optimizer state) cannot be resumed; start a run from "
        "it with init_from: {}",
        ckpt_dir, ckpt_dir);
  if (ps.has_values()) {
    load_checkpoint_values(ckpt_dir, ps, 0, ps.flat_values(), share, /*resuming=*/opt != nullptr);
    ps.invalidate_bf16();  // new weights: the bf16 copies are reconverted on use
  }
  if (opt) {
    const std::string saved = j.value("optimizer", "adamw");  // (not recorded before Muon)
    if (saved != opt->name())
      fail(
          "{}: its optimizer state is {}'s, but train.optimizer is {}; resume with "
          "train.optimizer: {}, or with --reset-optimizer (its weights, a fresh optimizer)",
          ckpt_dir, saved, opt->name(), saved);
    // Muon stepped the fused attn.qkv and mlp.fc whole before 2026-12-07: the run goes on with
    // their projections apart (other directions, and a smaller lr scale: each block's rows).
    if (opt->muon() && !j.value("muon_row_blocks", false))
      fmt::print(stderr,
                 "note: {}: its Muon stepped the fused attn.qkv and mlp.fc whole; from here each "
                 "projection (q, k, v; gate, up) steps as its own matrix, as torch.optim.Muon\n",
                 ckpt_dir);
    std::vector<Safetensors> files = open_pieces(ckpt_dir, "optimizer"), model_files;
    for (size_t i = 0; i < opt->slots().size(); ++i) {
      const OptSlot& s = opt->slots()[i];
      const int64_t lo = ps.offset(*s.param) + s.begin;
      fill_flat(files, "m.", ps, lo, opt->m(i).view({s.len}), share);
      if (opt->v(i).defined()) fill_flat(files, "v.", ps, lo, opt->v(i).view({s.len}), share);
      if (!opt->master(i).defined()) continue;
      // fp32 masters of bf16 values: the saved ones, or else the checkpoint's weights themselves
      // (fp32 master weights: exactly the masters they were; bf16 ones: widened).
      const std::string w = "w." + s.param->name;
      const bool saved =
          std::any_of(files.begin(), files.end(), [&](const Safetensors& f) { return f.has(w); });
      if (!saved && model_files.empty()) model_files = open_pieces(ckpt_dir, "model");
      fill_flat(saved ? files : model_files, saved ? "w." : "", ps, lo,
                opt->master(i).view({s.len}), share);
    }
    const int64_t taken = j.at("optimizer_steps").get<int64_t>();
    if (taken < 0)
      fail("{}/state.json: optimizer_steps {} is negative; the checkpoint is corrupt", ckpt_dir,
           taken);
    opt->set_steps_taken(taken);
  }
  if (st) {
    st->step = j.at("step").get<int64_t>();
    if (st->step < 0)
      fail(
          "{}/state.json: step {} is negative; the checkpoint is corrupt, resume from an earlier "
          "one",
          ckpt_dir, st->step);
    st->loader = j.at("loader");
    st->init_from = j.value("init_from", "");
    st->val_loss.reset();
    if (j.contains("val_loss") && j["val_loss"].is_number())
      st->val_loss = j["val_loss"].get<double>();
    st->guard = j.value("guard", nlohmann::json());
    st->evals = j.value("evals", nlohmann::json());
    st->tokens = j.value("tokens", int64_t{-1});  // absent before it was recorded
    st->elapsed_s = j.value("elapsed_s", 0.0);
  }
}
}  // namespace

void load_checkpoint_values(const std::string& ckpt_dir, const ParamSet& ps, int64_t lo,
                            const Tensor& out, const ShareOfWhole& share, bool resuming) {
  // A model with LoRA adapters from a checkpoint without them (init_from): they keep their values.
  const bool without_adapters = !checkpoint_model_config(ckpt_dir).lora.on() &&
                                std::any_of(ps.params().begin(), ps.params().end(),
                                            [](const Param& p) { return is_lora_param(p.name); });
  fill_flat(open_pieces(ckpt_dir, "model"), "", ps, lo, out, share, without_adapters);
  // LoRA under bf16 master weights resumed with fp32 ones: the adapters' fp32 masters the
  // optimizer files keep (w.) are their values; the model file holds them rounded to bf16.
  if (!resuming || out.dtype() != DType::kF32) return;
  const std::vector<Safetensors> opt = open_pieces(ckpt_dir, "optimizer");
  const int64_t hi = lo + out.numel();
  for (const Param& p : ps.params()) {  // each one's range alone (a GPU's out: no whole copy)
    const std::string w = "w." + p.name;
    if (std::none_of(opt.begin(), opt.end(), [&](const Safetensors& f) { return f.has(w); }))
      continue;
    const int64_t a = std::max(lo, ps.offset(p)), z = std::min(hi, ps.offset(p) + p.shape.numel());
    if (a < z) fill_flat(opt, "w.", ps, a, out.slice(a - lo, z - a), share);
  }
}

void for_each_checkpoint_value(const std::string& ckpt_dir, const ParamSet& layout,
                               const GiveValues& give) {
  const bool without_adapters = !checkpoint_model_config(ckpt_dir).lora.on();
  const std::vector<Safetensors> files = open_pieces(ckpt_dir, "model");
  for (const Param& p : layout.params()) {
    if (without_adapters && is_lora_param(p.name)) continue;
    const Tensor values = Tensor::empty({p.shape.numel()}, DType::kF32);
    fill_flat(files, "", layout, layout.offset(p), values);
    give(p, values.data<float>());
  }
}

std::string checkpoint_init_from(const std::string& ckpt_dir) {
  return read_state(ckpt_dir).value("init_from", "");
}

std::set<std::string> checkpoint_dtypes(const std::string& ckpt_dir) {
  std::set<std::string> out;
  for (const Safetensors& f : open_pieces(ckpt_dir, "model"))
    for (const std::string& n : f.names()) out.insert(f.info(n).dtype);
  return out;
}

}  // namespace lmforge
