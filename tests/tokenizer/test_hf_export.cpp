// export_hf_tokenizer against transformers: every kind of lmforge tokenizer is exported, loaded
// back with AutoTokenizer.from_pretrained (tests/reference/hf_export_ref.py, one run for all
// kinds: ctest runs each test in its own process, so this is one test) and must give lmforge's
// ids on every document: KJV Genesis 1-3, kernel documentation in four languages, GCIDE, and
// tokenizer_ref.py's hard cases (unicode, whitespace runs, digits, special-token text). Modes,
// Hugging Face <-> lmforge:
//   plain  encode(add_special_tokens=False)           <-> encode(text, allow_special=true)
//   split  ... split_special_tokens=True              <-> allow_special=false
//   bos    encode(add_special_tokens=True)            <-> add_bos=true (split as well for
//          SentencePiece, which never reads control pieces from text: no plain mode there)
// Without BOS, transformers' decode(ids) must be lmforge's decode(ids) (the text itself for the
// byte-level kinds). The export must load back into lmforge with the same ids (or be refused
// with an Error), copy a source tokenizer.json byte for byte and keep its tokenizer_config.json.
// Some exports get a config.json naming a model type, as a model export writes one, so that
// AutoTokenizer's choice of class by model type is covered.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_trainer.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "testing/paths.h"
#include "testing/process.h"
#include "tokenizer/reference_fixtures.h"

namespace lmforge {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Ids = std::vector<int32_t>;

struct Mode {
  std::string name;
  bool add_special_tokens, split_special_tokens;  // Hugging Face
  bool allow_special, add_bos;                    // lmforge
};
const Mode kPlain{"plain", false, false, true, false};
const Mode kSplit{"split", false, true, false, false};
const Mode kBos{"bos", true, false, true, true};
const Mode kBosSplit{"bos", true, true, false, true};

struct Case {
  std::string name;
  std::string source;      // what load_tokenizer gets: "assets:<file>", "sources:<path>", ...
  std::string model_type;  // a config.json beside the export, as a model export writes one
  bool sentencepiece = false, lossless = true, reloads = true;
};

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {"tiktoken-gpt2", "assets:gpt2.tiktoken", "gpt2"},
      {"tiktoken-cl100k_base", "assets:cl100k_base.tiktoken", ""},
      {"tiktoken-o200k_base", "assets:o200k_base.tiktoken", ""},
      {"tiktoken-llama3", "assets:llama3.tiktoken", "llama"},
      {"gpt2-merges", "sources:gpt2-merges/vocab.json", "gpt2"},
      {"hf-gpt2", "sources:hf-gpt2/tokenizer.json", ""},
      {"hf-sp-bpe", "sources:hf-sp-bpe/tokenizer.json", "llama", false, false},
      {"hf-sp-metaspace", "sources:hf-sp-metaspace/tokenizer.json", "", false, false},
      {"lmforge-bpe", "trained", "llama"},
      {"sentencepiece-bpe", "sources:sentencepiece-bpe/tokenizer.model", "llama", true, false},
      // Extra whitespace removed: lmforge's tokenizer.json loader refuses that normalizer, so
      // the export directory reloads from the tokenizer.model beside it.
      {"sentencepiece-bpe-plain", "sources:sentencepiece-bpe-plain/tokenizer.model", "", true,
       false},
      {"byte", "byte", ""},
  };
  return c;
}

std::vector<Mode> modes(const Case& c) {
  if (c.sentencepiece) return {kSplit, kBosSplit};
  return {kPlain, kSplit, kBos};
}

struct Result {
  Ids ids;
  std::string decoded;
};

// Runs tests/reference/hf_export_ref.py; "" on success, else the command and its output's tail.
std::string run_python(const std::string& args, const std::string& log) {
  std::string cmd = fmt::format("'{}' '{}/tests/reference/hf_export_ref.py' {} >'{}' 2>&1",
                                testing::python(), testing::source_dir(), args, log);
  if (std::system(cmd.c_str()) == 0) return "";
  std::string tail = testing::slurp(log);
  if (tail.size() > 4000) tail.erase(0, tail.size() - 4000);
  return fmt::format("{} failed:\n{}", cmd, tail);
}

// The source tokenizers and documents (cached in the build's ref/ directory).
std::string make_sources(const std::string& log_dir) {
  std::string sources = testing::ref_dir() + "/hf-export-sources";
  std::string error = run_python(
      "sources --out '" + sources + "' --assets '" + testing::shared_tokenizers_dir() + "'",
      log_dir + "/sources.log");
  EXPECT_EQ(error, "");
  return sources;
}

std::string source_path(const Case& c, const std::string& sources, const std::string& out,
                        const std::string& english) {
  if (c.source.starts_with("assets:"))
    return testing::shared_tokenizers_dir() + "/" + c.source.substr(7);
  if (c.source.starts_with("sources:")) return sources + "/" + c.source.substr(8);
  if (c.source == "trained") {  // lmforge's own BPE (data.tokenizer: bpe:N)
    std::string dir = out + "/trained-source";
    fs::create_directories(dir);
    write_file_atomic(dir + "/train.txt", english);
    BpeTrainOptions o;
    o.vocab_size = 1000;
    write_file_atomic(dir + "/tokenizer.json", train_bpe({dir + "/train.txt"}, o).tokenizer_json);
    return dir + "/tokenizer.json";
  }
  return c.source;
}

