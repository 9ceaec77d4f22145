// Safetensors reading, writing, conversion on load and sharded sets. The accept/reject rules are
// also checked against the reference package on a corpus (test_safetensors_reference).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/safetensors.h"
#include "testing/process.h"

namespace lmforge {

namespace fs = std::filesystem;

namespace {

// A file of: the 8-byte length (of the header, unless n is given), the header, `data` bytes.
std::string write_raw(const std::string& path, const std::string& header, size_t data,
                      std::optional<uint64_t> n = {}) {
  uint64_t len = n ? *n : header.size();
  std::string bytes(reinterpret_cast<const char*>(&len), 8);
  bytes += header;
  for (size_t i = 0; i < data; ++i) bytes += static_cast<char>(i);
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// Expects open() to fail with one line naming the file and holding every part of `parts`.
void expect_rejected(const std::string& path, const std::vector<std::string>& parts) {
  try {
    Safetensors::open(path);
    ADD_FAILURE() << path << ": accepted";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(path), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    for (const std::string& p : parts) EXPECT_NE(m.find(p), std::string::npos) << m;
  }
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t b, uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// One-tensor file of `dtype` holding `values` (raw element bits, 2 or 4 or 8 bytes each).
template <typename T>
std::string write_values(const std::string& path, const std::string& dtype,
                         const std::vector<T>& values) {
  std::string header =
      "{" +
      entry("x", dtype, "[" + std::to_string(values.size()) + "]", 0, values.size() * sizeof(T)) +
      "}";
  uint64_t n = header.size();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(&n), 8);
  f << header;
  f.write(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  return path;
}

// binary16 value of bits h, computed from the definition.
double half_value(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0    ? std::ldexp(m, -24)
             : e == 31 ? (m ? NAN : INFINITY)
                       : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}

}  // namespace

TEST(Safetensors, RoundTripsTensorsAndMetadata) {
  std::string dir = testing::temp_dir("st");
  Tensor a = Tensor::empty({2, 3}, DType::kF32);
  for (int i = 0; i < 6; ++i) a.data<float>()[i] = i * 0.5f;
  Tensor b = Tensor::empty({4}, DType::kI32);
  for (int i = 0; i < 4; ++i) b.data<int32_t>()[i] = -i;
  SafetensorsWriter w;
  w.add("a", a);
  w.add("b.ids", b);
  w.metadata["step"] = "12";
  w.write(dir + "/x.safetensors");
  for (const auto& e : std::filesystem::directory_iterator(dir))  // no temporary left behind
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
  Safetensors f = Safetensors::open(dir + "/x.safetensors");
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b.ids"}));
  EXPECT_EQ(f.metadata().at("step"), "12");
  Tensor ra = f.get("a");
  EXPECT_EQ(ra.shape(), Shape({2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(ra.data<float>()[i], i * 0.5f);
  EXPECT_EQ(f.get("b.ids").data<int32_t>()[3], -3);
  EXPECT_EQ(f.info("a").dtype, "F32");
  EXPECT_EQ(f.info("b.ids").begin, 24u);
  EXPECT_THROW(f.get("missing"), Error);
}

namespace {
int64_t rss_kib() {  // this process's resident memory now (VmRSS)
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.starts_with("VmRSS:")) return std::stoll(line.substr(6));
  return -1;
}
}  // namespace

// release(): a mapped file's tensor leaves the resident memory once read (what a checkpoint load
// does after copying each tensor), and a view of it still reads the same values (from the file
// again); over bytes in memory it does nothing to them.
TEST(Safetensors, ReleasedTensorsLeaveResidentMemoryAndStayReadable) {
  const std::string dir = testing::temp_dir("st_release");
  const int64_t n = 4 << 20;  // 16 MiB of fp32
  Tensor a = Tensor::empty({n}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) a.data<float>()[i] = static_cast<float>(i % 1000) * 0.25f;
  SafetensorsWriter w;
  w.add("a", a);
  w.write(dir + "/x.safetensors");
  Safetensors f = Safetensors::open(dir + "/x.safetensors");
  const Tensor v = f.get("a");
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += v.data<float>()[i];  // every page mapped in
  const int64_t before = rss_kib();
  f.release("a");
  const int64_t after = rss_kib();
  EXPECT_GT(before - after, 12 << 10) << "RSS " << before << " -> " << after << " KiB";
  for (int64_t i = 0; i < n; i += 4099) ASSERT_EQ(v.data<float>()[i], a.data<float>()[i]) << i;
  EXPECT_GT(sum, 0);

  std::ifstream in(dir + "/x.safetensors", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto storage = Storage::allocate(bytes.size());
  std::memcpy(storage->data(), bytes.data(), bytes.size());
  Safetensors m = Safetensors::from_bytes(storage, "bytes");
  m.release("a");
  const Tensor mv = m.get("a");
  for (int64_t i = 0; i < n; i += 4099) ASSERT_EQ(mv.data<float>()[i], a.data<float>()[i]) << i;
}

// Temporaries are per process; one left by a killed writer (its pid gone) is removed by the next
// write of the same file, one of a live writer (this process) is left alone.
TEST(AtomicFile, RemovesTheTemporariesOfDeadWritersOnly) {
  const std::string dir = testing::temp_dir("atomic"), path = dir + "/m.json";
  const std::string dead = path + ".999999999.3.tmp",  // beyond any pid_max: no such process
      live = fmt::format("{}.{}.77.tmp", path, getpid()), other = dir + "/n.json.999999999.0.tmp";
  for (const std::string& f : {dead, live, other}) std::ofstream(f) << "half";
  write_file_atomic(path, "{}");
  EXPECT_EQ(read_file(path), "{}");
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other)) << "another file's temporary";
  // Directories: only lmforge's own kind (an export's, "<DIR>.lmforge-export.<pid>.<n>.tmp") is
  // removed; a user's directory that merely looks like a temporary stays.
  const std::string user = path + ".999999999.4.tmp", exported = dir + "/out";
  const std::string stale = exported + ".lmforge-export.999999999.0.tmp";
  for (const std::string& d : {user, stale}) {
    fs::create_directories(d);
    std::ofstream(d + "/f") << "x";
  }
  write_file_atomic(path, "{}");
  EXPECT_TRUE(fs::exists(user + "/f"));
  const std::string fresh = fresh_temp_dir(exported + ".lmforge-export");
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_NE(fresh.find("out.lmforge-export."), std::string::npos) << fresh;
  EXPECT_TRUE(fs::is_directory(fresh));
  forget_temp(fresh);
}

TEST(Safetensors, TruncatedFileIsAClearError) {
  std::string dir = testing::temp_dir("st-trunc");
  Tensor a = Tensor::empty({64}, DType::kF32);
  SafetensorsWriter w;
  w.add("a", a);
  w.write(dir + "/x.safetensors");
  std::filesystem::resize_file(dir + "/x.safetensors",
                               std::filesystem::file_size(dir + "/x.safetensors") - 8);
  expect_rejected(dir + "/x.safetensors", {"truncated", "\"a\""});
  std::ofstream(dir + "/junk.safetensors") << "hello";
  EXPECT_THROW(Safetensors::open(dir + "/junk.safetensors"), Error);
  EXPECT_THROW(Safetensors::open(dir + "/absent.safetensors"), Error);
}

TEST(Safetensors, RejectsEveryViolationWithOneLineNamingFileAndTensor) {
  struct Case {
    std::string name, header;
    size_t data;
    std::vector<std::string> expect;
    std::optional<uint64_t> n = {};
  };
  const std::string a8 = entry("a", "F32", "[2]", 0, 8);
  const std::vector<Case> cases = {
      {"header-past-eof", "{" + a8 + "}", 8, {"runs past the end", "truncated"}, 500},
      {"huge-header", "{}", 0, {"limit"}, 100'000'001},
      {"u64-max-header", "{}", 0, {"limit"}, UINT64_MAX},
      {"non-utf8", "{\"a\xFF\":{}}", 0, {"UTF-8"}},
      {"overlong-utf8", "{\"\xC0\xAF\":{}}", 0, {"UTF-8"}},
      {"not-an-object", "[]", 0, {"not a JSON object"}},
      {"empty-header", "", 0, {"not a JSON object"}},
      {"trailing-garbage", "{" + a8 + "}x", 8, {"after the JSON object"}},
      {"trailing-comma", "{" + a8 + ",}", 8, {"expected a tensor name"}},
      {"unknown-dtype", "{" + entry("w", "Q4", "[2]", 0, 8) + "}", 8, {"\"w\"", "Q4"}},
      {"span-mismatch", "{" + entry("w", "F32", "[3]", 0, 8) + "}", 8, {"\"w\"", "needs 12 bytes"}},
      {"gap-at-start", "{" + entry("w", "F32", "[2]", 4, 12) + "}", 12, {"\"w\"", "unused"}},
      {"gap", "{" + a8 + "," + entry("w", "F32", "[1]", 12, 16) + "}", 16, {"\"w\"", "unused"}},
      {"overlap",
       "{" + a8 + "," + entry("w", "F32", "[1]", 4, 8) + "}",
       8,
       {"\"w\"", "overlap tensor \"a\""}},
      {"trailing-bytes", "{" + a8 + "}", 12, {"4 bytes after the last tensor"}},
      {"data-truncated", "{" + a8 + "}", 4, {"\"a\"", "truncated"}},
      {"reversed-offsets", "{" + entry("w", "U16", "[0]", 8, 0) + "}", 8, {"\"w\"", "end before"}},
      {"negative-dim", "{" + entry("w", "F32", "[-2]", 0, 8) + "}", 8, {"\"w\"", "shape[0]", "-2"}},
      {"float-dim", "{" + entry("w", "F32", "[2.0]", 0, 8) + "}", 8, {"\"w\"", "2.0"}},
      {"minus-zero-dim", "{" + entry("w", "F32", "[-0]", 0, 0) + "}", 0, {"\"w\"", "-0"}},
      {"string-dim", "{" + entry("w", "F32", "[\"2\"]", 0, 8) + "}", 8, {"\"w\"", "shape[0]"}},
      {"product-overflow",
       "{" + entry("w", "U16", "[4294967296,4294967296]", 0, 8) + "}",
       8,
       {"\"w\"", "overflows"}},
      {"overflow-before-zero",
       "{" + entry("w", "U16", "[4294967296,4294967296,0]", 0, 0) + "}",
       0,
       {"\"w\"", "overflows"}},
      {"bytes-overflow",
       "{" + entry("w", "F64", "[4611686018427387904]", 0, 0) + "}",
       0,
       {"overflows"}},
      {"sub-byte",
       "{" + entry("w", "F4", "[3]", 0, 1) + "}",
       1,
       {"\"w\"", "whole number of bytes"}},
      {"float-offset",
       "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}}",
       8,
       {"\"w\"", "data_offsets[1]"}},
      {"missing-field",
       "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}",
       8,
       {"\"w\"", "missing field shape"}},
      {"duplicate-field",
       "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
       8,
       {"\"w\"", "appears twice"}},
      {"entry-not-object", "{\"w\":5}", 0, {"\"w\"", "expected an object"}},
      {"metadata-not-strings",
       "{\"__metadata__\":{\"k\":1}," + a8 + "}",
       8,
       {"__metadata__", "\"k\""}},
      {"metadata-twice",
       "{\"__metadata__\":null,\"__metadata__\":{}," + a8 + "}",
       8,
       {"__metadata__ appears twice"}},
      {"too-deep",
       "{\"w\":{\"x\":" + std::string(127, '[') + std::string(127, ']') + "}}",
       0,
       {"\"w\"", "nested deeper"}},
      {"number-out-of-range",
       "{\"w\":{\"x\":1e400,\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
       8,
       {"\"w\"", "out of range"}},
      {"lone-surrogate", "{\"w\\ud800\":{}}", 0, {"surrogate"}},
      {"control-char", "{\"w\n\":{}}", 0, {"control character"}},
  };
  std::string dir = testing::temp_dir("st-reject");
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    expect_rejected(write_raw(dir + "/" + c.name + ".safetensors", c.header, c.data, c.n),
                    c.expect);
  }
  std::ofstream(dir + "/short.safetensors") << "\x02\x00\x00";
  expect_rejected(dir + "/short.safetensors", {"shorter than"});
}

TEST(Safetensors, AcceptsWhatTheReferenceAccepts) {
  std::string dir = testing::temp_dir("st-accept");
  // Leading whitespace, an entry as an array, a dtype as {"F32": null}, extra fields, a repeated
  // name (the last entry wins), null metadata, escapes, scalars and empty tensors anywhere.
  std::string header =
      " \n{\"__metadata__\":null,\"b\":[\"F32\",[2],[4,12]],\"a\":{\"dtype\":{\"F32\":null},"
      "\"shape\":[],\"data_offsets\":[0,4],\"extra\":[1,{\"k\":-1.5e3}]},\"c\":{\"dtype\":\"F32\","
      "\"shape\":[9],\"data_offsets\":[0,36]},\"c\":{\"dtype\":\"U16\",\"shape\":[0,5],"
      "\"data_offsets\":[12,12]},\"\\u00e9\\n\":{\"dtype\":\"I32\",\"shape\":[1,1],"
      "\"data_offsets\":[12,16]}}\t";
  while (header.size() % 4 != 1) header += ' ';  // the data starts 1 past a multiple of 4
  Safetensors f = Safetensors::open(write_raw(dir + "/x.safetensors", header, 16));
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b", "c", "\xC3\xA9\n"}));
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.get("a").ndim(), 0);
  EXPECT_EQ(f.get("c").shape(), Shape({0, 5}));
  EXPECT_EQ(f.info("b").shape, (std::vector<uint64_t>{2}));
  // "b" is not 4-byte aligned in the file: get() returns an aligned copy.
  Tensor b = f.get("b");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.raw()) % 4, 0u);
  float b0;
  std::memcpy(&b0, "\x04\x05\x06\x07", 4);
  EXPECT_EQ(bits_of(b.data<float>()[0]), bits_of(b0));
}

