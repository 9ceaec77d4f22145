// Conversions, elementwise arithmetic, squared norms and the AdamW update: the ops over whole
// buffers (parameters, gradients, optimizer state).
#include <cstring>

#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/backend/dispatch.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/stochastic_round.h"

namespace lmforge::ops {

using namespace detail;

void to_bf16(const Tensor& dst, const Tensor& src) {
  same_numel("to_bf16", dst, src);
  LMF_CHECK(dst.device() == src.device(), "to_bf16: both tensors on one device");
  dispatch(
      "to_bf16", src,
      [&](auto tag) {
        if constexpr (std::is_same_v<decltype(tag), float>)
          cpu::to_bf16(dst.bf16_data(), src.data<float>(), src.numel());
        else
          LMF_CHECK(false, "to_bf16 converts fp32, got {}", dtype_name(src.dtype()));
      },
      LMF_GPU(cuda::to_bf16(dst.bf16_data(), src.data<float>(), src.numel())));
}

void from_bf16(const Tensor& dst, const Tensor& src) {
  same_numel("from_bf16", dst, src);
  LMF_CHECK(dst.device() == src.device() && src.dtype() == DType::kBF16,
            "from_bf16: a bf16 tensor into an fp32 one on the same device");
  dispatch(
      "from_bf16", dst,
      [&](auto tag) {
        if constexpr (std::is_same_v<decltype(tag), float>)
          cpu::from_bf16(dst.data<float>(), src.bf16_data(), src.numel());
        else
          LMF_CHECK(false, "from_bf16 writes fp32, got {}", dtype_name(dst.dtype()));
      },
      LMF_GPU(cuda::from_bf16(dst.data<float>(), src.bf16_data(), src.numel())));
}

void keep_master(const Tensor& master, const Tensor& value) {
  same_numel("keep_master", master, value);
  LMF_CHECK(master.device() == value.device() && master.dtype() == DType::kF32 &&
                value.dtype() == DType::kBF16,
            "keep_master: an fp32 master of a bf16 value on the same device");
  dispatch(
      "keep_master", master,
      [&](auto) { cpu::keep_master(master.data<float>(), value.bf16_data(), master.numel()); },
      LMF_GPU(cuda::keep_master(master.data<float>(), value.bf16_data(), master.numel())));
}

void add(const Tensor& out, const Tensor& a, const Tensor& b) {
  same_device("add", out, {&a, &b});
  same_numel("add", a, b);
  same_numel("add", out, a);
  if (b.dtype() == DType::kBF16) {  // a residual branch's bf16 matmul output, widened exactly
    LMF_CHECK(out.dtype() == DType::kF32 && a.dtype() == DType::kF32,
              "add: a bf16 b goes into fp32 a and out");
    dispatch(
        "add", out,
        [&](auto tag) {
          if constexpr (std::is_same_v<decltype(tag), float>)
            cpu::add(out.data<float>(), a.data<float>(), b.bf16_data(), a.numel());
        },
        LMF_GPU(cuda::add(out.data<float>(), a.data<float>(), b.bf16_data(), a.numel())));
    return;
  }
  dispatch(
      "add", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::add<T>(ptr<T>(out), cptr<T>(a), cptr<T>(b), a.numel());
      },
      LMF_GPU(cuda::add(ptr<float>(out), cptr<float>(a), cptr<float>(b), a.numel())));
}

void accumulate(const Tensor& dst, const Tensor& src) {
  same_device("accumulate", dst, {&src});
  same_numel("accumulate", dst, src);
  dispatch(
      "accumulate", dst,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::accumulate<T>(ptr<T>(dst), cptr<T>(src), src.numel());
      },
      LMF_GPU(cuda::accumulate(ptr<float>(dst), cptr<float>(src), src.numel())));
}

void copy_block(const Tensor& dst, int64_t dst_row, int64_t dst_col, const Tensor& src,
                int64_t src_row, int64_t src_col, int64_t rows, int64_t cols, bool accumulate) {
  same_device("copy_block", dst, {&src});
  LMF_CHECK(dst.ndim() == 2 && src.ndim() == 2 && dst.dtype() == src.dtype(),
            "copy_block: 2-D tensors of one dtype, got {} {} and {} {}", dst.shape().str(),
            dtype_name(dst.dtype()), src.shape().str(), dtype_name(src.dtype()));
  LMF_CHECK(rows >= 0 && cols >= 0 && dst_row >= 0 && dst_col >= 0 && src_row >= 0 &&
                src_col >= 0 && dst_row + rows <= dst.size(0) && dst_col + cols <= dst.size(1) &&
                src_row + rows <= src.size(0) && src_col + cols <= src.size(1),
            "copy_block: a {}x{} block at ({}, {}) of {} from ({}, {}) of {}", rows, cols, dst_row,
            dst_col, dst.shape().str(), src_row, src_col, src.shape().str());
  LMF_CHECK(!accumulate || dst.dtype() == DType::kF32 || dst.dtype() == DType::kF64,
            "copy_block: accumulates fp32 or fp64, got {}", dtype_name(dst.dtype()));
  const int64_t ldd = dst.size(1), lds = src.size(1);
  const size_t es = dtype_size(dst.dtype());
  if (rows == 0 || cols == 0) return;
  auto* d = static_cast<char*>(dst.raw()) + (dst_row * ldd + dst_col) * es;
  const auto* s = static_cast<const char*>(src.raw()) + (src_row * lds + src_col) * es;
  dispatch_device(
      "copy_block", dst,
      [&] {
        auto add = [&](auto* to, const auto* from) {
          for (int64_t c = 0; c < cols; ++c) to[c] += from[c];
        };
        for (int64_t r = 0; r < rows; ++r) {
          char* dr = d + r * ldd * es;
          const char* sr = s + r * lds * es;
          if (!accumulate)
            std::memcpy(dr, sr, cols * es);
          else if (dst.dtype() == DType::kF32)
            add(reinterpret_cast<float*>(dr), reinterpret_cast<const float*>(sr));
          else
            add(reinterpret_cast<double*>(dr), reinterpret_cast<const double*>(sr));
        }
      },
      LMF_GPU({
        if (!accumulate)
          cuda::memcpy_2d(d, ldd * es, s, lds * es, cols * es, rows);
        else
          cuda::accumulate_block(reinterpret_cast<float*>(d), ldd,
                                 reinterpret_cast<const float*>(s), lds, rows, cols);
      }));
}