// Compares transformers' results for one exported tokenizer with lmforge's, mode by mode.
void check_against_transformers(const Case& c, const Tokenizer& tok,
                                const std::vector<std::string>& names,
                                const std::vector<std::string>& texts,
                                std::map<std::string, std::vector<Result>>& hf,
                                const std::string& cls) {
  constexpr int kMaxReported = 3;
  for (const Mode& mode : modes(c)) {
    const std::vector<Result>& got = hf[mode.name];
    ASSERT_EQ(got.size(), texts.size()) << mode.name << ": results missing";
    int id_failures = 0, decode_failures = 0;
    size_t tokens = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      Ids ours = tok.encode(texts[i], mode.allow_special, mode.add_bos);
      tokens += ours.size();
      const std::string where = fmt::format("mode {}, document {}", mode.name, names[i]);
      if (got[i].ids != ours && ++id_failures <= kMaxReported)
        ADD_FAILURE() << where << ": transformers' ids differ from lmforge's\n"
                      << testing::describe_mismatch(tok, ours, got[i].ids, texts[i]);
      if (mode.add_bos) continue;  // SentencePiece decodes <s> to "", transformers to "<s>"
      std::string want = tok.decode(ours);
      if (c.lossless) {
        EXPECT_EQ(want, texts[i]) << where << ": lmforge's decode";
      }
      if (got[i].decoded != want && ++decode_failures <= kMaxReported)
        ADD_FAILURE() << where << ": transformers' decode differs from lmforge's\n  lmforge:      "
                      << testing::escaped(want, 200)
                      << "\n  transformers: " << testing::escaped(got[i].decoded, 200);
    }
    EXPECT_EQ(id_failures, 0) << mode.name << ": documents whose ids differ";
    EXPECT_EQ(decode_failures, 0) << mode.name << ": documents decoded apart";
    std::printf("%s (%s, loaded by transformers as %s): mode %s, %zu documents, %zu tokens\n",
                c.name.c_str(), tok.kind().c_str(), cls.c_str(), mode.name.c_str(), texts.size(),
                tokens);
  }
}

// The export loads back into lmforge with the same ids (BOS included).
void check_reload(const Case& c, const Tokenizer& tok, const std::string& dir,
                  const std::vector<std::string>& names, const std::vector<std::string>& texts) {
  auto back = load_tokenizer(dir);
  EXPECT_EQ(back->bos_id(), tok.bos_id());
  EXPECT_EQ(back->eos_id(), tok.eos_id());
  for (bool allow_special : {false, true}) {
    if (c.sentencepiece && allow_special) continue;  // the export's <s> is an added token
    for (size_t i = 0; i < texts.size(); ++i) {
      Ids want = tok.encode(texts[i], allow_special, true);
      Ids got = back->encode(texts[i], allow_special, true);
      ASSERT_EQ(got, want) << "reloaded into lmforge: document " << names[i] << ", allow_special "
                           << allow_special << "\n"
                           << testing::describe_mismatch(tok, got, want, texts[i]);
    }
  }
}

// tokenizer.json copied byte for byte, a source tokenizer_config.json kept, else one written.
void check_files(const Case& c, const Tokenizer& tok, const std::string& dir) {
  json config = json::parse(testing::slurp(dir + "/tokenizer_config.json"));
  fs::path source_config = fs::path(tok.source()).parent_path() / "tokenizer_config.json";
  if (tok.kind().starts_with("hf-")) {
    EXPECT_EQ(testing::slurp(dir + "/tokenizer.json"), testing::slurp(tok.source()));
    if (fs::exists(source_config)) {
      EXPECT_EQ(testing::slurp(dir + "/tokenizer_config.json"), testing::slurp(source_config));
      EXPECT_EQ(config.value("model_max_length", 0), 1024);
      return;
    }
  }
  EXPECT_EQ(config.at("tokenizer_class"), "PreTrainedTokenizerFast");
  if (tok.eos_id() >= 0) {
    EXPECT_EQ(tok.special_id(config.at("eos_token").get<std::string>()), tok.eos_id());
  }
  if (tok.bos_id() >= 0) {
    EXPECT_EQ(tok.special_id(config.at("bos_token").get<std::string>()), tok.bos_id());
  }
  if (c.sentencepiece) {
    EXPECT_EQ(testing::slurp(dir + "/tokenizer.model"), testing::slurp(tok.source()));
  }
}