TEST(Safetensors, OpensEveryFormatDtypeButGetsOnlyLmforgeDtypes) {
  const std::vector<std::pair<std::string, int>> dtypes = {
      {"BOOL", 8},        {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
      {"I8", 8},          {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
      {"F8_E5M2FNUZ", 8}, {"I16", 16},    {"U16", 16},    {"F16", 16},    {"BF16", 16},
      {"I32", 32},        {"U32", 32},    {"F32", 32},    {"C64", 64},    {"F64", 64},
      {"I64", 64},        {"U64", 64}};
  std::string header = "{";
  uint64_t at = 0;
  for (auto& [d, bits] : dtypes) {
    uint64_t n = 8 * bits / 8;  // 8 elements
    header += entry("t." + d, d, "[8]", at, at + n) + ",";
    at += n;
  }
  header += entry("rank7", "F32", "[1,1,1,1,1,1,1]", at, at + 4) + "}";
  std::string dir = testing::temp_dir("st-dtypes");
  Safetensors f = Safetensors::open(write_raw(dir + "/x.safetensors", header, at + 4));
  EXPECT_EQ(f.names().size(), dtypes.size() + 1);
  for (const char* ok : {"U16", "F16", "BF16", "I32", "U32", "F32", "F64"})
    EXPECT_EQ(f.get(std::string("t.") + ok).numel(), 8) << ok;
  for (const char* no : {"BOOL", "F8_E4M3", "I64", "C64", "F4"}) {
    try {
      f.get(std::string("t.") + no);
      ADD_FAILURE() << no << ": no error";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find(std::string("\"t.") + no + "\""), std::string::npos) << m;
      EXPECT_NE(m.find(std::string("dtype ") + no), std::string::npos) << m;
    }
  }
  EXPECT_THROW(f.get("rank7"), Error);
  EXPECT_EQ(f.info("rank7").shape.size(), 7u);
}

TEST(Safetensors, LoadConvertsBf16AndF16Exactly) {
  std::string dir = testing::temp_dir("st-convert");
  std::vector<uint16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  // bf16 -> f32: the bits shift up; nothing else changes, NaN payloads included.
  Safetensors b = Safetensors::open(write_values(dir + "/bf16.safetensors", "BF16", all));
  Tensor b32 = b.load("x", DType::kF32);
  for (int i = 0; i < 65536; ++i)
    ASSERT_EQ(bits_of(b32.data<float>()[i]), static_cast<uint32_t>(i) << 16) << i;
  // f16 -> f32 and f64: the value the bits define (subnormals, infinities, NaN).
  Safetensors h = Safetensors::open(write_values(dir + "/f16.safetensors", "F16", all));
  Tensor h32 = h.load("x", DType::kF32), h64 = h.load("x", DType::kF64);
  for (int i = 0; i < 65536; ++i) {
    double want = half_value(static_cast<uint16_t>(i));
    float got = h32.data<float>()[i];
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got) && std::isnan(h64.data<double>()[i])) << i;
      ASSERT_EQ(std::signbit(got), (i & 0x8000) != 0) << i;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << i;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << i;
      ASSERT_EQ(h64.data<double>()[i], want) << i;
    }
  }
  // ... and back: every f16 and bf16 survives the round trip through f32 bit for bit.
  SafetensorsWriter w;
  w.add("h", h32);
  w.add("b", b32);
  w.write(dir + "/back.safetensors");
  Safetensors back = Safetensors::open(dir + "/back.safetensors");
  Tensor h16 = back.load("h", DType::kF16), b16 = back.load("b", DType::kBF16);
  for (int i = 0; i < 65536; ++i) {
    if (!std::isnan(half_value(static_cast<uint16_t>(i)))) {
      ASSERT_EQ(static_cast<const uint16_t*>(h16.raw())[i], i) << i;
    }
    if ((i & 0x7F80) != 0x7F80 || (i & 0x7F) == 0) {  // not a NaN
      ASSERT_EQ(static_cast<const uint16_t*>(b16.raw())[i], i) << i;
    }
  }
}

