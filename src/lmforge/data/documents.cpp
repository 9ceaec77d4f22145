#include "lmforge/data/documents.h"

#include <glob.h>
#include <simdjson.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <set>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"

namespace lmforge {

namespace fs = std::filesystem;

namespace {

// The file name's extension, lower case, without a .gz/.zst after it (compressed: that).
std::string base_extension(const std::string& path, std::string* compressed = nullptr) {
  std::string name = fs::path(path).filename().string();
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* ext : {".gz", ".zst"})
    if (name.size() > 4 && name.ends_with(ext)) {
      if (compressed) *compressed = ext;
      name.resize(name.size() - std::strlen(ext));
    }
  const size_t dot = name.rfind('.');
  return dot == std::string::npos || dot == 0 ? "" : name.substr(dot);
}

bool is_jsonl(const std::string& path) {
  const std::string e = base_extension(path);
  return e == ".jsonl" || e == ".json" || e == ".ndjson";
}

// What a directory's listing takes: text and JSONL files, plain or .gz/.zst (not .json: a
// directory's .json files are as often a JSON array or some tool's metadata; name one to read it
// as JSONL).
bool is_input_file(const fs::path& p) {
  const std::string e = base_extension(p.string());
  return e == ".jsonl" || e == ".ndjson" || e == ".txt";
}

// A compression prepare does not read: an error naming the file, not its bytes read as text.
// In a directory, only a file that is an input once decompressed (a.jsonl.xz; not photo.zip).
void check_compression(const std::string& path, bool listed) {
  const std::string e = base_extension(path);
  for (const char* c : {".bz2", ".xz", ".lz4", ".lzma", ".zip", ".7z", ".tar", ".tgz", ".br"})
    if (e == c && (!listed || is_input_file(path.substr(0, path.size() - e.size()))))
      fail(
          "{}: {} files are not read; decompress it, or recompress it with gzip or zstd "
          "(.gz and .zst are read as they are)",
          path, e);
}

// Removes a U+FEFF byte order mark starting s; whether there was one.
bool remove_bom(std::string& s) {
  if (s.compare(0, 3, "\xEF\xBB\xBF") != 0) return false;
  s.erase(0, 3);
  return true;
}

}  // namespace

