// The BPE trainer's tokenizer.json must load in HF `tokenizers` and encode exactly as lmforge
// does, on real text (the KJV) and on hard cases; training must be deterministic.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lmforge/data/text_shards.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_trainer.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

namespace {
const char* kHardCases =
    "H\xC3\xA9llo w\xC3\xB6rld \xF0\x9F\x8E\x89\xF0\x9F\x8E\x89 DON'T WE'VE I'LL  \t\n\n   \n"
    "12345678901234567890 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE "
    "\xE0\xB8\xAA\xE0\xB8\xA7\xE0\xB8\xB1\xE0\xB8\xAA\xE0\xB8\x94\xE0\xB8\xB5 "
    "e\xCC\x81\xCC\x81 <|endoftext|> tail\r\n";
}  // namespace

TEST(BpeTrainer, TokenizerJsonEncodesLikeHuggingFaceAndTrainingIsDeterministic) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("bpe-train");
  std::string kjv = read_file(demo_corpus_path());
  {
    std::ofstream(dir + "/train.txt") << kjv.substr(0, 2000000);
    std::ofstream(dir + "/test.txt") << kjv.substr(3000000, 300000) << kHardCases;
  }
  BpeTrainOptions o;
  o.vocab_size = 3000;
  BpeTrainResult a = train_bpe({dir + "/train.txt"}, o), b = train_bpe({dir + "/train.txt"}, o);
  EXPECT_EQ(a.tokenizer_json, b.tokenizer_json);
  EXPECT_EQ(a.vocab_size, 3000);
  write_file_atomic(dir + "/tokenizer.json", a.tokenizer_json);

  auto tok = load_tokenizer(dir + "/tokenizer.json");
  EXPECT_EQ(tok->vocab_size(), 3000);
  std::string text = read_file(dir + "/test.txt");
  std::vector<int32_t> ours = tok->encode(text, /*allow_special=*/true);
  EXPECT_EQ(tok->decode(ours), text);

  std::string cmd = "'" + testing::python() + "' '" + testing::source_dir() +
                    "/tests/reference/hf_encode.py' --tokenizer '" + dir +
                    "/tokenizer.json' --text '" + dir + "/test.txt' --out '" + dir + "/hf.txt'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::istringstream in(testing::slurp(dir + "/hf.txt"));
  std::vector<int32_t> hf;
  for (int32_t id; in >> id;) hf.push_back(id);
  ASSERT_EQ(hf.size(), ours.size());
  for (size_t i = 0; i < hf.size(); ++i) ASSERT_EQ(ours[i], hf[i]) << "first difference at " << i;
}

// The trainer reads a file in 4 MiB chunks; a chunk's end between two newlines must not count
// "\n\n" as two "\n" pieces (encode never makes them): here "\n\n" twice, once across the
// first chunk's end, is the second merge.
TEST(BpeTrainer, ANewlineRunAcrossTheReadsChunksStaysOnePiece) {
  std::string dir = testing::temp_dir("bpe-train-chunks");
  std::string text;
  for (int i = 0; i < 1398100; ++i) text += "ab\n";
  text += "abx\n\nab\nq\n\nq\n";  // bytes 4 MiB - 1 and 4 MiB: "\n\n"
  ASSERT_EQ(text.substr((4u << 20) - 1, 2), "\n\n");
  std::ofstream(dir + "/train.txt") << text;
  BpeTrainOptions o;
  o.vocab_size = 300;
  const nlohmann::json j = nlohmann::json::parse(train_bpe({dir + "/train.txt"}, o).tokenizer_json);
  const nlohmann::json& merges = j.at("model").at("merges");
  ASSERT_EQ(merges.size(), 2u) << merges.dump();  // "a b", then "\n\n" (no other pair twice)
  EXPECT_EQ(merges[1], nlohmann::json::array({"\u010a", "\u010a"})) << merges.dump();
}

// The special strings are cut out of the training text before counting, as Hugging Face's trainer
// does with added tokens: documents joined by <|endoftext|> teach no merge of its pieces.
TEST(BpeTrainer, SpecialStringsInTheTextTeachNoMerges) {
  std::string dir = testing::temp_dir("bpe-train-specials");
  std::string kjv = read_file(demo_corpus_path()).substr(0, 200000);
  {
    std::ofstream f(dir + "/train.txt");
    std::istringstream lines(kjv);
    for (std::string l; std::getline(lines, l);) f << l << "<|endoftext|>";
  }
  BpeTrainOptions o;
  o.vocab_size = 700;
  nlohmann::json j = nlohmann::json::parse(train_bpe({dir + "/train.txt"}, o).tokenizer_json);
  size_t pieces = 0;
  for (auto& [piece, id] : j.at("model").at("vocab").items()) {
    if (piece == "<|endoftext|>") continue;
    ++pieces;
    EXPECT_EQ(piece.find("<|"), std::string::npos) << piece;
    EXPECT_EQ(piece.find("doftext"), std::string::npos) << piece;
    EXPECT_EQ(piece.find("|>"), std::string::npos) << piece;
  }
  EXPECT_GT(pieces, 600u);
}

}  // namespace lmforge
