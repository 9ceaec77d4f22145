// Utf8Stream: token bytes streamed as valid UTF-8, against Python's bytes.decode("utf-8",
// "replace") (what transformers' TextStreamer prints) of the whole stream.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "lmforge/core/utf8.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {

TEST(Utf8Stream, HoldsBackACharacterCutBetweenPieces) {
  Utf8Stream u;
  EXPECT_EQ(u.push("\xD0"), "");  // the first byte of "п"
  EXPECT_EQ(u.push("\xBF"), "\xD0\xBF");
  EXPECT_EQ(u.push("a\xD1"), "a");
  EXPECT_EQ(u.finish(), "\xEF\xBF\xBD");  // a reply ending inside a character
  EXPECT_EQ(u.finish(), "");
}

// Random byte streams (valid characters of every length, stray continuation bytes, overlong
// and surrogate forms, characters cut short) cut into random pieces.
TEST(Utf8Stream, PrintsWhatPythonDecodesWithReplace) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  const std::vector<std::string> atoms = {
      "a", " ", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x99\x82", "\x80", "\xBF", "\xC0\x80",
      "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82", "\xF0\x9F\x99", "\xC3", "\xFF", "\xF5"};
  std::mt19937 rng(3);
  nlohmann::json cases = nlohmann::json::array();
  std::vector<std::string> got;
  for (int c = 0; c < 300; ++c) {
    std::string bytes;
    for (int k = std::uniform_int_distribution<int>(0, 12)(rng); k > 0; --k)
      bytes += atoms[std::uniform_int_distribution<size_t>(0, atoms.size() - 1)(rng)];
    Utf8Stream u;
    std::string out;
    for (size_t i = 0; i < bytes.size();) {
      const size_t n = std::uniform_int_distribution<size_t>(1, 4)(rng);
      out += u.push(bytes.substr(i, n));
      i += n;
    }
    got.push_back(out + u.finish());
    std::vector<int> b(bytes.begin(), bytes.end());
    for (int& x : b) x &= 0xFF;
    cases.push_back(b);
  }
  const std::string dir = testing::temp_dir("utf8-stream");
  std::ofstream(dir + "/in.json") << cases.dump();
  const std::string cmd =
      "'" + testing::python() +
      "' -c 'import json,sys; d=json.load(open(sys.argv[1])); "
      "json.dump([list(bytes(b).decode(\"utf-8\",\"replace\").encode()) for b in d], "
      "open(sys.argv[2], \"w\"))' '" +
      dir + "/in.json' '" + dir + "/out.json'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const nlohmann::json want = nlohmann::json::parse(testing::slurp(dir + "/out.json"));
  ASSERT_EQ(want.size(), got.size());
  for (size_t c = 0; c < got.size(); ++c) {
    std::string w;
    for (int x : want[c]) w += static_cast<char>(x);
    EXPECT_TRUE(got[c] == w) << "case " << c;
  }
}

}  // namespace lmforge
