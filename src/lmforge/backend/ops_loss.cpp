// The loss ops: softmax cross-entropy over rows of logits (forward, backward, both in one pass),
// the logits' soft-capping and the host sum of a tensor.
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/dispatch.h"
#include "lmforge/backend/distill_stats.h"
#include "lmforge/backend/ops.h"

namespace lmforge::ops {

using namespace detail;

void softmax_xent_rows(const Tensor& losses, const Tensor& logits, const Tensor& targets,
                       int32_t ignore_index, const Tensor& lse_sq_sum, int64_t vocab) {
  same_device("softmax_xent_rows", logits, {&losses, &targets, &lse_sq_sum});
  const int64_t ldx = last(logits), V = vocab > 0 ? vocab : ldx, N = rows(logits);
  LMF_CHECK(V <= ldx && (V == ldx || logits.device() == Device::kCUDA),
            "xent: vocab {} with logits rows of {} (padded rows: a GPU only)", V, ldx);
  LMF_CHECK(targets.numel() == N && losses.numel() == N, "xent: logits {} targets {}",
            logits.shape().str(), targets.shape().str());
  LMF_CHECK(lse_sq_sum.numel() == 1 && lse_sq_sum.dtype() == DType::kF64,
            "xent: lse_sq_sum is one double");
  dispatch(
      "softmax_xent_rows", logits,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::softmax_xent_forward<T>(ptr<T>(losses), cptr<T>(logits), targets.data<int32_t>(), N, V,
                                     ignore_index, lse_sq_sum.data<double>());
      },
      LMF_GPU(cuda::softmax_xent_forward(ptr<float>(losses), cptr<float>(logits),
                                         targets.data<int32_t>(), N, V, ignore_index,
                                         lse_sq_sum.data<double>(), ldx)));
}

void softcap_forward(const Tensor& x, double cap) {
  LMF_CHECK(cap > 0, "softcap_forward: cap {} (must be > 0)", cap);
  const int64_t N = rows(x), V = last(x);
  dispatch(
      "softcap_forward", x,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::softcap_rows<T>(ptr<T>(x), N, V, static_cast<T>(cap));
      },
      LMF_GPU(cuda::softcap_rows(ptr<float>(x), N, V, static_cast<float>(cap))));
}

void softcap_backward(const Tensor& dx, const Tensor& dy, const Tensor& y, double cap) {
  same_device("softcap_backward", y, {&dx, &dy});
  const int64_t N = rows(y), V = last(y), ldd = last(dx);
  LMF_CHECK(cap > 0 && dy.dtype() == y.dtype() && dy.numel() == y.numel() && rows(dx) == N &&
                (dx.dtype() == DType::kBF16 ? ldd >= V && y.dtype() == DType::kF32
                                            : ldd == V && dx.dtype() == y.dtype()),
            "softcap_backward: dx {} {} dy {} y {} cap {}", dx.shape().str(),
            dtype_name(dx.dtype()), dy.shape().str(), y.shape().str(), cap);
  const float c = static_cast<float>(cap);
  if (dx.dtype() == DType::kBF16) {
    dispatch(
        "softcap_backward", y,
        [&](auto) {
          cpu::softcap_grad_rows(static_cast<uint16_t*>(dx.bf16_data()), ldd, cptr<float>(dy),
                                 cptr<float>(y), N, V, c);
        },
        LMF_GPU(cuda::softcap_grad_rows(static_cast<uint16_t*>(dx.bf16_data()), ldd,
                                        cptr<float>(dy), cptr<float>(y), N, V, c)));
    return;
  }
  dispatch(
      "softcap_backward", y,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::softcap_grad_rows<T, T>(ptr<T>(dx), V, cptr<T>(dy), cptr<T>(y), N, V,
                                     static_cast<T>(cap));
      },
      LMF_GPU(
          cuda::softcap_grad_rows(ptr<float>(dx), V, cptr<float>(dy), cptr<float>(y), N, V, c)));
}

double sum(const Tensor& x) {
  double r = 0;
  dispatch(
      "sum", x,
      [&](auto tag) {
        using T = decltype(tag);
        const T* p = cptr<T>(x);
        for (int64_t i = 0; i < x.numel(); ++i) r += p[i];
      },
      LMF_GPU(r = gpu_reduce(cuda::sum, x)));
  return r;
}

