// Tokenizer unit tests: loader errors name the file (and line), invalid UTF-8 round-trips through
// every byte-level tokenizer, special tokens and BOS/EOS of the public encodings, and the
// behaviours test_tokenizer_reference found wrong once (each pinned to the reference's output,
// recorded from tiktoken 0.14 / HF tokenizers 0.23.3 where noted).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe.h"
#include "lmforge/tokenizer/bpe_trainer.h"
#include "lmforge/tokenizer/formats/formats.h"
#include "lmforge/tokenizer/pretokenizer.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/tokenizer/unicode_normalize.h"
#include "testing/errors.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using testing::error_of;

namespace fs = std::filesystem;
using nlohmann::json;
using Ids = std::vector<int32_t>;

constexpr const char* kMeta = "\xE2\x96\x81";  // U+2581

std::string shared(const std::string& name) {
  return testing::shared_tokenizers_dir() + "/" + name;
}

void write(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string b64(const std::string& bytes) {
  static const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    for (int k = 18; k >= 0; k -= 6) out += kAlphabet[(v >> k) & 63];
  }
  if (i + 1 == bytes.size()) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == bytes.size()) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8);
    for (int k = 18; k >= 6; k -= 6) out += kAlphabet[(v >> k) & 63];
    out += "=";
  }
  return out;
}

// A rank file with the 256 bytes, then `extra` lines as given.
std::string tiktoken_text(const std::string& extra = "") {
  std::string s;
  for (int b = 0; b < 256; ++b) s += b64(std::string(1, char(b))) + " " + std::to_string(b) + "\n";
  return s + extra;
}

// A byte-level tokenizer.json: 256 byte tokens (GPT-2's alphabet), a few merges, one added token.
json byte_level_json(bool add_prefix_space) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[gpt2_bytes_to_unicode(std::string(1, char(b)))] = b;
  json merges = json::array();
  int32_t next = 256;
  for (auto [a, b] : {std::pair{" ", "t"}, {"h", "e"}, {" t", "he"}, {"a", "b"}}) {
    vocab[gpt2_bytes_to_unicode(std::string(a) + b)] = next++;
    merges.push_back(json::array({gpt2_bytes_to_unicode(a), gpt2_bytes_to_unicode(b)}));
  }
  return {{"added_tokens", {{{"id", next}, {"content", "<|endoftext|>"}, {"special", true}}}},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

// A SentencePiece-style tokenizer.json: <unk> <s> </s>, byte fallback, "▁ h e ▁h ▁he" and the
// merges ▁+h, ▁h+e. `how`: "prepend" (Prepend + Replace normalizers), or a Metaspace
// prepend_scheme ("first", "always").
json sentencepiece_json(const std::string& how) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) vocab[fmt::format("<0x{:02X}>", b)] = 3 + b;
  for (std::string p : {std::string(kMeta), std::string("h"), std::string("e"),
                        std::string(kMeta) + "h", std::string(kMeta) + "he"})
    vocab[p] = vocab.size();
  json j = {{"added_tokens",
             {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
              {{"id", 1}, {"content", "<s>"}, {"special", true}},
              {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
            {"model",
             {{"type", "BPE"},
              {"vocab", vocab},
              {"merges", json::array({json::array({kMeta, "h"}),
                                      json::array({std::string(kMeta) + "h", "e"})})},
              {"unk_token", "<unk>"},
              {"byte_fallback", true}}}};
  if (how == "prepend")
    j["normalizer"] = {
        {"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", kMeta}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}}}}};
  else
    j["pre_tokenizer"] = {
        {"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", how}, {"split", false}};
  return j;
}

std::unique_ptr<Tokenizer> load_json(const std::string& dir, const std::string& name,
                                     const json& j) {
  write(dir + "/" + name, j.dump());
  return load_tokenizer(dir + "/" + name);
}

// --- loader errors ---------------------------------------------------------------------------

