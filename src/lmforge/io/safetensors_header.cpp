// The safetensors header parser. It is written against the reference implementation (the
// `safetensors` crate 0.8 reading its header with serde_json: safetensors/src/tensor.rs,
// read_metadata and Metadata::validate) rather than on a general JSON library, because what a file
// may contain is defined by what that code accepts: an entry may be an object or a 3-element
// array, a dtype "F32" or {"F32": null}, "-0" is a float (so not a dimension), floats beyond f64
// range are errors, nesting stops at 127 levels, a field repeated inside an entry is an error
// while a repeated tensor name keeps its last entry. test_safetensors_reference checks the
// accept/reject decision against the package on a corpus of valid and damaged files.
#include "lmforge/io/safetensors_header.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <tuple>

#include "lmforge/core/utf8.h"

namespace lmforge::safetensors_detail {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference's MAX_HEADER_SIZE
constexpr int kMaxDepth = 127;                     // serde_json's recursion limit (128) less one

// Every dtype the crate knows, in its order, with its size in bits.
constexpr FormatDType kFormatDTypes[] = {
    {"BOOL", 8, false, {}},
    {"F4", 4, false, {}},
    {"F6_E2M3", 6, false, {}},
    {"F6_E3M2", 6, false, {}},
    {"U8", 8, false, {}},
    {"I8", 8, false, {}},
    {"F8_E5M2", 8, false, {}},
    {"F8_E4M3", 8, false, {}},
    {"F8_E8M0", 8, false, {}},
    {"F8_E4M3FNUZ", 8, false, {}},
    {"F8_E5M2FNUZ", 8, false, {}},
    {"I16", 16, false, {}},
    {"U16", 16, true, DType::kU16},
    {"F16", 16, true, DType::kF16},
    {"BF16", 16, true, DType::kBF16},
    {"I32", 32, true, DType::kI32},
    {"U32", 32, true, DType::kU32},
    {"F32", 32, true, DType::kF32},
    {"C64", 64, false, {}},
    {"F64", 64, true, DType::kF64},
    {"I64", 64, false, {}},
    {"U64", 64, false, {}},
};

int find_format_dtype(std::string_view s) {
  for (size_t i = 0; i < std::size(kFormatDTypes); ++i)
    if (s == kFormatDTypes[i].name) return static_cast<int>(i);
  return -1;
}

void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    *out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    *out += static_cast<char>(0xC0 | (cp >> 6));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *out += static_cast<char>(0xE0 | (cp >> 12));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    *out += static_cast<char>(0xF0 | (cp >> 18));
    *out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// 1e0 .. 1e308, correctly rounded (glibc's strtod), as the f64 literals of serde_json's POW10.
const std::array<double, 309>& pow10_table() {
  static const std::array<double, 309> table = [] {
    std::array<double, 309> t{};
    for (int i = 0; i < 309; ++i) t[i] = std::strtod(("1e" + std::to_string(i)).c_str(), nullptr);
    return t;
  }();
  return table;
}

// A schema-directed JSON parser for the header. It accepts the JSON serde_json accepts (RFC 8259;
// whitespace is space, \t, \n, \r) and follows serde's rules for the header's types; every
// rejection is an Error naming the file, the byte and, inside an entry, the tensor.
class HeaderParser {
 public:
  HeaderParser(const std::string& file, const char* p, size_t n)
      : file_(file), begin_(p), p_(p), end_(p + n) {}

  void parse(std::map<std::string, Header::Tensor>* tensors,
             std::map<std::string, std::string>* metadata) {
    ws();
    if (peek() != '{') bad("the header is not a JSON object");
    enter();
    ws();
    bool first = true, seen_metadata = false;
    while (true) {
      if (first && peek() == '}') break;
      if (peek() != '"') bad("expected a tensor name");
      std::string key;
      string(&key);
      colon();
      if (key == "__metadata__") {
        if (seen_metadata) bad("__metadata__ appears twice");
        seen_metadata = true;
        parse_metadata(metadata);
      } else {
        context_ = "tensor " + quote_name(key) + ": ";
        Header::Tensor t = parse_tensor();
        context_.clear();
        (*tensors)[key] = std::move(t);  // a repeated name keeps its last entry, as serde does
      }
      ws();
      if (peek() == ',') {
        ++p_;
        ws();
        first = false;
        continue;
      }
      if (peek() != '}') bad("expected ',' or '}'");
      break;
    }
    ++p_;
    leave();
    ws();
    if (p_ != end_) bad("unexpected characters after the JSON object");
  }