double softmax_xent_forward(const Tensor& losses, const Tensor& logits, const Tensor& targets,
                            int32_t ignore_index, double* mean_lse_sq) {
  profile::Scope timed("softmax_xent_forward", logits);
  Tensor z = Tensor::empty({1}, DType::kF64, logits.device());
  softmax_xent_rows(losses, logits, targets, ignore_index, z);
  const Tensor y = targets.device() == Device::kCPU ? targets : targets.to(Device::kCPU);
  int64_t count = 0;
  for (int64_t i = 0; i < y.numel(); ++i) count += y.data<int32_t>()[i] != ignore_index;
  if (mean_lse_sq)
    *mean_lse_sq = count ? z.to(Device::kCPU).data<double>()[0] / static_cast<double>(count) : 0.0;
  return count ? sum(losses) / static_cast<double>(count) : 0.0;
}

void softmax_xent_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                           double dloss, int32_t ignore_index, double z_loss) {
  same_device("softmax_xent_backward", logits, {&dlogits, &targets});
  int64_t V = last(logits), N = rows(logits);
  LMF_CHECK(targets.numel() == N && rows(dlogits) == N &&
                (dlogits.dtype() == DType::kBF16 ? last(dlogits) >= V : last(dlogits) == V),
            "xent backward: logits {} targets {} dlogits {}", logits.shape().str(),
            targets.shape().str(), dlogits.shape().str());
  if (dlogits.dtype() == DType::kBF16) {  // the LM head's backward matmul input, already rounded
    const int64_t ld = last(dlogits);
    dispatch(
        "softmax_xent_backward", logits,
        [&](auto) {
          cpu::softmax_xent_backward_bf16(dlogits.bf16_data(), ld, cptr<float>(logits),
                                          targets.data<int32_t>(), static_cast<float>(dloss), N, V,
                                          ignore_index, z_loss);
        },
        LMF_GPU(cuda::softmax_xent_backward(dlogits.bf16_data(), ld, cptr<float>(logits),
                                            targets.data<int32_t>(), static_cast<float>(dloss), N,
                                            V, ignore_index, z_loss)));
    return;
  }
  dispatch(
      "softmax_xent_backward", logits,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::softmax_xent_backward<T>(ptr<T>(dlogits), cptr<T>(logits), targets.data<int32_t>(),
                                      static_cast<T>(dloss), N, V, ignore_index, z_loss);
      },
      LMF_GPU(cuda::softmax_xent_backward(ptr<float>(dlogits), cptr<float>(logits),
                                          targets.data<int32_t>(), static_cast<float>(dloss), N, V,
                                          ignore_index, z_loss)));
}

void softmax_xent_forward_backward(const Tensor& losses, const Tensor& lse_sq_sum,
                                   const Tensor& dlogits, const Tensor& logits,
                                   const Tensor& targets, int32_t ignore_index, double dloss,
                                   double z_loss, int64_t vocab, const Tensor& row_scale) {
  same_device("softmax_xent_forward_backward", logits, {&losses, &lse_sq_sum, &dlogits, &targets});
  if (row_scale.defined()) {
    same_device("softmax_xent_forward_backward", logits, {&row_scale});
    LMF_CHECK(row_scale.dtype() == DType::kF32 && row_scale.numel() == rows(logits),
              "xent: row_scale {} for {} rows (fp32)", row_scale.shape().str(), rows(logits));
  }
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  const int64_t ldx = last(logits), V = vocab > 0 ? vocab : ldx, N = rows(logits);
  LMF_CHECK(V <= ldx &&
                (V == ldx || (logits.device() == Device::kCUDA && dlogits.dtype() == DType::kBF16)),
            "xent: vocab {} with logits rows of {} (padded rows: a GPU and bf16 dlogits)", V, ldx);
  LMF_CHECK(targets.numel() == N && losses.numel() == N && rows(dlogits) == N &&
                (dlogits.dtype() == DType::kBF16 ? last(dlogits) >= V : last(dlogits) == V),
            "xent: logits {} targets {} dlogits {}", logits.shape().str(), targets.shape().str(),
            dlogits.shape().str());
  LMF_CHECK(lse_sq_sum.numel() == 1 && lse_sq_sum.dtype() == DType::kF64,
            "xent: lse_sq_sum is one double");
  const float dl = static_cast<float>(dloss);
  if (dlogits.dtype() == DType::kBF16) {  // the LM head's backward matmul input, already rounded
    const int64_t ld = last(dlogits);
    dispatch(
        "softmax_xent_forward_backward", logits,
        [&](auto) {
          cpu::softmax_xent_forward_backward_bf16(ptr<float>(losses), dlogits.bf16_data(), ld,
                                                  cptr<float>(logits), targets.data<int32_t>(), dl,
                                                  N, V, ignore_index, z_loss,
                                                  lse_sq_sum.data<double>(), rs);
        },
        LMF_GPU(cuda::softmax_xent_forward_backward(ptr<float>(losses), lse_sq_sum.data<double>(),
                                                    dlogits.bf16_data(), ld, cptr<float>(logits),
                                                    targets.data<int32_t>(), dl, N, V, ignore_index,
                                                    z_loss, ldx, rs)));
    return;
  }
  dispatch(
      "softmax_xent_forward_backward", logits,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::softmax_xent_forward_backward<T>(ptr<T>(losses), ptr<T>(dlogits), cptr<T>(logits),
                                              targets.data<int32_t>(), static_cast<T>(dloss), N, V,
                                              ignore_index, z_loss, lse_sq_sum.data<double>(), rs);
      },
      LMF_GPU(cuda::softmax_xent_forward_backward(
          ptr<float>(losses), lse_sq_sum.data<double>(), ptr<float>(dlogits), cptr<float>(logits),
          targets.data<int32_t>(), dl, N, V, ignore_index, z_loss, rs)));
}

