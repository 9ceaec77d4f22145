#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "lmforge/core/error.h"
#include "lmforge/data/shard.h"
#include "lmforge/data/text_shards.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "testing/paths.h"
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
  std::string e;
  {
    std::string bytes = testing::slurp(dir + "/ok.bin");
    bytes[0] = 'X';
    std::ofstream(dir + "/magic.bin", std::ios::binary) << bytes;
  }
  EXPECT_NE(error_of(dir + "/magic.bin").find("bad magic"), std::string::npos);
  {  // raw bytes in the fingerprint field: named, not printed
    std::string bytes = testing::slurp(dir + "/ok.bin");
    bytes[48] = '\xff';
    std::ofstream(dir + "/fingerprint.bin", std::ios::binary) << bytes;
  }
  e = error_of(dir + "/fingerprint.bin");
  EXPECT_NE(e.find("fingerprint (bytes 48-63) is not ASCII"), std::string::npos) << e;
  EXPECT_EQ(e.find('\xff'), std::string::npos);
  std::filesystem::copy_file(dir + "/ok.bin", dir + "/short.bin");
  std::filesystem::resize_file(dir + "/short.bin", kShardHeaderBytes + 150);
  e = error_of(dir + "/short.bin");
  EXPECT_NE(e.find("header says 100 tokens"), std::string::npos) << e;
  EXPECT_NE(e.find("short.bin"), std::string::npos) << e;
  std::ofstream(dir + "/tiny.bin") << "LMF";
  EXPECT_NE(error_of(dir + "/tiny.bin").find("not a token shard"), std::string::npos);
  EXPECT_NE(error_of(dir + "/none.bin").find("cannot open"), std::string::npos);
  EXPECT_THROW(expand_shards(dir + "/nothing*", "data.train"), Error);
  // A progress.json that is not prepare's (another tool's) is none of the loader's business.
  for (const char* other : {"{\"complete\": 0.75}", "{\"complete\": false}", "[1]"}) {
    std::ofstream(dir + "/progress.json") << other;
    EXPECT_EQ(expand_shards(dir + "/ok.bin", "data.train").size(), 1u) << other;
  }
}

// A prepared source's directory gives the key's split; a glob over both splits is refused (the
// validation documents would be trained on), a glob of one split is taken.
TEST(Shard, AGlobOverBothSplitsOfAPreparedSourceIsRefused) {
  std::string dir = testing::temp_dir("shard-splits");
  for (const char* name : {"train-00000.bin", "train-00001.bin", "val-00000.bin"})
    write_shard(dir + "/" + name, std::vector<uint32_t>(10, 1));
  EXPECT_EQ(expand_shards(dir, "data.train").size(), 2u);
  EXPECT_EQ(expand_shards(dir, "data.val").size(), 1u);
  EXPECT_EQ(expand_shards(dir + "/train-*.bin", "data.train").size(), 2u);
  EXPECT_EQ(expand_shards(dir + "/val-*", "data.train").size(), 1u);  // asked for by name
  for (const char* key : {"data.train", "data.val"}) {
    try {
      expand_shards(dir + "/*.bin", key);
      ADD_FAILURE() << key << ": a glob over both splits was taken";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("matches both train-*.bin and val-*.bin"),
                std::string::npos)
          << e.what();
    }
  }
}

// The document index is checked whole: an entry in the middle past the tokens, or going back,
// would make the loader read past the mapped file. 2-byte tokens leave the index unaligned
// (N odd): it still reads back.
TEST(Shard, DocumentIndexIsCheckedWholeAndReadUnaligned) {
  std::string dir = testing::temp_dir("shard-index");
  std::vector<uint32_t> toks = {1, 2, 3, 4, 5, 6, 7};  // u16, 7 tokens: index at an odd offset
  write_shard(dir + "/ok.bin", toks, {0, 3, 5});
  TokenShard ok = TokenShard::open(dir + "/ok.bin");
  ASSERT_EQ(ok.num_docs(), 3);
  EXPECT_EQ(ok.doc_start(1), 3);
  EXPECT_EQ(ok.doc_start(2), 5);
  EXPECT_EQ(ok.doc_start(3), 7);
  const std::string bytes = testing::slurp(dir + "/ok.bin");
  const size_t index = kShardHeaderBytes + 2 * toks.size();
  ASSERT_EQ(bytes.size(), index + 4 * 8);
  auto with_entry = [&](const std::string& name, int d, uint64_t v) {
    std::string b = bytes;
    std::memcpy(b.data() + index + 8 * d, &v, 8);
    std::ofstream(dir + "/" + name, std::ios::binary) << b;
    return dir + "/" + name;
  };
  std::string e = error_of(with_entry("past.bin", 1, 10000000));
  EXPECT_NE(e.find("document 1 of the index starts at token 10000000"), std::string::npos) << e;
  EXPECT_NE(e.find("past.bin"), std::string::npos) << e;
  e = error_of(with_entry("back.bin", 2, 2));
  EXPECT_NE(e.find("document 2 of the index starts at token 2 (after 3"), std::string::npos) << e;
}

