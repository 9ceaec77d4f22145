// The Hugging Face export's pieces on tiny hand-built tokenizers: merges derived from tiktoken
// ranks (transformers' TikTokenConverter order) and from SentencePiece scores, the SentencePiece
// model reader, and the models the export refuses. test_hf_export checks real tokenizers against
// transformers.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/tokenizer/hf_export.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using nlohmann::json;
using Pairs = std::vector<std::pair<std::string, std::string>>;

std::string base64(const std::string& in) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < in.size(); i += 3) {
    uint32_t v = static_cast<unsigned char>(in[i]) << 16;
    if (i + 1 < in.size()) v |= static_cast<unsigned char>(in[i + 1]) << 8;
    if (i + 2 < in.size()) v |= static_cast<unsigned char>(in[i + 2]);
    out += k[(v >> 18) & 63];
    out += k[(v >> 12) & 63];
    out += i + 1 < in.size() ? k[(v >> 6) & 63] : '=';
    out += i + 2 < in.size() ? k[v & 63] : '=';
  }
  return out;
}

Pairs merges_of(const json& j) {
  Pairs out;
  for (const json& m : j.at("model").at("merges")) out.emplace_back(m.at(0), m.at(1));
  return out;
}

// A rank file of the 256 bytes plus `extra` (ranks 256, 257, ...) and its .json.
std::unique_ptr<Tokenizer> tiny_tiktoken(const std::string& dir,
                                         const std::vector<std::string>& extra,
                                         const std::string& specials_json) {
  std::ofstream ranks(dir + "/tiny.tiktoken");
  int rank = 0;
  for (int b = 0; b < 256; ++b)
    ranks << base64(std::string(1, static_cast<char>(b))) << " " << rank++ << "\n";
  for (const std::string& t : extra) ranks << base64(t) << " " << rank++ << "\n";
  ranks.close();
  std::ofstream(dir + "/tiny.json")
      << R"({"pat_str": " ?\\p{L}+|\\s+", "special_tokens": )" << specials_json << "}";
  return load_tokenizer(dir + "/tiny.tiktoken");
}

TEST(TokenizerHfExportByteLevel, MergesFollowRanksThenThePartsRanks) {
  std::string dir = testing::temp_dir("hf-export-unit");
  // "abc" splits two ways: (a, bc) has the lower left rank (97 < 256), so it comes first.
  auto tok = tiny_tiktoken(dir, {"ab", "bc", "abc", " a", " ab"}, R"({"<|endoftext|>": 300})");
  json j = json::parse(hf_byte_level_tokenizer_json(dynamic_cast<const BpeTokenizer&>(*tok)));
  EXPECT_EQ(merges_of(j), (Pairs{{"a", "b"},
                                 {"b", "c"},
                                 {"a", "bc"},
                                 {"ab", "c"},
                                 {"\xC4\xA0", "a"},  // " a": GPT-2's map writes ' ' as U+0120
                                 {"\xC4\xA0", "ab"},
                                 {"\xC4\xA0"
                                  "a",
                                  "b"}}));
  const json& model = j.at("model");
  EXPECT_EQ(model.at("type"), "BPE");
  EXPECT_TRUE(model.at("ignore_merges").get<bool>());  // tiktoken looks whole pieces up
  // <|endoftext|> (300) does not follow on from the 261 tokens, where Hugging Face would number
  // an added token (261): it goes into the vocabulary too, which keeps its id.
  EXPECT_EQ(model.at("vocab").size(), 262u);
  EXPECT_EQ(model.at("vocab").at("<|endoftext|>"), 300);
  EXPECT_EQ(model.at("vocab").at("\xC4\xA0"
                                 "ab"),
            260);
  EXPECT_EQ(model.at("vocab").at("\xC4\x80"), 0);  // byte 0 -> U+0100
  EXPECT_EQ(j.at("pre_tokenizer").at("pretokenizers").at(0).at("pattern").at("Regex"),
            " ?\\p{L}+|\\s+");
  EXPECT_EQ(j.at("pre_tokenizer").at("pretokenizers").at(1).at("type"), "ByteLevel");
  ASSERT_EQ(j.at("added_tokens").size(), 1u);
  EXPECT_EQ(j.at("added_tokens").at(0).at("id"), 300);
  EXPECT_TRUE(j.at("added_tokens").at(0).at("special").get<bool>());
  EXPECT_TRUE(j.at("post_processor").is_null());  // no BOS
}

