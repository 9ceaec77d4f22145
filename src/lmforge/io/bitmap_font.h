// A 5x7 pixel bitmap font for printable ASCII, for text in rasterized charts (io/plot.h).
// Each glyph is 7 rows, top to bottom; bit 4 of a row is its leftmost pixel.
//
//   const uint8_t* g = glyph_5x7('A');   // g[0] == 0x0E: ".###."
#pragma once

#include <cstdint>

namespace lmforge {

inline constexpr int kGlyphWidth = 5, kGlyphHeight = 7;

// The glyph of c; '?' for characters outside printable ASCII.
const uint8_t* glyph_5x7(char c);

}  // namespace lmforge
