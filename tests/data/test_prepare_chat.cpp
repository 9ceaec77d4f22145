// SFT data: `prepare` with format chat encodes JSONL conversations with a chat template into
// shards with a loss mask (version 3), and the loader makes only the assistant's tokens targets.
// The ids and the mask are the chat template's (tested against the rendered text in
// test_chat_template); these tests check that they reach the shards and the batches intact.
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

std::string llama3() { return testing::shared_tokenizers_dir() + "/llama3.tiktoken"; }

std::vector<std::vector<ChatMessage>> conversations() {
  return {{{"system", "Answer briefly."}, {"user", "What is 2+2?"}, {"assistant", "4."}},
          {{"user", "Name a prophet."},
           {"assistant", "Moses."},
           {"user", "Another?"},
           {"assistant", "  Elijah, the Tishbite.\n"}},
          {{"user", "Say café in Japanese."}, {"assistant", "カフェ"}}};
}

json to_json(const std::vector<ChatMessage>& c) {
  json turns = json::array();
  for (const ChatMessage& m : c) turns.push_back({{"role", m.role}, {"content", m.content}});
  return {{"messages", turns}};
}

PrepareOptions chat_options(const std::string& in, const std::string& out) {
  PrepareOptions o;
  PrepareSource s{"chat", {in}, {}};
  s.doc.format = "chat";
  s.doc.chat_template = "llama3";
  o.sources = {s};
  o.output = out;
  o.tokenizer = llama3();
  o.progress = false;
  return o;
}

}  // namespace

