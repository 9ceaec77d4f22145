// export_hf_tokenizer (tokenizer.h) and the tokenizer.json it generates (hf_export.h). Layouts
// follow what `tokenizers` itself saves (https://huggingface.co/docs/tokenizers/api/pipeline):
// transformers' TikTokenConverter for rank files, Llama 2's export for SentencePiece BPE.
#include "lmforge/tokenizer/hf_export.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/formats/formats.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace {

constexpr std::string_view kMeta = "\xE2\x96\x81";  // U+2581 "▁"

// A JSON string literal; throws nlohmann's type_error for invalid UTF-8.
std::string json_string(std::string_view s) { return nlohmann::json(std::string(s)).dump(); }

// "[a, b]" of two JSON values.
std::string json_pair(const std::string& a, const std::string& b) {
  std::string s(1, '[');
  s += a;
  s += ", ";
  s += b;
  s += ']';
  return s;
}

// A JSON array or object of one item per line, at the indent of a model field's value.
std::string lines(const std::vector<std::string>& items, char open, char close) {
  if (items.empty()) return std::string{open, close};
  std::string out(1, open);
  for (size_t i = 0; i < items.size(); ++i) {
    out += i ? ",\n      " : "\n      ";
    out += items[i];
  }
  return out + "\n    " + close;
}

// tokenizer.json text: `head` holds every key but the model, then the model's scalar fields and
// its vocab and merges, already JSON text. Written by hand: nlohmann's ordered objects insert in
// linear time, which a 200k-token vocabulary cannot afford.
std::string tokenizer_json_text(const ordered_json& head, const ordered_json& model_fields,
                                const std::string& vocab, const std::string& merges) {
  std::string out = head.dump(2);
  out.resize(out.size() - 2);  // "\n}"
  out += ",\n  \"model\": {\n";
  for (auto& [key, value] : model_fields.items())
    out += "    " + json_string(key) + ": " + value.dump() + ",\n";
  out += "    \"vocab\": " + vocab + ",\n    \"merges\": " + merges;
  return out + "\n  }\n}\n";
}

ordered_json head_fields(const ordered_json& added, const ordered_json& normalizer,
                         const ordered_json& pre_tokenizer, const ordered_json& post_processor,
                         const ordered_json& decoder) {
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", normalizer},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", post_processor},
          {"decoder", decoder}};
}

ordered_json added_token(const std::string& content, int32_t id) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", true}};
}

// The specials, by id, as added_tokens.
ordered_json added_tokens(const std::map<std::string, int32_t>& specials) {
  std::vector<std::pair<int32_t, std::string>> by_id;
  for (auto& [text, id] : specials) by_id.emplace_back(id, text);
  std::sort(by_id.begin(), by_id.end());
  ordered_json out = ordered_json::array();
  for (auto& [id, text] : by_id) out.push_back(added_token(text, id));
  return out;
}

// "<bos> $A" (and "<bos> $A <bos> $B" for pairs), as Llama's tokenizer.json files have it.
ordered_json bos_post_processor(const std::string& bos, int32_t id) {
  auto special = [&](int type_id) {
    return ordered_json{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}};
  };
  auto sequence = [](const char* which, int type_id) {
    return ordered_json{{"Sequence", {{"id", which}, {"type_id", type_id}}}};
  };
  return {{"type", "TemplateProcessing"},
          {"single", {special(0), sequence("A", 0)}},
          {"pair", {special(0), sequence("A", 0), special(1), sequence("B", 1)}},
          {"special_tokens", {{bos, {{"id", bos}, {"ids", {id}}, {"tokens", {bos}}}}}}};
}

ordered_json bpe_model_fields(const char* unk, bool fuse_unk, bool byte_fallback,
                              bool ignore_merges) {
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", unk ? ordered_json(unk) : ordered_json(nullptr)},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", fuse_unk},
          {"byte_fallback", byte_fallback},
          {"ignore_merges", ignore_merges}};
}

