// A full disk during `lmforge prepare`: simulated with a file-size limit (RLIMIT_FSIZE via the
// shell's ulimit, SIGXFSZ ignored, so writes fail as they would with ENOSPC). The run must stop
// with one clear line and exit 1, leave no temporary file behind, and a re-run with space must
// finish and produce exactly what an uninterrupted run produces.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "lmforge/data/text_shards.h"
#include "testing/process.h"

namespace lmforge {
namespace {

namespace fs = std::filesystem;

std::map<std::string, std::string> tree(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file())
      out[fs::relative(e.path(), dir).string()] = testing::slurp(e.path().string());
  return out;
}

TEST(PrepareDiskFull, StopsCleanlyAndResumesToTheSameBytes) {
  std::string dir = testing::temp_dir("prepare-disk-full");
  // The demo corpus as many documents: a blank line after every 20 lines (~2.4 MB of text).
  std::istringstream kjv(testing::slurp(demo_corpus_path()));
  std::ofstream in(dir + "/in.txt");
  int n = 0;
  for (std::string line; std::getline(kjv, line) && n < 60000; ++n)
    in << line << (n % 20 == 19 ? "\n\n" : "\n");
  in.close();
  const std::string args =
      "prepare --input in.txt --tokenizer byte --text-mode blank_line --shard-tokens 200000 "
      "--output ";
  auto full = testing::run_lmforge(args + "reference", dir);
  ASSERT_EQ(full.exit_code, 0) << full.err;

  // 300 KiB per file: enough for the small files, not for a 200k-token (400 KB) train shard.
  std::string cmd = "cd '" + dir + "' && bash -c \"ulimit -f 300; trap '' XFSZ; exec '" +
                    testing::lmforge_bin() + "' " + args + "out\" >out.log 2>err.log";
  int status = std::system(cmd.c_str());
  EXPECT_NE(status, 0);
  std::string err = testing::slurp(dir + "/err.log");
  EXPECT_NE(err.find("write failed"), std::string::npos) << err;
  // (the limit it hit named: EFBIG, where a full disk's ENOSPC says the disk is full)
  EXPECT_NE(err.find("file-size limit (ulimit -f)"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  // The first shard failed: nothing is left, not even the (empty) directories prepare made.
  EXPECT_FALSE(std::filesystem::exists(dir + "/out"));

  auto again = testing::run_lmforge(args + "out", dir);
  ASSERT_EQ(again.exit_code, 0) << again.err;
  auto a = tree(dir + "/reference"), b = tree(dir + "/out");
  a.erase("summary.json");  // timings differ
  b.erase("summary.json");
  ASSERT_EQ(a.size(), b.size());
  for (auto& [name, bytes] : a) EXPECT_TRUE(b[name] == bytes) << name;
}

}  // namespace
}  // namespace lmforge
