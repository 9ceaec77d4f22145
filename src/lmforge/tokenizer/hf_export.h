// The Hugging Face tokenizer.json that export_hf_tokenizer (tokenizer.h) writes for the kinds
// that have none of their own, exposed here for the tests:
//  - byte-level BPE (tiktoken rank files, GPT-2 vocab.json + merges.txt): a BPE model over GPT-2's
//    byte<->unicode alphabet, merges in BpeEngine::rules() order (for rank files, transformers'
//    TikTokenConverter order), the tokenizer's own regex in a Split before ByteLevel, and
//    ignore_merges where lmforge looks whole pieces up (tiktoken);
//  - the byte tokenizer: 256 one-byte tokens, no merges;
//  - SentencePiece BPE with identity normalization (Llama 2, Mistral): merges by piece score,
//    the normalizer spec (extra-whitespace removal, dummy prefix, "▁" for spaces) as HF
//    normalizers, byte fallback. Unigram models and precompiled charsmaps (nmt_nfkc) have no exact
//    HF equivalent: Error.
// A BOS that encode(add_bos=true) adds becomes a TemplateProcessing post-processor.
//
//   std::string text = hf_byte_level_tokenizer_json(dynamic_cast<const BpeTokenizer&>(*tok));
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lmforge/tokenizer/bpe_tokenizer.h"
#include "lmforge/tokenizer/formats/sentencepiece_proto.h"

namespace lmforge {

std::string hf_byte_level_tokenizer_json(const BpeTokenizer& tok);
std::string hf_byte_tokenizer_json(const Tokenizer& tok);
// `bos`: the id encode(add_bos=true) starts with (-1: none); `where` names the model file. Throws
// Error saying why for a model it cannot express exactly.
std::string hf_sentencepiece_tokenizer_json(const SentencePieceModel& m, int32_t bos,
                                            const std::string& where);

// A SentencePiece BPE model's merges as (left id, right id), in the order Hugging Face's BPE
// applies them: SentencePiece merges the adjacent pair whose concatenation is the normal piece
// of highest score, so every split of a normal piece into two normal pieces is a merge, by score
// (highest first), then piece id, then the parts' ids.
std::vector<std::pair<int32_t, int32_t>> sentencepiece_bpe_merges(const SentencePieceModel& m);

}  // namespace lmforge
