#include "lmforge/train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "lmforge/io/atomic_file.h"
#include "lmforge/io/config.h"
#include "lmforge/io/safetensors.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "lmforge-checkpoint";
constexpr int kVersion = 1;

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  fs::path dir = fs::path(run_dir) / "checkpoints";
  if (!fs::is_directory(dir, ec)) return out;
  for (auto& e : fs::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if (!e.is_directory() || !name.starts_with("step-") || name.ends_with(".tmp")) continue;
    if (!fs::exists(e.path() / "state.json")) continue;
    try {
      out.emplace_back(std::stoll(name.substr(5)), e.path().string());
    } catch (...) {
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

json read_state(const std::string& ckpt_dir) {
  std::string path = ckpt_dir + "/state.json";
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail("{}: corrupt checkpoint state ({}); resume from an earlier checkpoint", path, e.what());
  }
  if (j.value("format", "") != kFormat)
    fail("{}: not an lmforge checkpoint (format \"{}\")", path, j.value("format", ""));
  if (j.value("version", 0) != kVersion)
    fail("{}: checkpoint version {} is not supported (this lmforge reads {})", path,
         j.value("version", 0), kVersion);
  return j;
}

void copy_into(const Tensor& dst, const Tensor& src, const std::string& file,
               const std::string& name) {
  if (!(src.shape() == dst.shape()) || src.dtype() != dst.dtype())
    fail(
        "{}: tensor {} is {} {} but the model needs {} {}; the checkpoint is from another "
        "architecture",
        file, name, src.shape().str(), dtype_name(src.dtype()), dst.shape().str(),
        dtype_name(dst.dtype()));
  dst.copy_from(src);
}

}  // namespace

std::string save_checkpoint(const std::string& run_dir, const Transformer& model, const AdamW* opt,
                            const TrainState& st, const std::string& config_yaml, int64_t keep_last,
                            const Tokenizer& tok) {
  fs::path dir = fs::path(run_dir) / "checkpoints";
  fs::create_directories(dir);
  std::string name = fmt::format("step-{:08d}", st.step);
  fs::path final_dir = dir / name, tmp = dir / (name + ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);

  SafetensorsWriter mw, ow;
  size_t i = 0;
  for (const Param& p : model.params().params()) {
    mw.add(p.name, p.value);
    if (opt) {
      ow.add("m." + p.name, opt->m(i));
      ow.add("v." + p.name, opt->v(i));
    }
    ++i;
  }
  mw.metadata["format"] = "pt";
  mw.write((tmp / "model.safetensors").string());
  if (opt) ow.write((tmp / "optimizer.safetensors").string());

  ModelConfig mc = model.config();
  json jm = json::object();
  for (auto& f : model_fields(mc)) jm[f.key] = field_value(f);
  json j = {{"format", kFormat},
            {"version", kVersion},
            {"step", st.step},
            {"optimizer_steps", opt ? opt->steps_taken() : 0},
            {"weights_only", opt == nullptr},
            {"init_from", st.init_from},
            {"loader", st.loader},
            {"model", jm},
            {"tokenizer",
             {{"kind", tok.kind()},
              {"fingerprint", tok.fingerprint()},
              {"vocab_size", tok.vocab_size()}}}};
  copy_tokenizer_files(tok, (tmp / "tokenizer").string());
  write_file_atomic((tmp / "config.yaml").string(), config_yaml);
  write_file_atomic((tmp / "state.json").string(), j.dump(2) + "\n");
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir);

  if (keep_last > 0) {
    auto all = list_checkpoints(run_dir);
    for (size_t k = 0; k + keep_last < all.size(); ++k) fs::remove_all(all[k].second, ec);
  }
  return final_dir.string();
}

std::string find_latest_checkpoint(const std::string& run_dir) {
  auto all = list_checkpoints(run_dir);
  return all.empty() ? "" : all.back().second;
}

std::string resolve_checkpoint(const std::string& path) {
  std::error_code ec;
  if (fs::exists(fs::path(path) / "state.json", ec)) return path;
  std::string latest = find_latest_checkpoint(path);
  if (latest.empty())
    fail(
        "{}: no checkpoint here (expected a checkpoint directory with state.json, or a run "
        "directory with checkpoints/step-*); train first or check the path",
        path);
  return latest;
}

ModelConfig checkpoint_model_config(const std::string& ckpt_dir) {
  json j = read_state(ckpt_dir);
  ModelConfig mc;
  for (auto& f : model_fields(mc)) {
    if (!j["model"].contains(f.key))
      fail("{}/state.json: model.{} missing; the checkpoint is corrupt", ckpt_dir, f.key);
    assign_field(f, j["model"][f.key].get<std::string>(), ckpt_dir + "/state.json");
  }
  mc.validate();
  return mc;
}

void check_same_architecture(const std::string& ckpt_dir, const ModelConfig& cfg) {
  ModelConfig saved = checkpoint_model_config(ckpt_dir), cur = cfg;
  auto a = model_fields(saved), b = model_fields(cur);
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].key == "preset" || a[i].key == "init_std") continue;
    if (field_value(a[i]) != field_value(b[i]))
      fail(
          "{}: checkpoint has model.{}={} but the config says {}; resume with the config it was "
          "trained with (its config.yaml) or start a new run.dir",
          ckpt_dir, a[i].key, field_value(a[i]), field_value(b[i]));
  }
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

void load_checkpoint(const std::string& ckpt_dir, Transformer& model, AdamW* opt, TrainState* st) {
  json j = read_state(ckpt_dir);
  std::string mpath = ckpt_dir + "/model.safetensors";
  Safetensors mf = Safetensors::open(mpath);
  for (Param& p : model.params().params()) copy_into(p.value, mf.get(p.name), mpath, p.name);
  if (opt) {
    if (j.value("weights_only", false))
      fail(
          "{}: a weights-only checkpoint (no optimizer state) cannot be resumed; start a run from "
          "it with init_from: {}",
          ckpt_dir, ckpt_dir);
    std::string opath = ckpt_dir + "/optimizer.safetensors";
    Safetensors of = Safetensors::open(opath);
    size_t i = 0;
    for (Param& p : model.params().params()) {
      copy_into(opt->m(i), of.get("m." + p.name), opath, "m." + p.name);
      copy_into(opt->v(i), of.get("v." + p.name), opath, "v." + p.name);
      ++i;
    }
    opt->set_steps_taken(j.at("optimizer_steps").get<int64_t>());
  }
  if (st) {
    st->step = j.at("step").get<int64_t>();
    st->loader = j.at("loader");
    st->init_from = j.value("init_from", "");
  }
}

std::string checkpoint_init_from(const std::string& ckpt_dir) {
  return read_state(ckpt_dir).value("init_from", "");
}

}  // namespace lmforge
