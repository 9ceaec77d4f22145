#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_trainer.h"
#include "lmforge/tokenizer/chat_template.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

namespace {
std::vector<ChatMessage> conversation() {
  return {{"system", "You are terse."},
          {"user", "What is 2+2?\n"},
          {"assistant", "  4.\n\nIt's four."},
          {"user", "And 3+3?"},
          {"assistant", "6"}};
}
// Runs tests/reference/SCRIPT --conversations DIR/in.json --out OUT over the conversations and
// returns DIR/out.json (an empty object when the script fails: the caller's comparisons fail).
nlohmann::json reference(const std::vector<std::vector<ChatMessage>>& conversations,
                         const std::string& script, const std::string& dir,
                         const std::string& out) {
  nlohmann::json in = nlohmann::json::array();
  for (const auto& c : conversations) {
    nlohmann::json turns = nlohmann::json::array();
    for (const ChatMessage& m : c) turns.push_back({{"role", m.role}, {"content", m.content}});
    in.push_back(turns);
  }
  std::ofstream(dir + "/in.json") << in.dump();
  const std::string cmd = "'" + testing::python() + "' '" + testing::source_dir() +
                          "/tests/reference/" + script + "' --conversations '" + dir +
                          "/in.json' --out '" + out + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return nlohmann::json::parse(testing::slurp(dir + "/out.json"), nullptr, false);
}
}  // namespace

// Encoding turn by turn must give exactly the ids of the rendered string encoded with specials
// allowed (what HF's apply_chat_template(tokenize=True) does), and the mask must select exactly
// the assistants' (trimmed) content and their <|eot_id|>.
TEST(ChatTemplate, Llama3IdsEqualEncodingTheRenderedTextAndMaskIsTheAssistant) {
  auto tok = load_tokenizer(testing::shared_tokenizers_dir() + "/llama3.tiktoken");
  auto msgs = conversation();
  ChatEncoding enc = apply_chat_template(*tok, msgs, "llama3");
  std::string rendered = render_chat_template(msgs, "llama3");
  EXPECT_EQ(rendered.rfind("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "You are terse.<|eot_id|>",
                           0),
            0u);
  EXPECT_EQ(enc.ids, tok->encode(rendered, /*allow_special=*/true));
  ASSERT_EQ(enc.assistant_mask.size(), enc.ids.size());
  std::vector<int32_t> assistant;
  for (size_t i = 0; i < enc.ids.size(); ++i)
    if (enc.assistant_mask[i]) assistant.push_back(enc.ids[i]);
  EXPECT_EQ(tok->decode(assistant), "4.\n\nIt's four.<|eot_id|>6<|eot_id|>");

  ChatEncoding gen = apply_chat_template(*tok, {{"user", "Hi"}}, "llama3", true);
  EXPECT_EQ(tok->decode(gen.ids),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplate, MissingSpecialsAndUnknownFormatsAreErrors) {
  auto tok = load_tokenizer(testing::shared_tokenizers_dir() + "/cl100k_base.tiktoken");
  EXPECT_THROW(apply_chat_template(*tok, conversation(), "chatml"), Error);  // no <|im_start|>
  EXPECT_THROW(apply_chat_template(*tok, conversation(), "llama3"), Error);
  EXPECT_THROW(apply_chat_template(*tok, conversation(), "alpaca"), Error);
}

// ChatML needs <|im_start|>/<|im_end|>: a small BPE trained with them as specials.
TEST(ChatTemplate, ChatMLIdsEqualEncodingTheRenderedTextAndMaskIsTheAssistant) {
  std::string dir = testing::temp_dir("chatml");
  std::ofstream(dir + "/corpus.txt") << "The assistant answers the user.\nWhat is two plus two?\n"
                                        "It is four, said the assistant to the user.\n";
  BpeTrainOptions o;
  o.vocab_size = 300;
  o.specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  write_file_atomic(dir + "/tokenizer.json", train_bpe({dir + "/corpus.txt"}, o).tokenizer_json);
  auto tok = load_tokenizer(dir + "/tokenizer.json");
  auto msgs = conversation();
  ChatEncoding enc = apply_chat_template(*tok, msgs, "chatml", true);
  std::string rendered = render_chat_template(msgs, "chatml", true);
  EXPECT_EQ(enc.ids, tok->encode(rendered, /*allow_special=*/true));
  std::vector<int32_t> assistant;
  for (size_t i = 0; i < enc.ids.size(); ++i)
    if (enc.assistant_mask[i]) assistant.push_back(enc.ids[i]);
  EXPECT_EQ(tok->decode(assistant), "  4.\n\nIt's four.<|im_end|>6<|im_end|>");
  EXPECT_EQ(rendered.substr(rendered.size() - 22), "<|im_start|>assistant\n");

  // The same tokenizer with ByteLevel's add_prefix_space: every run decodes one byte longer than
  // its text (the space in front), which must not shift the header/content boundary.
  nlohmann::json j = nlohmann::json::parse(testing::slurp(dir + "/tokenizer.json"));
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  std::filesystem::create_directories(dir + "/prefix");
  write_file_atomic(dir + "/prefix/tokenizer.json", j.dump());
  auto spaced = load_tokenizer(dir + "/prefix/tokenizer.json");
  enc = apply_chat_template(*spaced, msgs, "chatml");
  EXPECT_EQ(enc.ids, spaced->encode(render_chat_template(msgs, "chatml"), true));
  assistant.clear();
  for (size_t i = 0; i < enc.ids.size(); ++i)
    if (enc.assistant_mask[i]) assistant.push_back(enc.ids[i]);
  EXPECT_EQ(spaced->decode(assistant), "  4.\n\nIt's four.<|im_end|>6<|im_end|>");
}

// The rendered text equals transformers' rendering of the same templates (its Jinja, so Python's
// str.strip() for Llama 3's `trim`: every Unicode space, not only ASCII's), and Llama 3's ids are
// the rendered text's.
TEST(ChatTemplate, RenderedLikeTransformers) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  const std::string spaces =
      "\t\n\v\f\r\x1c\x1d\x1e\x1f \u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
      "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000";
  const std::vector<std::vector<ChatMessage>> conversations = {
      conversation(),
      {{"user", "\u00a0nbsp\u3000"}, {"assistant", "\vvt\f"}},
      {{"system", spaces + "inner" + spaces + "space" + spaces}, {"assistant", spaces}},
      {{"user", "\u200bzero width stays\ufeff"}, {"assistant", ""}, {"user", "é\u0301 "}},
  };
  const std::string dir = testing::temp_dir("chat-ref");
  const nlohmann::json ref =
      reference(conversations, "chat_template_ref.py", dir, dir + "/out.json");
  auto tok = load_tokenizer(testing::shared_tokenizers_dir() + "/llama3.tiktoken");
  for (const std::string format : {"llama3", "chatml"}) {
    for (bool gen : {false, true}) {
      for (size_t c = 0; c < conversations.size(); ++c) {
        SCOPED_TRACE(fmt::format("{}{} conversation {}", format, gen ? "+gen" : "", c));
        const std::string rendered = render_chat_template(conversations[c], format, gen);
        EXPECT_EQ(rendered, ref.at(format + (gen ? "+gen" : "")).at(c).get<std::string>());
        if (format == "llama3") {
          EXPECT_EQ(apply_chat_template(*tok, conversations[c], format, gen).ids,
                    tok->encode(rendered, /*allow_special=*/true));
        }
      }
    }
  }
}

