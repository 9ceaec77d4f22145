// Checkpoints you can kill -9, at length: 20 kills (tests/e2e/crash_resume.h).
#include "e2e/crash_resume.h"

namespace lmforge {

TEST(CheckpointCrash, TwentyKillsThenResumeIsBitExact) {
  testing::crash_and_resume(testing::temp_dir("slow-crash20"), /*steps=*/200, /*kills=*/20,
                            /*seed=*/20);
}

}  // namespace lmforge
