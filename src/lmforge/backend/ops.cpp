// The layer ops (linear, embedding, norms, RoPE, attention, activations); dispatch and the shared
// helpers are in dispatch.h, the loss in ops_loss.cpp, whole-buffer ops and AdamW in ops_optim.cpp.
#include "lmforge/backend/ops.h"

#include <omp.h>

#include <algorithm>

#include "lmforge/backend/cuda/attention.h"
#include "lmforge/backend/cuda/cudnn_attention.h"
#include "lmforge/backend/cuda/kernels.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/backend/dispatch.h"

namespace lmforge::ops {

using namespace detail;

namespace {

#ifdef LMFORGE_HAVE_CUDA
// Attention under bf16 mixed precision tries cuDNN's fused flash attention first (see ops.h).
bool try_cudnn_attention(bool bf16, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                         int64_t window) {
  return bf16 && cuda::cudnn_attention_enabled() &&
         cuda::cudnn_attention_supported(B, T, NH, NKV, HS, window);
}
#endif

// The matmul FLOPs of causal attention's forward: QK^T and PV over the (query, key) pairs a
// query sees (t + 1 of them, at most window); the backward is 2.5 times that (five matmuls,
// the scores recomputed), as FlashAttention counts it.
double attention_flops(int64_t B, int64_t T, int64_t NH, int64_t HS, int64_t window) {
  double pairs = 0;
  for (int64_t t = 0; t < T; ++t)
    pairs += static_cast<double>(window > 0 ? std::min(t + 1, window) : t + 1);
  return 4.0 * static_cast<double>(B * NH * HS) * pairs;
}

}  // namespace

void linear_forward(const Tensor& out, const Tensor& inp, const Tensor& weight,
                    const Tensor& bias) {
  int64_t OC = weight.size(0), C = weight.size(1), N = inp.numel() / C;
  LMF_CHECK(last(inp) == C && out.numel() == N * OC, "linear: inp {} weight {} out {}",
            inp.shape().str(), weight.shape().str(), out.shape().str());
  same_device("linear_forward", out, {&inp, &weight, &bias});
  const bool bf16 = weight.dtype() == DType::kBF16;
  profile::Scope timed(bf16 ? "linear_forward_bf16" : "linear_forward", out,
                       2.0 * static_cast<double>(N) * C * OC);
  LMF_CHECK(bf16 || inp.dtype() != DType::kBF16,
            "linear_forward: a bf16 input needs a bf16 weight");
  if (bf16) {  // bf16 mixed precision: fp32 or bf16 activations, bf16 weights
    // The kernels take the input as it is: a bf16 one goes straight into the matmul.
    auto run = [&](auto&& kernel) {
      if (inp.dtype() == DType::kBF16)
        kernel(out.data<float>(), static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(),
               cptr<float>(bias), N, C, OC);
      else
        kernel(out.data<float>(), inp.data<float>(), weight.bf16_data(), cptr<float>(bias), N, C,
               OC);
    };
    dispatch(
        "linear_forward_bf16", out,
        [&](auto) { run([](auto... a) { cpu::linear_forward_bf16(a...); }); },
        LMF_GPU(run([](auto... a) { cuda::linear_forward_bf16(a...); })));
    return;
  }
  dispatch(
      "linear_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::linear_forward<T>(ptr<T>(out), cptr<T>(inp), cptr<T>(weight), cptr<T>(bias), N, C, OC);
      },
      LMF_GPU(cuda::linear_forward(ptr<float>(out), cptr<float>(inp), cptr<float>(weight),
                                   cptr<float>(bias), N, C, OC)));
}