 private:
  [[noreturn]] void bad(std::string_view what) const {
    fail("{}: invalid safetensors header at byte {}: {}{}; the file is corrupt or not safetensors",
         file_, 8 + (p_ - begin_), context_, what);
  }

  char peek() const { return p_ < end_ ? *p_ : '\0'; }
  static bool digit(char c) { return c >= '0' && c <= '9'; }
  void ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\t' || *p_ == '\r')) ++p_;
  }
  void colon() {
    ws();
    if (peek() != ':') bad("expected ':'");
    ++p_;
    ws();
  }
  void enter() {
    if (++depth_ > kMaxDepth) bad("nested deeper than 127 levels");
    ++p_;
  }
  void leave() { --depth_; }
  void literal(std::string_view word) {
    if (static_cast<size_t>(end_ - p_) < word.size() || std::string_view(p_, word.size()) != word)
      bad("invalid literal");
    p_ += word.size();
  }

  uint32_t hex4() {
    if (end_ - p_ < 4) bad("invalid \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = *p_++;
      int d = digit(c)                 ? c - '0'
              : (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                       : -1;
      if (d < 0) bad("invalid \\u escape");
      v = v * 16 + d;
    }
    return v;
  }

  // A string at p_ (which is '"'); its value goes to *out when out is not null.
  void string(std::string* out) {
    ++p_;
    while (true) {
      if (p_ == end_) bad("unterminated string");
      char c = *p_;
      if (c == '"') {
        ++p_;
        return;
      }
      if (static_cast<unsigned char>(c) < 0x20) bad("control character in a string");
      if (c != '\\') {
        const char* run = p_;
        while (p_ < end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20)
          ++p_;
        if (out) out->append(run, p_);
        continue;
      }
      ++p_;
      if (p_ == end_) bad("unterminated string");
      char e = *p_++;
      uint32_t cp;
      switch (e) {
        case '"':
        case '\\':
        case '/':
          cp = static_cast<uint32_t>(e);
          break;
        case 'b':
          cp = '\b';
          break;
        case 'f':
          cp = '\f';
          break;
        case 'n':
          cp = '\n';
          break;
        case 'r':
          cp = '\r';
          break;
        case 't':
          cp = '\t';
          break;
        case 'u':
          cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) bad("lone surrogate in a \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u')
              bad("lone surrogate in a \\u escape");
            p_ += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) bad("lone surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          break;
        default:
          bad("invalid escape in a string");
      }
      if (out) append_utf8(out, cp);
    }
  }

  // A number at p_, parsed as serde_json parses it (serde_json/src/de.rs, without the
  // float_roundtrip feature). Returns true with *u for an integer that fits u64; false for any
  // other number (negative, "-0", a fraction or exponent, or an integer too large), which serde
  // reads as i64 or f64. Malformed numbers, and floats that overflow f64, are errors.
  bool number(uint64_t* u) {
    bool positive = true;
    if (peek() == '-') {
      ++p_;
      positive = false;
    }
    if (p_ == end_) bad("invalid number");
    char c = *p_++;
    uint64_t sig;
    if (c == '0') {
      if (digit(peek())) bad("invalid number (leading zero)");
      sig = 0;
    } else if (c >= '1' && c <= '9') {
      sig = static_cast<uint64_t>(c - '0');
      while (digit(peek())) {
        int d = *p_ - '0';
        if (u64_overflows(sig, d)) {
          long_integer(sig);
          return false;
        }
        ++p_;
        sig = sig * 10 + d;
      }
    } else {
      bad("invalid number");
    }
    if (peek() == '.') {
      decimal(sig, 0);
      return false;
    }
    if (peek() == 'e' || peek() == 'E') {
      exponent(sig, 0);
      return false;
    }
    if (!positive) return false;  // i64, or f64 for "-0" and below i64::MIN
    *u = sig;
    return true;
  }
  static bool u64_overflows(uint64_t sig, int d) {
    constexpr uint64_t m = UINT64_MAX;
    return sig >= m / 10 && (sig > m / 10 || static_cast<uint64_t>(d) > m % 10);
  }
  void long_integer(uint64_t sig) {
    int64_t exp = 0;
    while (digit(peek())) ++p_, ++exp;
    if (peek() == '.') return decimal(sig, exp);
    if (peek() == 'e' || peek() == 'E') return exponent(sig, exp);
    from_parts(sig, exp);
  }
  void decimal(uint64_t sig, int64_t exp_before) {
    ++p_;
    int64_t exp_after = 0;
    while (digit(peek())) {
      int d = *p_ - '0';
      if (u64_overflows(sig, d)) {  // ignore the digits that no longer fit
        while (digit(peek())) ++p_;
        if (peek() == 'e' || peek() == 'E') return exponent(sig, exp_before + exp_after);
        return from_parts(sig, exp_before + exp_after);
      }
      ++p_;
      sig = sig * 10 + d;
      --exp_after;
    }
    if (exp_after == 0) bad("invalid number (no digit after '.')");
    if (peek() == 'e' || peek() == 'E') return exponent(sig, exp_before + exp_after);
    from_parts(sig, exp_before + exp_after);
  }
  void exponent(uint64_t sig, int64_t start) {
    ++p_;
    bool positive_exp = true;
    if (peek() == '+') {
      ++p_;
    } else if (peek() == '-') {
      ++p_;
      positive_exp = false;
    }
    if (!digit(peek())) bad("invalid number (no digit in the exponent)");
    int32_t exp = 0;
    while (digit(peek())) {
      int d = *p_++ - '0';
      if (exp >= INT32_MAX / 10 && (exp > INT32_MAX / 10 || d > INT32_MAX % 10)) {
        if (sig != 0 && positive_exp) bad("number out of range");
        while (digit(peek())) ++p_;
        return;  // +-0.0
      }
      exp = exp * 10 + d;
    }
    int64_t e = positive_exp ? start + exp : start - exp;  // i32 saturating arithmetic
    from_parts(sig, std::clamp<int64_t>(e, INT32_MIN, INT32_MAX));
  }
  // sig * 10^exp in f64 arithmetic; only whether it overflows matters here.
  void from_parts(uint64_t sig, int64_t exp) {
    const auto& pow10 = pow10_table();
    double f = static_cast<double>(sig);
    while (true) {
      uint64_t a = static_cast<uint64_t>(exp < 0 ? -exp : exp);
      if (a < pow10.size()) {
        if (exp >= 0) {
          f *= pow10[a];
          if (std::isinf(f)) bad("number out of range");
        }
        return;
      }
      if (f == 0) return;
      if (exp >= 0) bad("number out of range");
      f /= 1e308;
      exp += 308;
    }
  }

  // Any JSON value (an extra field of an entry, which the reference parses and ignores).
  void skip_value() {
    ws();
    char c = peek();
    if (c == '"') return string(nullptr);
    if (c == '-' || digit(c)) {
      uint64_t u;
      number(&u);
      return;
    }
    if (c == 't') return literal("true");
    if (c == 'f') return literal("false");
    if (c == 'n') return literal("null");
    if (c != '[' && c != '{') bad("expected a JSON value");
    char close = c == '[' ? ']' : '}';
    enter();
    ws();
    if (peek() == close) {
      ++p_;
      return leave();
    }
    while (true) {
      if (close == '}') {
        if (peek() != '"') bad("expected a string key");
        string(nullptr);
        colon();
      }
      skip_value();
      ws();
      if (peek() == ',') {
        ++p_;
        ws();
        continue;
      }
      if (peek() != close) bad(close == ']' ? "expected ',' or ']'" : "expected ',' or '}'");
      ++p_;
      return leave();
    }
  }

  uint64_t nonnegative_integer(std::string_view what) {
    ws();
    const char* start = p_;
    uint64_t u = 0;
    if (peek() == '-' || digit(peek())) {
      if (number(&u)) return u;
      size_t n = std::min<size_t>(p_ - start, 40);
      bad(fmt::format("{}: expected a non-negative integer, got {}", what,
                      std::string_view(start, n)));
    }
    bad(fmt::format("{}: expected a non-negative integer", what));
  }

  // "F32", or {"F32": null} (serde's form of a unit enum variant).
  int dtype() {
    ws();
    std::string name;
    if (peek() == '"') {
      string(&name);
    } else if (peek() == '{') {
      enter();
      ws();
      if (peek() != '"') bad("dtype: expected a string or {\"<dtype>\": null}");
      string(&name);
      colon();
      if (peek() != 'n') bad("dtype: expected a string or {\"<dtype>\": null}");
      literal("null");
      ws();
      if (peek() != '}') bad("dtype: expected a string or {\"<dtype>\": null}");
      ++p_;
      leave();
    } else {
      bad("dtype: expected a string");
    }
    int kind = find_format_dtype(name);
    if (kind < 0) bad(fmt::format("unknown dtype {}", quote_name(name)));
    return kind;
  }

  std::vector<uint64_t> shape() {
    ws();
    if (peek() != '[') bad("shape: expected an array of non-negative integers");
    enter();
    std::vector<uint64_t> dims;
    ws();
    if (peek() == ']') {
      ++p_;
      leave();
      return dims;
    }
    while (true) {
      dims.push_back(nonnegative_integer(fmt::format("shape[{}]", dims.size())));
      ws();
      if (peek() == ',') {
        ++p_;
        continue;
      }
      if (peek() != ']') bad("shape: expected ',' or ']'");
      ++p_;
      leave();
      return dims;
    }
  }

  void offsets(Safetensors::Info* info) {
    ws();
    if (peek() != '[') bad("data_offsets: expected [begin, end]");
    enter();
    info->begin = nonnegative_integer("data_offsets[0]");
    ws();
    if (peek() != ',') bad("data_offsets: expected [begin, end]");
    ++p_;
    info->end = nonnegative_integer("data_offsets[1]");
    ws();
    if (peek() != ']') bad("data_offsets: expected [begin, end]");
    ++p_;
    leave();
  }

  // {"dtype": .., "shape": .., "data_offsets": .., <other fields ignored>}, or the same three as
  // an array (serde derives both for a struct).
  Header::Tensor parse_tensor() {
    Header::Tensor t;
    ws();
    if (peek() == '[') {
      enter();
      ws();
      if (peek() == ']') bad("expected [dtype, shape, data_offsets]");
      t.kind = dtype();
      for (int field = 1; field <= 2; ++field) {
        ws();
        if (peek() != ',') bad("expected [dtype, shape, data_offsets]");
        ++p_;
        if (field == 1)
          t.info.shape = shape();
        else
          offsets(&t.info);
      }
      ws();
      if (peek() != ']') bad("expected [dtype, shape, data_offsets]");
      ++p_;
      leave();
    } else if (peek() == '{') {
      enter();
      bool seen[3] = {false, false, false};
      ws();
      bool first = true;
      while (!(first && peek() == '}')) {
        if (peek() != '"') bad("expected a field name");
        std::string key;
        string(&key);
        colon();
        static const char* kFields[] = {"dtype", "shape", "data_offsets"};
        int f = key == "dtype" ? 0 : key == "shape" ? 1 : key == "data_offsets" ? 2 : -1;
        if (f >= 0 && seen[f]) bad(fmt::format("field {} appears twice", kFields[f]));
        if (f >= 0) seen[f] = true;
        if (f == 0)
          t.kind = dtype();
        else if (f == 1)
          t.info.shape = shape();
        else if (f == 2)
          offsets(&t.info);
        else
          skip_value();
        ws();
        first = false;
        if (peek() == ',') {
          ++p_;
          ws();
          continue;
        }
        if (peek() != '}') bad("expected ',' or '}'");
        break;
      }
      ++p_;
      leave();
      static const char* kFields[] = {"dtype", "shape", "data_offsets"};
      for (int f = 0; f < 3; ++f)
        if (!seen[f]) bad(fmt::format("missing field {}", kFields[f]));
    } else {
      bad("expected an object {dtype, shape, data_offsets}");
    }
    t.info.dtype = kFormatDTypes[t.kind].name;
    return t;
  }

  // null, or an object of strings (a repeated key keeps its last value).
  void parse_metadata(std::map<std::string, std::string>* metadata) {
    if (peek() == 'n') return literal("null");
    if (peek() != '{') bad("__metadata__: expected an object of strings");
    enter();
    ws();
    bool first = true;
    while (!(first && peek() == '}')) {
      if (peek() != '"') bad("__metadata__: expected a string key");
      std::string key, value;
      string(&key);
      colon();
      if (peek() != '"')
        bad(fmt::format("__metadata__: the value of {} is not a string", quote_name(key)));
      string(&value);
      (*metadata)[key] = std::move(value);
      ws();
      first = false;
      if (peek() == ',') {
        ++p_;
        ws();
        continue;
      }
      if (peek() != '}') bad("__metadata__: expected ',' or '}'");
      break;
    }
    ++p_;
    leave();
  }

  const std::string& file_;
  const char* begin_;
  const char* p_;
  const char* end_;
  std::string context_;  // "tensor \"x\": " inside an entry
  int depth_ = 0;
};

std::string shape_str(const std::vector<uint64_t>& shape) {
  return fmt::format("({})", fmt::join(shape, ", "));
}

// The checks of the reference's Metadata::validate and read_metadata on the parsed header: sorted
// by offsets, the tensors tile [0, data_size) with no gap or overlap, and each one's span is its
// element count times its dtype's size, computed without overflow.
void validate(const std::string& file, const std::map<std::string, Header::Tensor>& tensors,
              uint64_t data_size, std::vector<std::string>* order) {
  std::vector<std::pair<const std::string*, const Header::Tensor*>> sorted;
  for (auto& [name, t] : tensors) sorted.emplace_back(&name, &t);
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
    const auto& x = a.second->info;
    const auto& y = b.second->info;
    return std::tie(x.begin, x.end, *a.first) < std::tie(y.begin, y.end, *b.first);
  });
  uint64_t at = 0;
  const std::string* prev = nullptr;
  for (auto& [name, t] : sorted) {
    const Safetensors::Info& i = t->info;
    if (i.end < i.begin)
      fail("{}: tensor {}: data_offsets [{}, {}] end before they begin; the file is corrupt", file,
           quote_name(*name), i.begin, i.end);
    if (i.begin > at)
      fail(
          "{}: tensor {}: data_offsets [{}, {}] leave bytes [{}, {}) of the data section "
          "unused; the file is corrupt",
          file, quote_name(*name), i.begin, i.end, at, i.begin);
    if (i.begin < at)
      fail("{}: tensor {}: data_offsets [{}, {}] overlap tensor {}; the file is corrupt", file,
           quote_name(*name), i.begin, i.end, quote_name(*prev));
    uint64_t n = 1;
    for (uint64_t d : i.shape)
      if (__builtin_mul_overflow(n, d, &n))
        fail("{}: tensor {}: the element count of shape {} overflows; the file is corrupt", file,
             quote_name(*name), shape_str(i.shape));
    const FormatDType& f = kFormatDTypes[t->kind];
    uint64_t bits;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(f.bits), &bits))
      fail("{}: tensor {}: the size of shape {} of {} overflows; the file is corrupt", file,
           quote_name(*name), shape_str(i.shape), f.name);
    if (bits % 8 != 0)
      fail("{}: tensor {}: shape {} of {} is {} bits, not a whole number of bytes", file,
           quote_name(*name), shape_str(i.shape), f.name, bits);
    if (i.end - i.begin != bits / 8)
      fail(
          "{}: tensor {}: shape {} of {} needs {} bytes but data_offsets [{}, {}] hold {}; the "
          "file is corrupt",
          file, quote_name(*name), shape_str(i.shape), f.name, bits / 8, i.begin, i.end,
          i.end - i.begin);
    at = i.end;
    prev = name;
    order->push_back(*name);
  }
  if (at > data_size)
    fail(
        "{}: tensor {} ends at byte {} of the data section, which has {} bytes; the file is "
        "truncated",
        file, quote_name(*prev), at, data_size);
  if (at < data_size)
    fail(
        "{}: {} byte{} after the last tensor's data; the file is corrupt or not a safetensors file",
        file, data_size - at, data_size - at == 1 ? "" : "s");
}

}  // namespace