TEST(Safetensors, LoadRoundsToNearestEvenOnce) {
  std::string dir = testing::temp_dir("st-round");
  // f32 -> f16: the nearest binary16, ties to even, subnormals, overflow to inf; checked against
  // a search over all finite halves on values near every half and its midpoints.
  std::vector<double> finite;  // all non-negative finite halves, ascending
  for (int h = 0; h < 0x7C00; ++h) finite.push_back(half_value(static_cast<uint16_t>(h)));
  std::vector<float> xs;
  for (size_t i = 0; i + 1 < finite.size(); ++i) {
    float mid = static_cast<float>((finite[i] + finite[i + 1]) / 2);  // exact in f32
    for (float x :
         {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f), static_cast<float>(finite[i])})
      xs.push_back(i % 2 ? x : -x);
  }
  for (float x : {65504.0f, 65519.99f, 65520.0f, 1e9f, 1e-9f, 0.0f, -0.0f, INFINITY, -INFINITY})
    xs.push_back(x);
  Safetensors f = Safetensors::open(write_values(dir + "/f32.safetensors", "F32", xs));
  Tensor h = f.load("x", DType::kF16);
  for (size_t i = 0; i < xs.size(); ++i) {
    double a = std::fabs(static_cast<double>(xs[i]));
    uint16_t want;
    if (a >= 65520.0) {  // at or past the midpoint between 65504 and 2^16: infinity
      want = 0x7C00;
    } else if (a > 65504.0) {
      want = 0x7BFF;
    } else {
      size_t hi = std::lower_bound(finite.begin(), finite.end(), a) - finite.begin();
      size_t lo = hi && finite[hi] != a ? hi - 1 : hi;
      double dlo = a - finite[lo], dhi = finite[hi] - a;
      want = static_cast<uint16_t>(dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 ? hi : lo));
    }
    if (std::signbit(xs[i])) want |= 0x8000;
    ASSERT_EQ(static_cast<const uint16_t*>(h.raw())[i], want) << xs[i];
  }
  // f64 -> bf16 and f64 -> f16 round once: just above a tie goes up, though through f32 (which
  // drops the 2^-40) it would be a tie and round down to even.
  std::vector<double> d = {1 + std::ldexp(1, -8) + std::ldexp(1, -40),
                           1 + std::ldexp(1, -11) + std::ldexp(1, -40), 1e300, -1e-300, NAN};
  Safetensors g = Safetensors::open(write_values(dir + "/f64.safetensors", "F64", d));
  Tensor gb = g.load("x", DType::kBF16), gh = g.load("x", DType::kF16);
  const auto* pb = static_cast<const uint16_t*>(gb.raw());
  const auto* ph = static_cast<const uint16_t*>(gh.raw());
  EXPECT_EQ(pb[0], 0x3F81);
  EXPECT_EQ(ph[1], 0x3C01);
  EXPECT_EQ(pb[2], 0x7F80);  // inf
  EXPECT_EQ(ph[2], 0x7C00);
  EXPECT_EQ(pb[3], 0x8000);  // -0
  EXPECT_EQ(ph[3], 0x8000);
  EXPECT_TRUE((pb[4] & 0x7F80) == 0x7F80 && (pb[4] & 0x7F));
  EXPECT_TRUE((ph[4] & 0x7C00) == 0x7C00 && (ph[4] & 0x3FF));
  // f32 -> bf16 ties to even (the existing storage conversion).
  std::vector<float> t = {1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8)};
  Tensor tb =
      Safetensors::open(write_values(dir + "/tie.safetensors", "F32", t)).load("x", DType::kBF16);
  EXPECT_EQ(static_cast<const uint16_t*>(tb.raw())[0], 0x3F80);
  EXPECT_EQ(static_cast<const uint16_t*>(tb.raw())[1], 0x3F82);
  // Integers convert only to themselves.
  Safetensors ints =
      Safetensors::open(write_values(dir + "/i32.safetensors", "I32", std::vector<int32_t>{7}));
  EXPECT_EQ(ints.load("x", DType::kI32).data<int32_t>()[0], 7);
  EXPECT_THROW(ints.load("x", DType::kF32), Error);
}

