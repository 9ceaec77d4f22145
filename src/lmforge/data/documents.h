// Documents from a source's files, with the poisoned-corpus policy (docs/formats.md, "prepare"):
//   skipped (counted by reason): malformed_json, missing_field (absent or not a string),
//     invalid_utf8, nul_bytes, empty, too_large (> max_document_bytes), truncated_last_line
//     (a last line without '\n' that is not valid JSON)
//   repaired (counted, then kept): bom (a leading U+FEFF is removed)
// Formats: .jsonl / .jsonl.gz / .jsonl.zst (one document per line, field selectable), .txt
// (and .txt.gz/.zst): one document per file, or per blank-line-separated block.
// Chat (format "chat", JSONL only): the field (default "messages") is a conversation, an array
// of {"role": ..., "content": ...} objects; skipped as malformed_chat when it is anything else
// and as no_assistant without an assistant turn (nothing to train on). Its text is the
// conversation rendered with the chat template (tokenizer/chat_template.h).
// Preference (format "preference", JSONL only; DPO and ORPO): fields "prompt" (optional),
// "chosen" and "rejected", as TRL's datasets: strings, or with a chat template also lists of
// messages (a string prompt is a user turn, a string response an assistant turn). messages is
// the prompt + chosen, rejected the prompt + rejected; skipped as malformed_pair (a field of the
// wrong kind, a list without a template, a malformed message), missing_field (no chosen or
// rejected) or no_assistant. Without a template the pair is plain text: prompt then response.
// The prompt is the leading messages both sides share: assistant turns in it are not trained.
// Unpaired (format "unpaired", JSONL only; KTO): fields "prompt" (optional), "completion" and
// "label" (true: a desirable response), as TRL's unpaired preference datasets; prompt and
// completion as a preference pair's. messages is the prompt + completion, prompt_turns the
// prompt's messages; skipped as malformed_example (a field of the wrong kind, label not a
// boolean), missing_field (no completion or label) or no_assistant.
//
//   DocumentReader r(files, {.field = "text", .text_mode = "file"});
//   Document d;
//   while (r.next(&d)) if (d.skip.empty()) use(d.text);
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lmforge/data/byte_stream.h"
#include "lmforge/tokenizer/chat_template.h"

namespace simdjson::dom {
class element;
}

namespace lmforge {

struct DocumentOptions {
  std::string field;               // the JSONL field; empty: "text", or "messages" for chat
  std::string text_mode = "file";  // file | blank_line
  uint64_t max_document_bytes = 64ull << 20;
  std::string format = "text";  // text | chat | preference | unpaired
  std::string chat_template;    // chat: chatml (when empty) | llama3; preference: none = plain
  const std::string& json_field() const {
    static const std::string text = "text", messages = "messages";
    return !field.empty() ? field : format == "chat" ? messages : text;
  }
  const std::string& chat_format() const {
    static const std::string chatml = "chatml";
    return chat_template.empty() ? chatml : chat_template;
  }
};

struct Document {
  std::string text;
  std::vector<ChatMessage> messages;  // format "chat"; "preference": prompt + chosen
  std::vector<ChatMessage> rejected;  // format "preference": prompt + rejected
  size_t prompt_turns = 0;  // preference: leading messages both sides share (the prompt); unpaired
  bool desirable = false;   // unpaired: the label
  std::string skip;         // reason it is skipped; empty = keep
  bool bom_removed = false;
};

// A record as read, before JSON parsing and checks (which finish() does, in parallel if wanted).
struct RawRecord {
  std::string data;  // a JSONL line or a .txt document
  bool jsonl = false, no_newline = false;
  Document doc;  // skip/bom_removed decided while reading (e.g. too_large, BOM)
};

class DocumentReader {
 public:
  DocumentReader(std::vector<std::string> files, DocumentOptions opt);
  // The next record (kept or skipped); false at the end of the last file.
  bool next(Document* doc);
  // The same in two steps: next_raw() reads (sequential, cheap); finish() parses and checks
  // (const, thread-safe).
  bool next_raw(RawRecord* r);
  Document finish(RawRecord&& r) const;
  // Bytes consumed from the input files so far (compressed bytes for .gz/.zst).
  uint64_t bytes_consumed() const { return done_bytes_ + (in_ ? in_->consumed() : 0); }

 private:
  bool open_next_file();
  void check_text(Document* doc, bool utf8_checked = false) const;
  void finish_chat(const simdjson::dom::element& root, Document* doc) const;
  void finish_preference(const simdjson::dom::element& root, Document* doc) const;
  void finish_unpaired(const simdjson::dom::element& root, Document* doc) const;
  // d's text from its messages (and rejected): through the template, or their contents.
  void set_text(Document* d) const;
  std::vector<std::string> files_;
  DocumentOptions opt_;
  size_t file_ = 0;
  std::unique_ptr<ByteStream> in_;
  std::unique_ptr<LineReader> lines_;
  bool jsonl_ = false, first_line_ = true, file_done_ = true;
  uint64_t done_bytes_ = 0;
};

// Expands paths, directories (recursively: *.txt, *.jsonl, *.ndjson in any case and their
// .gz/.zst; a .json file is read as JSONL only when named) and globs into a file list (each spec's
// sorted, in the specs' order; a file named by several specs once, at its first place); throws
// Error naming the path that matches nothing, or a file compressed other than with gzip or zstd.
// `skipped` (if given) gets a line per directory that held other files.
std::vector<std::string> expand_inputs(const std::vector<std::string>& specs,
                                       std::vector<std::string>* skipped = nullptr);

}  // namespace lmforge