const ordered_json kByteLevelDecoder = {
    {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};

ordered_json byte_level_pre_tokenizer() {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", false}};
}

// Hugging Face numbers the added tokens that are not in the model's vocabulary one after another
// from the vocabulary's size, whatever ids tokenizer.json gives them (tokenizers'
// AddedVocabulary::add_tokens). Specials that follow on from the vocabulary stay added tokens
// only (Llama 3's layout); otherwise (cl100k's <|endoftext|> is 100257 after 100256 ranks) they
// go into the vocabulary too, which keeps their ids (GPT-2's layout; with ignore_merges a
// pre-tokenizer piece spelling a special would then be looked up as it, which the public patterns
// never give). `vocab`: "string": id lines.
void add_specials_to_vocab_unless_they_follow_on(std::vector<std::string>& vocab,
                                                 const std::map<std::string, int32_t>& specials) {
  std::vector<std::pair<int32_t, std::string>> by_id;
  for (auto& [text, id] : specials) by_id.emplace_back(id, text);
  std::sort(by_id.begin(), by_id.end());
  bool follow_on = true;
  for (size_t k = 0; k < by_id.size(); ++k)
    follow_on = follow_on && by_id[k].first == static_cast<int64_t>(vocab.size() + k);
  if (follow_on) return;
  for (auto& [id, text] : by_id) vocab.push_back(json_string(text) + ": " + std::to_string(id));
}

std::string special_name(const Tokenizer& tok, int32_t id) {
  if (id < 0) return "";
  for (auto& [text, sid] : tok.special_tokens())
    if (sid == id) return text;
  return "";
}

}  // namespace

std::string hf_byte_level_tokenizer_json(const BpeTokenizer& tok) {
  // What the generated pipeline cannot say: lmforge adds the prefix space once per run of text,
  // a ByteLevel after a Split would add it to every piece (such tokenizers come from a
  // tokenizer.json, which is copied instead).
  LMF_CHECK(tok.symbols() == BpeTokenizer::Symbols::kBytes && !tok.metaspace() &&
                !tok.add_prefix_space() && tok.normal_form() == NormalForm::kNone,
            "{}: not a plain byte-level BPE", tok.source());
  std::unordered_map<int32_t, bool> special;
  for (auto& [text, id] : tok.special_tokens()) special[id] = true;
  std::vector<std::string> vocab;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (special.count(id)) continue;
    std::string bytes = tok.token_bytes(id);
    // Ids without a token, and a second id spelling the same bytes, which encode never gives.
    if (bytes.empty() || tok.id_of(bytes) != id) continue;
    vocab.push_back(json_string(gpt2_bytes_to_unicode(bytes)) + ": " + std::to_string(id));
  }
  add_specials_to_vocab_unless_they_follow_on(vocab, tok.special_tokens());
  std::vector<std::string> merges;
  for (const BpeEngine::Rule& r : tok.engine().rules())
    merges.push_back(json_pair(json_string(gpt2_bytes_to_unicode(tok.token_bytes(r.left))),
                               json_string(gpt2_bytes_to_unicode(tok.token_bytes(r.right)))));

  ordered_json pre = byte_level_pre_tokenizer();
  if (const Pretokenizer* p = tok.pretokenizer())
    pre = {{"type", "Sequence"},
           {"pretokenizers",
            {{{"type", "Split"},
              {"pattern", {{"Regex", p->pattern()}}},
              {"behavior", "Isolated"},
              {"invert", false}},
             pre}}};
  std::string bos = special_name(tok, tok.bos_id());
  ordered_json post = bos.empty() ? ordered_json(nullptr) : bos_post_processor(bos, tok.bos_id());
  return tokenizer_json_text(
      head_fields(added_tokens(tok.special_tokens()), nullptr, pre, post, kByteLevelDecoder),
      bpe_model_fields(nullptr, false, false, tok.whole_piece_lookup()), lines(vocab, '{', '}'),
      lines(merges, '[', ']'));
}

