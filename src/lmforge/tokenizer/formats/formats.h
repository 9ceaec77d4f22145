// Loaders, one per file format; load_tokenizer() (tokenizer/load.cpp) picks one.
#pragma once

#include <memory>
#include <string>

#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

// <base64 bytes> <rank> per line; pattern and specials from a sibling .json or, for the public
// encodings, built in (known_encodings.h).
std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path);
// Hugging Face tokenizer.json with a BPE model (byte-level or SentencePiece-style).
std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::string& path);
// GPT-2's vocab.json + merges.txt (byte-level BPE, GPT-2 pattern).
std::unique_ptr<Tokenizer> load_gpt2_vocab_merges(const std::string& vocab_json,
                                                  const std::string& merges_txt);
// SentencePiece .model through libsentencepiece.
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);
// The byte-level tokenizer (256 bytes + <|endoftext|> = 256).
std::unique_ptr<Tokenizer> make_byte_tokenizer();

// A token id read from a file, checked to be in [0, 2^22): larger vocabularies do not exist, and
// a corrupt id must not turn into a multi-gigabyte allocation. Throws Error naming `where`.
int32_t checked_token_id(int64_t id, const std::string& where);

// GPT-2's byte <-> printable-unicode map (bytes_to_unicode in openai/gpt-2 encoder.py), used by
// byte-level BPE vocabularies. Returns the raw bytes of a mapped string, or false if a
// character is not in the map.
bool gpt2_unicode_to_bytes(const std::string& mapped, std::string* bytes);
std::string gpt2_bytes_to_unicode(const std::string& bytes);

}  // namespace lmforge
