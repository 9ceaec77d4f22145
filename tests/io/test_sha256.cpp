// SHA-256 against the FIPS 180-4 / NIST example vectors, against Python's hashlib on random data
// of every length around the block and padding boundaries, and the SHA-extension path against
// the portable one.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "lmforge/core/error.h"
#include "lmforge/io/sha256.h"
#include "testing/process.h"

namespace lmforge {

namespace {

std::string random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

}  // namespace

TEST(Sha256, KnownVectors) {
  // FIPS 180-4 examples (NIST CSRC "SHA256.pdf") and the long messages of the NIST test set.
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnop"
                       "jklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(sha256_hex("The quick brown fox jumps over the lazy dog"),
            "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592");
  std::cout << "SHA extensions: " << (sha256_hardware() ? "used" : "not available") << "\n";
}

// Fed in pieces of every size, the digest is that of the whole.
TEST(Sha256, IncrementalEqualsOneShotAndHardwareEqualsPortable) {
  std::string data = random_bytes(5000, 1);
  std::string whole = sha256_hex(data);
  std::mt19937 rng(2);
  for (int trial = 0; trial < 50; ++trial) {
    Sha256 h(trial % 2 ? Sha256::Impl::kPortable : Sha256::Impl::kAuto);
    for (size_t at = 0; at < data.size();) {
      size_t n = std::min<size_t>(data.size() - at, rng() % 200);
      h.update(data.data() + at, n);
      at += n;
    }
    ASSERT_EQ(h.hex_digest(), whole) << "trial " << trial;
  }
  for (size_t n = 0; n < 300; ++n) {
    std::string s = random_bytes(n, n);
    Sha256 a(Sha256::Impl::kAuto), p(Sha256::Impl::kPortable);
    a.update(s);
    p.update(s);
    ASSERT_EQ(a.hex_digest(), p.hex_digest()) << n << " bytes";
  }
}

// Lengths 0..200 (every padding case: 55, 56, 63, 64, 119, 120 bytes) and a few larger ones,
// against hashlib.
TEST(Sha256, MatchesPythonHashlib) {
  std::string py = testing::python().empty() ? "python3" : testing::python();
  std::string dir = testing::temp_dir("sha256");
  std::vector<size_t> sizes;
  for (size_t n = 0; n <= 200; ++n) sizes.push_back(n);
  for (size_t n : {1023, 1024, 1025, 65536 + 7, (1 << 20) + 13, (3 << 20) + 1}) sizes.push_back(n);
  std::ofstream list(dir + "/files.txt");
  std::vector<std::string> ours;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string path = dir + "/f" + std::to_string(i);
    std::string data = random_bytes(sizes[i], 100 + i);
    std::ofstream(path, std::ios::binary) << data;
    list << path << "\n";
    uint64_t bytes = 0;
    ours.push_back(sha256_file(path, &bytes));
    ASSERT_EQ(bytes, sizes[i]);
    ASSERT_EQ(ours.back(), sha256_hex(data));
  }
  list.close();
  std::ofstream(dir + "/hash.py")
      << "import hashlib, sys\n"
         "for p in open(sys.argv[1]).read().split():\n"
         "    print(hashlib.sha256(open(p, 'rb').read()).hexdigest())\n";
  std::string cmd =
      "'" + py + "' '" + dir + "/hash.py' '" + dir + "/files.txt' > '" + dir + "/py.txt'";
  if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "no python to compare with: " << cmd;
  std::istringstream in(testing::slurp(dir + "/py.txt"));
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string want;
    in >> want;
    EXPECT_EQ(ours[i], want) << sizes[i] << " bytes";
  }
}

TEST(Sha256, MissingFileNamesIt) {
  try {
    sha256_file("/nonexistent/model.safetensors");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/model.safetensors"), std::string::npos);
  }
}

}  // namespace lmforge
