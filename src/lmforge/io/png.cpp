#include "lmforge/io/png.h"

#include <zlib.h>

#include <cstring>
#include <vector>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {

void put_u32be(std::string& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out += static_cast<char>((v >> s) & 0xFF);
}

void put_chunk(std::string& out, const char type[4], const std::string& data) {
  put_u32be(out, static_cast<uint32_t>(data.size()));
  size_t start = out.size();
  out.append(type, 4);
  out += data;
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, reinterpret_cast<const Bytef*>(out.data() + start), data.size() + 4);
  put_u32be(out, static_cast<uint32_t>(crc));
}

}  // namespace

std::string encode_png_rgb(const uint8_t* rgb, int width, int height) {
  LMF_CHECK(width > 0 && height > 0, "png: {}x{}", width, height);
  const size_t row = static_cast<size_t>(width) * 3;
  std::vector<uint8_t> raw;  // each row: filter type 0 (None), then the row's bytes
  raw.reserve((row + 1) * height);
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb + y * row, rgb + (y + 1) * row);
  }
  uLongf zlen = compressBound(raw.size());
  std::string z(zlen, '\0');
  int rc = compress2(reinterpret_cast<Bytef*>(z.data()), &zlen, raw.data(), raw.size(),
                     Z_BEST_COMPRESSION);
  LMF_CHECK(rc == Z_OK, "png: zlib compress2 returned {}", rc);
  z.resize(zlen);

  std::string out("\x89PNG\r\n\x1a\n", 8);
  std::string ihdr;
  put_u32be(ihdr, width);
  put_u32be(ihdr, height);
  ihdr += {8, 2, 0, 0, 0};  // bit depth 8, colour type 2 (RGB), deflate, filter 0, no interlace
  put_chunk(out, "IHDR", ihdr);
  put_chunk(out, "IDAT", z);
  put_chunk(out, "IEND", "");
  return out;
}

}  // namespace lmforge
