// Hugging Face tokenizer.json (https://huggingface.co/docs/tokenizers) with a BPE model:
//  - byte-level (GPT-2, Llama 3, SmolLM): ByteLevel / Split pre-tokenizers (after a Digits one, as
//    SmolLM's), vocabulary in GPT-2's byte<->unicode form, ByteLevel decoder; a Unicode
//    normal form first (Qwen2's NFC; NFD, NFKC, NFKD);
//  - SentencePiece-style (HF exports of Llama 2, Mistral, TinyLlama): Prepend/Replace
//    normalizers or a Metaspace pre-tokenizer, byte_fallback <0xXX> tokens.
// Added tokens keep their special/lstrip/rstrip flags; a TemplateProcessing post-processor that
// starts with a special token gives the BOS.
#include <filesystem>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_tokenizer.h"
#include "lmforge/tokenizer/formats/formats.h"
#include "lmforge/tokenizer/known_encodings.h"

namespace lmforge {

using nlohmann::json;

namespace {

// Flattens a Sequence into its parts; a single component becomes a list of one.
std::vector<json> parts(const json& j) {
  if (j.is_null()) return {};
  if (j.value("type", "") == "Sequence") {
    for (const char* key : {"pretokenizers", "normalizers", "decoders", "processors"})
      if (j.contains(key)) return j[key].get<std::vector<json>>();
  }
  return {j};
}

// Adds merges given as "a b" strings or [a, b] pairs; tokens map through to_bytes().
template <typename ToBytes>
void add_merges(BpeTokenizer& tok, const json& merges, const std::string& path, ToBytes to_bytes) {
  uint32_t rank = 0;
  for (const json& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      std::string s = m.get<std::string>();
      size_t sp = s.find(' ');  // exactly one space between two tokens, as tokenizers splits it
      if (sp == 0 || sp == std::string::npos || sp + 1 == s.size() ||
          s.find(' ', sp + 1) != std::string::npos)
        fail("{}: merge {} (\"{}\") is not \"left right\"", path, rank, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      if (!m.is_array() || m.size() != 2 || !m[0].is_string() || !m[1].is_string())
        fail("{}: merge {} is {}, not [\"left\", \"right\"]", path, rank, m.dump());
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    }
    std::string ab, bb;
    if (!to_bytes(a, &ab) || !to_bytes(b, &bb))
      fail("{}: merge {} (\"{} {}\") holds characters outside the vocabulary's byte map", path,
           rank, a, b);
    int32_t ia = tok.id_of(ab), ib = tok.id_of(bb), im = tok.id_of(ab + bb);
    if (ia < 0 || ib < 0 || im < 0)
      fail("{}: merge {} (\"{} {}\") uses or makes a token missing from the vocabulary", path, rank,
           a, b);
    tok.engine().add_merge(ia, ib, im, rank++, /*last_wins=*/true);
  }
}

}  // namespace

namespace {

// eos_token of the tokenizer_config.json beside a tokenizer.json ("" when none): a string or
// {"content": ...}, as transformers writes either.
std::string tokenizer_config_eos(const std::string& tokenizer_json) {
  // (a model directory's pair only: a folder of several tokenizers has no one config for them)
  if (std::filesystem::path(tokenizer_json).filename() != "tokenizer.json") return "";
  const std::string path =
      (std::filesystem::path(tokenizer_json).parent_path() / "tokenizer_config.json").string();
  if (!std::filesystem::exists(path)) return "";
  try {
    const json j = json::parse(read_file(path));
    const json eos = j.is_object() ? j.value("eos_token", json()) : json();
    if (eos.is_string()) return eos.get<std::string>();
    if (eos.is_object() && eos.contains("content") && eos["content"].is_string())
      return eos["content"].get<std::string>();
    return "";
  } catch (const json::exception& e) {
    fail("{}: not a JSON object ({}); fix or remove it", path, e.what());
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::string& path) {
  std::string text = read_file(path);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({}); the file is truncated or corrupt", path, e.what());
  }
  auto tok = std::make_unique<BpeTokenizer>();
  try {
    const json& model = j.at("model");
    if (model.value("type", "BPE") != "BPE")
      fail("{}: model type \"{}\" is not supported (BPE only)", path, model.value("type", ""));
    for (const char* k : {"end_of_word_suffix", "continuing_subword_prefix"})
      if (model.contains(k) && !model[k].is_null() && model[k] != "")
        fail("{}: model.{} {} is not supported yet (BPE without word affixes only)", path, k,
             model[k].dump());
    if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"] != 0)
      fail(
          "{}: model.dropout {} is not supported (BPE dropout makes encoding random); set it "
          "to null",
          path, model["dropout"].dump());

    bool byte_level = false, metaspace = false, split_on_meta = false, digits = false;
    BpeTokenizer::Prepend prepend = BpeTokenizer::Prepend::kNever;
    std::string pattern;
    for (const json& p : parts(j["pre_tokenizer"])) {
      std::string type = p.value("type", "");
      if (type == "ByteLevel") {
        byte_level = true;
        // After a Split, HF would apply these to every piece of the split: one regex and a
        // prefix space per run of text is all lmforge does.
        if (!pattern.empty() && (p.value("use_regex", true) || p.value("add_prefix_space", false)))
          fail("{}: ByteLevel with use_regex or add_prefix_space after a Split is not supported",
               path);
        if (digits && p.value("add_prefix_space", false))  // HF: a space before every digit split
          fail("{}: ByteLevel with add_prefix_space after Digits is not supported", path);
        if (p.value("use_regex", true)) pattern = kGpt2Pattern;
        tok->set_add_prefix_space(p.value("add_prefix_space", false));
      } else if (type == "Split") {
        const json& pat = p.at("pattern");
        if (!pat.contains("Regex"))
          fail("{}: Split pre-tokenizer with a String pattern is not supported", path);
        if (p.value("behavior", "Isolated") != "Isolated")
          fail("{}: Split pre-tokenizer behavior {} is not supported (Isolated only)", path,
               p.value("behavior", ""));
        if (p.value("invert", false))
          fail(
              "{}: Split pre-tokenizer with invert: true is not supported (the matches are the "
              "pieces)",
              path);
        if (!pattern.empty())
          fail("{}: a second regex pre-tokenizer is not supported (one Split or ByteLevel)", path);
        pattern = pat["Regex"].get<std::string>();
      } else if (type == "Digits") {  // splits off numbers before any regex (SmolLM)
        if (byte_level || !pattern.empty() || metaspace)
          fail("{}: a Digits pre-tokenizer after another is not supported (only first)", path);
        tok->set_digits(p.value("individual_digits", false));
        digits = true;
      } else if (type == "Metaspace") {
        metaspace = true;
        split_on_meta = p.value("split", true);
        std::string scheme =
            p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
        prepend = scheme == "first"    ? BpeTokenizer::Prepend::kFirst
                  : scheme == "always" ? BpeTokenizer::Prepend::kAlways
                                       : BpeTokenizer::Prepend::kNever;
      } else {  // skipping it would split the text differently from Hugging Face
        fail("{}: pre-tokenizer {} is not supported yet (ByteLevel, Split and Metaspace are)", path,
             type.empty() ? p.dump() : type);
      }
    }
    bool normal_form_first = true;  // a normal form only before the "▁" steps (see below)
    for (const json& n : parts(j["normalizer"])) {
      std::string type = n.value("type", "");
      if (NormalForm f = normal_form_named(type); f != NormalForm::kNone) {
        // lmforge applies it before them: after them a K form would leave the spaces it makes
        // (from U+00A0, U+2002, ...) as spaces instead of "▁".
        if (!normal_form_first || tok->normal_form() != NormalForm::kNone)
          fail("{}: normalizer {} after another normalizer is not supported (only first)", path,
               type);
        tok->set_normal_form(f);
        continue;
      }
      normal_form_first = false;
      if (type == "Prepend" && n.value("prepend", "") == "\xE2\x96\x81") {
        metaspace = true;
        prepend = BpeTokenizer::Prepend::kEvery;
      } else if (type == "Replace" && n["pattern"].value("String", "") == " " &&
                 n.value("content", "") == "\xE2\x96\x81") {
        metaspace = true;
      } else {
        // Anything else would be skipped and the text encoded differently from Hugging Face.
        std::string what = n.dump();
        if (what.size() > 120) what = what.substr(0, 120) + "...";
        fail("{}: normalizer {} is not supported yet", path, what);
      }
    }
    if (metaspace && split_on_meta)
      fail("{}: Metaspace with split=true is not supported yet", path);

    // Vocabulary: byte-level strings are GPT-2-mapped; SentencePiece-style ones are raw UTF-8.
    auto to_bytes = [&](const std::string& s, std::string* out) {
      if (byte_level) return gpt2_unicode_to_bytes(s, out);
      *out = s;
      return true;
    };
    std::string bytes;
    for (auto& [s, id] : model.at("vocab").items()) {
      if (!to_bytes(s, &bytes))
        fail("{}: vocabulary entry \"{}\" is not in the byte-level alphabet", path, s);
      tok->add_token(checked_token_id(id.get<int64_t>(), path), bytes);
    }
    add_merges(*tok, model.at("merges"), path, to_bytes);
    tok->set_whole_piece_lookup(model.value("ignore_merges", false));
    if (!byte_level) {
      tok->set_symbols(BpeTokenizer::Symbols::kCharsWithByteFallback);
      tok->set_byte_fallback(model.value("byte_fallback", false));
      if (model.contains("unk_token") && model["unk_token"].is_string())
        tok->set_unk(tok->id_of(model["unk_token"].get<std::string>()),
                     model.value("fuse_unk", false));
      tok->set_metaspace(metaspace, prepend);
    }
    if (!pattern.empty()) tok->set_pretokenizer(std::make_unique<Pretokenizer>(pattern, path));
    for (const json& a : j.value("added_tokens", json::array())) {
      const std::string content = a.at("content").get<std::string>();
      if (a.value("single_word", false))
        fail("{}: added token \"{}\" has single_word, which is not supported yet", path, content);
      uint8_t flags = 0;
      if (!a.value("special", true)) flags |= BpeTokenizer::kNotSpecial;
      if (a.value("lstrip", false)) flags |= BpeTokenizer::kLstrip;
      if (a.value("rstrip", false)) flags |= BpeTokenizer::kRstrip;
      tok->add_special(content, checked_token_id(a.at("id").get<int64_t>(), path), flags);
    }

    // BOS from a TemplateProcessing post-processor that starts with a special token.
    int32_t bos = -1;
    for (const json& p : parts(j["post_processor"])) {
      if (p.value("type", "") != "TemplateProcessing") continue;
      const json& single = p.at("single");
      if (!single.empty() && single[0].contains("SpecialToken")) {
        std::string name = single[0]["SpecialToken"].at("id").get<std::string>();
        auto it = tok->special_tokens().find(name);
        if (it != tok->special_tokens().end()) bos = it->second;
      }
    }
    int32_t eos = -1;
    for (const char* name : {"<|end_of_text|>", "<|endoftext|>", "</s>", "<|im_end|>"}) {
      auto it = tok->special_tokens().find(name);
      if (it != tok->special_tokens().end()) {
        eos = it->second;
        break;
      }
    }
    // The sibling tokenizer_config.json's eos_token names it where it is a token (transformers'
    // tokenizer.eos_token: Gemma's <eos>, a chat model's <|im_end|> over </s>); the fingerprint
    // covers it when it differs from the guess by name.
    std::string identity = text;
    if (const std::string name = tokenizer_config_eos(path); !name.empty()) {
      const auto it = tok->special_tokens().find(name);
      const int32_t id = it != tok->special_tokens().end() ? it->second : tok->id_of(name);
      if (id >= 0 && id != eos) {
        identity += std::string(1, '\0') + "eos=" + name;
        eos = id;
      }
    }
    tok->set_bos_eos(bos, eos);
    tok->set_identity(byte_level ? "hf-bpe" : "hf-sp-bpe", path, fnv1a_hex(identity));
  } catch (const json::exception& e) {
    fail("{}: unexpected tokenizer.json layout ({})", path, e.what());
  }
  tok->finalize();
  return tok;
}

std::unique_ptr<Tokenizer> load_gpt2_vocab_merges(const std::string& vocab_json,
                                                  const std::string& merges_txt) {
  auto tok = std::make_unique<BpeTokenizer>();
  std::string vtext = read_file(vocab_json), mtext = read_file(merges_txt);
  try {
    std::string bytes;
    json vocab = json::parse(vtext);  // named: items() of a temporary would dangle
    if (!vocab.is_object()) fail("{}: expected a JSON object of token -> id", vocab_json);
    for (auto& [s, id] : vocab.items()) {
      if (s == "<|endoftext|>") {
        tok->add_special(s, checked_token_id(id.get<int64_t>(), vocab_json));
        continue;
      }
      if (!gpt2_unicode_to_bytes(s, &bytes))
        fail("{}: entry \"{}\" is not in GPT-2's byte-level alphabet", vocab_json, s);
      tok->add_token(checked_token_id(id.get<int64_t>(), vocab_json), bytes);
    }
  } catch (const json::exception& e) {
    fail("{}: not a GPT-2 vocab.json ({})", vocab_json, e.what());
  }
  json merges = json::array();
  size_t line_no = 0;
  for (size_t pos = 0; pos < mtext.size();) {
    size_t end = mtext.find('\n', pos);
    if (end == std::string::npos) end = mtext.size();
    std::string line = mtext.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.starts_with("#version")) continue;
    size_t sp = line.find(' ');
    if (sp == 0 || sp == std::string::npos || sp + 1 == line.size() ||
        line.find(' ', sp + 1) != std::string::npos)
      fail("{}:{}: expected \"left right\" (two tokens and one space)", merges_txt, line_no);
    merges.push_back(line);
  }
  add_merges(*tok, merges, merges_txt, gpt2_unicode_to_bytes);
  tok->set_pretokenizer(std::make_unique<Pretokenizer>(kGpt2Pattern, merges_txt));
  auto it = tok->special_tokens().find("<|endoftext|>");
  tok->set_bos_eos(-1, it == tok->special_tokens().end() ? -1 : it->second);
  tok->set_identity("gpt2-merges", vocab_json,
                    fnv1a_hex(mtext, std::stoull(fnv1a_hex(vtext), nullptr, 16)));
  tok->finalize();
  return tok;
}

}  // namespace lmforge