void linear_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                     const Tensor& dout, const Tensor& inp, const Tensor& weight) {
  int64_t OC = weight.size(0), C = weight.size(1), N = inp.numel() / C;
  same_device("linear_backward", dout, {&dinp, &dweight, &dbias, &inp, &weight});
  const bool bf16 = weight.dtype() == DType::kBF16;
  if (dout.dtype() == DType::kBF16) {
    // A bf16 output gradient, already rounded (the LM head's dlogits), rows ld >= OC apart.
    const int64_t ld = last(dout);
    LMF_CHECK(bf16 && inp.dtype() == DType::kBF16 && !dbias.raw() && rows(dout) == N && ld >= OC,
              "linear_backward: a bf16 dout {} needs bf16 weight and input and no bias (N={} "
              "OC={})",
              dout.shape().str(), N, OC);
    profile::Scope timed(
        "linear_backward_bf16", dout,
        2.0 * static_cast<double>(N) * C * OC * ((dinp.raw() ? 1 : 0) + (dweight.raw() ? 1 : 0)));
    auto run = [&](auto&& kernel) {
      kernel(ptr<float>(dinp), ptr<float>(dweight), static_cast<const uint16_t*>(dout.bf16_data()),
             ld, static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(), N, C, OC);
    };
    dispatch(
        "linear_backward_bf16", dinp.raw() ? dinp : dweight,
        [&](auto) { run([](auto... a) { cpu::linear_backward_bf16_dout(a...); }); },
        LMF_GPU(run([](auto... a) { cuda::linear_backward_bf16_dout(a...); })));
    return;
  }
  LMF_CHECK(dout.numel() == N * OC, "linear_backward: dout {} for N={} OC={}", dout.shape().str(),
            N, OC);
  profile::Scope timed(
      bf16 ? "linear_backward_bf16" : "linear_backward", dout,
      2.0 * static_cast<double>(N) * C * OC * ((dinp.raw() ? 1 : 0) + (dweight.raw() ? 1 : 0)));
  LMF_CHECK(bf16 || inp.dtype() != DType::kBF16,
            "linear_backward: a bf16 input needs a bf16 weight");
  if (bf16) {
    auto run = [&](auto&& kernel) {
      if (inp.dtype() == DType::kBF16)
        kernel(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias), dout.data<float>(),
               static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(), N, C, OC);
      else
        kernel(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias), dout.data<float>(),
               inp.data<float>(), weight.bf16_data(), N, C, OC);
    };
    dispatch(
        "linear_backward_bf16", dout,
        [&](auto) { run([](auto... a) { cpu::linear_backward_bf16(a...); }); },
        LMF_GPU(run([](auto... a) { cuda::linear_backward_bf16(a...); })));
    return;
  }
  dispatch(
      "linear_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::linear_backward<T>(ptr<T>(dinp), ptr<T>(dweight), ptr<T>(dbias), cptr<T>(dout),
                                cptr<T>(inp), cptr<T>(weight), N, C, OC);
      },
      LMF_GPU(cuda::linear_backward(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias),
                                    cptr<float>(dout), cptr<float>(inp), cptr<float>(weight), N, C,
                                    OC)));
}

void embedding_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte,
                       const Tensor& wpe) {
  int64_t B = tokens.size(0), T_ = tokens.size(1), V = wte.size(0), C = wte.size(1);
  LMF_CHECK(out.numel() == B * T_ * C, "embedding: out {} tokens {}", out.shape().str(),
            tokens.shape().str());
  LMF_CHECK(!wpe.raw() || wpe.size(0) >= T_, "embedding: T={} beyond {} positions", T_,
            wpe.size(0));
  LMF_CHECK(!wpe.raw() || wpe.dtype() == wte.dtype(), "embedding: wte {} but wpe {}",
            dtype_name(wte.dtype()), dtype_name(wpe.dtype()));
  if (wte.dtype() == DType::kBF16) {  // bf16 master weights: the tables widened on the way
    const uint16_t* e = wte.bf16_data();
    const uint16_t* p = wpe.raw() ? wpe.bf16_data() : nullptr;
    dispatch(
        "embedding_forward", out,
        [&](auto tag) {
          if constexpr (std::is_same_v<decltype(tag), float>)
            cpu::embedding_forward(ptr<float>(out), tokens.data<int32_t>(), e, p, B, T_, C, V);
          else
            LMF_CHECK(false, "embedding_forward: a bf16 table gives fp32 rows");
        },
        LMF_GPU(
            cuda::embedding_forward(ptr<float>(out), tokens.data<int32_t>(), e, p, B, T_, C, V)));
    return;
  }
  dispatch(
      "embedding_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::embedding_forward(ptr<T>(out), tokens.data<int32_t>(), cptr<T>(wte), cptr<T>(wpe), B,
                               T_, C, V);
      },
      LMF_GPU(cuda::embedding_forward(ptr<float>(out), tokens.data<int32_t>(), cptr<float>(wte),
                                      cptr<float>(wpe), B, T_, C, V)));
}

