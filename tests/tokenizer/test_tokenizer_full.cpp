// test_tokenizer_reference on every document of the corpora (label slow): the KJV, all of
// GCIDE and every .rst file of linux-doc, ~68 MB per tokenizer. The fixtures (~2 GB of JSONL)
// are made here, by make_fixtures.py --tokenizers-full, and removed again when every check
// passed (kept for inspection otherwise).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "testing/paths.h"
#include "tokenizer/reference_fixtures.h"

namespace lmforge {
namespace {

TEST(TokenizerReferenceFull, EveryTokenizerOnTheFullCorpora) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  const std::string out = testing::ref_dir(), dir = out + "/tokenizers-full";
  const std::string cmd = "'" + testing::python() + "' '" + testing::source_dir() +
                          "/tests/reference/make_fixtures.py' --out '" + out +
                          "' --tokenizers-full";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  for (const std::string& name : testing::reference_tokenizer_names()) {
    SCOPED_TRACE(name);
    testing::check_tokenizer_fixture(dir, name);
  }
  if (!HasFailure()) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lmforge