TEST(TokenizerErrors, CorruptTiktokenLinesNameFileAndLine) {
  std::string dir = testing::temp_dir("tok-tiktoken");
  struct Case {
    std::string extra, line;
  } cases[] = {
      {"@@@@ 256\n", ":257:"},          // bad base64
      {"QUI=\n", ":257:"},              // no rank
      {"QUI= x\n", ":257:"},            // rank not a number
      {"QUI= -3\n", ":257:"},           // negative rank
      {"QUI= 256 7\n", ":257:"},        // trailing junk
      {"QUI= 256\nQUJD\n", ":258:"},    // the second line is the bad one
      {" 256\n", ":257:"},              // no token
      {"QUI= 99999999999\n", ":257:"},  // absurd rank
  };
  for (const Case& c : cases) {
    std::string path = dir + "/bad.tiktoken";
    write(path, tiktoken_text(c.extra));
    std::string msg = error_of([&] { load_tokenizer(path); });
    EXPECT_NE(msg.find(path + c.line), std::string::npos) << c.extra << " -> " << msg;
  }
  // A file cut short before all 256 bytes: the count is named.
  std::string path = dir + "/short.tiktoken";
  write(path, tiktoken_text().substr(0, 600));
  std::string msg = error_of([&] { load_tokenizer(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
}

TEST(TokenizerErrors, TruncatedTokenizerJsonNamesTheFile) {
  std::string dir = testing::temp_dir("tok-json");
  std::string text = byte_level_json(false).dump();
  for (size_t keep : {size_t{1}, text.size() / 2, text.size() - 1}) {
    std::string path = dir + "/tokenizer.json";
    write(path, text.substr(0, keep));
    std::string msg = error_of([&] { load_tokenizer(path); });
    EXPECT_NE(msg.find(path), std::string::npos) << keep << ": " << msg;
    EXPECT_NE(msg.find("truncated"), std::string::npos) << keep << ": " << msg;
  }
  // Valid JSON, wrong layout.
  std::string path = dir + "/tokenizer.json";
  write(path, R"({"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}})");
  EXPECT_NE(error_of([&] { load_tokenizer(path); }).find(path), std::string::npos);
  // A file whose content is no format's is read as its name says (an empty or damaged one gets
  // that format's error, not SentencePiece's).
  for (const auto& [name, text, want] :
       {std::tuple<std::string, std::string, std::string>{"array.json", "[]\n", "layout"},
        {"empty.json", "", "not valid JSON"},
        {"empty.tiktoken", "", "0 ranks"}}) {
    write(dir + "/" + name, text);
    const std::string msg = error_of([&] { load_tokenizer(dir + "/" + name); });
    EXPECT_NE(msg.find(dir + "/" + name + ": "), std::string::npos) << msg;
    EXPECT_NE(msg.find(want), std::string::npos) << name << ": " << msg;
    EXPECT_EQ(msg.find("SentencePiece"), std::string::npos) << name << ": " << msg;
  }
}

TEST(TokenizerErrors, TruncatedVocabMergesNameTheFile) {
  std::string dir = testing::temp_dir("tok-vocab");
  write(dir + "/merges.txt", "#version: 0.2\nh e\n");
  write(dir + "/vocab.json", R"({"h": 0, "e": 1, "he)");
  std::string msg = error_of([&] { load_tokenizer(dir + "/vocab.json"); });
  EXPECT_NE(msg.find(dir + "/vocab.json"), std::string::npos) << msg;
  write(dir + "/vocab.json", byte_level_json(false)["model"]["vocab"].dump());
  write(dir + "/merges.txt", "#version: 0.2\nh e\nnospace\n");
  msg = error_of([&] { load_tokenizer(dir + "/vocab.json"); });
  EXPECT_NE(msg.find(dir + "/merges.txt:3"), std::string::npos) << msg;
  write(dir + "/merges.txt", "#version: 0.2\nh e\nt h e\n");  // tokenizers: "invalid at line 2"
  msg = error_of([&] { load_tokenizer(dir + "/vocab.json"); });
  EXPECT_NE(msg.find(dir + "/merges.txt:3: expected \"left right\""), std::string::npos) << msg;
}

// A merge of three tokens is refused, in either of tokenizer.json's forms, as tokenizers refuses
// it (lmforge merged the first two and ignored the third).
TEST(TokenizerErrors, MergesOfThreeTokensAreRefused) {
  std::string dir = testing::temp_dir("tok-merge3");
  std::string h = gpt2_bytes_to_unicode("h"), e = gpt2_bytes_to_unicode("e");
  for (const json& bad : {json::array({h, e, h}), json(h + " " + e + " " + h), json(h + " ")}) {
    json j = byte_level_json(false);
    j["model"]["merges"].push_back(bad);
    write(dir + "/tokenizer.json", j.dump());
    std::string msg = error_of([&] { load_tokenizer(dir + "/tokenizer.json"); });
    EXPECT_NE(msg.find(dir + "/tokenizer.json: merge 4 "), std::string::npos) << msg;
  }
}

TEST(TokenizerErrors, MissingPathsAreNamed) {
  for (std::string path :
       {"/nonexistent/gpt2.tiktoken", "/nonexistent/tokenizer.json", "/nonexistent/dir/"}) {
    std::string msg = error_of([&] { load_tokenizer(path); });
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  }
  std::string dir = testing::temp_dir("tok-empty-dir");
  std::string msg = error_of([&] { load_tokenizer(dir); });
  EXPECT_NE(msg.find("no tokenizer here"), std::string::npos) << msg;
}

TEST(TokenizerErrors, UnsupportedPreTokenizerSequencesAreRefused) {
  std::string dir = testing::temp_dir("tok-unsupported");
  json split = {{"type", "Split"},
                {"pattern", {{"Regex", "\\s+|\\S+"}}},
                {"behavior", "Isolated"},
                {"invert", false}};
  json j = byte_level_json(false);
  // A Split before ByteLevel's own regex: HF would split twice.
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {split, {{"type", "ByteLevel"}, {"use_regex", true}}}}};
  EXPECT_NE(error_of([&] { load_json(dir, "a.json", j); }).find("after a Split"),
            std::string::npos);
  // ...or add a prefix space to every piece of the split.
  j["pre_tokenizer"]["pretokenizers"][1] = {
      {"type", "ByteLevel"}, {"use_regex", false}, {"add_prefix_space", true}};
  EXPECT_NE(error_of([&] { load_json(dir, "b.json", j); }).find("after a Split"),
            std::string::npos);
  j["pre_tokenizer"]["pretokenizers"] = {split, split};
  EXPECT_NE(error_of([&] { load_json(dir, "c.json", j); }).find("second regex"), std::string::npos);
}

