// lmforge's safetensors reader and writer against the `safetensors` package (the Rust crate's
// Python binding, tests/reference/safetensors_ref.py):
//  - on a corpus of ~330 valid and damaged files (edge cases of every rule, seeded random byte
//    flips, truncations and header edits), Safetensors::open accepts exactly the files the
//    package accepts, with the same tensors, dtypes and shapes, and rejects the rest with a
//    one-line Error naming the file;
//  - files from SafetensorsWriter and write_safetensors_set load in the package with the same
//    bytes, dtypes and shapes, and a set is sharded as huggingface_hub shards it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/safetensors.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using json = nlohmann::json;

std::string run_ref(const std::string& args) {
  std::string cmd = "'" + testing::python() + "' '" + testing::source_dir() +
                    "/tests/reference/safetensors_ref.py' " + args;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return cmd;
}

std::string hex(const Tensor& t) {
  static const char* d = "0123456789abcdef";
  std::string s;
  const auto* p = static_cast<const unsigned char*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) s += {d[p[i] >> 4], d[p[i] & 15]};
  return s;
}

TEST(SafetensorsReference, AcceptsExactlyWhatThePackageAccepts) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("st-corpus");
  run_ref("corpus --out '" + dir + "'");
  json verdicts = json::parse(testing::slurp(dir + "/verdicts.json"));
  ASSERT_GT(verdicts.size(), 200u);
  std::vector<std::string> mismatches;
  int accepted = 0;
  for (const json& v : verdicts) {
    std::string file = v.at("file"), path = dir + "/" + file;
    bool want = v.at("ok");
    std::string why;
    bool got = false;
    try {
      Safetensors f = Safetensors::open(path);
      got = true;
      // The same tensors, dtypes and shapes; every tensor lmforge can hold is readable.
      std::map<std::string, json> ours;
      for (const std::string& n : f.names()) {
        const Safetensors::Info& i = f.info(n);
        ours[n] = json::array({i.dtype, i.shape});
        try {
          f.get(n);
        } catch (const Error&) {
        }
      }
      if (want && json(ours) != v.at("tensors"))
        why = "tensors differ: lmforge " + json(ours).dump() + ", package " + v["tensors"].dump();
    } catch (const Error& e) {
      std::string m = e.what();
      if (m.find(path) == std::string::npos || m.find('\n') != std::string::npos)
        why = "the error is not one line naming the file: " + m;
      if (want) why = "lmforge rejects it: " + m;
    } catch (const std::exception& e) {
      why = std::string("not an lmforge::Error: ") + e.what();
    }
    if (got && !want)
      why = "lmforge accepts it; the package says " + v.at("error").get<std::string>();
    accepted += got;
    if (!why.empty()) mismatches.push_back(file + ": " + why);
  }
  std::string report;
  for (const std::string& m : mismatches) report += "\n  " + m;
  EXPECT_TRUE(mismatches.empty()) << mismatches.size() << " of " << verdicts.size()
                                  << " files decided differently:" << report;
  EXPECT_GT(accepted, 50);
}

