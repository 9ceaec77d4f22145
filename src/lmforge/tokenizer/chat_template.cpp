#include "lmforge/tokenizer/chat_template.h"

#include <algorithm>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"

namespace lmforge {

namespace {

// The template's parts, encoded together at the end (encode_segments: the context of a run of
// text crosses the special tokens around it, as in the rendered string).
struct Builder {
  const Tokenizer& tok;
  struct Part {
    std::string text;  // a special token's name, or header + content
    bool special, assistant;
    size_t header = 0;  // bytes of text that are the header
  };
  std::vector<Part> parts;

  void special(const std::string& name, bool assistant) {
    if (!tok.special_id(name))
      fail("chat template: the tokenizer ({}) has no {} token; use a template it supports",
           tok.source(), name);
    parts.push_back({name, true, assistant});
  }
  // Header + content as one text; tokens ending past the header are content (a token straddling
  // the boundary is content). Counted in token bytes where they are the text's; else (an <unk>,
  // whose bytes are not the text it stands for; white space a special strips) the tokens from
  // the first that the header encoded alone in the same context does not begin with.
  void text(const std::string& header, const std::string& content, bool assistant) {
    parts.push_back({header + content, false, assistant, header.size()});
  }

  ChatEncoding finish() const {
    std::vector<Tokenizer::Segment> segs;
    for (const Part& p : parts) segs.push_back({p.text, p.special});
    ChatEncoding out;
    std::vector<size_t> ends;
    tok.encode_segments(segs, out.ids, &ends);
    out.assistant_mask.assign(out.ids.size(), 0);
    for (size_t k = 0, begin = 0; k < parts.size(); begin = ends[k++]) {
      const Part& p = parts[k];
      if (!p.assistant || (!p.special && p.text.size() == p.header)) continue;
      size_t from = begin;  // the first content token
      std::string bytes;    // the segment's tokens' bytes
      for (size_t i = begin; i < ends[k]; ++i) bytes += tok.token_bytes(out.ids[i]);
      if (!p.special && (bytes == p.text || bytes == " " + p.text)) {
        // Every byte its text's (but a prefix space): tokens ending past the header are content.
        const size_t header_end = bytes.size() - p.text.size() + p.header;
        for (size_t end = 0; from < ends[k]; ++from)
          if ((end += tok.token_bytes(out.ids[from]).size()) > header_end) break;
      } else if (!p.special) {
        // An <unk> (its bytes are not its text), a special's strip: the tokens the header alone
        // begins with, in the same context, are the header.
        std::vector<Tokenizer::Segment> alone;
        if (k > 0) alone.push_back(segs[k - 1]);
        alone.push_back({std::string_view(p.text).substr(0, p.header), false});
        std::vector<int32_t> h;
        std::vector<size_t> h_ends;
        tok.encode_segments(alone, h, &h_ends);
        for (size_t i = k > 0 ? h_ends[0] : 0;
             i < h.size() && from < ends[k] && out.ids[from] == h[i]; ++i)
          ++from;
      }
      std::fill(out.assistant_mask.begin() + static_cast<std::ptrdiff_t>(from),
                out.assistant_mask.begin() + static_cast<std::ptrdiff_t>(ends[k]), 1);
    }
    return out;
  }
};

// Python's str.isspace(), which Jinja's `trim` strips (str.strip()): Unicode white space and
// U+001C..U+001F.
bool python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// The code point of the valid character of n bytes at s[i].
uint32_t code_point(std::string_view s, size_t i, size_t n) {
  static constexpr unsigned char kLead[] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  uint32_t cp = static_cast<unsigned char>(s[i]) & kLead[n];
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

// Jinja's `trim`, which Meta's and HF's Llama 3 templates apply to each message's content.
std::string trim(const std::string& s) {
  std::vector<size_t> starts;  // of the characters (an invalid byte is one), then the end
  for (size_t i = 0; i < s.size(); i += std::max<size_t>(1, utf8_char_len(s, i)))
    starts.push_back(i);
  starts.push_back(s.size());
  auto space = [&](size_t k) {
    const size_t n = starts[k + 1] - starts[k];
    return utf8_char_len(s, starts[k]) == n && python_space(code_point(s, starts[k], n));
  };
  size_t b = 0, e = starts.size() - 1;
  while (b < e && space(b)) ++b;
  while (e > b && space(e - 1)) --e;
  return s.substr(starts[b], starts[e] - starts[b]);
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
  return b.finish();
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
