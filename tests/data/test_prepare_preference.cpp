// Preference data (DPO, ORPO): `prepare --format preference` writes each JSONL pair as two
// documents of a paired shard (chosen, rejected; each the prompt then the response, the mask on
// the response), and the loader's pairs mode puts them in rows 2j and 2j+1 with the response's
// tokens as the only targets. KTO's labelled responses: `prepare --format unpaired` writes each
// as a document of a labelled shard, and the loader's unpaired mode gives each a row and its
// label (as it does each side of a pair).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/data/loader.h"
#include "lmforge/data/prepare.h"
#include "lmforge/data/shard.h"
#include "lmforge/tokenizer/chat_template.h"
#include "testing/errors.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string tokenizer_file(const std::string& name) {
  return testing::shared_tokenizers_dir() + "/" + name + ".tiktoken";
}

PrepareOptions options(const std::string& in, const std::string& out, const std::string& tok,
                       const std::string& chat_template = "",
                       const std::string& format = "preference") {
  PrepareOptions o;
  PrepareSource s{"pairs", {in}, {}};
  s.doc.format = format;
  s.doc.chat_template = chat_template;
  o.sources = {s};
  o.output = out;
  o.tokenizer = tokenizer_file(tok);
  o.progress = false;
  return o;
}

// A shard document's ids and mask.
void read_doc(const TokenShard& s, int64_t d, std::vector<int32_t>& ids,
              std::vector<uint8_t>& mask) {
  ids.clear();
  mask.clear();
  for (int64_t i = s.doc_start(d); i < s.doc_start(d + 1); ++i) {
    ids.push_back(static_cast<int32_t>(s[i]));
    mask.push_back(s.is_target(i));
  }
}

// Plain-text documents: document d is (BOS) want[d][0] + want[d][1] + EOS, the response and EOS
// its targets.
void expect_plain_documents(const TokenShard& s, const Tokenizer& tok,
                            const std::vector<std::array<std::string, 2>>& want) {
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  for (int64_t d = 0; d < static_cast<int64_t>(want.size()); ++d) {
    read_doc(s, d, ids, mask);
    std::vector<int32_t> prompt = tok.encode(want[d][0]), response = tok.encode(want[d][1]);
    std::vector<int32_t> e = prompt;
    e.insert(e.end(), response.begin(), response.end());
    e.push_back(tok.eos_id());
    std::vector<uint8_t> m(prompt.size(), 0);
    m.resize(e.size(), 1);
    EXPECT_EQ(ids, e) << "document " << d;
    EXPECT_EQ(mask, m) << "document " << d;
  }
}

}  // namespace

