// Rotary position embedding (Su et al. 2021, RoFormer) in the Hugging Face "rotate_half"
// layout: element i pairs with i + HS/2, so HF Llama weights load without permutation.
// y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin; the backward is the inverse rotation.
#include "lmforge/backend/cpu/kernels.h"

namespace lmforge::cpu {

namespace {
template <typename T>
void rotate(T* x, const float* cos, const float* sin, int64_t B, int64_t T_, int64_t n_heads,
            int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos, float sign) {
  int64_t half = HS / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t p = pos ? pos[b * T_ + t] : pos0 + t;
      const float* c = cos + p * half;
      const float* s = sin + p * half;
      T* row = x + (b * T_ + t) * row_stride;
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
}
}  // namespace

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