// Pre-tokenizers and BPE options lmforge does not implement are refused, not skipped.
TEST(TokenizerErrors, UnsupportedPreTokenizersAndModelOptionsAreRefused) {
  std::string dir = testing::temp_dir("tok-unsupported-model");
  json j = byte_level_json(false);
  j["pre_tokenizer"] = {{"type", "WhitespaceSplit"}};
  EXPECT_NE(error_of([&] { load_json(dir, "a.json", j); }).find("pre-tokenizer WhitespaceSplit"),
            std::string::npos);
  j = byte_level_json(false);
  j["model"]["end_of_word_suffix"] = "</w>";
  EXPECT_NE(error_of([&] { load_json(dir, "b.json", j); }).find("end_of_word_suffix"),
            std::string::npos);
  j = byte_level_json(false);
  j["model"]["dropout"] = 0.1;
  EXPECT_NE(error_of([&] { load_json(dir, "c.json", j); }).find("dropout"), std::string::npos);
  j = byte_level_json(false);
  j["added_tokens"][0]["single_word"] = true;
  EXPECT_NE(error_of([&] { load_json(dir, "d.json", j); }).find("single_word"), std::string::npos);
  j = byte_level_json(false);  // null and empty affixes, no dropout: as Hugging Face writes them
  j["model"]["end_of_word_suffix"] = "";
  j["model"]["continuing_subword_prefix"] = nullptr;
  j["model"]["dropout"] = nullptr;
  EXPECT_EQ(error_of([&] { load_json(dir, "e.json", j); }), "");
}

// A normalizer lmforge does not implement (here SentencePiece's extra-whitespace removal, as the
// Hugging Face export writes it) is refused rather than skipped, which would encode differently.
TEST(TokenizerErrors, UnsupportedNormalizersAreRefused) {
  std::string dir = testing::temp_dir("tok-normalizer");
  json j = sentencepiece_json("prepend");
  j["normalizer"]["normalizers"].push_back(
      {{"type", "Replace"}, {"pattern", {{"Regex", " {2,}"}}}, {"content", " "}});
  std::string msg = error_of([&] { load_json(dir, "a.json", j); });
  EXPECT_NE(msg.find("a.json: normalizer {\"content\":\" \",\"pattern\":{\"Regex\""),
            std::string::npos)
      << msg;
  j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", std::string(300, 'A')}};
  msg = error_of([&] { load_json(dir, "b.json", j); });
  EXPECT_NE(msg.find("not supported yet"), std::string::npos) << msg;
  EXPECT_LT(msg.size(), 300u) << msg;
}

