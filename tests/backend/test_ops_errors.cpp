// Token ids outside the vocabulary reaching the CPU kernels (the trainer and generate check them
// first; a caller that does not must still get an error, not a crash): the kernels check inside
// OpenMP loops, where an exception would end the process in std::terminate, so they note the
// position and throw after the loop. Run with several threads so the bad id is met by a worker.
#include <gtest/gtest.h>
#include <omp.h>

#include <functional>
#include <string>

#include "lmforge/backend/ops.h"
#include "lmforge/core/error.h"
#include "testing/errors.h"

namespace lmforge {
namespace {

using testing::error_of;

constexpr int64_t kB = 2, kT = 64, kC = 8, kV = 50;

Tensor ids(int32_t bad, int64_t at) {
  Tensor t = Tensor::zeros({kB, kT}, DType::kI32);
  int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < kB * kT; ++i) p[i] = static_cast<int32_t>(i % kV);
  p[at] = bad;
  return t;
}

class OutOfVocabulary : public ::testing::TestWithParam<int32_t> {
 protected:
  void SetUp() override { omp_set_num_threads(2); }
};

TEST_P(OutOfVocabulary, EmbeddingForwardAndBackwardThrow) {
  Tensor out = Tensor::zeros({kB, kT, kC}, DType::kF32), wte = Tensor::zeros({kV, kC}, DType::kF32);
  const std::string want =
      "token id " + std::to_string(GetParam()) + " (at position 100) outside the vocabulary of 50";
  std::string msg =
      error_of([&] { ops::embedding_forward(out, ids(GetParam(), 100), wte, Tensor()); });
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
  msg = error_of([&] { ops::embedding_backward(wte, Tensor(), out, ids(GetParam(), 100)); });
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
}

// With several bad ids the lowest position is named, whichever thread meets one first.
TEST(OutOfVocabularyIds, TheLowestPositionIsNamed) {
  omp_set_num_threads(2);
  Tensor out = Tensor::zeros({kB, kT, kC}, DType::kF32), wte = Tensor::zeros({kV, kC}, DType::kF32);
  // Rows 0..63 go to thread 0 and 64..127 to thread 1 (static schedule): thread 1 meets its bad
  // id at once, thread 0 the lower one 60 rows in.
  Tensor t = ids(-3, 60);
  t.data<int32_t>()[64] = 99;
  for (int rep = 0; rep < 20; ++rep) {
    const std::string msg = error_of([&] { ops::embedding_forward(out, t, wte, Tensor()); });
    ASSERT_NE(msg.find("token id -3 (at position 60)"), std::string::npos) << msg;
  }
}

TEST_P(OutOfVocabulary, CrossEntropyThrows) {
  const int64_t N = kB * kT;
  Tensor logits = Tensor::zeros({N, kV}, DType::kF32), losses = Tensor::zeros({N}, DType::kF32);
  Tensor targets = ids(GetParam(), 77).view({N});
  const std::string want = "target " + std::to_string(GetParam()) + " (at position 77)";
  std::string msg =
      error_of([&] { ops::softmax_xent_forward(losses, logits, targets, /*ignore_index=*/-100); });
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
  Tensor dlogits = Tensor::zeros({N, kV}, DType::kF32);
  msg = error_of([&] { ops::softmax_xent_backward(dlogits, logits, targets, 1.0, -100); });
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
  Tensor lse = Tensor::zeros({1}, DType::kF64);
  msg = error_of([&] {
    ops::softmax_xent_forward_backward(losses, lse, dlogits, logits, targets, -100, 1.0);
  });
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
}

INSTANTIATE_TEST_SUITE_P(Ids, OutOfVocabulary, ::testing::Values(50, 1 << 30, -1, -7));

}  // namespace
}  // namespace lmforge