TEST(TokenizerHfExportByteLevel, BosBecomesTemplateProcessing) {
  std::string dir = testing::temp_dir("hf-export-unit-bos");
  auto tok = tiny_tiktoken(dir, {"ab"}, R"({"<|begin_of_text|>": 257, "<|end_of_text|>": 258})");
  ASSERT_EQ(tok->bos_id(), 257);
  json j = json::parse(hf_byte_level_tokenizer_json(dynamic_cast<const BpeTokenizer&>(*tok)));
  EXPECT_EQ(j.at("model").at("vocab").size(), 257u);  // the specials follow on: added tokens only
  const json& post = j.at("post_processor");
  EXPECT_EQ(post.at("type"), "TemplateProcessing");
  EXPECT_EQ(post.at("single").at(0).at("SpecialToken").at("id"), "<|begin_of_text|>");
  EXPECT_EQ(post.at("special_tokens").at("<|begin_of_text|>").at("ids"), json::array({257}));

  export_hf_tokenizer(*tok, dir + "/out");
  json config = json::parse(testing::slurp(dir + "/out/tokenizer_config.json"));
  EXPECT_EQ(config.at("bos_token"), "<|begin_of_text|>");
  EXPECT_EQ(config.at("eos_token"), "<|end_of_text|>");
  // What lmforge exported it loads again, with the same ids.
  auto back = load_tokenizer(dir + "/out");
  EXPECT_EQ(back->encode("ab abc", false, true), tok->encode("ab abc", false, true));
  // Another format (its fingerprint hashes other files) with the same vocabulary: a model of one
  // takes the other's ids (init_from with data.tokenizer, a distillation teacher).
  EXPECT_NE(back->fingerprint(), tok->fingerprint());
  EXPECT_TRUE(same_vocabulary(*back, *tok));
  EXPECT_TRUE(same_vocabulary(*tok, *tok));
  // One token's bytes, a special's name, or the EOS apart is another vocabulary.
  const std::string other = testing::temp_dir("hf-export-unit-bos-other");
  EXPECT_FALSE(same_vocabulary(
      *back,
      *tiny_tiktoken(other, {"ac"}, R"({"<|begin_of_text|>": 257, "<|end_of_text|>": 258})")));
  EXPECT_FALSE(same_vocabulary(
      *back, *tiny_tiktoken(other, {"ab"}, R"({"<|begin_of_text|>": 257, "<|eot_id|>": 258})")));
  EXPECT_FALSE(
      same_vocabulary(*back, *tiny_tiktoken(other, {"ab"}, R"({"<|begin_of_text|>": 257})")));
}

SentencePieceModel tiny_sentencepiece() {
  using SP = SentencePieceModel;
  SP m;
  m.model_type = SP::kBpe;
  m.byte_fallback = true;
  m.pieces = {{"<unk>", 0, SP::kUnknown},
              {"<s>", 0, SP::kControl},
              {"</s>", 0, SP::kControl},
              {"<0x61>", 0, SP::kByte},
              {"ab", -1, SP::kNormal},
              {"bc", -2, SP::kNormal},
              {"abc", -3, SP::kNormal},
              {"\xC3\xA9"
               "a",
               -4, SP::kNormal},
              {"a", -5, SP::kNormal},
              {"b", -6, SP::kNormal},
              {"c", -7, SP::kNormal},
              {"\xC3\xA9", -8, SP::kNormal}};
  return m;
}

