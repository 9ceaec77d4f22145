// TensorBoard event files (train/tensorboard.h) and MetricsWriter's use of them: CRC-32C against
// published vectors, the record framing, the hand-encoded Event bytes, and truncation on resume.
// tests/train/test_tensorboard_reference.cpp reads the files back with TensorBoard itself.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "lmforge/train/metrics.h"
#include "lmforge/train/tensorboard.h"
#include "testing/metrics.h"
#include "testing/process.h"

namespace lmforge {
namespace {

namespace fs = std::filesystem;

std::vector<fs::path> events_files(const std::string& run_dir) {
  std::vector<fs::path> v;
  for (const auto& e : fs::directory_iterator(run_dir + "/tb")) v.push_back(e.path());
  std::sort(v.begin(), v.end());
  return v;
}

// The records of a TFRecord file, checking the framing of each.
std::vector<std::string> records(const std::string& path) {
  std::string s = testing::slurp(path);
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    uint64_t len;
    uint32_t len_crc, data_crc;
    EXPECT_GE(s.size() - i, 16u);
    std::memcpy(&len, s.data() + i, 8);
    std::memcpy(&len_crc, s.data() + i + 8, 4);
    EXPECT_EQ(len_crc, masked_crc32c(s.data() + i, 8));
    std::string data = s.substr(i + 12, len);
    std::memcpy(&data_crc, s.data() + i + 12 + len, 4);
    EXPECT_EQ(data_crc, masked_crc32c(data.data(), data.size()));
    out.push_back(data);
    i += 16 + len;
  }
  return out;
}

template <typename T>
std::string bytes_of(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

TEST(Crc32c, KnownVectors) {
  // The check value of CRC-32C, and the iSCSI test vectors of RFC 3720, appendix B.4.
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(crc32c(""), 0u);
  EXPECT_EQ(crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string inc, dec;
  for (int i = 0; i < 32; ++i) inc += static_cast<char>(i), dec += static_cast<char>(31 - i);
  EXPECT_EQ(crc32c(inc), 0x46DD794Eu);
  EXPECT_EQ(crc32c(dec), 0x113FDB5Cu);
  // Incremental use continues a running value.
  EXPECT_EQ(crc32c("56789", 5, crc32c("1234", 4)), 0xE3069283u);
}

TEST(Crc32c, MaskIsRotateAndAdd) {
  uint32_t c = crc32c("123456789");
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TfRecord, Framing) {
  std::string r = tfrecord("abc");
  ASSERT_EQ(r.size(), 3u + 16u);
  EXPECT_EQ(r.substr(0, 8), bytes_of<uint64_t>(3));
  EXPECT_EQ(r.substr(8, 4), bytes_of(masked_crc32c(r.data(), 8)));
  EXPECT_EQ(r.substr(12, 3), "abc");
  EXPECT_EQ(r.substr(15, 4), bytes_of(masked_crc32c("abc", 3)));
}

TEST(TensorBoardWriter, EncodesEventsByHand) {
  std::string dir = testing::temp_dir("tb-encode");
  std::string path;
  {
    TensorBoardWriter tb(dir);
    path = tb.path();
    tb.scalar("loss", 300, 2.5, 1700000000.25);
    tb.scalar("x", -1, -1.0, 1.0);
    tb.flush();
  }
  std::string name = fs::path(path).filename().string();
  EXPECT_EQ(fs::path(path).parent_path(), fs::path(dir + "/tb"));
  EXPECT_TRUE(name.starts_with("events.out.tfevents.")) << name;
  EXPECT_TRUE(name.ends_with(fmt::format(".{}.lmforge", getpid()))) << name;
  EXPECT_EQ(name[30], '.') << name;  // 10 digits of Unix time, so names sort by creation

  auto recs = records(path);
  ASSERT_EQ(recs.size(), 3u);
  // Event{wall_time (1, fixed64), file_version (3, bytes) "brain.Event:2"}
  EXPECT_EQ(recs[0][0], '\x09');
  EXPECT_EQ(recs[0].substr(9),
            "\x1a\x0d"
            "brain.Event:2");
  // Event{wall_time, step (2, varint) 300 = ac 02, summary (5){value (1){tag (1) "loss",
  // simple_value (2, fixed32) 2.5f}}}
  std::string want = "\x09" + bytes_of(1700000000.25) + "\x10\xac\x02" + "\x2a\x0d" + "\x0a\x0b" +
                     "\x0a\x04loss" + "\x15" + bytes_of(2.5f);
  EXPECT_EQ(recs[1], want);
  // A negative step is a 10-byte varint (two's complement).
  std::string neg = "\x09" + bytes_of(1.0) + "\x10" + std::string(9, '\xff') + "\x01" +
                    "\x2a\x0a\x0a\x08\x0a\x01x\x15" + bytes_of(-1.0f);
  EXPECT_EQ(recs[2], neg);
}

TEST(TensorBoardWriter, TruncateAfterDropsLaterStepsAndATornTail) {
  std::string dir = testing::temp_dir("tb-truncate");
  std::string path;
  {
    TensorBoardWriter tb(dir);
    path = tb.path();
    for (int s = 1; s <= 10; ++s) tb.scalar("loss", s, s * 0.5, 1.0);
  }
  {  // a crash in the middle of a record
    std::FILE* f = std::fopen(path.c_str(), "ab");
    std::string r = tfrecord("0123456789");
    std::fwrite(r.data(), 1, 9, f);
    std::fclose(f);
  }
  tensorboard_truncate_after(dir, 4);
  auto recs = records(path);
  ASSERT_EQ(recs.size(), 5u);  // file_version + steps 1..4
  EXPECT_NE(recs[0].find("brain.Event:2"), std::string::npos);
  EXPECT_EQ(recs[4].substr(9, 2), "\x10\x04");
  // Nothing after the step: the file is left as it is.
  auto before = fs::last_write_time(path);
  tensorboard_truncate_after(dir, 100);
  EXPECT_EQ(records(path).size(), 5u);
  EXPECT_EQ(fs::last_write_time(path), before);
  tensorboard_truncate_after(testing::temp_dir("tb-none"), 1);  // no tb/: nothing to do
}

// metrics.jsonl on resume: records past the step, and a torn last line, are cut; with nothing to
// cut the file stays the same file (a `tail -f` of it follows the resumed run).
// Readers load a run's events files in name order: a resume's file sorts after the files already
// there even when its time in the name would not (within the same second a smaller pid, as pids
// wrap, sorted it first and TensorBoard read the resumed steps before the first ones).
TEST(TensorBoardWriter, ANewFileSortsAfterTheRunsFiles) {
  const std::string dir = testing::temp_dir("tb-order");
  fs::create_directories(dir + "/tb");
  const int64_t later = static_cast<int64_t>(std::time(nullptr)) + 100;
  const std::string before = fmt::format("events.out.tfevents.{:010d}.host.99999.lmforge", later);
  std::ofstream(dir + "/tb/" + before).flush();
  // Not the run's: other names, a time that would take 11 digits.
  for (const char* other : {"abcdefgh9999999999_tfevents", "events.out.tfevents.9999999999.h.1"})
    std::ofstream(dir + "/tb/" + other).flush();
  const TensorBoardWriter w(dir);
  EXPECT_GT(fs::path(w.path()).filename().string(), before);
  EXPECT_NE(w.path().find(fmt::format(".{:010d}.", later + 1)), std::string::npos) << w.path();
}

TEST(MetricsWriter, TruncateAfterKeepsTheFileWhenNothingIsCut) {
  const std::string dir = testing::temp_dir("metrics-truncate");
  const std::string path = dir + "/metrics.jsonl";
  std::ofstream(path) << "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"loss\": 1}\n";
  struct stat before {
  }, after{};
  ASSERT_EQ(::stat(path.c_str(), &before), 0);
  MetricsWriter::truncate_after(path, 2);
  ASSERT_EQ(::stat(path.c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);
  std::ofstream(path, std::ios::app) << "{\"step\": 3, \"lo";  // torn
  MetricsWriter::truncate_after(path, 2);
  EXPECT_EQ(testing::slurp(path), "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"loss\": 1}\n");
  MetricsWriter::truncate_after(path, 1);
  EXPECT_EQ(testing::slurp(path), "{\"step\": 1, \"loss\": 2}\n");

  // Read a line at a time: a history over the copy's 1 MiB blocks, a record kept after one cut
  // (steps out of order), a whole last line without its newline (kept, with one).
  std::string history;
  for (int s = 1; s <= 40000; ++s) history += fmt::format("{{\"step\": {}, \"loss\": 1.5}}\n", s);
  std::ofstream(path) << history << "{\"step\": 50000}\n{\"note\": \"x\"}\n{\"step\": 7}";
  MetricsWriter::truncate_after(path, 40000);
  EXPECT_TRUE(testing::slurp(path) == history + "{\"note\": \"x\"}\n{\"step\": 7}\n");
  std::ofstream(path, std::ios::app) << "{\"step\": 8}";  // the only change: its newline
  MetricsWriter::truncate_after(path, 40000);
  EXPECT_TRUE(testing::slurp(path) ==
              history + "{\"note\": \"x\"}\n{\"step\": 7}\n{\"step\": 8}\n");
}

TEST(MetricsWriter, LogsEveryNumericFieldToTensorBoard) {
  std::string dir = testing::temp_dir("metrics-tb");
  {
    MetricsWriter m(dir + "/metrics.jsonl", dir);
    m.write({{"step", 1},
             {"loss", 3.0},
             {"lr", 1e-3},
             {"tokens", 4096},
             {"note", "text"},
             {"skipped", true}});
    m.write({{"step", 1}, {"val_loss", 3.5}});
    m.write({{"loss", 1.0}});  // no step: metrics.jsonl only
  }
  EXPECT_EQ(testing::records_of(dir + "/metrics.jsonl", "loss").size(), 2u);
  auto files = events_files(dir);
  ASSERT_EQ(files.size(), 1u);
  auto recs = records(files[0].string());
  ASSERT_EQ(recs.size(), 1u + 4u);  // file_version; loss, lr, tokens, val_loss
  std::vector<std::string> tags;
  for (size_t i = 1; i < recs.size(); ++i) {
    // wall_time (9 bytes), step 1 (2), Event.summary (2), Summary.value (2), Value.tag: 0a len
    const std::string& r = recs[i];
    ASSERT_EQ(r.substr(9, 2), "\x10\x01");
    ASSERT_EQ(r[15], '\x0a');
    tags.push_back(r.substr(17, static_cast<unsigned char>(r[16])));
  }
  std::sort(tags.begin(), tags.end());
  EXPECT_EQ(tags, (std::vector<std::string>{"loss", "lr", "tokens", "val_loss"}));

  // Plain MetricsWriter: no TensorBoard; resume truncation and remove() reach the events too.
  { MetricsWriter plain(dir + "/other.jsonl"); }
  EXPECT_EQ(events_files(dir).size(), 1u);
  MetricsWriter::truncate_after(dir + "/metrics.jsonl", 0);
  EXPECT_EQ(records(files[0].string()).size(), 1u);
  MetricsWriter::remove(dir + "/metrics.jsonl");
  EXPECT_FALSE(fs::exists(dir + "/metrics.jsonl"));
  EXPECT_TRUE(events_files(dir).empty());
}

}  // namespace
}  // namespace lmforge
