#include "lmforge/tokenizer/chat_template.h"

#include "lmforge/core/error.h"

namespace lmforge {

namespace {

struct Builder {
  const Tokenizer& tok;
  ChatEncoding out;

  void special(const std::string& name, bool assistant) {
    auto id = tok.special_id(name);
    if (!id)
      fail("chat template: the tokenizer ({}) has no {} token; use a template it supports",
           tok.source(), name);
    out.ids.push_back(*id);
    out.assistant_mask.push_back(assistant);
  }
  // Encodes header + content as one text segment; tokens ending past the header are content.
  // A tokenizer that prepends a space to each run (SentencePiece's "▁", ByteLevel's
  // add_prefix_space) decodes to more bytes than the text: those come first.
  void text(const std::string& header, const std::string& content, bool assistant) {
    std::vector<int32_t> ids = tok.encode(header + content, false, false);
    size_t total = 0;
    for (int32_t id : ids) total += tok.token_bytes(id).size();
    const size_t prefix =
        total > header.size() + content.size() ? total - header.size() - content.size() : 0;
    size_t end = 0;
    for (int32_t id : ids) {
      end += tok.token_bytes(id).size();
      out.ids.push_back(id);
      out.assistant_mask.push_back(assistant && end > prefix + header.size());
    }
  }
};

// Jinja's `trim`, which Meta's and HF's Llama 3 templates apply to each message's content.
std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

void check_format(const std::string& format) {
  if (format != "llama3" && format != "chatml")
    fail("chat template: unknown format \"{}\"; expected llama3 or chatml", format);
}

}  // namespace

ChatEncoding apply_chat_template(const Tokenizer& tok, const std::vector<ChatMessage>& messages,
                                 const std::string& format, bool add_generation_prompt) {
  check_format(format);
  Builder b{tok, {}};
  if (format == "llama3") {
    b.special("<|begin_of_text|>", false);
    for (const ChatMessage& m : messages) {
      bool a = m.role == "assistant";
      b.special("<|start_header_id|>", false);
      b.text(m.role, "", false);
      b.special("<|end_header_id|>", false);
      b.text("\n\n", trim(m.content), a);
      b.special("<|eot_id|>", a);
    }
    if (add_generation_prompt) {
      b.special("<|start_header_id|>", false);
      b.text("assistant", "", false);
      b.special("<|end_header_id|>", false);
      b.text("\n\n", "", false);
    }
  } else {
    for (const ChatMessage& m : messages) {
      bool a = m.role == "assistant";
      b.special("<|im_start|>", false);
      b.text(m.role + "\n", m.content, a);
      b.special("<|im_end|>", a);
      b.text("\n", "", false);
    }
    if (add_generation_prompt) {
      b.special("<|im_start|>", false);
      b.text("assistant\n", "", false);
    }
  }
  return std::move(b.out);
}

std::string chat_end_of_turn(const std::string& format) {
  check_format(format);
  return format == "llama3" ? "<|eot_id|>" : "<|im_end|>";
}

std::string render_chat_template(const std::vector<ChatMessage>& messages,
                                 const std::string& format, bool add_generation_prompt) {
  check_format(format);
  std::string s;
  if (format == "llama3") {
    s = "<|begin_of_text|>";
    for (const ChatMessage& m : messages)
      s +=
          "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + trim(m.content) + "<|eot_id|>";
    if (add_generation_prompt) s += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  } else {
    for (const ChatMessage& m : messages)
      s += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (add_generation_prompt) s += "<|im_start|>assistant\n";
  }
  return s;
}

}  // namespace lmforge