// A Unicode normal form goes first: after the "▁" steps a K form would leave the spaces it
// makes as spaces (lmforge applies it before them), and two forms are one too many.
TEST(TokenizerErrors, NormalFormsOnlyFirst) {
  std::string dir = testing::temp_dir("tok-normal-form");
  json j = sentencepiece_json("prepend");
  j["normalizer"]["normalizers"].insert(j["normalizer"]["normalizers"].begin(),
                                        json::object({{"type", "NFKC"}}));
  EXPECT_EQ(error_of([&] { load_json(dir, "first.json", j); }), "");
  j["normalizer"]["normalizers"].push_back(json::object({{"type", "NFC"}}));
  std::string msg = error_of([&] { load_json(dir, "last.json", j); });
  EXPECT_NE(msg.find("last.json: normalizer NFC after another normalizer is not supported"),
            std::string::npos)
      << msg;
}

// --- special tokens, BOS/EOS -------------------------------------------------------------------

TEST(TokenizerSpecials, PublicEncodingsWithAndWithoutTheirJson) {
  struct Want {
    std::string name;
    int64_t vocab;
    int32_t bos, eos;
    std::vector<std::pair<std::string, int32_t>> specials;
  } wants[] = {
      {"gpt2", 50257, -1, 50256, {{"<|endoftext|>", 50256}}},
      {"cl100k_base",
       100277,
       -1,
       100257,
       {{"<|endoftext|>", 100257},
        {"<|fim_prefix|>", 100258},
        {"<|fim_middle|>", 100259},
        {"<|fim_suffix|>", 100260},
        {"<|endofprompt|>", 100276}}},
      {"o200k_base", 200019, -1, 199999, {{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}}},
      {"llama3",
       128256,
       128000,
       128001,
       {{"<|begin_of_text|>", 128000},
        {"<|end_of_text|>", 128001},
        {"<|start_header_id|>", 128006},
        {"<|end_header_id|>", 128007},
        {"<|eot_id|>", 128009},
        {"<|python_tag|>", 128010},
        {"<|reserved_special_token_247|>", 128255}}},
  };
  // Without the .json beside it, a rank file gets the built-in pattern and specials.
  std::string bare = testing::temp_dir("tok-bare");
  for (const Want& w : wants) {
    fs::create_symlink(shared(w.name + ".tiktoken"), bare + "/" + w.name + ".tiktoken");
    for (std::string path : {shared(w.name + ".tiktoken"), bare + "/" + w.name + ".tiktoken"}) {
      SCOPED_TRACE(path);
      auto tok = load_tokenizer(path);
      EXPECT_EQ(tok->kind(), "tiktoken");
      EXPECT_EQ(tok->vocab_size(), w.vocab);
      EXPECT_EQ(tok->bos_id(), w.bos);
      EXPECT_EQ(tok->eos_id(), w.eos);
      for (auto& [name, id] : w.specials) {
        EXPECT_EQ(tok->special_id(name), std::optional<int32_t>(id)) << name;
        EXPECT_EQ(tok->decode({id}), name);
        EXPECT_EQ(tok->encode(name, /*allow_special=*/true), Ids{id}) << name;
        EXPECT_NE(tok->encode(name, /*allow_special=*/false), Ids{id}) << name;
      }
      EXPECT_EQ(tok->special_id("<|not_a_special|>"), std::nullopt);
      EXPECT_EQ(tok->special_id(""), std::nullopt);
      if (w.bos >= 0) {
        EXPECT_EQ(tok->encode("hi", false, /*add_bos=*/true).front(), w.bos);
      } else {
        EXPECT_EQ(tok->encode("hi", false, true), tok->encode("hi"));
      }
    }
  }
  auto byte = load_tokenizer("byte");
  EXPECT_EQ(byte->eos_id(), 256);
  EXPECT_EQ(byte->bos_id(), -1);
  EXPECT_EQ(byte->special_id("<|endoftext|>"), std::optional<int32_t>(256));
}

