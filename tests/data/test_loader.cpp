// Loader: windows, packing, mixing, ranks and exact resume, on synthetic shards.
#include <gtest/gtest.h>

#include <set>

#include "lmforge/core/error.h"
#include "lmforge/data/loader.h"
#include "testing/process.h"

namespace lmforge {

namespace {

// A shard where token == position (ids < 1000 wrap), no document index.
std::string counting_shard(const std::string& dir, const std::string& name, int n) {
  std::vector<uint32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(i % 1000);
  write_shard(dir + "/" + name, t);
  return dir + "/" + name;
}

// Documents of lengths `lens`; document d's tokens are 1000*d + position.
std::string doc_shard(const std::string& dir, const std::string& name, std::vector<int> lens) {
  std::vector<uint32_t> t;
  std::vector<uint64_t> starts;
  for (size_t d = 0; d < lens.size(); ++d) {
    starts.push_back(t.size());
    for (int i = 0; i < lens[d]; ++i) t.push_back(static_cast<uint32_t>(1000 * d + i));
  }
  write_shard(dir + "/" + name, t, starts);
  return dir + "/" + name;
}

LoaderOptions opts(int64_t B, int64_t T, uint64_t seed) {
  LoaderOptions o;
  o.batch = B;
  o.seq = T;
  o.seed = seed;
  return o;
}

}  // namespace

TEST(Loader, WindowsAreShiftedByOneAndEveryEpochVisitsEachOnce) {
  std::string path = counting_shard(testing::temp_dir("loader-win"), "s.bin", 16 * 20 + 1);
  Loader l(parse_data_spec(path, "data.train"), opts(4, 16, 9));
  ASSERT_EQ(l.num_samples(0), 20);
  Batch b = Batch::make(4, 16);
  std::multiset<int64_t> seen;
  for (int step = 0; step < 5; ++step) {  // 5 x 4 = one epoch
    l.next(b);
    for (int i = 0; i < 64; ++i)
      EXPECT_EQ(b.targets.data<int32_t>()[i], b.tokens.data<int32_t>()[i] + 1);
    for (auto& s : l.last_samples()) seen.insert(s.index);
  }
  EXPECT_EQ(seen.size(), 20u);
  EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 20u);
}

// A ledger of sample ids: after save/restore the sequence continues exactly (across epochs).
TEST(Loader, ResumeContinuesTheExactSampleSequence) {
  std::string dir = testing::temp_dir("loader-resume");
  std::string a = counting_shard(dir, "a.bin", 2000), c = counting_shard(dir, "c.bin", 900);
  auto spec = parse_data_spec(a + "@0.7," + c + "@0.3", "data.train");
  Loader ref(spec, opts(3, 32, 5));
  Batch b = Batch::make(3, 32);
  std::vector<SampleId> ledger;
  for (int i = 0; i < 60; ++i) {
    ref.next(b);
    for (auto& s : ref.last_samples()) ledger.push_back(s);
  }
  Loader first(spec, opts(3, 32, 5));
  std::vector<SampleId> resumed;
  for (int i = 0; i < 23; ++i) {
    first.next(b);
    for (auto& s : first.last_samples()) resumed.push_back(s);
  }
  nlohmann::json st = nlohmann::json::parse(first.state().dump());  // through text, as on disk
  Loader second(spec, opts(3, 32, 5));
  second.set_state(st);
  for (int i = 23; i < 60; ++i) {
    second.next(b);
    for (auto& s : second.last_samples()) resumed.push_back(s);
  }
  EXPECT_EQ(resumed, ledger);
  // Mixing by weight: ~70% of rows from the first source.
  double from_a = 0;
  for (auto& s : ledger) from_a += s.source == 0;
  EXPECT_NEAR(from_a / ledger.size(), 0.7, 0.1);
}