void embedding_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                        const Tensor& tokens) {
  int64_t B = tokens.size(0), T_ = tokens.size(1), V = dwte.size(0), C = dwte.size(1);
  dispatch(
      "embedding_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::embedding_backward<T>(ptr<T>(dwte), ptr<T>(dwpe), cptr<T>(dout),
                                   tokens.data<int32_t>(), B, T_, C, V);
      },
      LMF_GPU(cuda::embedding_backward(ptr<float>(dwte), ptr<float>(dwpe), cptr<float>(dout),
                                       tokens.data<int32_t>(), B, T_, C, V)));
}

void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                       const Tensor& weight, const Tensor& bias, double eps) {
  same_numel("layernorm_forward", out, inp);
  if (out.dtype() == DType::kBF16) {  // bf16 activations (the output feeds a bf16 matmul)
    const int64_t N = rows(inp), C = last(inp);
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::layernorm_forward<float>(dst, ptr<float>(mean) + r0, ptr<float>(rstd) + r0,
                                    cptr<float>(inp) + r0 * C, cptr<float>(weight),
                                    cptr<float>(bias), n, C, eps);
    };
    dispatch(
        "layernorm_forward", inp,
        [&](auto) { cpu_rows_bf16("layernorm_forward", out, N, C, fill); },
        LMF_GPU(cuda::layernorm_forward(out.bf16_data(), ptr<float>(mean), ptr<float>(rstd),
                                        cptr<float>(inp), cptr<float>(weight), cptr<float>(bias), N,
                                        C, eps)));
    return;
  }
  dispatch(
      "layernorm_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::layernorm_forward<T>(ptr<T>(out), ptr<T>(mean), ptr<T>(rstd), cptr<T>(inp),
                                  cptr<T>(weight), cptr<T>(bias), rows(inp), last(inp), eps);
      },
      LMF_GPU(cuda::layernorm_forward(ptr<float>(out), ptr<float>(mean), ptr<float>(rstd),
                                      cptr<float>(inp), cptr<float>(weight), cptr<float>(bias),
                                      rows(inp), last(inp), eps)));
}

void layernorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                        const Tensor& dout, const Tensor& inp, const Tensor& weight,
                        const Tensor& mean, const Tensor& rstd) {
  dispatch(
      "layernorm_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::layernorm_backward<T>(ptr<T>(dinp), ptr<T>(dweight), ptr<T>(dbias), cptr<T>(dout),
                                   cptr<T>(inp), cptr<T>(weight), cptr<T>(mean), cptr<T>(rstd),
                                   rows(inp), last(inp));
      },
      LMF_GPU(cuda::layernorm_backward(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias),
                                       cptr<float>(dout), cptr<float>(inp), cptr<float>(weight),
                                       cptr<float>(mean), cptr<float>(rstd), rows(inp),
                                       last(inp))));
}

void rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& weight,
                     double eps) {
  same_numel("rmsnorm_forward", out, inp);
  if (out.dtype() == DType::kBF16) {  // bf16 activations
    const int64_t N = rows(inp), C = last(inp);
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::rmsnorm_forward<float>(dst, ptr<float>(rstd) + r0, cptr<float>(inp) + r0 * C,
                                  cptr<float>(weight), n, C, eps, 1, C);
    };
    dispatch(
        "rmsnorm_forward", inp, [&](auto) { cpu_rows_bf16("rmsnorm_forward", out, N, C, fill); },
        LMF_GPU(cuda::rmsnorm_forward(out.bf16_data(), ptr<float>(rstd), cptr<float>(inp),
                                      cptr<float>(weight), N, C, eps, 1, C)));
    return;
  }
  dispatch(
      "rmsnorm_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::rmsnorm_forward<T>(ptr<T>(out), ptr<T>(rstd), cptr<T>(inp), cptr<T>(weight), rows(inp),
                                last(inp), eps, 1, last(inp));
      },
      LMF_GPU(cuda::rmsnorm_forward(ptr<float>(out), ptr<float>(rstd), cptr<float>(inp),
                                    cptr<float>(weight), rows(inp), last(inp), eps, 1, last(inp))));
}

void rmsnorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dout,
                      const Tensor& inp, const Tensor& weight, const Tensor& rstd) {
  dispatch(
      "rmsnorm_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::rmsnorm_backward<T>(ptr<T>(dinp), ptr<T>(dweight), cptr<T>(dout), cptr<T>(inp),
                                 cptr<T>(weight), cptr<T>(rstd), rows(inp), last(inp), 1,
                                 last(inp));
      },
      LMF_GPU(cuda::rmsnorm_backward(ptr<float>(dinp), ptr<float>(dweight), cptr<float>(dout),
                                     cptr<float>(inp), cptr<float>(weight), cptr<float>(rstd),
                                     rows(inp), last(inp), 1, last(inp))));
}

void qk_norm_forward(const Tensor& out, const Tensor& rstd_q, const Tensor& rstd_k,
                     const Tensor& inp, const Tensor& wq, const Tensor& wk, int64_t NH, int64_t NKV,
                     double eps) {
  const int64_t HS = wq.numel(), Cq = inp.size(-1), N = inp.numel() / Cq;
  LMF_CHECK(Cq == (NH + 2 * NKV) * HS && out.numel() == inp.numel() && wk.numel() == HS &&
                rstd_q.numel() == N * NH && rstd_k.numel() == N * NKV,
            "qk_norm: inp {} wq {} rstd_q {} NH={} NKV={}", inp.shape().str(), wq.shape().str(),
            rstd_q.shape().str(), NH, NKV);
  out.copy_from(inp);  // v passes through
  dispatch("qk_norm_forward", out, [&](auto tag) {
    using T = decltype(tag);
    cpu::rmsnorm_forward<T>(ptr<T>(out), ptr<T>(rstd_q), cptr<T>(inp), cptr<T>(wq), N * NH, HS, eps,
                            NH, Cq);
    cpu::rmsnorm_forward<T>(ptr<T>(out) + NH * HS, ptr<T>(rstd_k), cptr<T>(inp) + NH * HS,
                            cptr<T>(wk), N * NKV, HS, eps, NKV, Cq);
  });
}

void qk_norm_backward(const Tensor& dinp, const Tensor& dwq, const Tensor& dwk, const Tensor& dout,
                      const Tensor& inp, const Tensor& wq, const Tensor& wk, const Tensor& rstd_q,
                      const Tensor& rstd_k, int64_t NH, int64_t NKV) {
  const int64_t HS = wq.numel(), Cq = inp.size(-1), N = inp.numel() / Cq;
  same_numel("qk_norm_backward", dinp, dout);
  dispatch("qk_norm_backward", dout, [&](auto tag) {
    using T = decltype(tag);
    cpu::rmsnorm_backward<T>(ptr<T>(dinp), ptr<T>(dwq), cptr<T>(dout), cptr<T>(inp), cptr<T>(wq),
                             cptr<T>(rstd_q), N * NH, HS, NH, Cq);
    cpu::rmsnorm_backward<T>(ptr<T>(dinp) + NH * HS, ptr<T>(dwk), cptr<T>(dout) + NH * HS,
                             cptr<T>(inp) + NH * HS, cptr<T>(wk), cptr<T>(rstd_k), N * NKV, HS, NKV,
                             Cq);
    const int64_t v0 = (NH + NKV) * HS, nv = NKV * HS;  // v passes through
    T* d = ptr<T>(dinp);
    const T* g = cptr<T>(dout);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = v0; c < v0 + nv; ++c) d[i * Cq + c] += g[i * Cq + c];
  });
}