// Values around each format's edges: zeros of both signs, subnormals, the largest finite values,
// infinities, NaNs, and a spread of ordinary numbers.
Tensor pattern(DType dt, int n) {
  static const uint32_t kEdge32[] = {0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF,
                                     0x7F800000, 0xFF800000, 0x7FC00001, 0xFFA00000};
  static const uint16_t kEdge16[] = {0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0x7C00,
                                     0xFC00, 0x7E01, 0x7F7F, 0x7F80, 0xFFC1};
  static const double kEdge64[] = {-0.0, 4.9e-324, INFINITY, NAN};
  std::string bytes;
  auto put = [&](const auto& v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  for (int i = 0; i < n; ++i) {
    uint32_t r = static_cast<uint32_t>(i) * 2654435761u;
    size_t k = static_cast<size_t>(i);
    if (dt == DType::kF64)
      put(k < std::size(kEdge64) ? kEdge64[k] : std::ldexp(static_cast<double>(r), -20) - 1e3);
    else if (dtype_size(dt) == 2)
      put(k < std::size(kEdge16) ? kEdge16[k] : static_cast<uint16_t>(r >> 7));
    else if (dt == DType::kF32)
      put(k < std::size(kEdge32) ? kEdge32[k] : r);
    else
      put(r);
  }
  Tensor t = Tensor::empty({n}, dt);
  std::memcpy(t.raw(), bytes.data(), bytes.size());
  return t;
}

const std::map<DType, std::string> kTorchNames = {
    {DType::kF64, "float64"}, {DType::kF32, "float32"}, {DType::kBF16, "bfloat16"},
    {DType::kF16, "float16"}, {DType::kI32, "int32"},   {DType::kU16, "uint16"},
    {DType::kU32, "uint32"}};

void expect_loaded_as_written(const json& got,
                              const std::vector<std::pair<std::string, Tensor>>& tensors) {
  ASSERT_EQ(got.at("tensors").size(), tensors.size());
  for (auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    const json& g = got.at("tensors").at(name);
    EXPECT_EQ(g.at("dtype"), kTorchNames.at(t.dtype()));
    std::vector<int64_t> shape;
    for (int i = 0; i < t.ndim(); ++i) shape.push_back(t.size(i));
    EXPECT_EQ(g.at("shape").get<std::vector<int64_t>>(), shape);
    EXPECT_EQ(g.at("hex"), hex(t));
  }
}

std::vector<std::pair<std::string, Tensor>> sample_tensors() {
  std::vector<std::pair<std::string, Tensor>> out;
  int n = 5;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64, DType::kI32, DType::kU16,
                   DType::kU32}) {
    out.emplace_back("w." + kTorchNames.at(dt), pattern(dt, 3 * n + 1).view({-1}));
    n += 7;
  }
  out.emplace_back("matrix", pattern(DType::kF32, 12).view({3, 4}));
  out.emplace_back("scalar", pattern(DType::kBF16, 1).view({}));
  out.emplace_back("empty", Tensor::empty({0, 3}, DType::kF16));
  out.emplace_back("caf\xC3\xA9", pattern(DType::kF32, 2));
  return out;
}

TEST(SafetensorsReference, WriterOutputLoadsInThePackageWithTheSameBytes) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("st-writer-ref");
  auto tensors = sample_tensors();
  SafetensorsWriter w;
  for (auto& [name, t] : tensors) w.add(name, t);
  w.metadata["format"] = "pt";
  w.write(dir + "/x.safetensors");
  run_ref("read --path '" + dir + "/x.safetensors' --out '" + dir + "/got.json'");
  json got = json::parse(testing::slurp(dir + "/got.json"));
  expect_loaded_as_written(got, tensors);
  EXPECT_EQ(got.at("metadata"), json({{"format", "pt"}}));
}

TEST(SafetensorsReference, ShardedSetLoadsInThePackageAndShardsAsHuggingFaceHub) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("st-set-ref");
  auto tensors = sample_tensors();
  {
    std::ofstream order(dir + "/order.txt");
    for (auto& [name, t] : tensors) order << name << "\n";
  }
  for (uint64_t max_bytes : {uint64_t{40}, uint64_t{100}, uint64_t{1} << 30}) {
    SCOPED_TRACE(max_bytes);
    std::string set = dir + "/set";
    std::vector<std::string> files =
        write_safetensors_set(set, tensors, {{"format", "pt"}}, max_bytes);
    std::string out = dir + "/got-" + std::to_string(max_bytes) + ".json";
    run_ref("read --path '" + set + "' --out '" + out + "' --order '" + dir +
            "/order.txt' --max-shard-bytes " + std::to_string(max_bytes));
    json got = json::parse(testing::slurp(out));
    expect_loaded_as_written(got, tensors);
    const json& split = got.at("hf_split");
    if (!split.at("is_sharded").get<bool>()) {
      EXPECT_EQ(files, std::vector<std::string>{"model.safetensors"});
      EXPECT_TRUE(got.at("index").is_null());
      continue;
    }
    EXPECT_GT(files.size(), 2u);
    // The same files holding the same tensors, and the same total_size.
    std::map<std::string, std::vector<std::string>> ours;
    for (auto& [name, t] : got.at("tensors").items()) ours[t.at("file")].push_back(name);
    std::map<std::string, std::vector<std::string>> hf;
    for (auto& [file, names] : split.at("filename_to_tensors").items()) {
      auto v = names.get<std::vector<std::string>>();
      std::sort(v.begin(), v.end());
      hf[file] = v;
    }
    EXPECT_EQ(ours, hf);
    EXPECT_EQ(got.at("index").at("metadata").at("total_size"),
              split.at("metadata").at("total_size"));
    SafetensorsSet s = SafetensorsSet::open(set);
    EXPECT_EQ(s.names().size(), tensors.size());
  }
}

}  // namespace
}  // namespace lmforge
