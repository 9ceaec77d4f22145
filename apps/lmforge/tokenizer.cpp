// lmforge tokenizer encode --tokenizer PATH [--jsonl FILE | FILE...]   one line of ids per document
// lmforge tokenizer decode --tokenizer PATH [FILE...]                  one line of ids -> text
// lmforge tokenizer info --tokenizer PATH
// Without files, encode reads all of stdin as one document and decode reads stdin line by line.
#include "lmforge/tokenizer/tokenizer.h"

#include <fmt/core.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_trainer.h"

namespace lmforge::app {

namespace {

void print_ids(const std::vector<int32_t>& ids) {
  std::string line;
  line.reserve(ids.size() * 6);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(ids[i]);
  }
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
  check_stdout();
}

std::vector<int32_t> parse_ids(const std::string& line, const std::string& where, size_t line_no,
                               const Tokenizer& tk) {
  std::vector<int32_t> ids;
  std::istringstream in(line);
  std::string tok;
  while (in >> tok) {
    try {
      size_t used = 0;
      long v = std::stol(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(tok);
      ids.push_back(static_cast<int32_t>(v));
    } catch (const std::exception&) {
      fail("{}:{}: \"{}\" is not a token id; expected space-separated non-negative integers", where,
           line_no, tok);
    }
    if (ids.back() >= tk.vocab_size())
      fail("{}:{}: id {} is outside the tokenizer's {} ids; decode with the tokenizer that made it",
           where, line_no, ids.back(), tk.vocab_size());
    // A gap in a BPE vocabulary's ids (cl100k's 100261..100275); SentencePiece's control pieces
    // (<s>, </s>) decode to nothing and are ids all the same.
    if (tk.kind() != "sentencepiece" && tk.token_bytes(ids.back()).empty())
      fail(
          "{}:{}: id {} is no token of {} (an unassigned id below its {}); decode with the "
          "tokenizer that made it",
          where, line_no, ids.back(), tk.source(), tk.vocab_size());
  }
  return ids;
}

}  // namespace

void for_each_jsonl_string(const std::string& path, const std::string& field,
                           const std::function<void(std::string)>& fn) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail("{}: is a directory; give a JSONL file", path);
  std::ifstream in(path);
  if (!in) fail("{}: cannot open; check the path", path);
  size_t line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains(field) || !j[field].is_string())
      fail("{}:{}: expected a JSON object with a string field \"{}\"", path, line_no, field);
    fn(j[field].get<std::string>());
  }
}