TEST(PreparePreference, PlainPairsArePromptThenResponseWithTheResponseAsTargets) {
  const std::string dir = testing::temp_dir("prepare-pref");
  {
    std::ofstream f(dir + "/p.jsonl", std::ios::binary);
    f << R"({"prompt": "In the beginning", "chosen": " God created the heaven.", "rejected": " was nothing."})"
      << "\n";
    f << R"({"chosen": "Amen.", "rejected": "No."})"
      << "\n";  // no prompt
    f << R"({"prompt": "x", "chosen": 3, "rejected": "y"})"
      << "\n";  // malformed_pair
    f << R"({"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "y"})"
      << "\n";  // a list needs a chat template: malformed_pair
    f << R"({"prompt": "x", "chosen": "y"})"
      << "\n";  // missing_field
  }
  const json summary = run_prepare(options(dir + "/p.jsonl", dir + "/out", "gpt2"));
  const json& st = summary["sources"]["pairs"];
  EXPECT_EQ(st["documents"]["train"], 2);
  EXPECT_EQ(st["skipped"], json({{"malformed_pair", 2}, {"missing_field", 1}}));

  auto tok = load_tokenizer(tokenizer_file("gpt2"));
  ASSERT_LT(tok->bos_id(), 0);  // GPT-2: no BOS; EOS <|endoftext|> ends each response
  TokenShard s = TokenShard::open(dir + "/out/pairs/train-00000.bin");
  EXPECT_TRUE(s.paired());
  ASSERT_EQ(s.num_docs(), 4);
  const std::vector<std::array<std::string, 2>> want = {
      {"In the beginning", " God created the heaven."},
      {"In the beginning", " was nothing."},
      {"", "Amen."},
      {"", "No."}};
  expect_plain_documents(s, *tok, want);
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;

  // Pairs mode: pair j in rows 2j (chosen) and 2j+1 (rejected); the targets are the response and
  // EOS, nothing of the prompt or the padding. T = 6 cuts the first pair's chosen side.
  LoaderOptions lo;
  lo.batch = 4;
  lo.seq = 6;
  lo.pairs = true;
  lo.pad_token = tok->eos_id();
  Loader loader(parse_data_spec(dir + "/out/pairs", "data.train"), lo);
  EXPECT_EQ(loader.num_samples(0), 2);
  EXPECT_EQ(loader.stats()[0]["cut_by_packing"], 1);
  EXPECT_EQ(loader.stats()[0]["pairs_without_targets"], 0);
  ASSERT_EQ(loader.sequential_batches(), 1);
  Batch b = Batch::make(4, 6);
  loader.sequential(0, b);
  for (int64_t row = 0; row < 4; ++row) {
    read_doc(s, row, ids, mask);
    for (int64_t t = 0; t < 6; ++t) {
      const int32_t x = b.tokens.data<int32_t>()[row * 6 + t];
      const int32_t y = b.targets.data<int32_t>()[row * 6 + t];
      if (t < static_cast<int64_t>(ids.size())) {
        EXPECT_EQ(x, ids[t]) << "row " << row << " t " << t;
      } else {
        EXPECT_EQ(b.doc_ids.data<int32_t>()[row * 6 + t], -1) << "padding";
      }
      const bool target = t + 1 < static_cast<int64_t>(ids.size()) && mask[t + 1];
      EXPECT_EQ(y, target ? ids[t + 1] : lo.ignore_index) << "row " << row << " t " << t;
    }
  }
  // Training order: whole pairs, the same rows together.
  loader.next(b);
  ASSERT_EQ(loader.last_samples().size(), 2u);

  // An odd batch, packing, or shards that are not pairs: one clear error each.
  lo.batch = 3;
  std::string e = testing::error_of([&] { Loader(parse_data_spec(dir + "/out/pairs", "d"), lo); });
  EXPECT_NE(e.find("train.batch_size: 3 is odd"), std::string::npos) << e;
  lo.batch = 2;
  lo.packing = "best_fit";
  e = testing::error_of([&] { Loader(parse_data_spec(dir + "/out/pairs", "d"), lo); });
  EXPECT_NE(e.find("data.packing: best_fit"), std::string::npos) << e;
  lo.packing = "none";
  lo.seq = 2;  // the first pair's 3 prompt tokens leave no response within T+1 = 3 tokens
  EXPECT_EQ(
      Loader(parse_data_spec(dir + "/out/pairs", "d"), lo).stats()[0]["pairs_without_targets"], 1);
  lo.seq = 6;
  lo.pairs = false;  // preference pairs are not next-token data
  e = testing::error_of([&] { Loader(parse_data_spec(dir + "/out/pairs", "d"), lo); });
  EXPECT_NE(e.find("only train.objective dpo, orpo, simpo and kto"), std::string::npos) << e;
  lo.pairs = true;
  write_shard(dir + "/plain.bin", {1, 2, 3, 4, 5, 6, 7, 8, 9}, {0, 4});
  e = testing::error_of([&] { Loader(parse_data_spec(dir + "/plain.bin", "d"), lo); });
  EXPECT_NE(e.find("--format preference"), std::string::npos) << e;
}

// No prompt, the dialogue in both sides (HH-RLHF's layout): TRL's implicit prompt
// (trl.data_utils.extract_prompt: their common start, less a space before the first difference;
// with no difference, all but the shorter's last character). A BOM starting a side's text is
// removed (and counted repaired), as from a text document.
TEST(PreparePreference, PlainPairsWithoutAPromptTakeTheImplicitOne) {
  const std::string dir = testing::temp_dir("prepare-pref-implicit");
  {
    std::ofstream f(dir + "/p.jsonl", std::ios::binary);
    f << R"({"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.", )"
      << R"("rejected": "\n\nHuman: Capital of France?\n\nAssistant: London."})"
      << "\n";
    f << R"({"prompt": "\ufeffHello", "chosen": " a", "rejected": " b"})"
      << "\n";
    f << R"({"chosen": "Yes.", "rejected": "Yes. Sure."})"
      << "\n";
    f << R"({"chosen": "\u00e9a", "rejected": "\u00e8b"})"  // differing in a character's last byte
      << "\n";
    f << R"({"chosen": "ab c", "rejected": "ab cd"})"  // no difference: no space taken off
      << "\n";
    f << R"({"chosen": "\ufeffSame a", "rejected": "Same b"})"  // a BOM is not text
      << "\n";
  }
  const json summary = run_prepare(options(dir + "/p.jsonl", dir + "/out", "gpt2"));
  EXPECT_EQ(summary["sources"]["pairs"]["repaired"], json({{"bom", 2}}));
  auto tok = load_tokenizer(tokenizer_file("gpt2"));
  TokenShard s = TokenShard::open(dir + "/out/pairs/train-00000.bin");
  ASSERT_EQ(s.num_docs(), 12);
  const std::string hh = "\n\nHuman: Capital of France?\n\nAssistant:";
  expect_plain_documents(s, *tok,
                         {{hh, " Paris."},
                          {hh, " London."},
                          {"Hello", " a"},
                          {"Hello", " b"},
                          {"Yes", "."},
                          {"Yes", ". Sure."},
                          {"", "\u00e9a"},
                          {"", "\u00e8b"},
                          {"ab ", "c"},
                          {"ab ", "cd"},
                          {"Same", " a"},
                          {"Same", " b"}});
}

