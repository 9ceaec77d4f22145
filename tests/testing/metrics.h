// Reads a run's metrics.jsonl in tests.
#pragma once

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "testing/process.h"

namespace lmforge::testing {

// The records of `path` (a metrics.jsonl) that carry `key`, in file order.
inline std::vector<nlohmann::json> records_of(const std::string& path, const std::string& key) {
  std::vector<nlohmann::json> out;
  std::istringstream in(slurp(path));
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains(key)) out.push_back(j);
  }
  return out;
}

}  // namespace lmforge::testing