TEST(ShardLossMask, RoundTripsAsVersion3AndUnmaskedShardsStayVersion2) {
  const std::string dir = testing::temp_dir("shard-mask");
  {
    ShardWriter w(dir + "/m.bin", {}, 2, /*loss_mask=*/true);
    const int32_t ids[11] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const uint8_t mask[11] = {0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0};  // crosses a byte
    w.begin_document();
    w.append(ids, 11, mask);
    w.begin_document();
    w.append(42);  // no mask given: a target
    w.commit();
  }
  TokenShard s = TokenShard::open(dir + "/m.bin");
  EXPECT_EQ(s.version(), 3u);
  ASSERT_TRUE(s.has_loss_mask());
  ASSERT_EQ(s.size(), 12);
  EXPECT_EQ(s.num_docs(), 2);
  std::string bits;
  for (int64_t i = 0; i < s.size(); ++i) bits += s.is_target(i) ? '1' : '0';
  EXPECT_EQ(bits, "011000001101");

  write_shard(dir + "/plain.bin", {1, 2, 3});
  TokenShard p = TokenShard::open(dir + "/plain.bin");
  EXPECT_EQ(p.version(), 2u);
  EXPECT_FALSE(p.has_loss_mask());
  EXPECT_TRUE(p.is_target(0));

  // A mask cut short, or flags this lmforge does not know: one clear error each.
  std::string bytes = testing::slurp(dir + "/m.bin");
  std::ofstream(dir + "/short.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 1);
  EXPECT_NE(testing::error_of([&] { TokenShard::open(dir + "/short.bin"); }).find("truncated"),
            std::string::npos);
  bytes[81] = 2;  // flag bit 9
  std::ofstream(dir + "/flags.bin", std::ios::binary) << bytes;
  EXPECT_NE(testing::error_of([&] { TokenShard::open(dir + "/flags.bin"); }).find("flags"),
            std::string::npos);
}

TEST(PrepareChat, ShardsHoldTheTemplateAndItsMaskAndTheLoaderTargetsOnlyTheAssistant) {
  const std::string dir = testing::temp_dir("prepare-chat");
  {
    std::ofstream f(dir + "/chat.jsonl", std::ios::binary);
    for (const auto& c : conversations()) f << to_json(c).dump() << "\n";
    f << R"({"messages": "not a list"})"
      << "\n";  // missing_field
    f << R"({"text": "no messages"})"
      << "\n";  // missing_field
    f << R"({"messages": [{"role": "user"}]})"
      << "\n";  // malformed_chat
    f << R"({"messages": [{"role": "user", "content": "hi"}]})"
      << "\n";  // no_assistant
  }
  const json summary = run_prepare(chat_options(dir + "/chat.jsonl", dir + "/out"));
  const json& st = summary["sources"]["chat"];
  EXPECT_EQ(st["documents"]["train"], 3);
  EXPECT_EQ(st["skipped"],
            json({{"missing_field", 2}, {"malformed_chat", 1}, {"no_assistant", 1}}));

  auto tok = load_tokenizer(llama3());
  TokenShard s = TokenShard::open(dir + "/out/chat/train-00000.bin");
  ASSERT_TRUE(s.has_loss_mask());
  ASSERT_EQ(s.num_docs(), 3);
  int64_t targets_expected = 0;
  for (int64_t d = 0; d < 3; ++d) {
    const ChatEncoding e = apply_chat_template(*tok, conversations()[d], "llama3");
    std::vector<int32_t> ids;
    std::vector<uint8_t> mask;
    for (int64_t i = s.doc_start(d); i < s.doc_start(d + 1); ++i) {
      ids.push_back(static_cast<int32_t>(s[i]));
      mask.push_back(s.is_target(i));
    }
    EXPECT_EQ(ids, e.ids) << "conversation " << d << " (no BOS/EOS around the template's)";
    EXPECT_EQ(mask, e.assistant_mask) << "conversation " << d;
    for (size_t i = 1; i < e.ids.size(); ++i) targets_expected += e.assistant_mask[i];
  }

  // Every conversation in one row each side of the packing: the targets are the assistant's
  // tokens (after the first of each document), nothing else.
  for (const std::string packing : {"best_fit", "none"}) {
    SCOPED_TRACE(packing);
    LoaderOptions lo;
    lo.batch = 1;
    lo.seq = packing == "none" ? s.size() - 1 : 127;
    lo.packing = packing;
    Loader loader(parse_data_spec(dir + "/out/chat", "data.train"), lo);
    std::string assistant;
    int64_t targets = 0;
    for (int64_t i = 0; i < loader.sequential_batches(); ++i) {
      Batch b = Batch::make(lo.batch, lo.seq);
      loader.sequential(i, b);
      for (int64_t t = 0; t < lo.seq; ++t) {
        const int32_t y = b.targets.data<int32_t>()[t];
        if (y == lo.ignore_index) continue;
        ++targets;
        assistant += tok->decode({y});
      }
    }
    EXPECT_EQ(targets, targets_expected);
    if (packing == "none") {  // one row, in document order
      EXPECT_EQ(assistant,
                "4.<|eot_id|>Moses.<|eot_id|>Elijah, the Tishbite.<|eot_id|>カフェ<|eot_id|>");
    }
  }
}

TEST(PrepareChat, BadSetUpIsOneClearErrorBeforeAnyOutput) {
  const std::string dir = testing::temp_dir("prepare-chat-errors");
  {
    std::ofstream(dir + "/chat.jsonl") << to_json(conversations()[0]).dump() << "\n";
    std::ofstream(dir + "/chat.txt") << "plain text\n";
  }
  PrepareOptions o = chat_options(dir + "/chat.jsonl", dir + "/o1");
  o.tokenizer = testing::shared_tokenizers_dir() + "/cl100k_base.tiktoken";  // no llama3 specials
  std::string e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("<|begin_of_text|>"), std::string::npos) << e;
  EXPECT_NE(e.find("source chat"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o1"));

  o = chat_options(dir + "/chat.txt", dir + "/o2");
  e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("format chat reads JSONL"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o2"));

  o = chat_options(dir + "/chat.jsonl", dir + "/o3");
  o.sources[0].doc.chat_template = "alpaca";
  e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("alpaca"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o3"));

  o = chat_options(dir + "/chat.jsonl", dir + "/o4");  // a template without format chat
  o.sources[0].doc.format = "text";
  e = testing::error_of([&] { run_prepare(o); });
  EXPECT_NE(e.find("formats chat, preference and unpaired only"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir + "/o4"));
}

}  // namespace lmforge