TEST(PreparePreference, ChatPairsUseTheTemplateForPromptAndResponses) {
  const std::string dir = testing::temp_dir("prepare-pref-chat");
  const std::vector<ChatMessage> prompt = {{"system", "Be brief."}, {"user", "Who led Israel?"}};
  {
    std::ofstream f(dir + "/p.jsonl", std::ios::binary);
    json turns = json::array();
    for (const ChatMessage& m : prompt) turns.push_back({{"role", m.role}, {"content", m.content}});
    f << json({{"prompt", turns}, {"chosen", "Moses."}, {"rejected", "Pharaoh."}}).dump() << "\n";
    f << json({{"prompt", "Say amen."},
               {"chosen", {{{"role", "assistant"}, {"content", "Amen."}}}},
               {"rejected", {{{"role", "assistant"}, {"content", "No."}}}}})
             .dump()
      << "\n";
    f << json({{"prompt", "x"},
               {"chosen", {{{"role", "user"}, {"content", "a"}}}},
               {"rejected", "b"}})
             .dump()
      << "\n";  // no_assistant
    // TRL's implicit prompt: both sides carry the whole conversation, an assistant turn in the
    // shared part.
    auto conv = [](const std::string& last) {
      return json::array({{{"role", "user"}, {"content", "Hi."}},
                          {{"role", "assistant"}, {"content", "Hello."}},
                          {{"role", "user"}, {"content", "Who?"}},
                          {{"role", "assistant"}, {"content", last}}});
    };
    f << json({{"chosen", conv("Moses.")}, {"rejected", conv("Aaron.")}}).dump() << "\n";
  }
  const json summary = run_prepare(options(dir + "/p.jsonl", dir + "/out", "llama3", "llama3"));
  EXPECT_EQ(summary["sources"]["pairs"]["skipped"], json({{"no_assistant", 1}}));
  auto tok = load_tokenizer(tokenizer_file("llama3"));
  TokenShard s = TokenShard::open(dir + "/out/pairs/train-00000.bin");
  ASSERT_EQ(s.num_docs(), 6);
  auto with = [](std::vector<ChatMessage> m, ChatMessage last) {
    m.push_back(std::move(last));
    return m;
  };
  const std::vector<std::vector<ChatMessage>> want = {
      with(prompt, {"assistant", "Moses."}),
      with(prompt, {"assistant", "Pharaoh."}),
      {{"user", "Say amen."}, {"assistant", "Amen."}},
      {{"user", "Say amen."}, {"assistant", "No."}}};
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  for (int64_t d = 0; d < 4; ++d) {
    const ChatEncoding e = apply_chat_template(*tok, want[d], "llama3");
    read_doc(s, d, ids, mask);
    EXPECT_EQ(ids, e.ids) << "document " << d;
    EXPECT_EQ(mask, e.assistant_mask) << "document " << d;
  }
  // The shared conversation is the prompt: its assistant turn is no target, the last reply (and
  // its end of turn) is.
  const std::vector<ChatMessage> shared = {
      {"user", "Hi."}, {"assistant", "Hello."}, {"user", "Who?"}};
  const size_t k = apply_chat_template(*tok, shared, "llama3").ids.size();
  for (int64_t d = 4; d < 6; ++d) {
    const ChatEncoding e = apply_chat_template(
        *tok, with(shared, {"assistant", d == 4 ? "Moses." : "Aaron."}), "llama3");
    read_doc(s, d, ids, mask);
    EXPECT_EQ(ids, e.ids) << "document " << d;
    std::vector<uint8_t> m = e.assistant_mask;
    std::fill(m.begin(), m.begin() + k, 0);
    EXPECT_EQ(mask, m) << "document " << d;
    EXPECT_NE(m, e.assistant_mask) << "the shared turn was a target of the template's mask";
    std::string targets;
    for (size_t i = 0; i < ids.size(); ++i)
      if (mask[i]) targets += tok->decode({ids[i]});
    EXPECT_EQ(targets, std::string(d == 4 ? "Moses." : "Aaron.") + "<|eot_id|>");
  }
}