namespace {
// The row stride of a distillation teacher's logits (N rows of V columns; padded past them on a
// GPU only, as its own LM head's chunk is).
int64_t teacher_stride(const char* op, const Tensor& teacher, int64_t N, int64_t V) {
  const int64_t ldt = last(teacher);
  LMF_CHECK(teacher.dtype() == DType::kF32 && rows(teacher) == N &&
                (ldt == V || (ldt > V && teacher.device() == Device::kCUDA)),
            "{}: teacher logits {} for {} rows of {} columns (padded rows: a GPU only)", op,
            teacher.shape().str(), N, V);
  return ldt;
}

// The columns of a vocabulary part's logits (rows padded past them on a GPU only).
int64_t part_columns(const char* op, const Tensor& logits, int64_t vocab) {
  const int64_t ldx = last(logits), V = vocab > 0 ? vocab : ldx;
  LMF_CHECK(V <= ldx && (V == ldx || logits.device() == Device::kCUDA),
            "{}: {} columns in logits rows of {} (padded rows: a GPU only)", op, V, ldx);
  return V;
}
}  // namespace

void softmax_xent_stats(const Tensor& stats, const Tensor& logits, const Tensor& targets,
                        int32_t ignore_index, int64_t v0, int64_t vocab_total, int64_t vocab) {
  same_device("softmax_xent_stats", logits, {&stats, &targets});
  const int64_t N = rows(logits), V = part_columns("softmax_xent_stats", logits, vocab);
  LMF_CHECK(logits.dtype() == DType::kF32 && stats.dtype() == DType::kF64 &&
                stats.numel() == 3 * N && targets.numel() == N && v0 >= 0 && v0 + V <= vocab_total,
            "softmax_xent_stats: logits {} (columns {} of {}) stats {} targets {}",
            logits.shape().str(), v0, vocab_total, stats.shape().str(), targets.shape().str());
  dispatch(
      "softmax_xent_stats", logits,
      [&](auto) {
        cpu::softmax_xent_stats(stats.data<double>(), logits.data<float>(), targets.data<int32_t>(),
                                N, V, ignore_index, v0, vocab_total);
      },
      LMF_GPU(cuda::softmax_xent_stats(stats.data<double>(), logits.data<float>(),
                                       targets.data<int32_t>(), N, V, ignore_index, v0, vocab_total,
                                       last(logits))));
}

