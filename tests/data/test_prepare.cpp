// lmforge prepare: round trip, determinism across thread counts, resume after interruption,
// and the poisoned-corpus policy (counts per reason; output equals the clean documents').
#include <gtest/gtest.h>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/data/prepare.h"
#include "lmforge/data/shard.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "testing/errors.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string gpt2() { return testing::shared_tokenizers_dir() + "/gpt2.tiktoken"; }

// Deterministic English-like documents with some Unicode.
std::vector<std::string> make_docs(int n) {
  std::vector<std::string> words = {"the",  "LORD",   "said",   "unto", "Moses,",
                                    "and",  "Aaron;", "behold", "café", "naïve",
                                    "日本", "🎉",      "\n",     "123",  "  "};
  std::vector<std::string> docs;
  uint64_t x = 7;
  for (int i = 0; i < n; ++i) {
    std::string d = "Doc " + std::to_string(i) + ":";
    int len = 5 + static_cast<int>(x % 200);
    for (int k = 0; k < len; ++k) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      d += " " + words[(x >> 33) % words.size()];
    }
    docs.push_back(d);
  }
  return docs;
}

void write_jsonl(const std::string& path, const std::vector<std::string>& docs) {
  std::ofstream f(path, std::ios::binary);
  for (auto& d : docs) f << json{{"text", d}}.dump() << "\n";
}

PrepareOptions options(const std::string& in, const std::string& out) {
  PrepareOptions o;
  o.sources = {{"src", {in}, {}}};
  o.output = out;
  o.tokenizer = gpt2();
  o.shard_tokens = 4000;
  o.val_fraction = 0.2;
  o.progress = false;
  return o;
}

// The .bin files of a prepared source, name -> bytes.
std::map<std::string, std::string> shard_files(const std::string& dir) {
  std::map<std::string, std::string> m;
  for (auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".bin") m[e.path().filename().string()] = testing::slurp(e.path());
  return m;
}

// Documents of one split, decoded, in order (BOS/EOS removed).
std::vector<std::string> decode_split(const std::string& dir, const std::string& split,
                                      const Tokenizer& tok) {
  std::vector<std::string> out;
  for (auto& [name, bytes] : shard_files(dir)) {
    if (!name.starts_with(split)) continue;
    TokenShard s = TokenShard::open(dir + "/" + name);
    EXPECT_EQ(s.tokenizer().fingerprint, tok.fingerprint());
    for (int64_t d = 0; d < s.num_docs(); ++d) {
      std::vector<int32_t> ids;
      for (int64_t i = s.doc_start(d); i < s.doc_start(d + 1); ++i) ids.push_back(s[i]);
      EXPECT_EQ(ids.back(), tok.eos_id());
      ids.pop_back();
      out.push_back(tok.decode(ids));
    }
  }
  return out;
}

}  // namespace

TEST(Prepare, RoundTripsAndIsIdenticalForOneAndTwoThreads) {
  std::string dir = testing::temp_dir("prepare-rt");
  auto docs = make_docs(400);
  fs::create_directories(dir + "/in");
  write_jsonl(dir + "/in/a.jsonl", std::vector<std::string>(docs.begin(), docs.begin() + 200));
  write_jsonl(dir + "/in/b.jsonl", std::vector<std::string>(docs.begin() + 200, docs.end()));
  ASSERT_EQ(std::system(("gzip -k '" + dir + "/in/b.jsonl' && mv '" + dir + "/in/b.jsonl.gz' '" +
                         dir + "/in/c.jsonl.gz'")
                            .c_str()),
            0);
  ASSERT_EQ(
      std::system(("zstd -q '" + dir + "/in/b.jsonl' -o '" + dir + "/in/d.jsonl.zst'").c_str()), 0);
  omp_set_num_threads(2);
  json summary = run_prepare(options(dir + "/in", dir + "/out2"));
  omp_set_num_threads(1);
  run_prepare(options(dir + "/in", dir + "/out1"));
  omp_set_num_threads(2);
  auto two = shard_files(dir + "/out2/src"), one = shard_files(dir + "/out1/src");
  EXPECT_GT(two.size(), 4u);  // several train and val shards
  EXPECT_EQ(two, one);

  // a.jsonl, b.jsonl, c.jsonl.gz, d.jsonl.zst in order: docs, docs[200:], docs[200:], docs[200:]
  std::vector<std::string> all(docs);
  for (int r = 0; r < 2; ++r) all.insert(all.end(), docs.begin() + 200, docs.end());
  auto tok = load_tokenizer(gpt2());
  auto train = decode_split(dir + "/out2/src", "train", *tok);
  auto val = decode_split(dir + "/out2/src", "val", *tok);
  EXPECT_EQ(train.size() + val.size(), all.size());
  EXPECT_GT(val.size(), all.size() / 10);
  size_t t = 0, v = 0;
  for (const std::string& d : all) {  // each document is the next one of its split
    if (t < train.size() && train[t] == d)
      ++t;
    else if (v < val.size() && val[v] == d)
      ++v;
    else
      FAIL() << "document not found in order: " << d.substr(0, 40);
  }
  EXPECT_EQ(summary["sources"]["src"]["documents"]["train"].get<size_t>(), train.size());
}