std::string hf_byte_tokenizer_json(const Tokenizer& tok) {
  std::vector<std::string> vocab;
  for (int b = 0; b < 256; ++b)
    vocab.push_back(json_string(gpt2_bytes_to_unicode(std::string(1, static_cast<char>(b)))) +
                    ": " + std::to_string(b));
  add_specials_to_vocab_unless_they_follow_on(vocab, tok.special_tokens());
  return tokenizer_json_text(head_fields(added_tokens(tok.special_tokens()), nullptr,
                                         byte_level_pre_tokenizer(), nullptr, kByteLevelDecoder),
                             bpe_model_fields(nullptr, false, false, false), lines(vocab, '{', '}'),
                             lines({}, '[', ']'));
}

std::vector<std::pair<int32_t, int32_t>> sentencepiece_bpe_merges(const SentencePieceModel& m) {
  std::unordered_map<std::string_view, int32_t> normal;
  for (size_t id = 0; id < m.pieces.size(); ++id)
    if (m.pieces[id].type == SentencePieceModel::kNormal)
      normal.emplace(m.pieces[id].piece, static_cast<int32_t>(id));
  struct Merge {
    float score;
    int32_t merged, left, right;
  };
  std::vector<Merge> merges;
  for (auto& [piece, id] : normal) {
    // Splits at character boundaries only: the parts are pieces, which are whole characters.
    for (size_t k = 1; k < piece.size(); ++k) {
      if ((static_cast<unsigned char>(piece[k]) & 0xC0) == 0x80) continue;
      auto l = normal.find(piece.substr(0, k)), r = normal.find(piece.substr(k));
      if (l != normal.end() && r != normal.end())
        merges.push_back({m.pieces[id].score, id, l->second, r->second});
    }
  }
  std::sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.merged != b.merged) return a.merged < b.merged;
    return a.left != b.left ? a.left < b.left : a.right < b.right;
  });
  std::vector<std::pair<int32_t, int32_t>> out;
  out.reserve(merges.size());
  for (const Merge& x : merges) out.emplace_back(x.left, x.right);
  return out;
}

