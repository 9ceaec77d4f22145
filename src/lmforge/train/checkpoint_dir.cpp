// A run directory's checkpoints on disk: manifests, verification, listing, pruning, finding
// (train/checkpoint_dir.h); what a checkpoint holds and its loading are checkpoint.cpp's.
#include "lmforge/train/checkpoint_dir.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/sha256.h"
#include "lmforge/train/checkpoint.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace checkpoint_dir {

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kManifestFormat = "lmforge-checkpoint-manifest";
constexpr int kManifestVersion = 1;

struct Listed {
  int64_t step;
  fs::path dir;
};

// "step-00000100" -> 100; -1 for any other name (e.g. "step-00000100.tmp").
int64_t step_of(const std::string& name) {
  if (!name.starts_with("step-") || name.size() == 5 || name.size() > 5 + 18) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(5));
}

// Complete checkpoints (step-N directories with a manifest), oldest first; not verified.
std::vector<Listed> list_checkpoints(const std::string& run_dir) {
  std::vector<Listed> out;
  std::error_code ec;
  fs::path dir = fs::path(run_dir) / "checkpoints";
  if (!fs::is_directory(dir, ec)) return out;
  for (auto& e : fs::directory_iterator(dir, ec)) {
    int64_t step = step_of(e.path().filename().string());
    if (step < 0 || !e.is_directory(ec) || !fs::exists(e.path() / kManifest, ec)) continue;
    out.push_back({step, e.path()});
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.step < b.step; });
  return out;
}

}  // namespace

void sync_path(const fs::path& p, bool directory) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  if (fd < 0) fail("{}: cannot open to sync it to disk ({})", p.string(), std::strerror(errno));
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    fail("{}: fsync failed ({}); is the disk full or failing?", p.string(), std::strerror(err));
  }
  ::close(fd);
}

namespace {

// SHA-256 of each file (and its size), a few at a time: a checkpoint's bytes are mostly in two
// files.
std::vector<std::string> hash_files(const std::vector<fs::path>& files,
                                    std::vector<uint64_t>* sizes = nullptr) {
  std::vector<std::string> hex(files.size());
  std::vector<std::exception_ptr> err(files.size());  // rethrown as they were, after the loop
  std::vector<uint64_t> bytes(files.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(4)
  for (size_t i = 0; i < files.size(); ++i) {
    try {
      hex[i] = sha256_file(files[i].string(), &bytes[i]);
    } catch (...) {
      err[i] = std::current_exception();
    }
  }
  for (const std::exception_ptr& e : err)
    if (e) std::rethrow_exception(e);
  if (sizes) *sizes = bytes;
  return hex;
}

}  // namespace

void write_manifest(const fs::path& dir, const std::vector<std::string>& expected) {
  std::vector<fs::path> files, dirs{dir};
  std::vector<std::string> names;
  for (auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_directory()) dirs.push_back(e.path());
    if (!e.is_regular_file()) continue;
    files.push_back(e.path());
    names.push_back(e.path().lexically_relative(dir).generic_string());
  }
  for (const std::string& n : expected) {
    if (std::find(names.begin(), names.end(), n) != names.end()) continue;
    std::error_code ec;
    if (!fs::is_regular_file(dir / n, ec))
      fail(
          "checkpoint {}: {} is missing although every rank reported its shard written; check "
          "that run.dir is one directory shared by all nodes",
          dir.string(), n);
    files.push_back(dir / n);
    names.push_back(n);
  }
  std::vector<size_t> order(files.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return names[a] < names[b]; });
  std::vector<uint64_t> bytes;
  std::vector<std::string> hex = hash_files(files, &bytes);
  json list = json::array();
  for (size_t i : order) {
    sync_path(files[i], false);
    list.push_back({{"path", names[i]}, {"bytes", bytes[i]}, {"sha256", hex[i]}});
  }
  for (const fs::path& d : dirs) sync_path(d, true);
  json m = {{"format", kManifestFormat}, {"version", kManifestVersion}, {"files", list}};
  write_file_atomic((dir / kManifest).string(), m.dump(2) + "\n");
  sync_path(dir, true);
}