// A rank file's fingerprint (which shards, the data.text cache and checkpoints are checked by)
// covers its pattern and specials where a sibling .json changes them from the built-in encoding:
// other ids. The public files, with their .json (tiktoken's older spelling of the same patterns)
// or without, keep the fingerprint of their ranks alone, which earlier checkpoints recorded.
TEST(TokenizerFingerprint, TiktokenCountsItsJson) {
  std::string bare = testing::temp_dir("tok-fp-bare");
  for (const char* name : {"gpt2", "cl100k_base", "o200k_base", "llama3"}) {
    const std::string ranks = shared(std::string(name) + ".tiktoken");
    fs::create_symlink(ranks, bare + "/" + name + ".tiktoken");
    const std::string before = fnv1a_hex(testing::slurp(ranks));
    EXPECT_EQ(load_tokenizer(ranks)->fingerprint(), before) << name;
    EXPECT_EQ(load_tokenizer(bare + "/" + name + ".tiktoken")->fingerprint(), before) << name;
  }
  std::string dir = testing::temp_dir("tok-fp");
  fs::create_symlink(shared("cl100k_base.tiktoken"), dir + "/t.tiktoken");
  auto fingerprint_with = [&](const nlohmann::json& meta) {
    std::ofstream(dir + "/t.json") << meta.dump(2);
    return load_tokenizer(dir + "/t.tiktoken")->fingerprint();
  };
  const nlohmann::json cl100k = nlohmann::json::parse(testing::slurp(shared("cl100k_base.json")));
  const std::string base = load_tokenizer(shared("cl100k_base.tiktoken"))->fingerprint();
  EXPECT_EQ(fingerprint_with(cl100k), base);  // written out again: the same encoding
  nlohmann::json other = cl100k;
  other["pat_str"] = nlohmann::json::parse(testing::slurp(shared("gpt2.json")))["pat_str"];
  EXPECT_NE(fingerprint_with(other), base);
  other = cl100k;
  other["special_tokens"]["<|im_start|>"] = 100264;
  const std::string with_im = fingerprint_with(other);
  EXPECT_NE(with_im, base);
  other["special_tokens"]["<|im_start|>"] = 100265;
  EXPECT_NE(fingerprint_with(other), with_im);
}

// A tokenizer.json's EOS is its tokenizer_config.json's eos_token where that is a token (what
// transformers' tokenizer.eos_token is), else guessed by name; the fingerprint covers the choice,
// and a checkpoint's copy of the tokenizer carries the file, so it loads as the same tokenizer.
TEST(TokenizerFingerprint, TokenizerJsonTakesItsConfigsEos) {
  std::string dir = testing::temp_dir("tok-config-eos");
  std::ofstream(dir + "/corpus.txt") << "In the beginning God created the heaven and the earth.\n";
  BpeTrainOptions o;
  o.vocab_size = 280;
  o.specials = {"</s>", "<|im_end|>", "<eos>"};
  write_file_atomic(dir + "/tokenizer.json", train_bpe({dir + "/corpus.txt"}, o).tokenizer_json);
  auto guessed = load_tokenizer(dir + "/tokenizer.json");
  const int32_t s_end = *guessed->special_id("</s>"), im_end = *guessed->special_id("<|im_end|>"),
                eos = *guessed->special_id("<eos>");
  EXPECT_EQ(guessed->eos_id(), s_end);  // by name: </s> before <|im_end|>
  auto with_config = [&](const nlohmann::json& config) {
    std::ofstream(dir + "/tokenizer_config.json") << config.dump();
    return load_tokenizer(dir + "/tokenizer.json");
  };
  EXPECT_EQ(with_config({{"eos_token", "<eos>"}})->eos_id(), eos);
  auto im = with_config({{"eos_token", {{"content", "<|im_end|>"}, {"special", true}}}});
  EXPECT_EQ(im->eos_id(), im_end);
  EXPECT_NE(im->fingerprint(), guessed->fingerprint());
  auto same = with_config({{"eos_token", "</s>"}, {"pad_token", "<eos>"}});
  EXPECT_EQ(same->eos_id(), s_end);
  EXPECT_EQ(same->fingerprint(), guessed->fingerprint());  // the guess's EOS: the same tokenizer
  EXPECT_EQ(with_config({{"eos_token", "<not a token>"}})->eos_id(), s_end);
  // Only a model directory's pair: another file name beside the config keeps its guessed EOS.
  fs::copy_file(dir + "/tokenizer.json", dir + "/other.json");
  with_config({{"eos_token", "<eos>"}});
  EXPECT_EQ(load_tokenizer(dir + "/other.json")->eos_id(), s_end);
  // A checkpoint's copy: tokenizer_config.json (and the chat template) go with tokenizer.json.
  std::ofstream(dir + "/chat_template.jinja") << "{{ messages }}";
  auto chat = with_config({{"eos_token", "<|im_end|>"}});
  ASSERT_TRUE(copy_tokenizer_files(*chat, dir + "/copy"));
  EXPECT_TRUE(fs::exists(dir + "/copy/chat_template.jinja"));
  auto copied = load_tokenizer(dir + "/copy/tokenizer.json");
  EXPECT_EQ(copied->eos_id(), im_end);
  EXPECT_EQ(copied->fingerprint(), chat->fingerprint());
}