TEST(Safetensors, WriterRejectsDuplicateAndReservedNames) {
  std::string dir = testing::temp_dir("st-writer");
  Tensor a = Tensor::empty({2}, DType::kF32);
  SafetensorsWriter w;
  w.add("a", a);
  w.add("a", a);
  EXPECT_THROW(w.write(dir + "/x.safetensors"), Error);
  SafetensorsWriter r;
  r.add("__metadata__", a);
  EXPECT_THROW(r.write(dir + "/x.safetensors"), Error);
  EXPECT_FALSE(fs::exists(dir + "/x.safetensors"));
}

TEST(Safetensors, WriterMakesStreamedTensorsInOrderOneAtATime) {
  // Tensors made at write() (a checkpoint gathered one parameter at a time) give the same file
  // as the same tensors added whole; each is made once, in order.
  std::string dir = testing::temp_dir("st-stream");
  std::vector<Tensor> ts;
  for (int64_t n : {5, 12, 3}) {
    Tensor t = Tensor::empty({n}, DType::kF32);
    for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = static_cast<float>(n * 100 + i);
    ts.push_back(t);
  }
  SafetensorsWriter whole, streamed;
  std::vector<int> made;
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::string name = "t" + std::to_string(i);
    whole.add(name, ts[i]);
    streamed.add(name, DType::kF32, ts[i].shape(), [&, i] {
      made.push_back(static_cast<int>(i));
      return ts[i].clone();
    });
  }
  whole.metadata["k"] = streamed.metadata["k"] = "v";
  whole.write(dir + "/whole.safetensors");
  streamed.write(dir + "/streamed.safetensors");
  EXPECT_EQ(made, (std::vector<int>{0, 1, 2}));
  auto bytes = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  EXPECT_EQ(bytes(dir + "/streamed.safetensors"), bytes(dir + "/whole.safetensors"));
}