// Labelled responses (KTO): a label byte per document after the loss mask, read back; a label
// other than 0 or 1, or a label block cut off, is a corrupt shard.
TEST(Shard, LabelsFollowTheMaskAndAreChecked) {
  std::string dir = testing::temp_dir("shard-labels");
  {
    ShardWriter w(dir + "/ok.bin", {}, 2, /*loss_mask=*/true, /*paired=*/false,
                  /*labelled=*/true);
    const int32_t a[] = {5, 6, 7}, b[] = {8, 9};
    const uint8_t ma[] = {0, 1, 1}, mb[] = {0, 1};
    w.begin_document(true);
    w.append(a, 3, ma);
    w.begin_document(false);
    w.append(b, 2, mb);
    w.commit();
  }
  TokenShard ok = TokenShard::open(dir + "/ok.bin");
  ASSERT_TRUE(ok.labelled());
  EXPECT_FALSE(ok.paired());
  ASSERT_EQ(ok.num_docs(), 2);
  EXPECT_EQ(ok.label(0), 1);
  EXPECT_EQ(ok.label(1), 0);
  EXPECT_FALSE(ok.is_target(0));
  EXPECT_TRUE(ok.is_target(4));
  const std::string bytes = testing::slurp(dir + "/ok.bin");
  ASSERT_EQ(bytes.size(), kShardHeaderBytes + 5 * 2 + 3 * 8 + 1 + 2);
  {
    std::string b = bytes;
    b.back() = 7;
    std::ofstream(dir + "/label.bin", std::ios::binary) << b;
  }
  std::string e = error_of(dir + "/label.bin");
  EXPECT_NE(e.find("document 1 has label 7"), std::string::npos) << e;
  std::ofstream(dir + "/cut.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 1);
  e = error_of(dir + "/cut.bin");
  EXPECT_NE(e.find("truncated or corrupt"), std::string::npos) << e;
  {
    std::string b = bytes;
    const uint32_t flags = 4;  // labels without the loss mask
    std::memcpy(b.data() + 80, &flags, 4);
    std::ofstream(dir + "/flags.bin", std::ios::binary) << b;
  }
  e = error_of(dir + "/flags.bin");
  EXPECT_NE(e.find("labelled responses needs a loss mask"), std::string::npos) << e;
}

// data.text's shard is the file's encoding as one text (the tokenizer's own encoding is checked
// against tiktoken in test_tokenizer_reference): encoded in chunks cut at newlines, a blank line
// at a chunk's edge became two tokens ("?\n", "\n" for cl100k's "?\n\n").
TEST(TextShards, HoldTheFileEncodedAsOneText) {
  std::string dir = testing::temp_dir("text-shards");
  setenv("LMFORGE_CACHE", (dir + "/cache").c_str(), 1);
  std::string text;
  for (int i = 0; text.size() < (5u << 19); ++i)
    text += fmt::format("And he said unto him {}, Where art thou?\n\n", i);
  std::ofstream(dir + "/text.txt") << text;
  auto tok = load_tokenizer(testing::shared_tokenizers_dir() + "/cl100k_base.tiktoken");
  TextShards shards = shards_from_text(dir + "/text.txt", 0.0, *tok);
  unsetenv("LMFORGE_CACHE");
  std::vector<int32_t> want = tok->encode(text);
  want.push_back(tok->eos_id());
  TokenShard got = TokenShard::open(shards.train);
  ASSERT_EQ(got.size(), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(got[static_cast<int64_t>(i)], static_cast<uint32_t>(want[i])) << "token " << i;
}

// data.val_fraction holds out the text's last share from a line's start, where one is near: a
// text of few long lines held out ~all of it (a title, then one 200 kB line: 7 training tokens).
TEST(TextShards, TheHeldOutShareStartsAtALineNearTheCut) {
  std::string lines;
  for (int i = 0; i < 1000; ++i) lines += fmt::format("line {:04d} of the text\n", i);  // 22 B
  const size_t cut = held_out_cut(lines, 0.05);
  EXPECT_EQ(cut, lines.size() - 1100);  // exactly 50 lines held out: the cut is a line start
  EXPECT_EQ(lines[cut - 1], '\n');
  EXPECT_EQ(held_out_cut(lines, 0.0), lines.size());
  // 5% of 10 kB, 25 bytes past a line's start: that start (within half the share).
  std::string near = std::string(9474, 'a') + "\n" + std::string(525, 'b');
  EXPECT_EQ(held_out_cut(near, 0.05), 9475u);
  // One long line after a title: ~5% held out, cut mid-line at a character's start (é is two
  // bytes: the cut never splits it).
  std::string title = "Title\n";
  for (int i = 0; i < 50000; ++i) title += "\xC3\xA9";  // é
  const size_t c = held_out_cut(title, 0.05);
  EXPECT_NEAR(static_cast<double>(title.size() - c), 0.05 * title.size(), 2.0);
  EXPECT_EQ(static_cast<unsigned char>(title[c]), 0xC3u);
  // Text that is not UTF-8 (bytes 0x80-0xBF throughout): at most 3 bytes back, not to the start.
  const std::string binary(10000, '\x80');
  EXPECT_GE(held_out_cut(binary, 0.05), 9500u - 3);
}

}  // namespace lmforge
