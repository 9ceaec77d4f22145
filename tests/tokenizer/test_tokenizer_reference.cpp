// Every tokenizer format against its reference library, document by document (the bar):
// token ids equal exactly, and decode(encode(x)) gives what the reference's decode gives (x for
// every plain document). References, from tests/reference/tokenizer_ref.py (run by
// make_fixtures.py): tiktoken for the four rank files of ../shared/assets/tokenizers (with their
// .json patterns, and with lmforge's built-in patterns against tiktoken's own); Hugging Face
// `tokenizers` for tokenizer.json files built from those ranks (GPT-2 and Llama 3 style) or
// trained on the KJV (SentencePiece-style BPE, Prepend/Replace or Metaspace), for the Unicode
// normal forms (Qwen2's layout with NFC, and NFD, NFKC, NFKD), and for GPT-2's
// vocab.json + merges.txt; `sentencepiece` for a .model trained on the KJV. Documents: a fixed
// ~1.5 MB sample of the KJV, GCIDE and the kernel's .rst files, plus hand-written hard cases
// and every assigned code point. The full corpora are test_tokenizer_full (label slow).
#include <gtest/gtest.h>

#include "testing/paths.h"
#include "tokenizer/reference_fixtures.h"

namespace lmforge {
namespace {

class TokenizerReference : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerReference, IdsAndRoundTrip) {
  testing::check_tokenizer_fixture(testing::ref_dir() + "/tokenizers", GetParam());
}

// The test list is fixed when the binary is built, before the fixtures exist.
INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerReference,
                         ::testing::ValuesIn(testing::reference_tokenizer_names()),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return name;
                         });

}  // namespace
}  // namespace lmforge