namespace {
void rope(const char* op, bool backward, const Tensor& x, const Tensor& cos, const Tensor& sin,
          int64_t NH, int64_t NKV, int64_t pos0) {
  int64_t B = x.size(0), T_ = x.size(1), Cq = x.size(2), HS = Cq / (NH + 2 * NKV);
  LMF_CHECK(pos0 + T_ <= cos.size(0) && cos.size(1) * 2 == HS, "{}: T={} pos0={} table {} HS={}",
            op, T_, pos0, cos.shape().str(), HS);
  dispatch(
      op, x,
      [&](auto tag) {
        using T = decltype(tag);
        auto f = backward ? cpu::rope_backward<T> : cpu::rope_forward<T>;
        // q and k heads are adjacent: NH + NKV heads from the start of each row.
        f(ptr<T>(x), cos.data<float>(), sin.data<float>(), B, T_, NH + NKV, HS, Cq, pos0);
      },
      LMF_GPU((backward ? cuda::rope_backward : cuda::rope_forward)(
          ptr<float>(x), cos.data<float>(), sin.data<float>(), B, T_, NH + NKV, HS, Cq, pos0)));
}
}  // namespace

void rope_forward(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                  int64_t n_kv_head, int64_t pos0) {
  rope("rope_forward", false, qkv, cos, sin, n_head, n_kv_head, pos0);
}

void rope_backward(const Tensor& dqkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                   int64_t n_kv_head, int64_t pos0) {
  rope("rope_backward", true, dqkv, cos, sin, n_head, n_kv_head, pos0);
}

void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& qkv, int64_t NH,
                       int64_t NKV, int64_t window, [[maybe_unused]] bool bf16) {
  int64_t B = qkv.size(0), T_ = qkv.size(1), HS = qkv.size(2) / (NH + 2 * NKV);
  LMF_CHECK(NH % NKV == 0 && qkv.size(2) == (NH + 2 * NKV) * HS && lse.numel() == B * NH * T_ &&
                out.numel() == B * T_ * NH * HS,
            "attention: qkv {} lse {} out {} NH={} NKV={}", qkv.shape().str(), lse.shape().str(),
            out.shape().str(), NH, NKV);
  profile::Scope timed("attention_forward", out, attention_flops(B, T_, NH, HS, window));
  dispatch(
      "attention_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::attention_forward<T>(ptr<T>(out), ptr<T>(lse), cptr<T>(qkv), B, T_, NH, NKV, HS,
                                  window);
      },
      LMF_GPU(if (!try_cudnn_attention(bf16, B, T_, NH, NKV, HS, window) ||
                  !cuda::cudnn_attention_forward(ptr<float>(out), ptr<float>(lse), cptr<float>(qkv),
                                                 B, T_, NH, NKV, HS))
                  cuda::attention_forward(ptr<float>(out), ptr<float>(lse), cptr<float>(qkv), B, T_,
                                          NH, NKV, HS, window)));
}