TEST(Prepare, ResumesAfterAnInterruptionToTheSameBytes) {
  std::string dir = testing::temp_dir("prepare-resume");
  write_jsonl(dir + "/in.jsonl", make_docs(600));
  run_prepare(options(dir + "/in.jsonl", dir + "/full"));
  PrepareOptions o = options(dir + "/in.jsonl", dir + "/cut");
  o.stop_after_shards = 2;
  EXPECT_THROW(run_prepare(o), Error);
  EXPECT_FALSE(json::parse(testing::slurp(dir + "/cut/src/progress.json"))["complete"]);
  // Its shards so far are not data to train on: the directory (or a glob or file in it) is
  // refused, naming the rerun, until prepare has finished.
  for (const std::string& spec : {dir + "/cut/src", dir + "/cut/src/train-*.bin"}) {
    const std::string e = testing::error_of([&] { expand_shards(spec, "data.train"); });
    EXPECT_NE(e.find("did not finish"), std::string::npos) << e;
    EXPECT_NE(e.find("run the same prepare again"), std::string::npos) << e;
  }
  o.stop_after_shards = 0;
  run_prepare(o);
  EXPECT_FALSE(expand_shards(dir + "/cut/src", "data.train").empty());
  EXPECT_EQ(shard_files(dir + "/cut/src"), shard_files(dir + "/full/src"));
  EXPECT_EQ(json::parse(testing::slurp(dir + "/cut/src/progress.json"))["stats"],
            json::parse(testing::slurp(dir + "/full/src/progress.json"))["stats"]);
}

TEST(Prepare, PoisonedCorpusCountsEachReasonAndKeepsOnlyTheCleanDocuments) {
  std::string dir = testing::temp_dir("prepare-poison");
  auto docs = make_docs(60);
  write_jsonl(dir + "/clean.jsonl", docs);
  {
    std::ofstream f(dir + "/poisoned.jsonl", std::ios::binary);
    f << "\xEF\xBB\xBF";  // a BOM before the first record: repaired
    for (size_t i = 0; i < docs.size(); ++i) {
      f << json{{"text", docs[i]}}.dump() << "\n";
      switch (i) {
        case 3:
          f << "{\"text\": \"unterminated\n";
          break;  // malformed_json
        case 7:
          f << "{\"body\": \"no text field\"}\n";
          break;  // missing_field
        case 9:
          f << "{\"text\": 42}\n";
          break;  // missing_field
        case 11:
          f << "{\"text\": \"a\\u0000b\"}\n";
          break;  // nul_bytes
        case 13:
          f << "{\"text\": \"\"}\n";
          break;  // empty
        case 15:
          f << "\n";
          break;  // empty
        case 17:
          f << json{{"text", std::string(20000, 'x')}}.dump() << "\n";
          break;  // too_large
        case 19:
          f << "[1, 2]\n";
          break;  // missing_field
        default:
          break;
      }
    }
    f << "{\"text\": \"cut off";  // truncated_last_line
  }
  {
    std::ofstream t(dir + "/bad.txt", std::ios::binary);
    t << "bad \xFF\xFE bytes\n";  // invalid_utf8 (.txt, one document per file)
  }
  PrepareOptions clean = options(dir + "/clean.jsonl", dir + "/out-clean");
  PrepareOptions poisoned = options(dir + "/poisoned.jsonl", dir + "/out-poisoned");
  poisoned.sources[0].inputs.push_back(dir + "/bad.txt");
  clean.sources[0].doc.max_document_bytes = poisoned.sources[0].doc.max_document_bytes = 10000;
  run_prepare(clean);
  json s = run_prepare(poisoned)["sources"]["src"];
  EXPECT_EQ(s["skipped"], (json{{"malformed_json", 1},
                                {"missing_field", 3},
                                {"nul_bytes", 1},
                                {"empty", 2},
                                {"too_large", 1},
                                {"truncated_last_line", 1},
                                {"invalid_utf8", 1}}));
  EXPECT_EQ(s["repaired"], (json{{"bom", 1}}));
  EXPECT_EQ(shard_files(dir + "/out-poisoned/src"), shard_files(dir + "/out-clean/src"));
}