void add_tokenizer(CLI::App& app) {
  struct Opts {
    std::string tokenizer, jsonl, field = "text";
    std::vector<std::string> files;
    bool allow_special = false, bos = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* tk = app.add_subcommand("tokenizer", "Encode, decode and inspect tokenizers");
  tk->require_subcommand(1);

  CLI::App* enc =
      tk->add_subcommand("encode", "Text -> one line of space-separated ids per document");
  enc->add_option("--tokenizer", o->tokenizer, "Tokenizer file or directory (or \"byte\")")
      ->required();
  enc->add_option("--jsonl", o->jsonl, "JSONL input: one document per line (blank lines skipped)");
  enc->add_option("--field", o->field, "JSONL field holding the text")->capture_default_str();
  enc->add_flag("--allow-special", o->allow_special, "Special-token text becomes special ids");
  enc->add_flag("--bos", o->bos, "Prepend the tokenizer's BOS token, if it has one");
  enc->add_option("files", o->files, "Text files, one document each (default: stdin)");
  enc->callback([o, enc] {
    if (!o->jsonl.empty() && !o->files.empty())
      fail("tokenizer encode: --jsonl {} or FILE..., not both", o->jsonl);
    if (o->jsonl.empty() && enc->count("--field"))
      fail("--field: only with --jsonl (it names the JSONL field to encode)");
    auto tok = load_tokenizer(o->tokenizer);
    auto encode = [&](const std::string& text) {
      print_ids(tok->encode(text, o->allow_special, o->bos));
    };
    if (!o->jsonl.empty()) {
      for_each_jsonl_string(o->jsonl, o->field, encode);
    } else if (o->files.empty()) {
      encode(std::string(std::istreambuf_iterator<char>(std::cin), {}));
    } else {
      for (const std::string& f : o->files) encode(read_file(f));
    }
  });

  CLI::App* dec =
      tk->add_subcommand("decode", "Lines of space-separated ids -> text, one line each");
  dec->add_option("--tokenizer", o->tokenizer, "Tokenizer file or directory")->required();
  dec->add_option("files", o->files, "Files of id lines (default: stdin)");
  dec->callback([o] {
    auto tok = load_tokenizer(o->tokenizer);
    auto run = [&](std::istream& in, const std::string& where) {
      size_t line_no = 0;
      for (std::string line; std::getline(in, line);) {
        std::string text = tok->decode(parse_ids(line, where, ++line_no, *tok)) + "\n";
        std::fwrite(text.data(), 1, text.size(), stdout);
        check_stdout();
      }
    };
    if (o->files.empty()) run(std::cin, "<stdin>");
    for (const std::string& f : o->files) {
      check_not_directory(f);
      std::ifstream in(f);
      if (!in) fail("{}: cannot open; check the path", f);
      run(in, f);
    }
  });

  struct TrainOpts {
    int64_t vocab_size = 8192;
    std::string out, pattern;
    std::vector<std::string> specials = {"<|endoftext|>"}, files;
    bool force = false;
  };
  auto t = std::make_shared<TrainOpts>();
  CLI::App* train = tk->add_subcommand(
      "train", "Learn a byte-level BPE from text files; writes OUT/tokenizer.json (HF format)");
  train->add_option("--vocab-size", t->vocab_size, "Bytes + merges + specials")
      ->capture_default_str();
  train->add_option("--out", t->out, "Output directory")->required();
  train->add_option("--pattern", t->pattern, "Pre-tokenizer regex (default: GPT-4's)");
  train->add_option("--special", t->specials, "Special tokens (default: <|endoftext|>)");
  train->add_option("files", t->files, "Text files (streamed)")->required();
  train->add_flag("--force", t->force, "Replace OUT/tokenizer.json when it exists");
  train->callback([t] {
    // Checked before the work: shards and runs made with the tokenizer there would no longer
    // match it (a mismatch lmforge refuses, but only once the new one is in place).
    std::error_code ec;
    if (!t->force && std::filesystem::exists(t->out + "/tokenizer.json", ec))
      fail("--out: {}/tokenizer.json exists; choose a new directory, or pass --force to replace it",
           t->out);
    set_oom_hint(kTokenizerTrainOomHint);
    BpeTrainOptions opt;
    opt.vocab_size = t->vocab_size;
    opt.pattern = t->pattern;
    opt.specials = t->specials;
    auto t0 = std::chrono::steady_clock::now();
    make_directories(t->out);  // before the work: a path that cannot be one fails now
    BpeTrainResult r = train_bpe(t->files, opt);
    write_file_atomic(t->out + "/tokenizer.json", r.tokenizer_json);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print(
        "trained {} merges, vocabulary {} on {:.1f} MB ({} distinct pieces) in {:.1f}s: {}\n",
        r.merges, r.vocab_size, r.bytes_read / 1e6, r.distinct_pieces, dt,
        t->out + "/tokenizer.json");
  });

  CLI::App* info = tk->add_subcommand("info", "Kind, vocabulary size, special tokens");
  info->add_option("--tokenizer", o->tokenizer, "Tokenizer file or directory")->required();
  info->callback([o] {
    auto tok = load_tokenizer(o->tokenizer);
    fmt::print(
        "kind: {}\nsource: {}\nfingerprint: {}\nvocab_size: {}\nbos_id: {}\neos_id: {}\n"
        "special_tokens: {}\n",
        tok->kind(), tok->source(), tok->fingerprint(), tok->vocab_size(), tok->bos_id(),
        tok->eos_id(), tok->special_tokens().size());
    size_t shown = 0;
    for (auto& [name, id] : tok->special_tokens()) {
      if (shown++ == 16) {
        fmt::print("  ...\n");
        break;
      }
      fmt::print("  {} {}\n", id, name);
    }
  });
}

}  // namespace lmforge::app
