#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "lmforge/core/error.h"
#include "lmforge/io/safetensors.h"
#include "testing/process.h"

namespace lmforge {

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
  EXPECT_FALSE(std::filesystem::exists(dir + "/x.safetensors.tmp"));
  Safetensors f = Safetensors::open(dir + "/x.safetensors");
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b.ids"}));
  EXPECT_EQ(f.metadata().at("step"), "12");
  Tensor ra = f.get("a");
  EXPECT_EQ(ra.shape(), Shape({2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(ra.data<float>()[i], i * 0.5f);
  EXPECT_EQ(f.get("b.ids").data<int32_t>()[3], -3);
  EXPECT_THROW(f.get("missing"), Error);
}

TEST(Safetensors, TruncatedFileIsAClearError) {
  std::string dir = testing::temp_dir("st-trunc");
  Tensor a = Tensor::empty({64}, DType::kF32);
  SafetensorsWriter w;
  w.add("a", a);
  w.write(dir + "/x.safetensors");
  std::filesystem::resize_file(dir + "/x.safetensors",
                               std::filesystem::file_size(dir + "/x.safetensors") - 8);
  try {
    Safetensors::open(dir + "/x.safetensors");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  std::ofstream(dir + "/junk.safetensors") << "hello";
  EXPECT_THROW(Safetensors::open(dir + "/junk.safetensors"), Error);
  EXPECT_THROW(Safetensors::open(dir + "/absent.safetensors"), Error);
}

}  // namespace lmforge