// The ids and assistant masks transformers' apply_chat_template gives, for tokenizers whose
// context crosses the special tokens: a Metaspace "first" prefix only at the very start (not
// after each special), <unk> tokens whose bytes are not their text (the header/content boundary),
// specials with lstrip/rstrip taking the white space beside them, a header ("\n\n") whose tokens
// change with the content after it.
TEST(ChatTemplate, MasksLikeTransformers) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  const std::vector<std::vector<ChatMessage>> conversations = {
      {{"user", "hello world"}, {"assistant", "the dog"}},
      {{"system", "you are helpful."},
       {"user", "  two plus two? "},
       {"assistant", " it is four.\n"},
       {"user", "and \u0416?"},
       {"assistant", "\u0416\u0416 hello \u0416 world"}},
      {{"user", "\u0416x"}, {"assistant", ""}, {"user", "q"}, {"assistant", "\n\nthe end  "}},
  };
  const std::string dir = testing::temp_dir("chat-mask-ref");
  const nlohmann::json ref = reference(conversations, "chat_mask_ref.py", dir, dir);
  for (const std::string name : {"first", "unk", "strip", "bytes"}) {
    auto tok = load_tokenizer(dir + "/" + name + "/tokenizer.json");
    for (const std::string format : {"chatml", "llama3"}) {
      for (size_t c = 0; c < conversations.size(); ++c) {
        SCOPED_TRACE(fmt::format("{} {} conversation {}", name, format, c));
        const ChatEncoding enc = apply_chat_template(*tok, conversations[c], format);
        const nlohmann::json& want = ref.at(name).at(format).at(c);
        EXPECT_EQ(enc.ids, want.at("ids").get<std::vector<int32_t>>());
        EXPECT_EQ(std::vector<int>(enc.assistant_mask.begin(), enc.assistant_mask.end()),
                  want.at("mask").get<std::vector<int>>());
      }
    }
  }
}

}  // namespace lmforge
