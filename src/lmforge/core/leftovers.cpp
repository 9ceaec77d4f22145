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

void note_temp(const std::string& tmp) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_temps.insert(tmp);
}

void forget_temp(const std::string& tmp) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_temps.erase(tmp);
}

void make_directories(const std::string& path) {
  std::vector<fs::path> missing;  // from the deepest up
  std::error_code ec;
  for (fs::path p = fs::path(path).lexically_normal(); !p.empty() && !fs::exists(p, ec);
       p = p.parent_path()) {
    missing.push_back(p);
    if (p == p.parent_path()) break;
  }
  fs::create_directories(path);  // (throws filesystem_error naming the path)
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) g_made.push_back(it->string());
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