std::string hf_sentencepiece_tokenizer_json(const SentencePieceModel& m, int32_t bos,
                                            const std::string& where) {
  using SP = SentencePieceModel;
  auto cannot = [&](const std::string& why) {
    fail("{}: cannot export this SentencePiece model to Hugging Face's tokenizer.json: {}", where,
         why);
  };
  // What tokenizer.json cannot say exactly. Hugging Face's Unigram lattice holds every piece, so
  // it reads control pieces ("<s>") and byte pieces from text, which SentencePiece never does; its
  // Precompiled normalizer looks up whole grapheme clusters (or their characters one by one, from
  // 6 bytes on) where SentencePiece takes the longest match, so a letter with several combining
  // marks normalizes differently.
  if (m.model_type != SP::kBpe)
    cannot(fmt::format(
        "it is a {} model; only BPE models export exactly{}",
        m.model_type == SP::kUnigram ? "Unigram"
        : m.model_type == SP::kWord  ? "word"
                                     : "char",
        m.model_type == SP::kUnigram
            ? " (Hugging Face's Unigram would read control pieces such as <s> from plain text)"
            : ""));
  if (!m.precompiled_charsmap.empty())
    cannot(fmt::format(
        "its normalizer \"{}\" is a precompiled charsmap, which Hugging Face applies per "
        "grapheme cluster (SentencePiece: longest match), so text with combining marks would "
        "encode differently; only identity-normalized models (Llama 2, Mistral) export exactly",
        m.normalizer_name));
  if (m.treat_whitespace_as_suffix)
    cannot("treat_whitespace_as_suffix has no Hugging Face equivalent");
  // SentencePiece matches user-defined pieces inside the normalized text and never ends on an
  // unused piece; Hugging Face has neither rule.
  for (const SP::Piece& p : m.pieces)
    if (p.type == SP::kUserDefined || p.type == SP::kUnused)
      cannot(fmt::format("piece \"{}\" is {}, which Hugging Face cannot match the same way",
                         p.piece, p.type == SP::kUserDefined ? "user-defined" : "unused"));

  std::map<std::string, int32_t> specials;
  std::string unk;
  for (size_t id = 0; id < m.pieces.size(); ++id) {
    const SP::Piece& p = m.pieces[id];
    if (p.type == SP::kControl || p.type == SP::kUnknown)
      specials.emplace(p.piece, static_cast<int32_t>(id));
    if (p.type == SP::kUnknown) unk = p.piece;
  }

  // The normalizer spec, step by step as SentencePiece's Normalizer applies it.
  const std::string space = m.escape_whitespaces ? std::string(kMeta) : " ";
  ordered_json norm = ordered_json::array();
  if (m.remove_extra_whitespaces) {
    // \A and \z: Oniguruma's ^ and $ match at every line break.
    norm.push_back({{"type", "Replace"}, {"pattern", {{"Regex", "\\A +| +\\z"}}}, {"content", ""}});
    norm.push_back({{"type", "Replace"}, {"pattern", {{"Regex", " {2,}"}}}, {"content", " "}});
  }
  if (m.add_dummy_prefix) norm.push_back({{"type", "Prepend"}, {"prepend", space}});
  if (m.escape_whitespaces)
    norm.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}});
  ordered_json normalizer = norm.empty()
                                ? ordered_json(nullptr)
                                : ordered_json{{"type", "Sequence"}, {"normalizers", norm}};

  ordered_json dec = ordered_json::array();
  if (!unk.empty())
    dec.push_back(
        {{"type", "Replace"}, {"pattern", {{"String", unk}}}, {"content", m.unk_surface}});
  if (m.escape_whitespaces)
    dec.push_back({{"type", "Replace"}, {"pattern", {{"String", kMeta}}}, {"content", " "}});
  if (m.byte_fallback) dec.push_back({{"type", "ByteFallback"}});
  dec.push_back({{"type", "Fuse"}});
  if (m.add_dummy_prefix)
    dec.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  ordered_json decoder = {{"type", "Sequence"}, {"decoders", dec}};

  std::string bos_name =
      bos >= 0 && bos < static_cast<int32_t>(m.pieces.size()) ? m.pieces[bos].piece : std::string();
  ordered_json post = bos_name.empty() ? ordered_json(nullptr) : bos_post_processor(bos_name, bos);
  ordered_json head = head_fields(added_tokens(specials), normalizer, nullptr, post, decoder);

  std::vector<std::string> vocab;
  for (size_t id = 0; id < m.pieces.size(); ++id)
    vocab.push_back(json_string(m.pieces[id].piece) + ": " + std::to_string(id));
  std::vector<std::string> merges;
  for (auto& [l, r] : sentencepiece_bpe_merges(m))
    merges.push_back(json_pair(json_string(m.pieces[l].piece), json_string(m.pieces[r].piece)));
  return tokenizer_json_text(
      head, bpe_model_fields(unk.empty() ? nullptr : unk.c_str(), true, m.byte_fallback, false),
      lines(vocab, '{', '}'), lines(merges, '[', ']'));
}

namespace {

// tokenizer_config.json (+ special_tokens_map.json): the class that loads tokenizer.json as it
// is in transformers 4 and 5 (in 5 an alias of TokenizersBackend), and the named specials.
void write_tokenizer_config(const std::string& dir, const std::string& bos, const std::string& eos,
                            const std::string& unk) {
  ordered_json names = ordered_json::object();
  if (!bos.empty()) names["bos_token"] = bos;
  if (!eos.empty()) names["eos_token"] = eos;
  if (!unk.empty()) names["unk_token"] = unk;
  ordered_json config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                         {"clean_up_tokenization_spaces", false}};
  config.update(names);
  write_file_atomic(dir + "/tokenizer_config.json", config.dump(2) + "\n");
  write_file_atomic(dir + "/special_tokens_map.json", names.dump(2) + "\n");
}

