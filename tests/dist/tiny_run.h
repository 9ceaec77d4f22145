// The training run the multi-rank tests compare (gpt2-tiny, 6 logged steps, no eval, checkpoint
// or sample unless a test adds them); tests append --set run.dir=... and their own options.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "testing/process.h"

namespace lmforge::testing {

inline constexpr const char* kTinyTrain =
    "train --set model.preset=gpt2-tiny --set train.seq_len=32 --set train.steps=6 "
    "--set train.lr=3e-3 --set train.min_lr=2e-4 --set train.warmup=0 --set train.grad_clip=0.5 "
    "--set train.eval_every=0 "
    "--set train.checkpoint_every=0 --set sample.prompt= --set train.log_every=1 ";

// A run where the last of 2 ranks hangs (SIGSTOP) at step 3 and the others give up after 3 s.
inline constexpr const char* kHangAtStep3 =
    "--set train.batch_size=2 --set train.inject_fault=hang@3 --set dist.timeout=3";

// The job stopped non-zero with one line naming the hung rank and the timeout's key.
inline void expect_hung_rank_named(const RunResult& h) {
  EXPECT_NE(h.exit_code, 0);
  EXPECT_NE(h.err.find("rank 1 (at collective"), std::string::npos) << h.err;
  EXPECT_NE(h.err.find("dist.timeout"), std::string::npos) << h.err;
}

}  // namespace lmforge::testing