void softmax_xent_parallel(const Tensor& losses, const Tensor& lse_sq_sum, const Tensor& dlogits,
                           const Tensor& logits, const Tensor& targets, const Tensor& all_stats,
                           int32_t ignore_index, double dloss, double z_loss, int64_t v0,
                           const Tensor& row_scale, int64_t vocab) {
  same_device("softmax_xent_parallel", logits,
              {&losses, &lse_sq_sum, &dlogits, &targets, &all_stats, &row_scale});
  const int64_t N = rows(logits), V = part_columns("softmax_xent_parallel", logits, vocab);
  const int64_t ldx = last(logits), P = N > 0 ? all_stats.numel() / (3 * N) : 0;
  const bool bf16 = dlogits.defined() && dlogits.dtype() == DType::kBF16;
  // (fp32 dlogits: in the logits' own rows, which they may alias)
  LMF_CHECK(logits.dtype() == DType::kF32 && all_stats.dtype() == DType::kF64 &&
                all_stats.numel() == 3 * N * P && targets.numel() == N && losses.numel() == N &&
                lse_sq_sum.numel() == 1 && lse_sq_sum.dtype() == DType::kF64 &&
                (!dlogits.defined() ||
                 (rows(dlogits) == N && (bf16 ? last(dlogits) >= V : last(dlogits) == ldx))) &&
                (!row_scale.defined() || row_scale.numel() == N),
            "softmax_xent_parallel: logits {} stats {} targets {} dlogits {}", logits.shape().str(),
            all_stats.shape().str(), targets.shape().str(),
            dlogits.defined() ? dlogits.shape().str() : "none");
  float* d32 = dlogits.defined() && !bf16 ? dlogits.data<float>() : nullptr;
  uint16_t* d16 = bf16 ? dlogits.bf16_data() : nullptr;
  const int64_t ld = bf16 ? last(dlogits) : ldx;
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  dispatch(
      "softmax_xent_parallel", logits,
      [&](auto) {
        cpu::softmax_xent_parallel(losses.data<float>(), lse_sq_sum.data<double>(), d32, d16, ld,
                                   logits.data<float>(), targets.data<int32_t>(),
                                   all_stats.data<double>(), P, static_cast<float>(dloss), N, V,
                                   ignore_index, z_loss, v0, rs);
      },
      LMF_GPU(cuda::softmax_xent_parallel(losses.data<float>(), lse_sq_sum.data<double>(), d32, d16,
                                          ld, logits.data<float>(), targets.data<int32_t>(),
                                          all_stats.data<double>(), P, static_cast<float>(dloss), N,
                                          V, ignore_index, z_loss, v0, rs, ldx)));
}

void softmax_distill_forward_backward(const Tensor& losses, const Tensor& kl, const Tensor& dlogits,
                                      const Tensor& logits, const Tensor& teacher,
                                      const Tensor& targets, int32_t ignore_index, double dloss,
                                      double alpha, double temperature, int64_t vocab) {
  same_device("softmax_distill_forward_backward", logits,
              {&losses, &kl, &dlogits, &teacher, &targets});
  const int64_t ldx = last(logits), V = vocab > 0 ? vocab : ldx, N = rows(logits);
  const bool bf16 = dlogits.dtype() == DType::kBF16;
  const int64_t ldt = teacher_stride("distill", teacher, N, V);
  LMF_CHECK(logits.dtype() == DType::kF32 && targets.numel() == N && losses.numel() == N &&
                kl.numel() == N && rows(dlogits) == N &&
                (bf16 ? last(dlogits) >= V : last(dlogits) == V) &&
                (V == ldx || (logits.device() == Device::kCUDA && bf16)),
            "distill: logits {} teacher {} targets {} dlogits {}", logits.shape().str(),
            teacher.shape().str(), targets.shape().str(), dlogits.shape().str());
  const float dl = static_cast<float>(dloss);
  if (bf16) {
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::softmax_distill_forward_backward(
          ptr<float>(losses) + r0, ptr<float>(kl) + r0, dst, cptr<float>(logits) + r0 * V,
          cptr<float>(teacher) + r0 * V, targets.data<int32_t>() + r0, dl, n, V, ignore_index,
          alpha, temperature);
    };
    dispatch_device(
        "softmax_distill_forward_backward", logits,
        [&]() { cpu_rows_bf16("softmax_distill_forward_backward", dlogits, N, V, fill); },
        LMF_GPU(cuda::softmax_distill_forward_backward(
            ptr<float>(losses), ptr<float>(kl), nullptr, dlogits.bf16_data(), last(dlogits),
            cptr<float>(logits), ldx, cptr<float>(teacher), ldt, targets.data<int32_t>(), dl, N, V,
            ignore_index, alpha, temperature)));
    return;
  }
  dispatch_device(
      "softmax_distill_forward_backward", logits,
      [&]() {
        cpu::softmax_distill_forward_backward(ptr<float>(losses), ptr<float>(kl),
                                              ptr<float>(dlogits), cptr<float>(logits),
                                              cptr<float>(teacher), targets.data<int32_t>(), dl, N,
                                              V, ignore_index, alpha, temperature);
      },
      LMF_GPU(cuda::softmax_distill_forward_backward(
          ptr<float>(losses), ptr<float>(kl), ptr<float>(dlogits), nullptr, V, cptr<float>(logits),
          ldx, cptr<float>(teacher), ldt, targets.data<int32_t>(), dl, N, V, ignore_index, alpha,
          temperature)));
}

