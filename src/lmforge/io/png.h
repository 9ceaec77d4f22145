// A minimal PNG encoder: 8-bit RGB, no interlace, filter 0 on every row, the image data
// deflated with zlib (PNG spec, https://www.w3.org/TR/png/: signature, IHDR, IDAT, IEND; each
// chunk is u32 big-endian length | type | data | CRC-32 of type and data).
//
//   std::string bytes = encode_png_rgb(pixels.data(), width, height);   // pixels: (H, W, 3)
#pragma once

#include <cstdint>
#include <string>

namespace lmforge {

std::string encode_png_rgb(const uint8_t* rgb, int width, int height);

}  // namespace lmforge
