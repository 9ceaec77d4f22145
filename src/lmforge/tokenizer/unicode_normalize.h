// Unicode normalization forms (UAX #15) as Hugging Face's NFC / NFD / NFKC / NFKD normalizers
// apply them (Qwen2's tokenizer.json has NFC), through ICU.
#pragma once

#include <string>
#include <string_view>

namespace lmforge {

enum class NormalForm { kNone, kNFC, kNFD, kNFKC, kNFKD };

// "NFC" -> kNFC, ...; kNone for any other name.
NormalForm normal_form_named(std::string_view name);
const char* normal_form_name(NormalForm f);  // "NFC", ...; "none"

// `text` in normal form `f` (kNone: unchanged), by Unicode 9.0's tables as Hugging Face's
// normalizers (characters assigned later are left as they are). Bytes that are not valid UTF-8 stay
// as they are and separate the text around them (nothing composes across them); Hugging Face only
// ever sees valid text.
std::string normalize_utf8(std::string_view text, NormalForm f);

}  // namespace lmforge