TEST(TokenizerHfExportSentencePiece, BpeMergesByScoreThenParts) {
  SentencePieceModel m = tiny_sentencepiece();
  // Highest score first; "abc" = ab + c (ids 4, 10) before a + bc (8, 5), by the parts' ids as
  // transformers orders them; "éa" splits only between characters; byte pieces are never parts.
  EXPECT_EQ(sentencepiece_bpe_merges(m),
            (std::vector<std::pair<int32_t, int32_t>>{{8, 9}, {9, 10}, {4, 10}, {8, 5}, {11, 8}}));
  json j = json::parse(hf_sentencepiece_tokenizer_json(m, 1, "tiny.model"));
  EXPECT_EQ(merges_of(j).front(), (std::pair<std::string, std::string>{"a", "b"}));
  EXPECT_EQ(j.at("model").at("unk_token"), "<unk>");
  EXPECT_TRUE(j.at("model").at("byte_fallback").get<bool>());
  EXPECT_EQ(j.at("added_tokens").size(), 3u);
  EXPECT_EQ(j.at("post_processor").at("single").at(0).at("SpecialToken").at("id"), "<s>");
  // nmt-style defaults: extra whitespace removed, dummy prefix, spaces as "▁".
  std::vector<std::string> types;
  for (const json& n : j.at("normalizer").at("normalizers")) types.push_back(n.at("type"));
  EXPECT_EQ(types, (std::vector<std::string>{"Replace", "Replace", "Prepend", "Replace"}));
}

TEST(TokenizerHfExportSentencePiece, RefusesWhatTokenizerJsonCannotSay) {
  auto message = [](const SentencePieceModel& m) {
    try {
      hf_sentencepiece_tokenizer_json(m, -1, "x.model");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  SentencePieceModel word = tiny_sentencepiece();
  word.model_type = SentencePieceModel::kWord;
  EXPECT_NE(message(word).find("x.model: cannot export"), std::string::npos) << message(word);
  EXPECT_NE(message(word).find("word model"), std::string::npos);
  SentencePieceModel unigram = tiny_sentencepiece();
  unigram.model_type = SentencePieceModel::kUnigram;
  EXPECT_NE(message(unigram).find("Unigram model"), std::string::npos) << message(unigram);
  SentencePieceModel nfkc = tiny_sentencepiece();
  nfkc.normalizer_name = "nmt_nfkc";
  nfkc.precompiled_charsmap = "\x01\x02";
  EXPECT_NE(message(nfkc).find("normalizer \"nmt_nfkc\""), std::string::npos) << message(nfkc);
  SentencePieceModel user = tiny_sentencepiece();
  user.pieces.push_back({"<tool>", 0, SentencePieceModel::kUserDefined});
  EXPECT_NE(message(user).find("\"<tool>\" is user-defined"), std::string::npos) << message(user);
}

// Protobuf wire format, written by hand: key = field << 3 | wire type.
std::string varint(uint64_t v) {
  std::string s;
  do {
    s += static_cast<char>((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
    v >>= 7;
  } while (v);
  return s;
}
std::string field(int n, const std::string& bytes) {
  return varint(n << 3 | 2) + varint(bytes.size()) + bytes;
}
std::string field(int n, uint64_t v) { return varint(n << 3) + varint(v); }
std::string piece(const std::string& text, float score, int type) {
  char f[4];
  std::memcpy(f, &score, 4);
  return field(1, text) + varint(2 << 3 | 5) + std::string(f, 4) + field(3, type);
}

TEST(TokenizerHfExportSentencePiece, ReadsTheModelProto) {
  std::string proto =
      field(1, piece("<unk>", 0, 2)) + field(1, piece("\xE2\x96\x81the", -1.5f, 1)) +
      field(2, field(3, 2) + field(35, 1) + field(7, "ignored")) +
      field(3, field(1, "identity") + field(3, 0) + field(2, std::string("\0\1", 2))) +
      field(99, 7);
  SentencePieceModel m = parse_sentencepiece_model(proto, "t.model");
  ASSERT_EQ(m.pieces.size(), 2u);
  EXPECT_EQ(m.pieces[1].piece, "\xE2\x96\x81the");
  EXPECT_EQ(m.pieces[1].score, -1.5f);
  EXPECT_EQ(m.pieces[0].type, SentencePieceModel::kUnknown);
  EXPECT_EQ(m.model_type, SentencePieceModel::kBpe);
  EXPECT_TRUE(m.byte_fallback);
  EXPECT_EQ(m.normalizer_name, "identity");
  EXPECT_EQ(m.precompiled_charsmap, std::string("\0\1", 2));
  EXPECT_FALSE(m.add_dummy_prefix);
  EXPECT_TRUE(m.remove_extra_whitespaces);  // the .proto default
  EXPECT_THROW(parse_sentencepiece_model(proto.substr(0, proto.size() - 4), "t.model"), Error);
}

}  // namespace
}  // namespace lmforge