TEST(PreparePreference, BadSetUpIsOneClearErrorBeforeAnyOutput) {
  const std::string dir = testing::temp_dir("prepare-pref-errors");
  std::ofstream(dir + "/p.jsonl") << R"({"chosen": "a", "rejected": "b"})"
                                  << "\n";
  std::ofstream(dir + "/p.txt") << "plain\n";
  PrepareOptions o = options(dir + "/p.txt", dir + "/o1", "gpt2");
  std::string e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("format preference reads JSONL"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o1"));
  o = options(dir + "/p.jsonl", dir + "/o2", "gpt2", "llama3");  // GPT-2 lacks llama3's specials
  e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("<|begin_of_text|>"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o2"));
  o = options(dir + "/p.jsonl", dir + "/o3", "gpt2");
  o.sources[0].doc.field = "text";
  e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("fields prompt, chosen and rejected"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o3"));
}

TEST(PrepareUnpaired, LabelledResponsesAreOneDocumentEachWithTheirLabel) {
  const std::string dir = testing::temp_dir("prepare-unpaired");
  {
    std::ofstream f(dir + "/u.jsonl", std::ios::binary);
    f << R"({"prompt": "In the beginning", "completion": " God created the heaven.", "label": true})"
      << "\n";
    f << R"({"prompt": "In the beginning", "completion": " was nothing.", "label": false})"
      << "\n";
    f << R"({"completion": "Amen.", "label": true})"
      << "\n";  // no prompt
    f << R"({"prompt": "x", "completion": "y", "label": "yes"})"
      << "\n";  // malformed_example
    f << R"({"prompt": "x", "completion": 3, "label": true})"
      << "\n";  // malformed_example
    f << R"({"prompt": "x", "completion": "y"})"
      << "\n";  // missing_field
    f << R"({"prompt": "x", "label": false})"
      << "\n";  // missing_field
  }
  const json summary = run_prepare(options(dir + "/u.jsonl", dir + "/out", "gpt2", "", "unpaired"));
  const json& st = summary["sources"]["pairs"];
  EXPECT_EQ(st["documents"]["train"], 3);
  EXPECT_EQ(st["skipped"], json({{"malformed_example", 2}, {"missing_field", 2}}));

  auto tok = load_tokenizer(tokenizer_file("gpt2"));
  TokenShard s = TokenShard::open(dir + "/out/pairs/train-00000.bin");
  EXPECT_FALSE(s.paired());
  ASSERT_TRUE(s.labelled());
  ASSERT_EQ(s.num_docs(), 3);
  const std::vector<std::array<std::string, 2>> want = {
      {"In the beginning", " God created the heaven."},
      {"In the beginning", " was nothing."},
      {"", "Amen."}};
  const int8_t labels[] = {1, 0, 1};
  expect_plain_documents(s, *tok, want);
  for (int64_t d = 0; d < 3; ++d) EXPECT_EQ(s.label(d), labels[d]) << "document " << d;
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;

  // Unpaired mode: a row per response, its label beside it, padding rows labelled -1.
  LoaderOptions lo;
  lo.batch = 2;
  lo.seq = 8;
  lo.unpaired = true;
  lo.pad_token = tok->eos_id();
  Loader loader(parse_data_spec(dir + "/out/pairs", "data.train"), lo);
  EXPECT_EQ(loader.num_samples(0), 3);
  ASSERT_EQ(loader.sequential_batches(), 2);
  Batch b = Batch::make(2, 8);
  for (int64_t i = 0; i < 2; ++i) {
    loader.sequential(i, b);
    for (int64_t row = 0; row < 2; ++row) {
      const int64_t d = 2 * i + row;
      if (d == 3) {
        EXPECT_EQ(b.labels[row], -1) << "padding row";
        continue;
      }
      EXPECT_EQ(b.labels[row], labels[d]) << "document " << d;
      read_doc(s, d, ids, mask);
      for (int64_t t = 0; t < 8 && t < static_cast<int64_t>(ids.size()); ++t)
        EXPECT_EQ(b.tokens.data<int32_t>()[row * 8 + t], ids[t]) << "document " << d;
    }
  }
  // Training draws rows with their labels: every row's label is its document's.
  for (int k = 0; k < 4; ++k) {
    loader.next(b);
    for (size_t row = 0; row < 2; ++row) {
      const SampleId id = loader.last_samples()[row];
      EXPECT_EQ(b.labels[row], labels[id.index]);
    }
  }

  // Pairs in unpaired mode: each side a row, the chosen one desirable (TRL unpairs them so).
  {
    std::ofstream f(dir + "/p.jsonl", std::ios::binary);
    f << R"({"prompt": "a", "chosen": " b", "rejected": " c"})"
      << "\n";
    f << R"({"prompt": "d", "chosen": " e", "rejected": " f"})"
      << "\n";
  }
  run_prepare(options(dir + "/p.jsonl", dir + "/pout", "gpt2"));
  Loader pairs(parse_data_spec(dir + "/pout/pairs", "data.train"), lo);
  EXPECT_EQ(pairs.num_samples(0), 4);
  for (int64_t i = 0; i < 2; ++i) {
    pairs.sequential(i, b);
    EXPECT_EQ(b.labels[0], 1);
    EXPECT_EQ(b.labels[1], 0);
  }

  // Labelled shards elsewhere, other shards for KTO, packing: one clear error each.
  lo.unpaired = false;
  std::string e = testing::error_of([&] { Loader(parse_data_spec(dir + "/out/pairs", "d"), lo); });
  EXPECT_NE(e.find("only train.objective kto"), std::string::npos) << e;
  lo.pairs = true;
  e = testing::error_of([&] { Loader(parse_data_spec(dir + "/out/pairs", "d"), lo); });
  EXPECT_NE(e.find("only train.objective kto"), std::string::npos) << e;
  lo.pairs = false;
  lo.unpaired = true;
  write_shard(dir + "/plain.bin", {1, 2, 3, 4, 5, 6, 7, 8, 9}, {0, 4});
  e = testing::error_of([&] { Loader(parse_data_spec(dir + "/plain.bin", "d"), lo); });
  EXPECT_NE(e.find("--format unpaired"), std::string::npos) << e;
  lo.packing = "best_fit";
  e = testing::error_of([&] { Loader(parse_data_spec(dir + "/out/pairs", "d"), lo); });
  EXPECT_NE(e.find("data.packing: best_fit"), std::string::npos) << e;
}

// With a chat template: the completion's assistant turn is the target, the prompt's turns (its
// assistant turn too) are not.
TEST(PrepareUnpaired, ChatResponsesUseTheTemplate) {
  const std::string dir = testing::temp_dir("prepare-unpaired-chat");
  const std::vector<ChatMessage> prompt = {
      {"user", "Hi."}, {"assistant", "Hello."}, {"user", "Who?"}};
  {
    std::ofstream f(dir + "/u.jsonl", std::ios::binary);
    json turns = json::array();
    for (const ChatMessage& m : prompt) turns.push_back({{"role", m.role}, {"content", m.content}});
    f << json({{"prompt", turns}, {"completion", "Moses."}, {"label", false}}).dump() << "\n";
  }
  run_prepare(options(dir + "/u.jsonl", dir + "/out", "llama3", "llama3", "unpaired"));
  auto tok = load_tokenizer(tokenizer_file("llama3"));
  TokenShard s = TokenShard::open(dir + "/out/pairs/train-00000.bin");
  ASSERT_TRUE(s.labelled());
  ASSERT_EQ(s.num_docs(), 1);
  EXPECT_EQ(s.label(0), 0);
  std::vector<ChatMessage> turns = prompt;
  turns.push_back({"assistant", "Moses."});
  const ChatEncoding e = apply_chat_template(*tok, turns, "llama3");
  const size_t k = apply_chat_template(*tok, prompt, "llama3").ids.size();
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  read_doc(s, 0, ids, mask);
  EXPECT_EQ(ids, e.ids);
  ASSERT_EQ(mask.size(), e.assistant_mask.size());
  for (size_t i = 0; i < mask.size(); ++i)
    EXPECT_EQ(mask[i], i < k ? 0 : e.assistant_mask[i]) << "token " << i;
  EXPECT_TRUE(std::find(mask.begin(), mask.end(), 1) != mask.end());
}

}  // namespace lmforge