TEST(Loader, RanksSeeDisjointSamples) {
  std::string path = counting_shard(testing::temp_dir("loader-ranks"), "s.bin", 8 * 100 + 1);
  std::set<int64_t> all;
  size_t total = 0;
  for (int rank = 0; rank < 2; ++rank) {
    LoaderOptions o = opts(5, 8, 3);
    o.rank = rank;
    o.world = 2;
    Loader l(parse_data_spec(path, "data.train"), o);
    Batch b = Batch::make(5, 8);
    for (int i = 0; i < 10; ++i) {  // 10 x 5 = half an epoch each
      l.next(b);
      for (auto& s : l.last_samples()) {
        all.insert(s.index);
        ++total;
      }
    }
  }
  EXPECT_EQ(total, 100u);
  EXPECT_EQ(all.size(), 100u);  // no sample seen by both ranks
}

TEST(Loader, BestFitPackingCutsFewerDocumentsAndRestartsPositions) {
  std::string dir = testing::temp_dir("loader-pack");
  std::vector<int> lens;
  for (int d = 0; d < 200; ++d) lens.push_back(3 + (d * 37) % 29);  // 3..31 tokens
  lens.push_back(100);                                              // longer than a slot: split
  std::string path = doc_shard(dir, "d.bin", lens);
  LoaderOptions o = opts(4, 32, 1);
  o.packing = "best_fit";
  Loader packed(parse_data_spec(path, "data.train"), o);
  Loader chunked(parse_data_spec(path, "data.train"), opts(4, 32, 1));
  auto ps = packed.stats()[0], cs = chunked.stats()[0];
  EXPECT_EQ(ps["documents"], 201);
  EXPECT_EQ(ps["cut_by_packing"], 1);  // only the 100-token document
  EXPECT_GT(cs["cut_by_chunking"].get<int>(), 50);
  EXPECT_GT(ps["fill"].get<double>(), 0.95);
  Batch b = Batch::make(4, 32);
  for (int step = 0; step < 10; ++step) {
    packed.next(b);
    const int32_t* tok = b.tokens.data<int32_t>();
    const int32_t* tgt = b.targets.data<int32_t>();
    const int32_t* pos = b.positions.data<int32_t>();
    const int32_t* doc = b.doc_ids.data<int32_t>();
    for (int i = 0; i < 4 * 32; ++i) {
      if (doc[i] < 0) {  // padding
        EXPECT_EQ(tgt[i], -100);
        continue;
      }
      EXPECT_EQ(pos[i], tok[i] % 1000) << i;  // position within its document
      bool same_doc_next = i % 32 < 31 && doc[i + 1] == doc[i];
      if (same_doc_next) {
        EXPECT_EQ(tgt[i], tok[i + 1]);
      } else if (i % 32 < 31) {
        EXPECT_EQ(tgt[i], -100);  // no cross-document target
      }
    }
  }
}

// Packed, every token of every document but its first is a target exactly once per epoch (a long
// document's slots overlap by one token, as the windows of data.packing: none do), and a
// sequential read (validation) goes through the documents in order: its first batch holds the
// first documents, not the long ones' slots.
TEST(Loader, BestFitTargetsEveryTokenOnceAndReadsInDocumentOrder) {
  std::vector<int> lens = {5, 100, 34, 65, 66, 33, 2, 1};
  for (int d = 0; d < 60; ++d) lens.push_back(3 + (d * 37) % 29);
  const std::string path = doc_shard(testing::temp_dir("loader-pack-targets"), "d.bin", lens);
  LoaderOptions o = opts(4, 32, 1);
  o.packing = "best_fit";
  Loader l(parse_data_spec(path, "data.train"), o);
  Batch b = Batch::make(4, 32);
  std::multiset<int32_t> targets;
  for (int64_t i = 0; i < l.sequential_batches(); ++i) {
    l.sequential(i, b);
    for (int j = 0; j < 4 * 32; ++j)
      if (b.targets.data<int32_t>()[j] != -100) targets.insert(b.targets.data<int32_t>()[j]);
    if (i == 0) {  // documents 0 and 1's first tokens
      std::set<int32_t> first(b.tokens.data<int32_t>(), b.tokens.data<int32_t>() + 4 * 32);
      EXPECT_TRUE(first.count(0) && first.count(1000))
          << "the first batch is not the first documents'";
    }
  }
  std::multiset<int32_t> want;
  for (size_t d = 0; d < lens.size(); ++d)
    for (int i = 1; i < lens[d]; ++i) want.insert(static_cast<int32_t>(1000 * d + i));
  EXPECT_EQ(targets, want);
}