// --- invalid UTF-8 ----------------------------------------------------------------------------

// Random bytes (mostly invalid UTF-8) encode without error and decode back to the same bytes.
TEST(TokenizerInvalidUtf8, RandomBytesRoundTripThroughByteLevelTokenizers) {
  std::string dir = testing::temp_dir("tok-utf8");
  std::vector<std::unique_ptr<Tokenizer>> toks;
  for (const char* name : {"gpt2", "cl100k_base", "o200k_base", "llama3"})
    toks.push_back(load_tokenizer(shared(std::string(name) + ".tiktoken")));
  toks.push_back(load_json(dir, "bytelevel.json", byte_level_json(false)));
  toks.push_back(load_json(dir, "sp.json", sentencepiece_json("prepend")));
  toks.push_back(load_tokenizer("byte"));
  std::mt19937 rng(1234);
  const std::string alphabet = "ab \n\t'sT1\xC3\xA9\xE2\x96\x81";
  for (int trial = 0; trial < 300; ++trial) {
    std::string text(rng() % 200, '\0');
    for (char& c : text) {
      // Half raw bytes, half bytes of plausible text, so that runs and partial sequences mix.
      c = rng() % 2 ? static_cast<char>(rng()) : alphabet[rng() % alphabet.size()];
    }
    for (auto& tok : toks) {
      Ids ids = tok->encode(text);
      for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->vocab_size()) << tok->source();
      std::string back = tok->decode(ids);
      // U+2581 in the text decodes to a space in SentencePiece-style tokenizers, by design.
      if (tok->kind() == "hf-sp-bpe" && text.find(kMeta) != std::string::npos) continue;
      ASSERT_EQ(back, text) << tok->source() << " trial " << trial;
    }
  }
}

// Bytes that are not UTF-8 stay as they are and separate the text: nothing composes across
// them, and normalizing twice changes nothing (random bytes mixed with composable text). The
// forms themselves are checked against Hugging Face in test_tokenizer_reference (hf-nf*).
TEST(TokenizerInvalidUtf8, NormalFormsKeepInvalidBytesAndAreIdempotent) {
  EXPECT_EQ(normalize_utf8("e\xCC\x81", NormalForm::kNFC), "\xC3\xA9");  // e + U+0301 -> U+00E9
  EXPECT_EQ(normalize_utf8("e\xFF\xCC\x81", NormalForm::kNFC), "e\xFF\xCC\x81");
  EXPECT_EQ(normalize_utf8("\xC3\xA9\xC3", NormalForm::kNFD), "e\xCC\x81\xC3");
  std::mt19937 rng(15);
  const std::string alphabet = "ae \n\xCC\x81\xCC\xA3\xC3\xA9\xEF\xAC\x81\xE1\x84\x80\xE1\x85\xA1";
  for (NormalForm f : {NormalForm::kNFC, NormalForm::kNFD, NormalForm::kNFKC, NormalForm::kNFKD}) {
    for (int trial = 0; trial < 300; ++trial) {
      std::string text(rng() % 120, '\0');
      for (char& c : text)
        c = rng() % 4 ? alphabet[rng() % alphabet.size()] : static_cast<char>(rng());
      const std::string once = normalize_utf8(text, f);
      ASSERT_EQ(normalize_utf8(once, f), once) << normal_form_name(f) << " trial " << trial;
      // Bytes 0xF8..0xFF are never UTF-8: each one is kept, in order.
      auto never_utf8 = [](const std::string& s) {
        std::string out;
        for (char c : s)
          if (static_cast<unsigned char>(c) >= 0xF8) out += c;
        return out;
      };
      ASSERT_EQ(never_utf8(once), never_utf8(text)) << normal_form_name(f) << " trial " << trial;
    }
  }
}

