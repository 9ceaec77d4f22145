#include "lmforge/core/leftovers.h"

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <set>
#include <vector>

namespace lmforge {

namespace fs = std::filesystem;

namespace {
std::mutex g_mutex;
std::set<std::string> g_temps;
std::vector<std::string> g_made;  // in the order made: parents before children
}  // namespace

void note_temp(const std::string& tmp, const std::function<void()>& make) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_temps.insert(tmp);
  if (make) make();
}

void forget_temp(const std::string& tmp) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_temps.erase(tmp);
}

void make_directories(const std::string& path) {
  // One component at a time, remembering those this call made (one another process made
  // meanwhile is not ours to remove), under the lock as note_temp's make.
  std::lock_guard<std::mutex> lock(g_mutex);
  fs::path sofar;
  for (const fs::path& part : fs::path(path).lexically_normal()) {
    sofar /= part;
    if (part.empty() || sofar == sofar.root_path()) continue;
    try {
      if (fs::create_directory(sofar)) g_made.push_back(sofar.string());
    } catch (const fs::filesystem_error& e) {
      throw fs::filesystem_error("create_directories", fs::path(path), e.code());
    }
  }
}

int remove_leftovers(bool for_exit) {
  std::unique_lock<std::mutex> lock(g_mutex);
  int removed = 0;
  std::error_code ec;
  for (const std::string& t : g_temps)
    if (fs::exists(fs::symlink_status(t, ec))) removed += fs::remove_all(t, ec) > 0 ? 1 : 0;
  g_temps.clear();
  for (auto it = g_made.rbegin(); it != g_made.rend(); ++it)
    if (fs::is_directory(*it, ec) && fs::is_empty(*it, ec)) removed += fs::remove(*it, ec) ? 1 : 0;
  g_made.clear();
  if (for_exit) lock.release();  // held until the process ends
  return removed;
}

}  // namespace lmforge