namespace {

// Takes a checkpoint out of the complete set atomically (a rename to *.tmp), then deletes it: a
// kill in the middle leaves a stale *.tmp for the next save to remove, never a half-deleted
// checkpoint that still looks complete.
// A checkpoint a process reads (generate, eval, export, info while its run trains) holds a shared
// flock on its directory (hold_for_reading); retire() leaves one so held for a later prune, where
// it otherwise vanished under the reader (keep_last 1: 1 read in 5 failed). Where flock does not
// work (a filesystem without it), no lock: as before.
void retire(const fs::path& ckpt) {
  std::error_code ec;
  const int fd = ::open(ckpt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
    ::close(fd);
    return;  // being read: the next save's prune takes it
  }
  fs::path tmp = ckpt;
  tmp += ".tmp";
  fs::remove_all(tmp, ec);
  fs::rename(ckpt, tmp, ec);
  if (ec) tmp = ckpt;  // cannot rename: delete in place
  fs::remove_all(tmp, ec);
  if (fd >= 0) ::close(fd);
}

std::mutex reads_mu;
std::map<std::string, int> reads;  // checkpoint directory -> its held descriptor

// Takes a shared lock on a checkpoint directory until release_checkpoint_reads() or the end of
// the process; false when the directory is gone (retired, or being retired, since it was listed).
bool hold_for_reading(const fs::path& ckpt) {
  std::lock_guard<std::mutex> lock(reads_mu);
  if (reads.count(ckpt.string())) return true;
  const int fd = ::open(ckpt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno != ENOENT;  // (unreadable: verification says so)
  if (::flock(fd, LOCK_SH | LOCK_NB) != 0) {
    const bool retiring = errno == EWOULDBLOCK;
    ::close(fd);
    return !retiring;  // (no flock here: read unprotected)
  }
  struct stat held {
  }, now{};  // retired between the open and the lock: another (or no) path
  if (::fstat(fd, &held) != 0 || ::stat(ckpt.c_str(), &now) != 0 || held.st_ino != now.st_ino ||
      held.st_dev != now.st_dev) {
    ::close(fd);
    return false;
  }
  reads[ckpt.string()] = fd;
  return true;
}

// Lets go of one checkpoint held by hold_for_reading (one skipped as damaged: a prune may take it).
void drop_hold(const fs::path& ckpt) {
  std::lock_guard<std::mutex> lock(reads_mu);
  if (auto it = reads.find(ckpt.string()); it != reads.end()) {
    ::close(it->second);
    reads.erase(it);
  }
}

std::optional<double> saved_val_loss(const fs::path& ckpt) {
  try {
    json j = json::parse(read_file((ckpt / "state.json").string()));
    if (j.contains("val_loss") && j["val_loss"].is_number()) return j["val_loss"].get<double>();
  } catch (const std::exception&) {  // a damaged checkpoint is nobody's best
  }
  return std::nullopt;
}

}  // namespace

}  // namespace checkpoint_dir

using namespace checkpoint_dir;

void prune_checkpoints(const std::string& run_dir, int64_t step, int64_t keep_last) {
  fs::path dir = fs::path(run_dir) / "checkpoints";
  if (!fs::is_directory(dir)) return;  // a resume into a new run.dir: none yet
  std::vector<Listed> kept, drop;
  std::error_code ec;
  for (Listed& c : list_checkpoints(run_dir)) {
    if (c.step <= step) {
      kept.push_back(c);
      continue;
    }
    fs::path to = dir / "abandoned" / c.dir.filename();
    fs::create_directories(to.parent_path(), ec);
    for (int n = 2; fs::exists(to, ec); ++n)  // an earlier abandoned one of the same step stays
      to = dir / "abandoned" / fmt::format("{}.{}", c.dir.filename().string(), n);
    fs::rename(c.dir, to, ec);
    if (ec) {
      drop.push_back(c);  // cannot move it aside: it must not be resumed, so it goes
      continue;
    }
    fmt::print(stderr,
               "warning: {} is from a continuation this run abandoned (it went back to step {}); "
               "moved to {}\n",
               c.dir.string(), step, to.string());
  }
  const Listed* best = nullptr;
  std::optional<double> best_loss;
  for (const Listed& c : kept) {
    std::optional<double> vl = saved_val_loss(c.dir);
    if (vl && (!best_loss || *vl < *best_loss)) {
      best = &c;
      best_loss = vl;
    }
  }
  if (best)
    write_file_atomic((dir / "best").string(), best->dir.filename().string() + "\n");
  else
    fs::remove(dir / "best", ec);
  if (keep_last > 0)
    for (size_t k = 0; k + keep_last < kept.size(); ++k)
      if (&kept[k] != best) drop.push_back(kept[k]);
  for (const Listed& c : drop) retire(c.dir);
  sync_path(dir, true);
}

