// Chat templates: a list of {role, content} messages -> token ids, plus a mask of the tokens
// the assistant produced (its content and its end-of-turn token), for SFT's assistant-only loss.
//
//   llama3:
//   <|begin_of_text|>(<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>)*
//   chatml:  (<|im_start|>{role}\n{content}<|im_end|>\n)*
// add_generation_prompt appends the assistant header, ready for generate.
// Text between special tokens is encoded as a unit, exactly as encoding the rendered string
// with specials allowed would (Tokenizer::encode_segments: prefixes and a special's lstrip/rstrip
// as there), except that text in a message spelling a special token stays text; a token
// straddling the header/content boundary counts as content.
#pragma once

#include <string>
#include <vector>

#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

struct ChatMessage {
  std::string role;  // system | user | assistant (any role text is accepted)
  std::string content;
};

struct ChatEncoding {
  std::vector<int32_t> ids;
  std::vector<uint8_t> assistant_mask;  // 1 where ids[i] was produced by the assistant
};

// format: "llama3" or "chatml". Throws Error when the tokenizer lacks the format's specials.
ChatEncoding apply_chat_template(const Tokenizer& tok, const std::vector<ChatMessage>& messages,
                                 const std::string& format, bool add_generation_prompt = false);
// The token that ends a turn in the format (where generation of a reply stops).
std::string chat_end_of_turn(const std::string& format);
// The rendered text (what HF's apply_chat_template(tokenize=False) prints).
std::string render_chat_template(const std::vector<ChatMessage>& messages,
                                 const std::string& format, bool add_generation_prompt = false);

}  // namespace lmforge
