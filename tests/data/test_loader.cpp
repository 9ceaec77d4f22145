#include <gtest/gtest.h>

#include "lmforge/core/error.h"
#include "lmforge/data/loader.h"
#include "testing/process.h"

namespace lmforge {

namespace {
std::string make_shard(const std::string& dir, int n) {
  std::vector<uint32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(i);  // token == position
  write_shard(dir + "/s.bin", t);
  return dir + "/s.bin";
}
}  // namespace

TEST(Loader, WindowsAreShiftedByOneAndResumeExactly) {
  std::string path = make_shard(testing::temp_dir("loader"), 1000);
  Loader a({path}, 4, 16, 99), b({path}, 4, 16, 99);
  Tensor tok = Tensor::empty({4, 16}, DType::kI32), tgt = Tensor::empty({4, 16}, DType::kI32);
  Tensor tok2 = Tensor::empty({4, 16}, DType::kI32), tgt2 = Tensor::empty({4, 16}, DType::kI32);
  for (int i = 0; i < 3; ++i) a.next(tok, tgt);
  b.set_state(a.state());  // b continues where a is
  for (int step = 0; step < 5; ++step) {
    a.next(tok, tgt);
    b.next(tok2, tgt2);
    for (int i = 0; i < 64; ++i) {
      EXPECT_EQ(tok.data<int32_t>()[i], tok2.data<int32_t>()[i]);
      EXPECT_EQ(tgt.data<int32_t>()[i], tok.data<int32_t>()[i] + 1);
      EXPECT_LT(tgt.data<int32_t>()[i], 1000);
    }
  }
}

TEST(Loader, RejectsTokensBeyondTheVocabularyAndTooLittleData) {
  std::string dir = testing::temp_dir("loader-vocab");
  std::string path = make_shard(dir, 300);
  Loader l({path}, 1, 8, 1);
  EXPECT_NO_THROW(l.check_vocab(300, "data.train"));
  try {
    l.check_vocab(257, "data.train");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 299"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Loader({path}, 1, 300, 1), Error);
}

}  // namespace lmforge
