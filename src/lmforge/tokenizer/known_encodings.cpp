#include "lmforge/tokenizer/known_encodings.h"

#include <fmt/format.h>

namespace lmforge {

// Patterns as tiktoken (openai_public.py) and Meta's Llama 3 tokenizer.py define them.
const char* const kGpt2Pattern =
    R"('(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kCl100kPattern =
    R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+)";
namespace {
constexpr const char* kO200kPattern =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::vector<std::pair<std::string, int32_t>> llama3_specials() {
  std::vector<std::pair<std::string, int32_t>> s = {{"<|begin_of_text|>", 128000},
                                                    {"<|end_of_text|>", 128001},
                                                    {"<|reserved_special_token_0|>", 128002},
                                                    {"<|reserved_special_token_1|>", 128003},
                                                    {"<|finetune_right_pad_id|>", 128004},
                                                    {"<|reserved_special_token_2|>", 128005},
                                                    {"<|start_header_id|>", 128006},
                                                    {"<|end_header_id|>", 128007},
                                                    {"<|eom_id|>", 128008},
                                                    {"<|eot_id|>", 128009},
                                                    {"<|python_tag|>", 128010}};
  for (int32_t id = 128011; id < 128256; ++id)
    s.emplace_back(fmt::format("<|reserved_special_token_{}|>", id - 128011 + 3), id);
  return s;
}
}  // namespace

const KnownEncoding* known_encoding_for_ranks(size_t n_ranks) {
  static const std::vector<KnownEncoding> table = {
      {"gpt2",
       50256,
       kGpt2Pattern,
       {{"<|endoftext|>", 50256}},
       "",
       "<|endoftext|>",
       {R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"}},
      {"cl100k_base",
       100256,
       kCl100kPattern,
       {{"<|endoftext|>", 100257},
        {"<|fim_prefix|>", 100258},
        {"<|fim_middle|>", 100259},
        {"<|fim_suffix|>", 100260},
        {"<|endofprompt|>", 100276}},
       "",
       "<|endoftext|>",
       {R"(('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {"o200k_base",
       199998,
       kO200kPattern,
       {{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}},
       "",
       "<|endoftext|>",
       {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {"llama3", 128000, kLlama3Pattern, llama3_specials(), "<|begin_of_text|>", "<|end_of_text|>"},
  };
  for (const KnownEncoding& e : table)
    if (e.n_ranks == n_ranks) return &e;
  return nullptr;
}

}  // namespace lmforge
