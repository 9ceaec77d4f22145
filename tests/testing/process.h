// Runs the lmforge binary (path from $LMFORGE_BIN, set by CTest) and captures its result.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "testing/paths.h"

namespace lmforge::testing {

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Corrupts one byte of a file in place (flips its low bit), as a bad disk or a torn copy would.
inline void flip_bit(const std::string& path, uint64_t at) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(at));
  f.put(static_cast<char>(c ^ 0x01));
}

// The directories temp_dir() made in this process, removed when its tests end if they all passed
// (a failure keeps them to look at). Runs of the whole suite no longer pile up gigabytes under
// /tmp.
class TempDirs : public ::testing::Environment {
 public:
  static TempDirs& get() {
    static TempDirs* self = [] {
      auto* t = new TempDirs;
      ::testing::AddGlobalTestEnvironment(t);  // gtest owns it
      return t;
    }();
    return *self;
  }
  void add(const std::filesystem::path& dir) { dirs_.push_back(dir); }
  void TearDown() override {
    if (!::testing::UnitTest::GetInstance()->Passed()) return;
    std::error_code ec;
    for (const auto& d : dirs_) std::filesystem::remove_all(d, ec);
  }

 private:
  std::vector<std::filesystem::path> dirs_;
};

// A fresh, empty directory under the system temp dir, unique per test; removed at the end of the
// process when every test passed.
inline std::string temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("lmforge-test-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  TempDirs::get().add(dir);
  return dir.string();
}

// A tiny byte-level run on the demo corpus, as several tests start one (one block of gpt2-tiny,
// batch 2 x 32, no evaluation or sample): add its steps, saves and run.dir.
inline constexpr const char* kByteDemoTrain =
    "train --set model.preset=gpt2-tiny --set model.n_layer=1 --set model.vocab_size=257 "
    "--set data.text=demo:kjv --set data.tokenizer=byte --set train.batch_size=2 "
    "--set train.seq_len=32 --set train.eval_every=0 --set sample.prompt= ";

// args are appended to the binary verbatim (quote them yourself); runs in `cwd`. `launcher`
// (e.g. "srun -n 2") goes before the binary.
inline RunResult run_lmforge(const std::string& args, const std::string& cwd,
                             const std::string& launcher = "") {
  std::string bin = lmforge_bin();
  std::string out = cwd + "/.stdout", err = cwd + "/.stderr";
  std::string cmd = "cd '" + cwd + "' && " + launcher + " '" + bin + "' " + args + " >'" + out +
                    "' 2>'" + err + "'";
  int status = std::system(cmd.c_str());
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

}  // namespace lmforge::testing
