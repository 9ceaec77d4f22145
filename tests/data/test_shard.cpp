#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "lmforge/core/error.h"
#include "lmforge/data/shard.h"
#include "testing/process.h"

namespace lmforge {

namespace {
std::string error_of(const std::string& path) {
  try {
    TokenShard::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Shard, RoundTripsU16AndU32) {
  std::string dir = testing::temp_dir("shard");
  std::vector<uint32_t> small = {0, 1, 65535, 256, 7}, big = {0, 70000, 128255, 3};
  write_shard(dir + "/a.bin", small);
  write_shard(dir + "/b.bin", big);
  TokenShard a = TokenShard::open(dir + "/a.bin"), b = TokenShard::open(dir + "/b.bin");
  EXPECT_EQ(std::filesystem::file_size(dir + "/a.bin"), kShardHeaderBytes + 2 * small.size());
  EXPECT_EQ(std::filesystem::file_size(dir + "/b.bin"), kShardHeaderBytes + 4 * big.size());
  ASSERT_EQ(a.size(), 5);
  ASSERT_EQ(b.size(), 4);
  for (size_t i = 0; i < small.size(); ++i) EXPECT_EQ(a[i], small[i]);
  for (size_t i = 0; i < big.size(); ++i) EXPECT_EQ(b[i], big[i]);
  EXPECT_EQ(b.max_token(), 128255u);
  EXPECT_EQ(expand_shards(dir, "data.train").size(), 2u);
  EXPECT_EQ(expand_shards(dir + "/a*", "data.train").size(), 1u);
}

TEST(Shard, BadMagicSizeMismatchAndMissingFileAreClearErrors) {
  std::string dir = testing::temp_dir("shard-bad");
  write_shard(dir + "/ok.bin", std::vector<uint32_t>(100, 5));
  {
    std::string bytes = testing::slurp(dir + "/ok.bin");
    bytes[0] = 'X';
    std::ofstream(dir + "/magic.bin", std::ios::binary) << bytes;
  }
  EXPECT_NE(error_of(dir + "/magic.bin").find("bad magic"), std::string::npos);
  std::filesystem::copy_file(dir + "/ok.bin", dir + "/short.bin");
  std::filesystem::resize_file(dir + "/short.bin", kShardHeaderBytes + 150);
  std::string e = error_of(dir + "/short.bin");
  EXPECT_NE(e.find("header says 100 tokens"), std::string::npos) << e;
  EXPECT_NE(e.find("short.bin"), std::string::npos) << e;
  std::ofstream(dir + "/tiny.bin") << "LMF";
  EXPECT_NE(error_of(dir + "/tiny.bin").find("not a token shard"), std::string::npos);
  EXPECT_NE(error_of(dir + "/none.bin").find("cannot open"), std::string::npos);
  EXPECT_THROW(expand_shards(dir + "/nothing*", "data.train"), Error);
}

}  // namespace lmforge