// The tokenizer's file, checked to be what was loaded (the fingerprint that shards and
// checkpoints record; GPT-2's covers vocab.json and merges.txt, as in load_gpt2_vocab_merges; a
// rank file's, its sibling .json's pattern and specials too, and a tokenizer.json's, the EOS of
// its tokenizer_config.json: those two are loaded again).
std::string read_source(const Tokenizer& tok) {
  std::string text = read_file(tok.source()), fingerprint = fnv1a_hex(text);
  if (tok.kind() == "tiktoken") fingerprint = load_tiktoken(tok.source())->fingerprint();
  if (tok.kind() == "hf-bpe" || tok.kind() == "hf-sp-bpe")
    fingerprint = load_hf_tokenizer_json(tok.source())->fingerprint();
  if (tok.kind() == "gpt2-merges") {
    std::string merges = read_file((fs::path(tok.source()).parent_path() / "merges.txt").string());
    fingerprint = fnv1a_hex(merges, std::stoull(fingerprint, nullptr, 16));
  }
  if (fingerprint != tok.fingerprint())
    fail("{}: the file changed since the tokenizer was loaded; reload it and export again",
         tok.source());
  return text;
}

// Copies `from` to dir/name unless they are the same file.
void copy_into(const fs::path& from, const std::string& dir, const std::string& name) {
  fs::path to = fs::path(dir) / name;
  std::error_code ec;
  if (fs::exists(to) && fs::equivalent(from, to, ec)) return;
  copy_file_atomic(from.string(), to.string());
}

}  // namespace

void export_hf_tokenizer(const Tokenizer& tok, const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the directory ({})", dir, ec.message());
  const std::string& kind = tok.kind();
  std::string bos = special_name(tok, tok.bos_id()), eos = special_name(tok, tok.eos_id()), unk;
  try {
    if (kind == "hf-bpe" || kind == "hf-sp-bpe") {
      // The original, byte for byte, and its tokenizer_config.json if it had one.
      read_source(tok);
      fs::path src(tok.source());
      copy_into(src, dir, "tokenizer.json");
      fs::path config = src.parent_path() / "tokenizer_config.json";
      if (fs::exists(config)) {
        copy_into(config, dir, "tokenizer_config.json");
        for (const char* name : {"special_tokens_map.json", "chat_template.jinja"})
          if (fs::exists(src.parent_path() / name)) copy_into(src.parent_path() / name, dir, name);
        return;
      }
      if (auto* bpe = dynamic_cast<const BpeTokenizer*>(&tok)) unk = special_name(tok, bpe->unk());
    } else if (kind == "tiktoken" || kind == "gpt2-merges") {
      auto* bpe = dynamic_cast<const BpeTokenizer*>(&tok);
      LMF_CHECK(bpe, "{} tokenizer is not a BpeTokenizer", kind);
      read_source(tok);
      write_file_atomic(dir + "/tokenizer.json", hf_byte_level_tokenizer_json(*bpe));
    } else if (kind == "byte") {
      write_file_atomic(dir + "/tokenizer.json", hf_byte_tokenizer_json(tok));
    } else if (kind == "sentencepiece") {
      std::string bytes = read_source(tok);
      SentencePieceModel m = parse_sentencepiece_model(bytes, tok.source());
      LMF_CHECK(static_cast<int64_t>(m.pieces.size()) == tok.vocab_size(), "{}: {} pieces vs {}",
                tok.source(), m.pieces.size(), tok.vocab_size());
      write_file_atomic(dir + "/tokenizer.json",
                        hf_sentencepiece_tokenizer_json(m, tok.bos_id(), tok.source()));
      // Beside it for tools that read the SentencePiece model (transformers prefers the .json).
      copy_into(tok.source(), dir, "tokenizer.model");
      for (const SentencePieceModel::Piece& p : m.pieces)
        if (p.type == SentencePieceModel::kUnknown) unk = p.piece;
    } else {
      fail("{}: tokenizer kind \"{}\" cannot be exported to Hugging Face format", tok.source(),
           kind);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: cannot write its tokenizer.json ({}); a token is not valid UTF-8", tok.source(),
         e.what());
  }
  write_tokenizer_config(dir, bos, eos, unk);
}

}  // namespace lmforge