namespace {
// Inverted dropout of probability p on 32 hashed bits: element i is dropped when its bits fall
// below `cut`, the others scaled.
struct Dropout {
  uint32_t cut;
  float scale;
  explicit Dropout(double p) {
    LMF_CHECK(p >= 0 && p < 1, "dropout: p {} outside [0, 1)", p);
    cut = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
    scale = static_cast<float>(1.0 / (1.0 - p));
  }
};
}  // namespace

void dropout_forward(const Tensor& out, const Tensor& inp, double p, uint32_t key) {
  same_device("dropout_forward", out, {&inp});
  same_numel("dropout_forward", out, inp);
  LMF_CHECK(
      out.dtype() == DType::kF32 && (inp.dtype() == DType::kF32 || inp.dtype() == DType::kBF16),
      "dropout_forward: fp32 out from fp32 or bf16, got {} from {}", dtype_name(out.dtype()),
      dtype_name(inp.dtype()));
  const Dropout m(p);
  float* o = out.data<float>();
  const float* x = inp.dtype() == DType::kF32 ? inp.data<float>() : nullptr;
  const uint16_t* h = inp.dtype() == DType::kBF16 ? inp.bf16_data() : nullptr;
  dispatch_device(
      "dropout_forward", out,
      [&] { cpu::dropout_forward(o, x, h, out.numel(), m.cut, m.scale, key); },
      LMF_GPU(cuda::dropout_forward(o, x, h, out.numel(), m.cut, m.scale, key)));
}

void dropout_backward(const Tensor& dinp, const Tensor& g, double p, uint32_t key) {
  same_device("dropout_backward", dinp, {&g});
  same_numel("dropout_backward", dinp, g);
  LMF_CHECK(dinp.dtype() == DType::kF32 && g.dtype() == DType::kF32,
            "dropout_backward: fp32, got {} and {}", dtype_name(dinp.dtype()),
            dtype_name(g.dtype()));
  const Dropout m(p);
  dispatch_device(
      "dropout_backward", dinp,
      [&] {
        cpu::dropout_backward(dinp.data<float>(), g.data<float>(), g.numel(), m.cut, m.scale, key);
      },
      LMF_GPU(cuda::dropout_backward(dinp.data<float>(), g.data<float>(), g.numel(), m.cut, m.scale,
                                     key)));
}

void scale(const Tensor& x, double s) {
  dispatch(
      "scale", x,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::scale<T>(ptr<T>(x), static_cast<T>(s), x.numel());
      },
      LMF_GPU(cuda::scale(ptr<float>(x), static_cast<float>(s), x.numel())));
}

void axpby(const Tensor& y, double a, const Tensor& x, double b) {
  same_device("axpby", y, {&x});
  same_numel("axpby", y, x);
  dispatch(
      "axpby", y,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::axpby<T>(ptr<T>(y), static_cast<T>(a), cptr<T>(x), static_cast<T>(b), y.numel());
      },
      LMF_GPU(cuda::axpby(ptr<float>(y), static_cast<float>(a), cptr<float>(x),
                          static_cast<float>(b), y.numel())));
}

double sum_squares(const Tensor& x) {
  double r = 0;
  dispatch(
      "sum_squares", x,
      [&](auto tag) {
        using T = decltype(tag);
        r = cpu::sum_squares<T>(cptr<T>(x), x.numel());
      },
      LMF_GPU(r = gpu_reduce(cuda::sum_squares, x)));
  return r;
}