// One test for every kind: transformers starts once (the whole run ~30 s; ctest runs each test
// in its own process).
TEST(TokenizerHfExport, AutoTokenizerEncodesAndDecodesLikeLmforge) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  std::string out = testing::temp_dir("hf-export");
  std::string sources = make_sources(out);
  std::vector<std::string> names, texts;
  std::string english;
  std::ifstream docs(sources + "/docs.jsonl");
  for (std::string line; std::getline(docs, line);) {
    json d = json::parse(line);
    names.push_back(d.at("name"));
    texts.push_back(d.at("text"));
    if (names.back().starts_with("kjv") || names.back().starts_with("process/"))
      english += texts.back();
  }
  ASSERT_GT(texts.size(), 100u) << sources << "/docs.jsonl";

  std::map<std::string, std::unique_ptr<Tokenizer>> toks;
  json manifest = {{"docs", sources + "/docs.jsonl"}, {"tokenizers", json::array()}};
  for (const Case& c : cases()) {
    auto t1 = clock::now();
    auto tok = load_tokenizer(source_path(c, sources, out, english));
    std::string dir = out + "/" + c.name;
    export_hf_tokenizer(*tok, dir);
    if (!c.model_type.empty())
      write_file_atomic(
          dir + "/config.json",
          json({{"model_type", c.model_type}, {"vocab_size", tok->vocab_size()}}).dump());
    json m = json::array();
    for (const Mode& mode : modes(c))
      m.push_back({{"mode", mode.name},
                   {"add_special_tokens", mode.add_special_tokens},
                   {"split_special_tokens", mode.split_special_tokens}});
    manifest["tokenizers"].push_back({{"name", c.name}, {"dir", dir}, {"modes", m}});
    std::printf("%s (%s): loaded and exported in %.2f s\n", c.name.c_str(), tok->kind().c_str(),
                std::chrono::duration<double>(clock::now() - t1).count());
    toks[c.name] = std::move(tok);
  }
  write_file_atomic(out + "/manifest.json", manifest.dump());
  auto t2 = clock::now();
  std::string error =
      run_python("encode --manifest '" + out + "/manifest.json' --out '" + out + "/results.jsonl'",
                 out + "/encode.log");
  ASSERT_EQ(error, "");
  std::printf("transformers: %.1f s\n", std::chrono::duration<double>(clock::now() - t2).count());

  std::map<std::string, std::string> classes;  // name -> the class AutoTokenizer chose
  std::map<std::string, std::map<std::string, std::vector<Result>>> hf;  // [name][mode][doc]
  std::ifstream in(out + "/results.jsonl");
  std::string line;
  std::getline(in, line);
  json first = json::parse(line);  // named: items() of a temporary would dangle
  for (auto& [name, cls] : first.at("classes").items()) classes[name] = cls;
  while (std::getline(in, line)) {
    json r = json::parse(line);
    auto& v = hf[r.at("name")][r.at("mode")];
    size_t doc = r.at("doc");
    if (v.size() <= doc) v.resize(doc + 1);
    v[doc] = {r.at("ids").get<Ids>(), r.at("decoded").get<std::string>()};
  }

  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const Tokenizer& tok = *toks.at(c.name);
    std::string dir = out + "/" + c.name;
    check_against_transformers(c, tok, names, texts, hf[c.name], classes[c.name]);
    if (c.reloads)
      check_reload(c, tok, dir, names, texts);
    else  // refused with an Error rather than encoded differently
      EXPECT_THROW(load_tokenizer(dir), Error);
    check_files(c, tok, dir);
    if (c.name == "sentencepiece-bpe-plain") {
      // The tokenizer.model beside a refused tokenizer.json stands in for an intact one only:
      // not for a damaged file, nor for one with tokens added past the model's pieces.
      const std::string json_text = testing::slurp(dir + "/tokenizer.json");
      const std::string other = out + "/sp-fallback";
      fs::create_directories(other);
      fs::copy_file(dir + "/tokenizer.model", other + "/tokenizer.model");
      std::ofstream(other + "/tokenizer.json") << json_text.substr(0, json_text.size() / 2);
      EXPECT_THROW(load_tokenizer(other), Error);
      json added = json::parse(json_text);
      added["added_tokens"].push_back({{"id", tok.vocab_size()},
                                       {"content", "<|im_start|>"},
                                       {"single_word", false},
                                       {"lstrip", false},
                                       {"rstrip", false},
                                       {"normalized", false},
                                       {"special", true}});
      std::ofstream(other + "/tokenizer.json", std::ios::trunc) << added.dump();
      EXPECT_THROW(load_tokenizer(other), Error);
      std::ofstream(other + "/tokenizer.json", std::ios::trunc) << json_text;
      EXPECT_EQ(load_tokenizer(other)->vocab_size(), tok.vocab_size());
    }
  }
  std::printf("total: %.1f s\n", std::chrono::duration<double>(clock::now() - t0).count());
  if (!HasFailure()) fs::remove_all(out);
}

// Unigram and nmt_nfkc (SentencePiece's defaults) have no exact tokenizer.json: a clear Error.
TEST(TokenizerHfExport, RefusesUnigramSentencePieceModels) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("hf-export-unigram");
  std::string model = make_sources(dir) + "/sentencepiece-unigram/tokenizer.model";
  auto tok = load_tokenizer(model);
  try {
    export_hf_tokenizer(*tok, dir + "/out");
    ADD_FAILURE() << "exported a Unigram model";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(model + ": cannot export this SentencePiece model"),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("Unigram model"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lmforge