// A file named by several inputs (its directory, a glob in it, its path spelled another way) is
// read once, at its first place.
TEST(Prepare, InputsNamingAFileTwiceReadItOnce) {
  const std::string dir = testing::temp_dir("prepare-inputs");
  std::filesystem::create_directories(dir + "/in");
  for (const char* name : {"a.jsonl", "b.txt"}) std::ofstream(dir + "/in/" + name) << "x\n";
  const std::vector<std::string> files = expand_inputs(
      {dir + "/in/b.txt", dir + "/in", dir + "/in/*.jsonl", dir + "/in/../in/a.jsonl"});
  EXPECT_EQ(files, (std::vector<std::string>{dir + "/in/b.txt", dir + "/in/a.jsonl"}));
}

// JSONL by extension in any case (.jsonl, .json, .ndjson; .gz/.zst after them): a directory
// lists them all and names what it leaves; a compression prepare does not read is an error (its
// bytes read as text were a document of noise, or skipped as nul_bytes without a word).
TEST(Prepare, InputKindsByExtensionInAnyCase) {
  const std::string dir = testing::temp_dir("prepare-kinds");
  std::filesystem::create_directories(dir + "/in");
  for (const char* name : {"a.jsonl", "b.ndjson", "c.JSONL", "d.json", "e.Txt", "f.csv"})
    std::ofstream(dir + "/in/" + name) << "{\"text\": \"x\"}\n{\"text\": \"y\"}\n";
  std::vector<std::string> skipped;
  const std::vector<std::string> files = expand_inputs({dir + "/in"}, &skipped);
  EXPECT_EQ(files.size(), 4u);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("2 other files (e.g. " + dir + "/in/d.json)"), std::string::npos)
      << skipped[0];
  // Each JSONL file gives its 2 lines as documents; the .txt file is one document; a .json file
  // named is JSONL.
  const nlohmann::json docs =
      run_prepare(options(dir + "/in", dir + "/out"))["sources"]["src"]["documents"];
  EXPECT_EQ(docs["train"].get<int>() + docs["val"].get<int>(), 3 * 2 + 1);
  EXPECT_EQ(expand_inputs({dir + "/in/d.json"}).size(), 1u);
  std::ofstream(dir + "/x.jsonl.bz2") << "BZh91AY&SY";
  const std::string e = testing::error_of([&] { expand_inputs({dir + "/x.jsonl.bz2"}); });
  EXPECT_NE(e.find("x.jsonl.bz2: .bz2 files are not read; decompress it"), std::string::npos) << e;
  // In a directory too, where the file is an input once decompressed (other archives are left).
  std::filesystem::create_directories(dir + "/in2");
  std::ofstream(dir + "/in2/photos.zip") << "PK";
  std::ofstream(dir + "/in2/ok.txt") << "x";
  EXPECT_EQ(expand_inputs({dir + "/in2", dir + "/in"}).size(), 1u + 4u);
  std::ofstream(dir + "/in2/c.jsonl.XZ") << "\xFD"
                                            "7zXZ";
  const std::string e2 = testing::error_of([&] { expand_inputs({dir + "/in2"}); });
  EXPECT_NE(e2.find("c.jsonl.XZ: .xz files are not read"), std::string::npos) << e2;
}

// Two prepares into one output under other names: summary.json lists both sources (the first's
// kept while its directory is there and the tokenizer is the same).
TEST(Prepare, SummaryKeepsTheSourcesPreparedBefore) {
  const std::string dir = testing::temp_dir("prepare-summary");
  fs::create_directories(dir + "/in");
  write_jsonl(dir + "/in/a.jsonl", make_docs(30));
  PrepareOptions o = options(dir + "/in", dir + "/out");
  run_prepare(o);
  o.sources[0].name = "other";
  const json summary = run_prepare(o);
  EXPECT_TRUE(summary["sources"].contains("src")) << summary.dump();
  EXPECT_TRUE(summary["sources"].contains("other")) << summary.dump();
  EXPECT_EQ(json::parse(testing::slurp(dir + "/out/summary.json")), summary);
  fs::remove_all(dir + "/out/src");
  o.sources[0].name = "third";
  EXPECT_FALSE(run_prepare(o)["sources"].contains("src"));
}