namespace {
void check_adamw(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                 const Tensor& param_bf16) {
  same_numel("adamw_update", param, grad);
  if (param_bf16.defined()) same_numel("adamw_update", param, param_bf16);
  for (const Tensor* t : {&grad, &m, &v, &param_bf16})
    LMF_CHECK(!t->defined() || t->device() == param.device(),
              "adamw_update: the parameter and its gradient, moments and bf16 copy on one device");
  if (param.dtype() == DType::kBF16)
    LMF_CHECK(!param_bf16.defined(), "adamw_update: a bf16 parameter is its own bf16 copy");
}

// bf16 master weights: the stochastic rounding's hash takes the low 32 bits of the flat index and
// the key its high word, so n elements from flat index sr_index are cut where the low word would
// wrap: fn(done, len, key, index0) per piece.
template <typename Fn>
void sr_pieces(int64_t n, int64_t sr_index, uint64_t sr_seed, int64_t step, Fn&& fn) {
  for (int64_t done = 0; done < n;) {
    const uint64_t index = static_cast<uint64_t>(sr_index + done);
    const int64_t len =
        std::min<int64_t>(n - done, (int64_t{1} << 32) - static_cast<int64_t>(index & 0xffffffffu));
    fn(done, len, sr_key(sr_seed, step, static_cast<uint32_t>(index >> 32)),
       static_cast<uint32_t>(index));
    done += len;
  }
}
}  // namespace

void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step, const Tensor& param_bf16, double grad_scale, uint64_t sr_seed,
                  int64_t sr_index) {
  check_adamw(param, grad, m, v, param_bf16);
  if (param.dtype() == DType::kBF16) {  // bf16 master weights, rounded stochastically
    uint16_t* p = param.bf16_data();
    const float* g = grad.data<float>();
    float *mp = m.data<float>(), *vp = v.data<float>();
    auto pieces = [&](auto&& kernel) {
      sr_pieces(param.numel(), sr_index, sr_seed, step,
                [&](int64_t done, int64_t len, uint32_t key, uint32_t index0) {
                  kernel(p + done, g + done, mp + done, vp + done, len, lr, beta1, beta2, eps,
                         weight_decay, step, grad_scale, key, index0);
                });
    };
    dispatch(
        "adamw_update", grad, [&](auto) { pieces(cpu::adamw_update_sr); },
        LMF_GPU(pieces(cuda::adamw_update_sr)));
    return;
  }
  uint16_t* p16 = param_bf16.defined() ? param_bf16.bf16_data() : nullptr;
  dispatch(
      "adamw_update", param,
      [&](auto) {
        cpu::adamw_update(param.data<float>(), grad.data<float>(), m.data<float>(), v.data<float>(),
                          p16, param.numel(), lr, beta1, beta2, eps, weight_decay, step,
                          grad_scale);
      },
      LMF_GPU(cuda::adamw_update(param.data<float>(), grad.data<float>(), m.data<float>(),
                                 v.data<float>(), p16, param.numel(), lr, beta1, beta2, eps,
                                 weight_decay, step, grad_scale)));
}

void adamw_update_all(const std::vector<AdamwItem>& items, double lr, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, double grad_scale,
                      uint64_t sr_seed) {
  if (items.empty()) return;
#ifdef LMFORGE_HAVE_CUDA
  bool gpu = true;  // every item on the GPU: one launch
  for (const AdamwItem& it : items) gpu = gpu && it.param.device() == Device::kCUDA;
  if (gpu) {
    profile::Scope scope("adamw_update_all", items[0].param);
    std::vector<cuda::AdamwSlot> slots;
    slots.reserve(items.size());
    for (const AdamwItem& it : items) {
      check_adamw(it.param, it.grad, it.m, it.v, it.param_bf16);
      LMF_CHECK(!it.keep_master || (it.param.dtype() == DType::kF32 && it.param_bf16.defined() &&
                                    it.param_bf16.dtype() == DType::kBF16),
                "adamw_update_all: keep_master needs an fp32 master and its bf16 value");
      const float* g = it.grad.data<float>();
      float *m = it.m.data<float>(), *v = it.v.data<float>();
      if (it.param.dtype() == DType::kBF16) {
        uint16_t* p = it.param.bf16_data();
        sr_pieces(it.param.numel(), it.sr_index, sr_seed, step,
                  [&](int64_t done, int64_t len, uint32_t key, uint32_t index0) {
                    slots.push_back({p + done, g + done, m + done, v + done, nullptr, len, key,
                                     index0, /*sr=*/true, it.decay});
                  });
      } else {
        slots.push_back({it.param.data<float>(), g, m, v,
                         it.param_bf16.defined() ? it.param_bf16.bf16_data() : nullptr,
                         it.param.numel(), 0, 0, /*sr=*/false, it.decay, it.keep_master});
      }
    }
    cuda::adamw_update_many(slots.data(), static_cast<int64_t>(slots.size()), lr, beta1, beta2, eps,
                            weight_decay, step, grad_scale);
    return;
  }
#endif
  // The CPU's update: one parallel loop per item.
  for (const AdamwItem& it : items) {
    if (it.keep_master) keep_master(it.param, it.param_bf16);
    adamw_update(it.param, it.grad, it.m, it.v, lr, beta1, beta2, eps,
                 it.decay ? weight_decay : 0.0, step, it.param_bf16, grad_scale, sr_seed,
                 it.sr_index);
  }
}

}  // namespace lmforge::ops