void softmax_distill_stats(const Tensor& stats, const Tensor& logits, const Tensor& teacher,
                           const Tensor& targets, int32_t ignore_index, int64_t v0,
                           int64_t vocab_total, double temperature, int64_t vocab) {
  same_device("softmax_distill_stats", logits, {&stats, &teacher, &targets});
  const int64_t N = rows(logits), V = part_columns("softmax_distill_stats", logits, vocab);
  const int64_t ldt = teacher_stride("softmax_distill_stats", teacher, N, V);
  LMF_CHECK(logits.dtype() == DType::kF32 && stats.dtype() == DType::kF64 &&
                stats.numel() == kDistillStats * N && targets.numel() == N && v0 >= 0 &&
                v0 + V <= vocab_total && temperature > 0,
            "softmax_distill_stats: logits {} (columns {} of {}) teacher {} stats {} targets {}",
            logits.shape().str(), v0, vocab_total, teacher.shape().str(), stats.shape().str(),
            targets.shape().str());
  dispatch_device(
      "softmax_distill_stats", logits,
      [&]() {
        cpu::softmax_distill_stats(stats.data<double>(), cptr<float>(logits), cptr<float>(teacher),
                                   targets.data<int32_t>(), N, V, ignore_index, v0, vocab_total,
                                   temperature);
      },
      LMF_GPU(cuda::softmax_distill_stats(stats.data<double>(), cptr<float>(logits), last(logits),
                                          cptr<float>(teacher), ldt, targets.data<int32_t>(), N, V,
                                          ignore_index, v0, vocab_total, temperature)));
}

void softmax_distill_parallel(const Tensor& losses, const Tensor& kl, const Tensor& dlogits,
                              const Tensor& logits, const Tensor& teacher, const Tensor& targets,
                              const Tensor& all_stats, int32_t ignore_index, double dloss,
                              double alpha, double temperature, int64_t v0, int64_t vocab) {
  same_device("softmax_distill_parallel", logits,
              {&losses, &kl, &dlogits, &teacher, &targets, &all_stats});
  const int64_t N = rows(logits), V = part_columns("softmax_distill_parallel", logits, vocab);
  const int64_t ldx = last(logits), P = N > 0 ? all_stats.numel() / (kDistillStats * N) : 0;
  const bool bf16 = dlogits.defined() && dlogits.dtype() == DType::kBF16;
  // (fp32 dlogits: in the logits' own rows, which they may alias)
  const int64_t ldt = teacher_stride("softmax_distill_parallel", teacher, N, V);
  LMF_CHECK(logits.dtype() == DType::kF32 && all_stats.dtype() == DType::kF64 &&
                all_stats.numel() == kDistillStats * N * P && targets.numel() == N &&
                losses.numel() == N && kl.numel() == N &&
                (!dlogits.defined() ||
                 (rows(dlogits) == N && (bf16 ? last(dlogits) >= V : last(dlogits) == ldx))),
            "softmax_distill_parallel: logits {} teacher {} stats {} targets {} dlogits {}",
            logits.shape().str(), teacher.shape().str(), all_stats.shape().str(),
            targets.shape().str(), dlogits.defined() ? dlogits.shape().str() : "none");
  const float dl = static_cast<float>(dloss);
  dispatch_device(
      "softmax_distill_parallel", logits,
      [&]() {
        if (!bf16) {
          cpu::softmax_distill_parallel(
              ptr<float>(losses), ptr<float>(kl), dlogits.defined() ? ptr<float>(dlogits) : nullptr,
              cptr<float>(logits), cptr<float>(teacher), targets.data<int32_t>(),
              all_stats.data<double>(), P, dl, N, 0, N, V, ignore_index, alpha, temperature, v0);
          return;
        }
        // bf16 dlogits: each block of rows in fp32 first (the statistics are indexed by row, so
        // the blocks take the whole table and their rows' offset)
        cpu_rows_bf16(
            "softmax_distill_parallel", dlogits, N, V, [&](float* d, int64_t r0, int64_t n) {
              cpu::softmax_distill_parallel(ptr<float>(losses), ptr<float>(kl), d,
                                            cptr<float>(logits), cptr<float>(teacher),
                                            targets.data<int32_t>(), all_stats.data<double>(), P,
                                            dl, N, r0, n, V, ignore_index, alpha, temperature, v0);
            });
      },
      LMF_GPU(cuda::softmax_distill_parallel(
          ptr<float>(losses), ptr<float>(kl),
          bf16 || !dlogits.defined() ? nullptr : ptr<float>(dlogits),
          bf16 ? dlogits.bf16_data() : nullptr, bf16 ? last(dlogits) : ldx, cptr<float>(logits),
          ldx, cptr<float>(teacher), ldt, targets.data<int32_t>(), all_stats.data<double>(), P, dl,
          N, V, ignore_index, alpha, temperature, v0)));
}

}  // namespace lmforge::ops