std::string verify_checkpoint(const std::string& ckpt_dir, std::string* why) {
  auto bad = [&](const fs::path& p, const std::string& what) {
    if (why) *why = what;
    return p.string();
  };
  fs::path dir(ckpt_dir), mpath = dir / kManifest;
  std::error_code ec;
  if (!fs::exists(mpath, ec))
    return bad(mpath, "missing, so the checkpoint is incomplete (its save was interrupted)");
  json m;
  try {
    m = json::parse(read_file(mpath.string()));
  } catch (const std::exception& e) {
    return bad(mpath, fmt::format("unreadable ({})", e.what()));
  }
  if (!m.is_object() || m.value("format", "") != kManifestFormat || !m.contains("files") ||
      !m["files"].is_array())
    return bad(mpath, fmt::format("not a checkpoint manifest (expected format \"{}\" and files)",
                                  kManifestFormat));
  std::vector<fs::path> files;
  std::vector<std::string> sums;
  std::set<std::string> listed;
  for (const json& f : m["files"]) {
    bool ok = f.is_object() && f.contains("path") && f["path"].is_string() && f.contains("bytes") &&
              f["bytes"].is_number_unsigned() && f.contains("sha256") && f["sha256"].is_string() &&
              f["sha256"].get<std::string>().size() == 64;
    fs::path rel = ok ? fs::path(f["path"].get<std::string>()) : fs::path();
    if (!ok || rel.empty() || rel.is_absolute() ||
        std::find(rel.begin(), rel.end(), "..") != rel.end())
      return bad(mpath, fmt::format("malformed entry {}", f.dump()));
    fs::path p = dir / rel;
    uint64_t want = f["bytes"].get<uint64_t>();
    uint64_t size = fs::file_size(p, ec);
    if (ec) return bad(p, "missing (listed in manifest.json)");
    if (size != want) return bad(p, fmt::format("{} bytes, manifest.json says {}", size, want));
    files.push_back(p);
    sums.push_back(f["sha256"].get<std::string>());
    listed.insert(rel.generic_string());
  }
  // What loading reads must have been saved with it: state.json, and every tensor file (the
  // rank files are found by name, so one added later would be read unverified).
  if (!listed.count("state.json"))
    return bad(mpath, "lists no state.json; the checkpoint is corrupt");
  for (auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (e.is_regular_file(ec) && n.ends_with(".safetensors") && !listed.count(n))
      return bad(e.path(), "not listed in manifest.json (added after the save?); remove it");
  }
  std::vector<std::string> hex;
  try {
    hex = hash_files(files);
  } catch (const Error& e) {
    return bad(dir, e.what());
  }
  for (size_t i = 0; i < files.size(); ++i)
    if (hex[i] != sums[i])
      return bad(files[i], "contents differ from manifest.json (SHA-256 mismatch)");
  return "";
}

bool has_checkpoints(const std::string& run_dir) { return !list_checkpoints(run_dir).empty(); }

void release_checkpoint_reads() {
  std::lock_guard<std::mutex> lock(reads_mu);
  for (const auto& [dir, fd] : reads) ::close(fd);
  reads.clear();
}

namespace {
// The newest of one listing that verifies (""), or false when one was retired under the look
// and may_relist.
bool latest_of_listing(const std::string& run_dir, std::string* found, bool may_relist) {
  auto all = list_checkpoints(run_dir);
  std::vector<std::string> skipped;
  for (auto c = all.rbegin(); c != all.rend(); ++c) {
    std::error_code ec;
    if (!hold_for_reading(c->dir) && may_relist) return false;
    std::string why, bad = verify_checkpoint(c->dir.string(), &why);
    if (!bad.empty() && may_relist && !fs::exists(c->dir, ec)) return false;
    if (bad.empty()) {
      for (const std::string& w : skipped)
        fmt::print(stderr, "warning: {}; using {} instead\n", w, c->dir.filename().string());
      std::fflush(stderr);
      *found = c->dir.string();
      return true;
    }
    drop_hold(c->dir);
    skipped.push_back(
        fmt::format("{}: {}; skipping checkpoint {}", bad, why, c->dir.filename().string()));
  }
  if (!skipped.empty())
    fail(
        "{}; no valid checkpoint in {}/checkpoints ({} damaged); restore one or start a new "
        "run.dir",
        skipped.front(), run_dir, skipped.size());
  *found = "";
  return true;
}
}  // namespace

std::string find_latest_checkpoint(const std::string& run_dir) {
  // One retired by the run's trainer since it was listed (train.keep_last) is no damage: the
  // listing is taken again (bounded: a trainer saving faster than this verifies).
  for (int relist = 0;; ++relist) {
    std::string found;
    if (latest_of_listing(run_dir, &found, relist < 50)) return found;
  }
}

std::string resolve_checkpoint(const std::string& path) {
  std::error_code ec;
  if (fs::exists(fs::path(path) / "state.json", ec) || fs::exists(fs::path(path) / kManifest, ec)) {
    hold_for_reading(path);
    std::string why, bad = verify_checkpoint(path, &why);
    if (!bad.empty())
      fail(
          "{}: {}; checkpoint {} is damaged; use another one (a run directory picks its newest "
          "valid checkpoint)",
          bad, why, path);
    return path;
  }
  std::string latest = find_latest_checkpoint(path);
  if (latest.empty())
    fail(
        "{}: no checkpoint here (expected a checkpoint directory with state.json, or a run "
        "directory with checkpoints/step-*); train first or check the path",
        path);
  return latest;
}

}  // namespace lmforge