TEST(SafetensorsSet, ShardsAsHuggingFaceAndReadsBack) {
  std::string dir = testing::temp_dir("st-set");
  std::vector<std::pair<std::string, Tensor>> tensors;
  auto add = [&](const std::string& name, Shape s, DType dt) {
    Tensor t = Tensor::empty(s, dt);
    auto* p = static_cast<unsigned char*>(t.raw());
    for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(i * 7 + name.size());
    tensors.emplace_back(name, t);
  };
  add("a", {4, 4}, DType::kF32);  // 64 bytes
  add("b", {10}, DType::kBF16);   // 20
  add("c", {3}, DType::kF16);     // 6
  add("d", {2}, DType::kI32);     // 8
  add("e", {40}, DType::kF32);    // 160: over the limit, a shard of its own
  auto files = write_safetensors_set(dir, tensors, {{"format", "pt"}}, 70);
  // a fills shard 1; b starts the next, which stays open while e takes a shard of its own.
  EXPECT_EQ(files, (std::vector<std::string>{
                       "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                       "model-00003-of-00003.safetensors", "model.safetensors.index.json"}));
  auto index = nlohmann::json::parse(read_file(dir + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 258);
  EXPECT_EQ(index["weight_map"]["e"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["d"], "model-00003-of-00003.safetensors");
  for (const std::string& open_as : {dir, dir + "/model.safetensors.index.json"}) {
    SafetensorsSet s = SafetensorsSet::open(open_as);
    EXPECT_EQ(s.files().size(), 3u);
    EXPECT_EQ(s.names(), (std::vector<std::string>{"a", "e", "b", "c", "d"}));
    EXPECT_EQ(s.metadata().at("format"), "pt");
    for (auto& [name, t] : tensors) {
      Tensor got = s.get(name);
      ASSERT_EQ(got.shape(), t.shape());
      EXPECT_EQ(std::memcmp(got.raw(), t.raw(), t.nbytes()), 0) << name;
    }
    EXPECT_EQ(s.load("b", DType::kF32).dtype(), DType::kF32);
    EXPECT_EQ(s.info("c").dtype, "F16");
    EXPECT_THROW(s.get("zzz"), Error);
  }

  // Everything fits: one model.safetensors, and the shards and index are gone.
  files = write_safetensors_set(dir, tensors, {}, kSafetensorsShardBytes);
  EXPECT_EQ(files, std::vector<std::string>{"model.safetensors"});
  std::vector<std::string> left;
  for (auto& e : fs::directory_iterator(dir)) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"model.safetensors"});
  SafetensorsSet one = SafetensorsSet::open(dir);
  EXPECT_EQ(one.names().size(), 5u);
  EXPECT_EQ(SafetensorsSet::open(dir + "/model.safetensors").names().size(), 5u);

  // Sharded again (into two): the single file goes, as would any stale shard.
  std::ofstream(dir + "/model-00009-of-00009.safetensors") << "stale";
  files = write_safetensors_set(dir, tensors, {}, 200);
  EXPECT_EQ(files.size(), 3u);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/model-00009-of-00009.safetensors"));
  EXPECT_EQ(SafetensorsSet::open(dir).names().size(), 5u);
}

TEST(SafetensorsSet, ErrorsNameTheIndexShardAndTensor) {
  std::string dir = testing::temp_dir("st-set-err");
  std::vector<std::pair<std::string, Tensor>> tensors = {{"x", Tensor::empty({8}, DType::kF32)},
                                                         {"y", Tensor::empty({8}, DType::kF32)}};
  write_safetensors_set(dir, tensors, {}, 40);
  std::string index = dir + "/model.safetensors.index.json";
  auto expect_error = [&](const std::vector<std::string>& parts) {
    try {
      SafetensorsSet::open(dir);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
      for (const std::string& p : parts) EXPECT_NE(m.find(p), std::string::npos) << m;
    }
  };
  auto j = nlohmann::json::parse(read_file(index));
  // A tensor the index lists in a shard that lacks it.
  j["weight_map"]["ghost"] = "model-00001-of-00002.safetensors";
  write_file_atomic(index, j.dump());
  expect_error({index, "\"ghost\"", "model-00001-of-00002.safetensors", "no such tensor"});
  // A shard that is missing.
  j["weight_map"].erase("ghost");
  write_file_atomic(index, j.dump());
  fs::remove(dir + "/model-00002-of-00002.safetensors");
  expect_error({index, "\"y\"", "model-00002-of-00002.safetensors", "does not exist"});
  // A shard outside the directory.
  j["weight_map"]["y"] = "../elsewhere.safetensors";
  write_file_atomic(index, j.dump());
  expect_error({index, "\"y\"", "not a file name"});
  // A corrupt shard: its own error, naming it.
  write_safetensors_set(dir, tensors, {}, 40);
  fs::resize_file(dir + "/model-00002-of-00002.safetensors", 20);
  expect_error({"model-00002-of-00002.safetensors", "truncated"});
  // Not an index; nothing to open.
  write_file_atomic(index, "{\"metadata\": {}}");
  expect_error({index, "weight_map"});
  std::string empty = testing::temp_dir("st-set-empty");
  EXPECT_THROW(SafetensorsSet::open(empty), Error);
}

}  // namespace lmforge