TEST(Loader, RejectsTokensBeyondTheVocabularyAndTooLittleData) {
  std::string dir = testing::temp_dir("loader-vocab");
  std::string path = counting_shard(dir, "s.bin", 300);
  Loader l(parse_data_spec(path, "data.train"), opts(1, 8, 1));
  EXPECT_NO_THROW(l.check_vocab(300, "data.train"));
  try {
    l.check_vocab(257, "data.train");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 299"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Loader(parse_data_spec(path, "data.train"), opts(1, 300, 1)), Error);
  EXPECT_THROW(parse_data_spec(path + "@-1", "data.train"), Error);
  // Spaces around the entries and their weights, as a list is often written.
  const auto spaced = parse_data_spec(" " + path + " @ 0.7 , " + path + "@0.3 ", "data.train");
  ASSERT_EQ(spaced.size(), 2u);
  EXPECT_EQ(spaced[0].spec, path);
  EXPECT_EQ(spaced[0].weight, 0.7);
  EXPECT_EQ(spaced[1].weight, 0.3);
  LoaderOptions o = opts(1, 8, 1);
  o.packing = "best_fit";  // needs a document index
  EXPECT_THROW(Loader(parse_data_spec(path, "data.train"), o), Error);
}

// A checkpoint's loader state resumes only the data it was saved over: another sequence length
// (so another sample count) or a cursor out of range is refused, naming the source.
TEST(Loader, StateOfOtherDataOrOutOfRangeIsRefused) {
  std::string path = counting_shard(testing::temp_dir("loader-state"), "s.bin", 16 * 20 + 1);
  auto spec = parse_data_spec(path, "data.train");
  Loader l(spec, opts(4, 16, 9));
  Batch b = Batch::make(4, 16);
  l.next(b);
  nlohmann::json st = l.state();
  EXPECT_EQ(st["sources"][0]["samples"], 20);
  auto error_of = [&](Loader& into, const nlohmann::json& j) -> std::string {
    try {
      into.set_state(j);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  Loader shorter(spec, opts(4, 8, 9));  // 40 samples of 8+1 tokens
  std::string e = error_of(shorter, st);
  EXPECT_NE(e.find("made 20 samples but now makes 40"), std::string::npos) << e;
  EXPECT_NE(e.find("s.bin"), std::string::npos) << e;
  nlohmann::json bad = st;
  bad["sources"][0]["cursor"] = -3;
  e = error_of(l, bad);
  EXPECT_NE(e.find("sample -3 of 20 is out of range"), std::string::npos) << e;
  bad["sources"][0]["cursor"] = 21;
  EXPECT_NE(error_of(l, bad).find("out of range"), std::string::npos);
  nlohmann::json old = st;  // a checkpoint from before "samples" was saved still resumes
  old["sources"][0].erase("samples");
  EXPECT_EQ(error_of(l, old), "");
  try {
    Loader none(spec, opts(4, 0, 9));
    ADD_FAILURE() << "a sequence length of 0 was accepted";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("sequence length 0"), std::string::npos) << err.what();
  }
  // A best_fit position saved before its rows were cut and numbered as now (no "plan") would
  // point at other rows: refused, naming the way on; one saved now resumes.
  const std::string docs =
      doc_shard(testing::temp_dir("loader-state-plan"), "d.bin", {5, 100, 34, 65, 7, 12, 40});
  LoaderOptions o = opts(2, 16, 9);
  o.packing = "best_fit";
  Loader packed(parse_data_spec(docs, "data.train"), o);
  nlohmann::json saved = nlohmann::json::parse(packed.state().dump());
  EXPECT_EQ(error_of(packed, saved), "");
  saved["sources"][0].erase("plan");
  e = error_of(packed, saved);
  EXPECT_NE(e.find("earlier lmforge"), std::string::npos) << e;
  EXPECT_NE(e.find("init_from"), std::string::npos) << e;
}

}  // namespace lmforge