// Text longer than the pieces normalize_utf8 hands ICU (1 MiB) normalizes as a whole: a unit
// that starts with an ASCII letter starts at a boundary of every form, so the form of k copies is
// k copies of the unit's form (the pieces are cut before ASCII characters only).
TEST(TokenizerNormalForms, LongTextIsNormalizedAsAWhole) {
  // Long runs of marks of two combining classes (230, 220): a cut inside one would leave them
  // reordered and composed differently.
  std::string unit =
      "Cafe\xCC\x81 q\xCC\x87\xCC\xA3 \xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8 \xEF\xAC\x81 e";
  for (int k = 0; k < 200; ++k) unit += "\xCC\x81\xCC\xA3";
  std::string text, want;
  for (NormalForm f : {NormalForm::kNFC, NormalForm::kNFD, NormalForm::kNFKC, NormalForm::kNFKD}) {
    const std::string one = normalize_utf8(unit, f);
    text.clear();
    want.clear();
    while (text.size() < (size_t{3} << 20)) {
      text += unit;
      want += one;
    }
    ASSERT_TRUE(normalize_utf8(text, f) == want) << normal_form_name(f);  // 3 MiB: no diff dump
  }
}

// --- behaviours pinned to the references -------------------------------------------------------

// tiktoken's regex crate and HF's Oniguruma take \s as White_Space; PCRE2's \s also matches
// U+180E. lmforge compiles \s as \p{White_Space}.
TEST(TokenizerPretokenizer, BackslashSIsUnicodeWhiteSpace) {
  auto pieces = [](const std::string& pattern, const std::string& text) {
    std::vector<std::string> out;
    Pretokenizer(pattern, "test").split(text, [&](std::string_view p) { out.emplace_back(p); });
    return out;
  };
  const std::string mvs = "\xE1\xA0\x8E";  // U+180E MONGOLIAN VOWEL SEPARATOR
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces(R"(\s+|\S+)", "a" + mvs + mvs + "b c"), (V{"a" + mvs + mvs + "b", " ", "c"}));
  EXPECT_EQ(pieces(R"([^\s]+|\s)", mvs + "\xC2\xA0" + "x"), (V{mvs, "\xC2\xA0", "x"}));
  EXPECT_EQ(pieces(R"(\s)", "\xE2\x80\x80\xE3\x80\x80\xC2\x85"),
            (V{"\xE2\x80\x80", "\xE3\x80\x80", "\xC2\x85"}));  // U+2000, U+3000, U+0085
  // \Q...\E stays literal.
  EXPECT_EQ(pieces(R"(\Q\s\E|.)", "x\\sy"), (V{"x", "\\s", "y"}));
  // From tiktoken 0.14, cl100k_base: "\t\t" + U+180E is 3 pieces there, not one whitespace run.
  auto cl100k = load_tokenizer(shared("cl100k_base.tiktoken"));
  EXPECT_EQ(cl100k->encode("\t\t" + mvs), (Ids{197, 197, 157, 254, 236}));
  EXPECT_EQ(cl100k->encode("x   " + mvs), (Ids{87, 256, 87189, 254, 236}));
}

// A long run under nested quantifiers overflows PCRE2's default JIT stack (32 KiB): the match
// must still succeed, not leave the rest of the text as single bytes. Text a Split pattern does
// not cover is kept in pieces of valid UTF-8, invalid bytes one by one.
TEST(TokenizerPretokenizer, LongRunsAndUncoveredTextStayWhole) {
  auto pieces = [](const std::string& pattern, const std::string& text) {
    std::vector<std::string> out;
    Pretokenizer(pattern, "test").split(text, [&](std::string_view p) { out.emplace_back(p); });
    return out;
  };
  using V = std::vector<std::string>;
  const std::string run(20000, 'a');
  EXPECT_EQ(pieces(R"( ?(?:\p{L}\p{M}*)+|\s+|[^\s\p{L}]+)", run + " hello world"),
            (V{run, " hello", " world"}));
  EXPECT_EQ(pieces(R"(\p{L}+)",
                   "hello, world!! \xFF\xFE"
                   "12"),
            (V{"hello", ", ", "world", "!! ", "\xFF", "\xFE", "12"}));
  EXPECT_EQ(pieces(R"(\p{L}+)", "\xE6\x97\xA5x \xE6\x97"),  // a cut character at the end
            (V{"\xE6\x97\xA5x", " ", "\xE6", "\x97"}));
}