std::vector<std::string> expand_inputs(const std::vector<std::string>& specs,
                                       std::vector<std::string>* skipped) {
  std::vector<std::string> out;
  std::set<std::string> taken;  // canonical paths
  for (const std::string& spec : specs) {
    std::vector<std::string> found;
    std::error_code ec;
    if (fs::is_directory(spec, ec)) {
      std::vector<std::string> others;
      for (auto& e : fs::recursive_directory_iterator(spec))
        if (e.is_regular_file()) {
          check_compression(e.path(), /*listed=*/true);
          (is_input_file(e.path()) ? found : others).push_back(e.path());
        }
      if (skipped && !others.empty()) {
        std::sort(others.begin(), others.end());
        skipped->push_back(fmt::format("{}: {} other file{} (e.g. {})", spec, others.size(),
                                       others.size() == 1 ? "" : "s", others[0]));
      }
    } else if (spec.find_first_of("*?[") != std::string::npos) {
      glob_t g{};
      if (::glob(spec.c_str(), 0, nullptr, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; ++i) found.emplace_back(g.gl_pathv[i]);
      globfree(&g);
    } else if (fs::exists(spec, ec)) {
      found.push_back(spec);
    } else {
      fail("{}: no such input file; check the path", spec);
    }
    if (found.empty())
      fail(
          "{}: matches no input files (.txt, .jsonl, .ndjson; plain, .gz or .zst; a .json file "
          "when named)",
          spec);
    std::sort(found.begin(), found.end());
    for (const std::string& f : found) check_compression(f, /*listed=*/false);
    // Each file once, where several inputs name it (a directory and a glob in it, a path
    // spelled two ways): at its first place.
    for (const std::string& f : found) {
      fs::path key = fs::weakly_canonical(f, ec);
      if (ec) key = fs::absolute(f).lexically_normal();
      if (taken.insert(key.string()).second) out.push_back(f);
    }
  }
  return out;
}

DocumentReader::DocumentReader(std::vector<std::string> files, DocumentOptions opt)
    : files_(std::move(files)), opt_(std::move(opt)) {
  if (opt_.text_mode != "file" && opt_.text_mode != "blank_line")
    fail("text_mode: expected file or blank_line, got \"{}\"", opt_.text_mode);
  if (opt_.format != "text" && opt_.format != "chat" && opt_.format != "preference" &&
      opt_.format != "unpaired")
    fail("format: expected text, chat, preference or unpaired, got \"{}\"", opt_.format);
  if (opt_.format == "text" && !opt_.chat_template.empty())
    fail(
        "chat_template: \"{}\" applies to formats chat, preference and unpaired only (this "
        "source is format text)",
        opt_.chat_template);
  if (opt_.format == "preference" && !opt_.field.empty())
    fail(
        "field: format preference reads the fields prompt, chosen and rejected; remove field "
        "\"{}\"",
        opt_.field);
  if (opt_.format == "unpaired" && !opt_.field.empty())
    fail(
        "field: format unpaired reads the fields prompt, completion and label; remove field "
        "\"{}\"",
        opt_.field);
  if (opt_.format == "chat" || !opt_.chat_template.empty())
    render_chat_template({}, opt_.chat_format());  // an unknown template fails here
  if (opt_.format != "text")
    for (const std::string& f : files_)
      if (!is_jsonl(f))
        fail("{}: format {} reads JSONL, one {} per line; convert it or use format text", f,
             opt_.format,
             opt_.format == "chat"
                 ? fmt::format(
                       "conversation ({{\"{}\": [{{\"role\": ..., \"content\": ...}}, ...]}})",
                       opt_.json_field())
             : opt_.format == "preference"
                 ? "preference pair ({\"prompt\": ..., \"chosen\": ..., \"rejected\": ...})"
                 : "labelled response ({\"prompt\": ..., \"completion\": ..., \"label\": "
                   "true})");
}

bool DocumentReader::open_next_file() {
  if (in_) done_bytes_ += in_->consumed();
  lines_.reset();
  in_.reset();
  if (file_ >= files_.size()) return false;
  const std::string& path = files_[file_++];
  in_ = ByteStream::open(path);
  lines_ = std::make_unique<LineReader>(*in_, opt_.max_document_bytes);
  jsonl_ = is_jsonl(path);
  first_line_ = true;
  file_done_ = false;
  return true;
}

void DocumentReader::check_text(Document* d, bool utf8_checked) const {
  if (remove_bom(d->text)) d->bom_removed = true;
  if (!d->skip.empty()) return;
  if (d->text.size() > opt_.max_document_bytes)
    d->skip = "too_large";
  else if (d->text.find('\0') != std::string::npos)
    d->skip = "nul_bytes";
  else if (!utf8_checked && find_invalid_utf8(d->text) != d->text.size())
    d->skip = "invalid_utf8";
  else if (d->text.empty())
    d->skip = "empty";
}

bool DocumentReader::next(Document* d) {
  RawRecord r;
  if (!next_raw(&r)) return false;
  *d = finish(std::move(r));
  return true;
}

Document DocumentReader::finish(RawRecord&& r) const {
  Document d = std::move(r.doc);
  if (!d.skip.empty()) return d;
  if (!r.jsonl) {
    d.text = std::move(r.data);
    check_text(&d);
    return d;
  }
  // simdjson's DOM parser validates the whole line (structure and UTF-8) at GB/s; one parser
  // per thread, since finish() runs in parallel.
  thread_local simdjson::dom::parser parser;
  simdjson::dom::element root;
  if (parser.parse(r.data).get(root) != simdjson::SUCCESS) {
    bool blank = r.data.find_first_not_of(" \t\r") == std::string::npos;
    d.skip = blank ? "empty" : r.no_newline ? "truncated_last_line" : "malformed_json";
    return d;
  }
  if (opt_.format == "chat") {
    finish_chat(root, &d);
    return d;
  }
  if (opt_.format == "preference") {
    finish_preference(root, &d);
    return d;
  }
  if (opt_.format == "unpaired") {
    finish_unpaired(root, &d);
    return d;
  }
  std::string_view text;
  if (root[opt_.json_field()].get_string().get(text) != simdjson::SUCCESS) {
    d.skip = "missing_field";  // not an object, no such field, or not a string
    return d;
  }
  d.text.assign(text);
  check_text(&d, /*utf8_checked=*/true);  // simdjson validated the line's UTF-8
  return d;
}

void DocumentReader::finish_chat(const simdjson::dom::element& root, Document* d) const {
  simdjson::dom::array turns;
  if (root[opt_.json_field()].get_array().get(turns) != simdjson::SUCCESS) {
    d->skip = "missing_field";  // not an object, no such field, or not an array
    return;
  }
  bool assistant = false;
  for (simdjson::dom::element turn : turns) {
    std::string_view role, content;
    if (turn["role"].get_string().get(role) != simdjson::SUCCESS ||
        turn["content"].get_string().get(content) != simdjson::SUCCESS) {
      d->skip = "malformed_chat";
      d->messages.clear();
      return;
    }
    d->messages.push_back({std::string(role), std::string(content)});
    assistant = assistant || role == "assistant";
  }
  if (!assistant) {
    d->skip = "no_assistant";
    d->messages.clear();
    return;
  }
  d->text = render_chat_template(d->messages, opt_.chat_format());
  check_text(d, /*utf8_checked=*/true);
  if (!d->skip.empty()) d->messages.clear();
}

namespace {
// A preference record's field: a string (one message of `role`) or a list of messages. Returns
// false when it is neither, or a message is malformed; absent leaves `out` empty.
bool read_turns(const simdjson::dom::element& root, const char* key, const char* role,
                bool allow_list, std::vector<ChatMessage>& out, bool& present) {
  simdjson::dom::element v;
  present = root[key].get(v) == simdjson::SUCCESS;
  if (!present) return true;
  std::string_view text;
  if (v.get_string().get(text) == simdjson::SUCCESS) {
    out.push_back({role, std::string(text)});
    return true;
  }
  simdjson::dom::array turns;
  if (!allow_list || v.get_array().get(turns) != simdjson::SUCCESS) return false;
  for (simdjson::dom::element turn : turns) {
    std::string_view r, content;
    if (turn["role"].get_string().get(r) != simdjson::SUCCESS ||
        turn["content"].get_string().get(content) != simdjson::SUCCESS)
      return false;
    out.push_back({std::string(r), std::string(content)});
  }
  return true;
}

// TRL's extract_prompt on two strings: up to the first character where they differ, less a
// space just before it; with no difference, all but the shorter's last character (where TRL's
// loop ends), no space taken off.
size_t implicit_prompt_bytes(const std::string& a, const std::string& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0, last = 0;  // last: the start of the last character both share
  while (i < n) {
    const size_t len = std::max<size_t>(1, utf8_char_len(a, i));
    if (i + len > n || a.compare(i, len, b, i, len) != 0) break;
    last = i;
    i += len;
  }
  if (i == n) return last;
  if (i > 0 && a[i - 1] == ' ') --i;
  return i;
}

bool has_assistant(const std::vector<ChatMessage>& m) {
  return std::any_of(m.begin(), m.end(),
                     [](const ChatMessage& x) { return x.role == "assistant"; });
}
}  // namespace

void DocumentReader::finish_preference(const simdjson::dom::element& root, Document* d) const {
  // Plain pairs (no chat template) are strings: the prompt's text, then the response's.
  const bool chat = !opt_.chat_template.empty();
  std::vector<ChatMessage> prompt, chosen, rejected;
  bool has_prompt = false, has_chosen = false, has_rejected = false;
  const bool ok = read_turns(root, "prompt", "user", chat, prompt, has_prompt) &&
                  read_turns(root, "chosen", "assistant", chat, chosen, has_chosen) &&
                  read_turns(root, "rejected", "assistant", chat, rejected, has_rejected);
  if (!ok) {
    d->skip = "malformed_pair";
    return;
  }
  if (!has_chosen || !has_rejected) {
    d->skip = "missing_field";
    return;
  }
  if (!has_assistant(chosen) || !has_assistant(rejected)) {
    d->skip = "no_assistant";
    return;
  }
  if (!chat && !has_prompt) {  // TRL's implicit prompt of string pairs (HH-RLHF's layout)
    for (auto* side : {&chosen, &rejected})  // (a BOM starting a side is not text: set_text)
      if (remove_bom(side->front().content)) d->bom_removed = true;
    const size_t n = implicit_prompt_bytes(chosen[0].content, rejected[0].content);
    if (n > 0) {
      prompt.push_back({"user", chosen[0].content.substr(0, n)});
      chosen[0].content.erase(0, n);
      rejected[0].content.erase(0, n);
    }
  }
  d->messages = prompt;
  d->messages.insert(d->messages.end(), chosen.begin(), chosen.end());
  d->rejected = std::move(prompt);
  d->rejected.insert(d->rejected.end(), rejected.begin(), rejected.end());
  // The prompt: the leading messages both sides share (an explicit prompt, or TRL's implicit one
  // when chosen and rejected carry the whole conversation); only what follows is trained.
  auto same = [](const ChatMessage& a, const ChatMessage& b) {
    return a.role == b.role && a.content == b.content;
  };
  while (d->prompt_turns + 1 < std::min(d->messages.size(), d->rejected.size()) &&
         same(d->messages[d->prompt_turns], d->rejected[d->prompt_turns]))
    ++d->prompt_turns;
  set_text(d);
}

void DocumentReader::set_text(Document* d) const {
  if (!opt_.chat_template.empty()) {
    d->text = render_chat_template(d->messages, opt_.chat_format());
    if (!d->rejected.empty()) d->text += render_chat_template(d->rejected, opt_.chat_format());
  } else {
    // Each side is a document: a BOM its text starts with is removed (and counted) there.
    for (auto* m : {&d->messages, &d->rejected})
      if (!m->empty() && remove_bom(m->front().content)) d->bom_removed = true;
    d->text.clear();
    for (const auto* m : {&d->messages, &d->rejected})
      for (const ChatMessage& x : *m) d->text += x.content;
  }
  check_text(d, /*utf8_checked=*/true);
  if (!d->skip.empty()) d->messages.clear(), d->rejected.clear();
}

void DocumentReader::finish_unpaired(const simdjson::dom::element& root, Document* d) const {
  const bool chat = !opt_.chat_template.empty();
  std::vector<ChatMessage> prompt, completion;
  bool has_prompt = false, has_completion = false;
  simdjson::dom::element label;
  const bool has_label = root["label"].get(label) == simdjson::SUCCESS;
  bool desirable = false;
  if (!read_turns(root, "prompt", "user", chat, prompt, has_prompt) ||
      !read_turns(root, "completion", "assistant", chat, completion, has_completion) ||
      (has_label && label.get_bool().get(desirable) != simdjson::SUCCESS)) {
    d->skip = "malformed_example";
    return;
  }
  if (!has_completion || !has_label) {
    d->skip = "missing_field";
    return;
  }
  if (!has_assistant(completion)) {
    d->skip = "no_assistant";
    return;
  }
  d->desirable = desirable;
  d->prompt_turns = prompt.size();
  d->messages = std::move(prompt);
  d->messages.insert(d->messages.end(), completion.begin(), completion.end());
  set_text(d);
}

bool DocumentReader::next_raw(RawRecord* r) {
  *r = RawRecord{};
  Document* d = &r->doc;
  for (;;) {
    if (file_done_ && !open_next_file()) return false;
    std::string line;
    LineReader::Status st;
    if (jsonl_) {
      if (!lines_->next(&line, &st)) {
        file_done_ = true;
        continue;
      }
      if (first_line_ && remove_bom(line)) d->bom_removed = true;
      first_line_ = false;
      r->jsonl = true;
      r->no_newline = st == LineReader::Status::kNoNewline;
      if (st == LineReader::Status::kTooLong) d->skip = "too_large";
      r->data = std::move(line);
      return true;
    }
    if (opt_.text_mode == "file") {
      // The whole file is one document (read in full: it is one document either way).
      std::string text;
      bool too_long = false;
      while (lines_->next(&line, &st)) {
        if (st == LineReader::Status::kTooLong ||
            text.size() + line.size() > opt_.max_document_bytes)
          too_long = true;
        if (too_long) continue;
        text += line;
        if (st != LineReader::Status::kNoNewline) text += '\n';
      }
      file_done_ = true;
      r->data = std::move(text);
      if (too_long) d->skip = "too_large";
      return true;
    }
    // blank_line: blocks of non-blank lines separated by blank lines.
    std::string block;
    bool any = false, too_long = false;
    while (lines_->next(&line, &st)) {
      if (first_line_ && remove_bom(line)) d->bom_removed = true;
      first_line_ = false;
      if (st == LineReader::Status::kTooLong) {  // its bytes were dropped: not a blank line
        any = too_long = true;
        continue;
      }
      bool blank = line.find_first_not_of(" \t\r") == std::string::npos;
      if (blank) {
        if (any) break;
        continue;
      }
      any = true;
      if (block.size() + line.size() > opt_.max_document_bytes) too_long = true;
      if (!too_long) {
        if (!block.empty()) block += '\n';
        block += line;
      }
    }
    if (!any) {
      file_done_ = true;
      continue;
    }
    // A CRLF file's block keeps its inner line ends; its last line's \r ends the line, as \n does.
    if (!block.empty() && block.back() == '\r') block.pop_back();
    r->data = std::move(block);
    if (too_long) d->skip = "too_large";
    return true;
  }
}

}  // namespace lmforge
