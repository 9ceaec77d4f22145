// The training run the multi-rank tests compare (gpt2-tiny, 6 logged steps, no eval, checkpoint
// or sample unless a test adds them); tests append --set run.dir=... and their own options.
#pragma once

namespace lmforge::testing {

inline constexpr const char* kTinyTrain =
    "train --set model.preset=gpt2-tiny --set train.seq_len=32 --set train.steps=6 "
    "--set train.lr=3e-3 --set train.warmup=0 --set train.grad_clip=0.5 --set train.eval_every=0 "
    "--set train.checkpoint_every=0 --set sample.prompt= --set train.log_every=1 ";

}  // namespace lmforge::testing