TEST(Prepare, SplitsByCount) {
  std::string dir = testing::temp_dir("prepare-count");
  auto docs = make_docs(50);
  write_jsonl(dir + "/in.jsonl", docs);
  PrepareOptions o = options(dir + "/in.jsonl", dir + "/out");
  o.val_fraction = 0;
  o.val_docs = 7;
  json s = run_prepare(o)["sources"]["src"];
  EXPECT_EQ(s["documents"]["val"], 7);
  EXPECT_EQ(s["documents"]["train"], 43);
  auto tok = load_tokenizer(gpt2());
  auto val = decode_split(dir + "/out/src", "val", *tok);
  EXPECT_EQ(val, std::vector<std::string>(docs.begin(), docs.begin() + 7));
  o.val_fraction = 0.1;
  EXPECT_THROW(run_prepare(o), Error);
}

TEST(Prepare, FatalErrorsAreClearAndWriteNothing) {
  std::string dir = testing::temp_dir("prepare-errors");
  write_jsonl(dir + "/in.jsonl", make_docs(10));
  auto error_of = [](const PrepareOptions& o) -> std::string {
    try {
      run_prepare(o);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of(options(dir + "/missing.jsonl", dir + "/o1")).find("missing.jsonl"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir + "/o1/src"));
  EXPECT_NE(error_of(options(dir + "/in.jsonl", "/proc/lmforge-out")).find("/proc/lmforge-out"),
            std::string::npos);
  run_prepare(options(dir + "/in.jsonl", dir + "/o2"));
  PrepareOptions other = options(dir + "/in.jsonl", dir + "/o2");
  other.val_fraction = 0.5;
  EXPECT_NE(error_of(other).find("different prepare"), std::string::npos);
  // Nothing kept: the hint follows the reason (here every document too large).
  PrepareOptions small = options(dir + "/in.jsonl", dir + "/o3");
  small.sources[0].doc.max_document_bytes = 4;
  const std::string e = error_of(small);
  EXPECT_NE(e.find("no documents kept"), std::string::npos) << e;
  EXPECT_NE(e.find("raise the source's max_document_bytes"), std::string::npos) << e;
}

// text_mode: blank_line: a line too long to hold is dropped by the line reader; it must count
// the whole block as too_large, not end it as a blank line would (which kept both halves).
TEST(Prepare, BlankLineModeSkipsABlockWithAnOverlongLine) {
  std::string dir = testing::temp_dir("prepare-blank");
  {
    std::ofstream f(dir + "/in.txt", std::ios::binary);
    f << "first line\n" << std::string((1 << 20) + 4096, 'x') << "\nlast line\n\nsecond doc\n";
  }
  PrepareOptions o = options(dir + "/in.txt", dir + "/out");
  o.sources[0].doc.text_mode = "blank_line";
  o.sources[0].doc.max_document_bytes = 100;
  o.val_fraction = 0;
  json s = run_prepare(o)["sources"]["src"];
  EXPECT_EQ(s["skipped"], (json{{"too_large", 1}}));
  auto tok = load_tokenizer(gpt2());
  EXPECT_EQ(decode_split(dir + "/out/src", "train", *tok), std::vector<std::string>{"second doc"});
}

// text_mode: blank_line on a CRLF file: the blocks of the LF file, their inner line ends CRLF, and
// no \r left at a block's end (the line end before the blank line).
TEST(Prepare, BlankLineModeEndsCrlfBlocksLikeLfOnes) {
  std::string dir = testing::temp_dir("prepare-crlf");
  auto tok = load_tokenizer(gpt2());
  for (const std::string eol : {"\n", "\r\n"}) {
    std::ofstream(dir + "/in.txt", std::ios::binary)
        << "para one" << eol << "line two" << eol << eol << "para two" << eol << " " << eol << eol
        << "last" << eol;
    PrepareOptions o = options(dir + "/in.txt", dir + "/out" + std::to_string(eol.size()));
    o.sources[0].doc.text_mode = "blank_line";
    o.val_fraction = 0;
    run_prepare(o);
    EXPECT_EQ(decode_split(dir + "/out" + std::to_string(eol.size()) + "/src", "train", *tok),
              (std::vector<std::string>{"para one" + eol + "line two", "para two", "last"}));
  }
}

// A gzip input cut short is an error naming it, not a corpus that silently ends early.
TEST(Prepare, TruncatedGzipIsAnError) {
  std::string dir = testing::temp_dir("prepare-gz");
  write_jsonl(dir + "/in.jsonl", make_docs(200));
  ASSERT_EQ(std::system(("gzip -k '" + dir + "/in.jsonl'").c_str()), 0);
  run_prepare(options(dir + "/in.jsonl.gz", dir + "/whole"));  // the whole file reads
  fs::resize_file(dir + "/in.jsonl.gz", fs::file_size(dir + "/in.jsonl.gz") / 2);
  try {
    run_prepare(options(dir + "/in.jsonl.gz", dir + "/cut"));
    ADD_FAILURE() << "a truncated .gz was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("in.jsonl.gz: gzip stream ends early"), std::string::npos)
        << e.what();
  }
}

// gzip members follow each other (cat a.gz b.gz) and zero padding may end the file, as gzip and
// Python's gzip module read them; any other bytes after a member -- appended junk, or a member
// whose header is damaged -- are an error at their offset (zlib's gzread ignored them: a damaged
// second member silently dropped its documents).
TEST(Prepare, GzipMembersAndPaddingReadAndTrailingBytesAreAnError) {
  std::string dir = testing::temp_dir("prepare-gz-members");
  auto docs = make_docs(120);
  write_jsonl(dir + "/a.jsonl", std::vector<std::string>(docs.begin(), docs.begin() + 60));
  write_jsonl(dir + "/b.jsonl", std::vector<std::string>(docs.begin() + 60, docs.end()));
  ASSERT_EQ(
      std::system(("cd '" + dir + "' && gzip -k a.jsonl b.jsonl && cat a.jsonl.gz b.jsonl.gz" +
                   " > ab.jsonl.gz && head -c 1000 /dev/zero | cat ab.jsonl.gz - >" +
                   " padded.jsonl.gz && printf 'junk' | cat ab.jsonl.gz - > junk.jsonl.gz")
                      .c_str()),
      0);
  auto tok = load_tokenizer(gpt2());
  for (const char* name : {"ab", "padded"}) {
    PrepareOptions o = options(dir + "/" + name + ".jsonl.gz", dir + "/out-" + name);
    o.val_fraction = 0;
    run_prepare(o);
    EXPECT_EQ(decode_split(dir + "/out-" + name + "/src", "train", *tok), docs) << name;
  }
  std::string a_size = std::to_string(fs::file_size(dir + "/a.jsonl.gz"));
  std::string ab = read_file(dir + "/ab.jsonl.gz");
  std::string damaged = ab;
  damaged[std::stoul(a_size)] = 'x';  // the second member's first header byte
  std::ofstream(dir + "/damaged.jsonl.gz", std::ios::binary) << damaged;
  for (auto [name, at] : {std::pair<std::string, std::string>{"junk", std::to_string(ab.size())},
                          {"damaged", a_size}}) {
    std::string err = testing::error_of(
        [&] { run_prepare(options(dir + "/" + name + ".jsonl.gz", dir + "/out-" + name)); });
    EXPECT_NE(err.find(name + ".jsonl.gz: the bytes from byte " + at + " on are not gzip data"),
              std::string::npos)
        << err;
  }
}

// A BOM before a record that is skipped repaired nothing: only kept records count as repaired.
TEST(Prepare, BomOnASkippedRecordIsNotCountedAsRepaired) {
  std::string dir = testing::temp_dir("prepare-bom");
  {
    std::ofstream f(dir + "/in.jsonl", std::ios::binary);
    f << "\xEF\xBB\xBF{\"text\": \"\"}\n";
    for (auto& d : make_docs(5)) f << json{{"text", d}}.dump() << "\n";
  }
  json s = run_prepare(options(dir + "/in.jsonl", dir + "/out"))["sources"]["src"];
  EXPECT_EQ(s["skipped"], (json{{"empty", 1}}));
  EXPECT_FALSE(s.contains("repaired") && s["repaired"].contains("bom")) << s.dump();
}

}  // namespace lmforge
