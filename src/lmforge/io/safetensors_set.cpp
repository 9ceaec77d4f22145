// Sharded safetensors as Hugging Face writes them (huggingface_hub's
// split_torch_state_dict_into_shards and save_torch_state_dict): model.safetensors, or
// model-0000i-of-0000N.safetensors plus model.safetensors.index.json.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "lmforge/io/atomic_file.h"
#include "lmforge/io/safetensors.h"
#include "lmforge/io/safetensors_header.h"

namespace lmforge {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kSingleName = "model.safetensors";
constexpr const char* kIndexName = "model.safetensors.index.json";

bool is_shard_name(const std::string& name) {
  static const std::regex re(R"(model-\d{5,}-of-\d{5,}\.safetensors)");
  return std::regex_match(name, re);
}

// A shard named in an index must be a file beside it: no absolute path, no "..".
bool is_plain_relative(const std::string& name) {
  if (name.empty()) return false;
  fs::path p(name);
  if (p.is_absolute()) return false;
  for (const fs::path& part : p)
    if (part == "..") return false;
  return true;
}

void remove_file(const fs::path& p) {
  std::error_code ec;
  fs::remove(p, ec);
  if (ec) fail("{}: cannot remove the stale file ({})", p.string(), ec.message());
}

}  // namespace

SafetensorsSet SafetensorsSet::open(const std::string& path) {
  std::error_code ec;
  SafetensorsSet s;
  fs::path file = path;
  if (fs::is_directory(file, ec)) {
    if (fs::exists(file / kSingleName, ec)) {
      file /= kSingleName;
    } else if (fs::exists(file / kIndexName, ec)) {
      file /= kIndexName;
    } else {
      fail("{}: holds neither {} nor {}; check the path", path, kSingleName, kIndexName);
    }
  }
  s.path_ = file.string();
  if (file.extension() != ".json") {
    s.files_.push_back(Safetensors::open(s.path_));
    for (const std::string& n : s.files_[0].names()) s.where_[n] = 0;
    return s;
  }

  json index;
  try {
    index = json::parse(read_file(s.path_));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({}); the index is corrupt", s.path_, e.what());
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail("{}: no \"weight_map\" object; not a safetensors index", s.path_);
  // Each shard once, in name order; the first tensor naming it stands for it in errors.
  std::map<std::string, std::string> shards;
  for (auto& [tensor, v] : index["weight_map"].items()) {
    if (!v.is_string() || !is_plain_relative(v.get<std::string>()))
      fail("{}: weight_map: tensor {}: the shard {} is not a file name beside the index", s.path_,
           safetensors_detail::quote_name(tensor), v.dump());
    shards.emplace(v.get<std::string>(), tensor);
  }
  fs::path dir = file.parent_path();
  std::map<std::string, size_t> shard_index;
  for (auto& [shard, tensor] : shards) {
    fs::path p = dir / shard;
    if (!fs::exists(p, ec))
      fail(
          "{}: weight_map puts tensor {} in shard {}, which does not exist; the download is "
          "incomplete",
          s.path_, safetensors_detail::quote_name(tensor), p.string());
    shard_index[shard] = s.files_.size();
    s.files_.push_back(Safetensors::open(p.string()));
  }
  for (auto& [tensor, v] : index["weight_map"].items()) {
    size_t i = shard_index.at(v.get<std::string>());
    if (!s.files_[i].has(tensor))
      fail(
          "{}: weight_map puts tensor {} in shard {}, which has no such tensor; the index "
          "and the shards do not match",
          s.path_, safetensors_detail::quote_name(tensor), s.files_[i].path());
    s.where_[tensor] = i;
  }
  return s;
}

const Safetensors& SafetensorsSet::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    fail("{}: no tensor named {}; the weights do not match this model", path_,
         safetensors_detail::quote_name(name));
  return files_[it->second];
}

Tensor SafetensorsSet::get(const std::string& name) const { return file_of(name).get(name); }

Tensor SafetensorsSet::load(const std::string& name, DType want) const {
  return file_of(name).load(name, want);
}

void SafetensorsSet::release(const std::string& name) const { file_of(name).release(name); }

const Safetensors::Info& SafetensorsSet::info(const std::string& name) const {
  return file_of(name).info(name);
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  for (size_t i = 0; i < files_.size(); ++i)
    for (const std::string& n : files_[i].names()) {
      auto it = where_.find(n);
      if (it != where_.end() && it->second == i) out.push_back(n);
    }
  return out;
}

const std::map<std::string, std::string>& SafetensorsSet::metadata() const {
  static const std::map<std::string, std::string> kNone;
  return files_.empty() ? kNone : files_[0].metadata();
}

std::vector<std::string> write_safetensors_set(
    const std::string& dir, const std::vector<std::pair<std::string, Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata, uint64_t max_shard_bytes) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the directory ({})", dir, ec.message());
  std::set<std::string> seen;
  for (auto& [name, t] : tensors)
    if (!seen.insert(name).second)
      fail("{}: cannot write tensor {}: two tensors have this name", dir,
           safetensors_detail::quote_name(name));

  // huggingface_hub's split: in order, a tensor starts a new shard when it would take the current
  // one past the limit; a tensor larger than the limit gets a shard of its own (and the current
  // one stays open, so it may come later in the numbering).
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> current;
  uint64_t current_bytes = 0, total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    uint64_t n = tensors[i].second.nbytes();
    total += n;
    if (n > max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (current_bytes + n > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += n;
  }
  if (!current.empty()) shards.push_back(std::move(current));

  fs::path root = dir;
  std::vector<std::string> written;
  auto write_shard = [&](const std::string& name, const std::vector<size_t>& members) {
    SafetensorsWriter w;
    for (size_t i : members) w.add(tensors[i].first, tensors[i].second);
    w.metadata = metadata;
    w.write((root / name).string());
    written.push_back(name);
  };
  if (shards.size() <= 1) {
    std::vector<size_t> all(tensors.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    write_shard(kSingleName, all);
    remove_file(root / kIndexName);
  } else {
    json weight_map = json::object();
    for (size_t s = 0; s < shards.size(); ++s) {
      std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
      write_shard(name, shards[s]);
      for (size_t i : shards[s]) weight_map[tensors[i].first] = name;
    }
    // The single file would shadow the index (readers prefer it), so it goes before the index
    // appears.
    remove_file(root / kSingleName);
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_file_atomic((root / kIndexName).string(), index.dump(2) + "\n");
    written.push_back(kIndexName);
  }
  std::set<std::string> keep(written.begin(), written.end());
  for (const auto& e : fs::directory_iterator(root, ec)) {
    std::string name = e.path().filename().string();
    if (is_shard_name(name) && !keep.count(name)) remove_file(e.path());
  }
  if (ec) fail("{}: cannot list the directory ({})", dir, ec.message());
  return written;
}

}  // namespace lmforge