const FormatDType& format_dtype(int kind) { return kFormatDTypes[kind]; }

const char* format_dtype_name(DType t) {
  for (const FormatDType& f : kFormatDTypes)
    if (f.lmforge && f.dtype == t) return f.name;
  return "?";
}

bool is_utf8(std::string_view s) { return find_invalid_utf8(s) == s.size(); }

std::string quote_name(std::string_view s) {
  return nlohmann::json(std::string(s))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Header read_header(const std::string& file, const char* bytes, uint64_t size) {
  if (size < 8)
    fail("{}: not a safetensors file ({} bytes, shorter than the 8-byte header length)", file,
         size);
  uint64_t n = 0;
  std::memcpy(&n, bytes, 8);  // little-endian, as are the machines lmforge runs on
  if (n > kMaxHeaderBytes)
    fail(
        "{}: safetensors header length {} is over the format's limit of {} bytes; the file is "
        "corrupt or not a safetensors file",
        file, n, kMaxHeaderBytes);
  if (n > size - 8)
    fail(
        "{}: safetensors header of {} bytes runs past the end of the {}-byte file; the file is "
        "truncated or corrupt",
        file, n, size);
  const char* text = bytes + 8;
  size_t bad = find_invalid_utf8(std::string_view(text, n));
  if (bad != n)
    fail("{}: safetensors header is not valid UTF-8 (byte {}); the file is corrupt", file, 8 + bad);
  Header h;
  HeaderParser(file, text, n).parse(&h.tensors, &h.metadata);
  validate(file, h.tensors, size - 8 - n, &h.order);
  h.data_start = 8 + n;
  return h;
}

}  // namespace lmforge::safetensors_detail