// HF normalizes and pre-tokenizes every run of text between added tokens on its own. Expected
// ids recorded from HF tokenizers 0.23.3 on the same tokenizer.json.
TEST(TokenizerHfRuns, PrefixesApplyPerRunOfText) {
  std::string dir = testing::temp_dir("tok-runs");
  // ids: <s> 1, ▁ 259, h 260, e 261, ▁h 262, ▁he 263; "<" 0x3C -> 63, "s" -> 118, ">" -> 65.
  auto prepend = load_json(dir, "prepend.json", sentencepiece_json("prepend"));
  EXPECT_EQ(prepend->encode("he"), (Ids{263}));
  EXPECT_EQ(prepend->encode(" he"), (Ids{259, 263}));
  EXPECT_EQ(prepend->encode("he<s>he", true), (Ids{263, 1, 263}));
  EXPECT_EQ(prepend->encode("<s>he", true), (Ids{1, 263}));
  EXPECT_EQ(prepend->encode("he<s>he", false), (Ids{263, 63, 118, 65, 260, 261}));
  EXPECT_EQ(prepend->decode({263, 1, 263}), "he<s> he");
  EXPECT_EQ(prepend->decode({259, 263}), " he");

  auto first = load_json(dir, "first.json", sentencepiece_json("first"));
  EXPECT_EQ(first->encode(" he"), (Ids{263}));
  EXPECT_EQ(first->encode("he<s>he", true), (Ids{263, 1, 260, 261}));
  EXPECT_EQ(first->encode("he<s> he", true), (Ids{263, 1, 263}));
  EXPECT_EQ(first->encode("<s>he", true), (Ids{1, 260, 261}));
  EXPECT_EQ(first->encode(std::string(kMeta) + "he"), (Ids{263}));

  auto always = load_json(dir, "always.json", sentencepiece_json("always"));
  EXPECT_EQ(always->encode("he<s>he", true), (Ids{263, 1, 263}));
  EXPECT_EQ(always->encode("he<s> he", true), (Ids{263, 1, 263}));
  EXPECT_EQ(always->encode("<s>he", true), (Ids{1, 263}));

  // ByteLevel add_prefix_space: a space before every run (Ġ = byte 0x20 = id 32).
  auto bl = load_json(dir, "bl.json", byte_level_json(true));
  EXPECT_EQ(bl->encode("ab<|endoftext|>cd", true), (Ids{32, 259, 260, 32, 99, 100}));
  EXPECT_EQ(bl->encode("<|endoftext|>cd", true), (Ids{260, 32, 99, 100}));
  EXPECT_EQ(bl->encode(" ab"), (Ids{32, 259}));
  EXPECT_EQ(bl->decode({32, 259, 260, 32, 99, 100}), " ab<|endoftext|> cd");
}

// The heap merge (pieces longer than 128 symbols) gives the linear scan's result: lowest rank
// first, leftmost on ties, with several pairs per rank as tiktoken rank files make.
TEST(TokenizerBpe, LongPiecesMergeLikeTheLinearScan) {
  std::mt19937 rng(7);
  BpeEngine engine;
  struct M {
    int32_t a, b, merged;
    uint32_t rank;
  };
  std::vector<M> merges;
  int32_t next = 6;
  for (uint32_t rank = 0; rank < 60; ++rank) {
    int32_t merged = next++;
    for (int k = 0; k < 1 + int(rng() % 2); ++k) {  // one or two pairs make the same token
      M m{int32_t(rng() % merged), int32_t(rng() % merged), merged, rank};
      bool dup = false;
      for (const M& o : merges) dup |= o.a == m.a && o.b == m.b;
      if (dup) continue;
      merges.push_back(m);
      engine.add_merge(m.a, m.b, m.merged, m.rank);
    }
  }
  auto reference = [&](Ids ids) {
    for (;;) {
      size_t at = 0;
      const M* best = nullptr;
      for (size_t i = 0; i + 1 < ids.size(); ++i)
        for (const M& m : merges)
          if (m.a == ids[i] && m.b == ids[i + 1] && (!best || m.rank < best->rank)) {
            best = &m;
            at = i;
          }
      if (!best) return ids;
      ids[at] = best->merged;
      ids.erase(ids.begin() + at + 1);
    }
  };
  for (int trial = 0; trial < 60; ++trial) {
    Ids ids(100 + rng() % 900);
    for (int32_t& id : ids) id = rng() % 6;
    Ids got = ids;
    engine.merge(got);
    ASSERT_EQ(got, reference(ids)) << "trial " << trial << ", " << ids.size() << " symbols";
  }
}

}  // namespace
}  // namespace lmforge
