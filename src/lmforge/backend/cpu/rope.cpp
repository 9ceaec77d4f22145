// Rotary position embedding (Su et al. 2021, RoFormer) in the Hugging Face "rotate_half"
// layout: element i pairs with i + HS/2, so HF Llama weights load without permutation.
// y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin; the backward is the inverse rotation.
#include <vector>

#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

namespace {
// One row's first n_heads heads, rotated in place at the angles c, s (sign -1: the inverse).
template <typename T>
inline void rotate_row(T* row, const float* c, const float* s, int64_t n_heads, int64_t HS,
                       float sign) {
  const int64_t half = HS / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    T* v = row + h * HS;
    for (int64_t i = 0; i < half; ++i) {
      T x1 = v[i], x2 = v[i + half];
      T ci = c[i], si = sign * s[i];
      v[i] = x1 * ci - x2 * si;
      v[i + half] = x2 * ci + x1 * si;
    }
  }
}

// Every row of x (B*T_ rows, row_stride apart; rows of T_ positions from pos0, or at pos):
// row(r, p) with p the row's position. One OpenMP loop over rows.
template <typename F>
void for_rows(int64_t B, int64_t T_, int64_t pos0, const int32_t* pos, F&& row) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) row(b * T_ + t, pos ? pos[b * T_ + t] : pos0 + t);
}

template <typename T>
void rotate(T* x, const float* cos, const float* sin, int64_t B, int64_t T_, int64_t n_heads,
            int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos, float sign) {
  const int64_t half = HS / 2;
  for_rows(B, T_, pos0, pos, [&](int64_t r, int64_t p) {
    rotate_row(x + r * row_stride, cos + p * half, sin + p * half, n_heads, HS, sign);
  });
}
}  // namespace

void rope_bf16(uint16_t* x, const float* cos, const float* sin, int64_t B, int64_t T_,
               int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos,
               bool backward) {
  const int64_t half = HS / 2, n = n_heads * HS;
  for_rows(B, T_, pos0, pos, [&](int64_t r, int64_t p) {
    thread_local std::vector<float> w;
    if (static_cast<int64_t>(w.size()) < n) w.resize(n);
    uint16_t* row = x + r * row_stride;
    from_bf16_serial(w.data(), row, n);
    rotate_row(w.data(), cos + p * half, sin + p * half, n_heads, HS, backward ? -1.0f : 1.0f);
    to_bf16_serial(row, w.data(), n);
  });
}

template <typename T>
void rope_forward(T* x, const float* cos, const float* sin, int64_t B, int64_t T_, int64_t n_heads,
                  int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos) {
  rotate(x, cos, sin, B, T_, n_heads, HS, row_stride, pos0, pos, 1.0f);
}

template <typename T>
void rope_backward(T* dx, const float* cos, const float* sin, int64_t B, int64_t T_,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                   const int32_t* pos) {
  rotate(dx, cos, sin, B, T_, n_heads, HS, row_stride, pos0, pos, -1.0f);
}

template void rope_forward<float>(float*, const float*, const float*, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, const int32_t*);
template void rope_forward<double>(double*, const float*, const float*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, const int32_t*);
template void rope_backward<float>(float*, const float*, const float*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, const int32_t*);
template void rope_backward<double>(double*, const float*, const float*, int64_t, int64_t, int64_t,
                                    int64_t, int64_t, int64_t, const int32_t*);

}  // namespace lmforge::cpu