void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                        const Tensor& out, const Tensor& lse, int64_t NH, int64_t NKV,
                        int64_t window, [[maybe_unused]] bool bf16) {
  int64_t B = qkv.size(0), T_ = qkv.size(1), HS = qkv.size(2) / (NH + 2 * NKV);
  LMF_CHECK(NH % NKV == 0 && qkv.size(2) == (NH + 2 * NKV) * HS && lse.numel() == B * NH * T_ &&
                out.numel() == B * T_ * NH * HS && dout.numel() == out.numel() &&
                dqkv.numel() == qkv.numel(),
            "attention_backward: qkv {} dqkv {} out {} dout {} lse {} NH={} NKV={}",
            qkv.shape().str(), dqkv.shape().str(), out.shape().str(), dout.shape().str(),
            lse.shape().str(), NH, NKV);
  profile::Scope timed("attention_backward", dout, 2.5 * attention_flops(B, T_, NH, HS, window));
  dispatch(
      "attention_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::attention_backward<T>(ptr<T>(dqkv), cptr<T>(dout), cptr<T>(qkv), cptr<T>(out),
                                   cptr<T>(lse), B, T_, NH, NKV, HS, window);
      },
      LMF_GPU(if (!try_cudnn_attention(bf16, B, T_, NH, NKV, HS, window) ||
                  !cuda::cudnn_attention_backward(ptr<float>(dqkv), cptr<float>(dout),
                                                  cptr<float>(qkv), cptr<float>(out),
                                                  cptr<float>(lse), B, T_, NH, NKV, HS))
                  cuda::attention_backward(ptr<float>(dqkv), cptr<float>(dout), cptr<float>(qkv),
                                           cptr<float>(out), cptr<float>(lse), B, T_, NH, NKV, HS,
                                           window)));
}

void gelu_forward(const Tensor& out, const Tensor& inp) {
  same_numel("gelu_forward", out, inp);
  if (out.dtype() == DType::kBF16) {  // bf16 activations
    const int64_t N = rows(inp), F = last(inp);
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::gelu_forward<float>(dst, cptr<float>(inp) + r0 * F, n * F);
    };
    dispatch(
        "gelu_forward", inp, [&](auto) { cpu_rows_bf16("gelu_forward", out, N, F, fill); },
        LMF_GPU(cuda::gelu_forward(out.bf16_data(), cptr<float>(inp), inp.numel())));
    return;
  }
  dispatch(
      "gelu_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::gelu_forward<T>(ptr<T>(out), cptr<T>(inp), inp.numel());
      },
      LMF_GPU(cuda::gelu_forward(ptr<float>(out), cptr<float>(inp), inp.numel())));
}

void gelu_backward(const Tensor& dinp, const Tensor& inp, const Tensor& dout) {
  dispatch(
      "gelu_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::gelu_backward<T>(ptr<T>(dinp), cptr<T>(inp), cptr<T>(dout), inp.numel());
      },
      LMF_GPU(
          cuda::gelu_backward(ptr<float>(dinp), cptr<float>(inp), cptr<float>(dout), inp.numel())));
}

void swiglu_forward(const Tensor& out, const Tensor& inp) {
  int64_t F = last(inp) / 2, N = rows(inp);
  LMF_CHECK(out.numel() == N * F, "swiglu: inp {} out {}", inp.shape().str(), out.shape().str());
  if (out.dtype() == DType::kBF16) {  // bf16 activations
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::swiglu_forward<float>(dst, cptr<float>(inp) + r0 * 2 * F, n, F);
    };
    dispatch(
        "swiglu_forward", inp, [&](auto) { cpu_rows_bf16("swiglu_forward", out, N, F, fill); },
        LMF_GPU(cuda::swiglu_forward(out.bf16_data(), cptr<float>(inp), N, F)));
    return;
  }
  dispatch(
      "swiglu_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::swiglu_forward<T>(ptr<T>(out), cptr<T>(inp), N, F);
      },
      LMF_GPU(cuda::swiglu_forward(ptr<float>(out), cptr<float>(inp), N, F)));
}

void swiglu_backward(const Tensor& dinp, const Tensor& inp, const Tensor& dout) {
  dispatch(
      "swiglu_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::swiglu_backward<T>(ptr<T>(dinp), cptr<T>(inp), cptr<T>(dout), rows(inp),
                                last(inp) / 2);
      },
      LMF_GPU(cuda::swiglu_backward(ptr<float>(dinp), cptr<float>(inp), cptr<float>(dout),
                                    rows(inp), last(inp) / 2)));
}

}  // namespace lmforge::ops
