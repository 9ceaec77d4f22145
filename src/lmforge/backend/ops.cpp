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

// Packed rows (ops.h): positions (B, T) int32 within [0, rows) each; doc_start (B, T) int32 with
// doc_start[t] in [0, t] and never decreasing along a row. Checked where they are on the host
// (they are made by the model, so a failure is a bug there).
void check_positions(const char* op, const Tensor& positions, int64_t B, int64_t T_, int64_t rows) {
  if (!positions.defined()) return;
  LMF_CHECK(positions.dtype() == DType::kI32 && positions.numel() == B * T_,
            "{}: positions {} for B={} T={}", op, positions.shape().str(), B, T_);
  if (positions.device() != Device::kCPU) return;
  const int32_t* p = positions.data<int32_t>();
  for (int64_t i = 0; i < B * T_; ++i)
    LMF_CHECK(p[i] >= 0 && p[i] < rows, "{}: position {} at {} outside [0, {})", op, p[i], i, rows);
}

void check_doc_start(const char* op, const Tensor& doc_start, int64_t B, int64_t T_) {
  if (!doc_start.defined()) return;
  LMF_CHECK(doc_start.dtype() == DType::kI32 && doc_start.numel() == B * T_,
            "{}: doc_start {} for B={} T={}", op, doc_start.shape().str(), B, T_);
  if (doc_start.device() != Device::kCPU) return;
  const int32_t* d = doc_start.data<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) {
      const int32_t v = d[b * T_ + t];
      LMF_CHECK(v >= 0 && v <= t && (t == 0 || v >= d[b * T_ + t - 1]),
                "{}: doc_start {} at row {} position {} (must be in [0, t], non-decreasing)", op, v,
                b, t);
    }
}

#ifdef LMFORGE_HAVE_CUDA
// Attention under bf16 mixed precision tries cuDNN's fused flash attention first (see ops.h);
// its plans take the plain 1 / sqrt(HS) scores only.
bool try_cudnn_attention(bool bf16, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                         int64_t window, const AttnScore& score) {
  return bf16 && score.plain(HS) && cuda::cudnn_attention_takes(B, T, NH, NKV, HS, window);
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

// fp32 scratch shaped like t, for the fp32 kernels run on bf16 activations (attention on the
// CPU, or where cuDNN takes no plan): one grow-only buffer per slot and device, reused every step.
Tensor f32_scratch(const Tensor& t, int slot) {
  static Tensor bufs[2][4];  // [on a GPU][slot]
  Tensor& b = bufs[t.device() == Device::kCUDA][slot];
  if (!b.defined() || b.numel() < t.numel())
    b = Tensor::empty({t.numel()}, DType::kF32, t.device());
  return b.slice(0, t.numel()).view(t.shape());
}
// The same holding fp32(t) for a bf16 t (exact).
Tensor widened(const Tensor& t, int slot) {
  Tensor w = f32_scratch(t, slot);
  from_bf16(w, t);
  return w;
}

}  // namespace

void linear_forward(const Tensor& out, const Tensor& inp, const Tensor& weight,
                    const Tensor& bias) {
  int64_t OC = weight.size(0), C = weight.size(1), N = inp.numel() / C;
  same_device("linear_forward", out, {&inp, &weight, &bias});
  const bool bf16 = weight.dtype() == DType::kBF16;
  // Rows padded past OC (the LM head's logits on a GPU, 16-byte rows for the fast GEMM kernels):
  // fp32 output of bf16 weights on a GPU, no bias; the padding is not written.
  const bool padded = out.numel() != N * OC && rows(out) == N && last(out) > OC;
  LMF_CHECK(last(inp) == C && (out.numel() == N * OC || padded), "linear: inp {} weight {} out {}",
            inp.shape().str(), weight.shape().str(), out.shape().str());
  if (padded) {
#ifdef LMFORGE_HAVE_CUDA
    LMF_CHECK(
        bf16 && out.dtype() == DType::kF32 && out.device() == Device::kCUDA && !bias.defined(),
        "linear_forward: padded output rows need a GPU, bf16 weights and no bias");
    profile::Scope timed("linear_forward_bf16", out, 2.0 * static_cast<double>(N) * C * OC);
    if (inp.dtype() == DType::kBF16)
      cuda::linear_forward_bf16(out.data<float>(), static_cast<const uint16_t*>(inp.bf16_data()),
                                weight.bf16_data(), nullptr, N, C, OC, last(out));
    else
      cuda::linear_forward_bf16(out.data<float>(), inp.data<float>(), weight.bf16_data(), nullptr,
                                N, C, OC, last(out));
    return;
#else
    fail("linear_forward: padded output rows need the CUDA backend");
#endif
  }
  profile::Scope timed(bf16 ? "linear_forward_bf16" : "linear_forward", out,
                       2.0 * static_cast<double>(N) * C * OC);
  LMF_CHECK(bf16 || inp.dtype() != DType::kBF16,
            "linear_forward: a bf16 input needs a bf16 weight");
  LMF_CHECK(bf16 || out.dtype() != DType::kBF16,
            "linear_forward: a bf16 output needs a bf16 weight");
  if (bf16) {  // bf16 mixed precision: fp32 or bf16 activations, bf16 weights
    // The kernels take the input as it is (a bf16 one goes straight into the matmul) and write
    // an fp32 or a bf16 output (bf16 matmul outputs).
    auto run = [&](auto&& kernel) {
      auto with_out = [&](auto* o) {
        if (inp.dtype() == DType::kBF16)
          kernel(o, static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(),
                 cptr<float>(bias), N, C, OC);
        else
          kernel(o, inp.data<float>(), weight.bf16_data(), cptr<float>(bias), N, C, OC);
      };
      if (out.dtype() == DType::kBF16)
        with_out(out.bf16_data());
      else
        with_out(out.data<float>());
    };
    dispatch_device(
        "linear_forward_bf16", weight,
        [&] { run([](auto... a) { cpu::linear_forward_bf16(a...); }); },
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
                     const Tensor& dout, const Tensor& inp, const Tensor& weight,
                     bool dweight_accumulate, bool dinp_accumulate) {
  int64_t OC = weight.size(0), C = weight.size(1), N = inp.numel() / C;
  same_device("linear_backward", dout, {&dinp, &dweight, &dbias, &inp, &weight});
  const bool dw_acc = dweight_accumulate, dx_acc = dinp_accumulate;
  // The GPU kernels always add: a gradient to be written is zeroed first there (the host
  // ParamSet leaves gradients unwritten; on a GPU it zeroes them, so a weight's does not happen).
  const bool write_dw = !dw_acc && dweight.raw(),
             write_dx = !dx_acc && dinp.raw() && dinp.dtype() != DType::kBF16;
  if ((write_dw || write_dx) && dout.device() == Device::kCUDA) {
    if (write_dw) dweight.zero_();
    if (write_dx) dinp.zero_();
    return linear_backward(dinp, dweight, dbias, dout, inp, weight, true, true);
  }
  const bool bf16 = weight.dtype() == DType::kBF16;
  if (dout.dtype() == DType::kBF16) {
    // A bf16 output gradient, already rounded (the LM head's dlogits, the MLP's d(fc_out)),
    // rows ld >= OC apart.
    const int64_t ld = last(dout);
    LMF_CHECK(bf16 && inp.dtype() == DType::kBF16 && rows(dout) == N && ld >= OC,
              "linear_backward: a bf16 dout {} needs bf16 weight and input (N={} OC={})",
              dout.shape().str(), N, OC);
    profile::Scope timed(
        "linear_backward_bf16", dout,
        2.0 * static_cast<double>(N) * C * OC * ((dinp.raw() ? 1 : 0) + (dweight.raw() ? 1 : 0)));
    auto run = [&](auto&& kernel) {
      kernel(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias),
             static_cast<const uint16_t*>(dout.bf16_data()), ld,
             static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(), N, C, OC);
    };
    dispatch_device(
        "linear_backward_bf16", weight,
        [&] { run([=](auto... a) { cpu::linear_backward_bf16_dout(a..., dw_acc, dx_acc); }); },
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
  LMF_CHECK(dinp.dtype() != DType::kBF16 || (bf16 && inp.dtype() == DType::kBF16),
            "linear_backward: a bf16 dinp needs bf16 weight and input");
  if (bf16) {
    // dinp fp32 (+=, or written), or bf16 (written: bf16 activations, the attention output's
    // gradient).
    auto run = [&](auto&& kernel) {
      if (dinp.dtype() == DType::kBF16)
        kernel(dinp.bf16_data(), ptr<float>(dweight), ptr<float>(dbias), dout.data<float>(),
               static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(), N, C, OC);
      else if (inp.dtype() == DType::kBF16)
        kernel(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias), dout.data<float>(),
               static_cast<const uint16_t*>(inp.bf16_data()), weight.bf16_data(), N, C, OC);
      else
        kernel(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias), dout.data<float>(),
               inp.data<float>(), weight.bf16_data(), N, C, OC);
    };
    dispatch(
        "linear_backward_bf16", dout,
        [&](auto) { run([=](auto... a) { cpu::linear_backward_bf16(a..., dw_acc, dx_acc); }); },
        LMF_GPU(run([](auto... a) { cuda::linear_backward_bf16(a...); })));
    return;
  }
  dispatch(
      "linear_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::linear_backward<T>(ptr<T>(dinp), ptr<T>(dweight), ptr<T>(dbias), cptr<T>(dout),
                                cptr<T>(inp), cptr<T>(weight), N, C, OC, dw_acc, dx_acc);
      },
      LMF_GPU(cuda::linear_backward(ptr<float>(dinp), ptr<float>(dweight), ptr<float>(dbias),
                                    cptr<float>(dout), cptr<float>(inp), cptr<float>(weight), N, C,
                                    OC)));
}

namespace {
void check_vocab_split(const char* op, int64_t v0, int64_t vocab_total, int64_t V) {
  LMF_CHECK(v0 >= 0 && (vocab_total == 0 || v0 + V <= vocab_total),
            "{}: rows [{}, {}) of a vocabulary of {}", op, v0, v0 + V, vocab_total);
}
}  // namespace

void embedding_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte,
                       const Tensor& wpe, const Tensor& positions, int64_t v0,
                       int64_t vocab_total) {
  same_device("embedding_forward", out, {&tokens, &wte, &wpe, &positions});
  int64_t B = tokens.size(0), T_ = tokens.size(1), V = wte.size(0), C = wte.size(1);
  check_vocab_split("embedding_forward", v0, vocab_total, V);
  LMF_CHECK(out.numel() == B * T_ * C, "embedding: out {} tokens {}", out.shape().str(),
            tokens.shape().str());
  LMF_CHECK(!wpe.raw() || positions.defined() || wpe.size(0) >= T_,
            "embedding: T={} beyond {} positions", T_, wpe.size(0));
  if (wpe.raw()) check_positions("embedding_forward", positions, B, T_, wpe.size(0));
  const int32_t* pos = wpe.raw() ? cptr<int32_t>(positions) : nullptr;
  LMF_CHECK(!wpe.raw() || wpe.dtype() == wte.dtype(), "embedding: wte {} but wpe {}",
            dtype_name(wte.dtype()), dtype_name(wpe.dtype()));
  if (wte.dtype() == DType::kBF16) {  // bf16 master weights: the tables widened on the way
    LMF_CHECK(out.device() == Device::kCPU || (v0 == 0 && (vocab_total == 0 || vocab_total == V)),
              "embedding_forward: bf16 tables split over ranks on the CPU only");
    const uint16_t* e = wte.bf16_data();
    const uint16_t* p = wpe.raw() ? wpe.bf16_data() : nullptr;
    dispatch(
        "embedding_forward", out,
        [&](auto tag) {
          if constexpr (std::is_same_v<decltype(tag), float>)
            cpu::embedding_forward(ptr<float>(out), tokens.data<int32_t>(), e, p, B, T_, C, V, pos,
                                   v0, vocab_total);
          else
            LMF_CHECK(false, "embedding_forward: a bf16 table gives fp32 rows");
        },
        LMF_GPU(cuda::embedding_forward(ptr<float>(out), tokens.data<int32_t>(), e, p, B, T_, C, V,
                                        pos)));
    return;
  }
  dispatch(
      "embedding_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::embedding_forward(ptr<T>(out), tokens.data<int32_t>(), cptr<T>(wte), cptr<T>(wpe), B,
                               T_, C, V, pos, v0, vocab_total);
      },
      LMF_GPU(cuda::embedding_forward(ptr<float>(out), tokens.data<int32_t>(), cptr<float>(wte),
                                      cptr<float>(wpe), B, T_, C, V, pos, v0, vocab_total)));
}

void embedding_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                        const Tensor& tokens, const Tensor& positions, int64_t v0,
                        int64_t vocab_total) {
  same_device("embedding_backward", dout, {&dwte, &dwpe, &tokens, &positions});
  // (without dwte: the positions' gradient alone; vocabulary parallelism's own rows)
  const int64_t B = tokens.size(0), T_ = tokens.size(1), C = last(dout);
  const int64_t V = dwte.raw() ? dwte.size(0) : 0;
  LMF_CHECK(!dwte.raw() || dwte.size(1) == C, "embedding_backward: dwte {} for dout {}",
            dwte.shape().str(), dout.shape().str());
  check_vocab_split("embedding_backward", v0, vocab_total, V);
  const int64_t P = dwpe.raw() ? dwpe.size(0) : 0;
  if (dwpe.raw()) check_positions("embedding_backward", positions, B, T_, P);
  const int32_t* pos = dwpe.raw() ? cptr<int32_t>(positions) : nullptr;
  dispatch(
      "embedding_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::embedding_backward<T>(ptr<T>(dwte), ptr<T>(dwpe), cptr<T>(dout),
                                   tokens.data<int32_t>(), B, T_, C, V, pos, v0, vocab_total);
      },
      LMF_GPU(cuda::embedding_backward(ptr<float>(dwte), ptr<float>(dwpe), cptr<float>(dout),
                                       tokens.data<int32_t>(), B, T_, C, V, pos, P, v0)));
}

void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                       const Tensor& weight, const Tensor& bias, double eps) {
  same_device("layernorm_forward", out, {&mean, &rstd, &inp, &weight, &bias});
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
  same_device("layernorm_backward", dout, {&dinp, &dweight, &dbias, &inp, &weight, &mean, &rstd});
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
                     double eps, double offset) {
  same_device("rmsnorm_forward", out, {&rstd, &inp, &weight});
  same_numel("rmsnorm_forward", out, inp);
  if (out.dtype() == DType::kBF16) {  // bf16 activations
    const int64_t N = rows(inp), C = last(inp);
    auto fill = [&](float* dst, int64_t r0, int64_t n) {
      cpu::rmsnorm_forward<float>(dst, ptr<float>(rstd) + r0, cptr<float>(inp) + r0 * C,
                                  cptr<float>(weight), n, C, eps, 1, C, offset);
    };
    dispatch(
        "rmsnorm_forward", inp, [&](auto) { cpu_rows_bf16("rmsnorm_forward", out, N, C, fill); },
        LMF_GPU(cuda::rmsnorm_forward(out.bf16_data(), ptr<float>(rstd), cptr<float>(inp),
                                      cptr<float>(weight), N, C, eps, 1, C, offset)));
    return;
  }
  dispatch(
      "rmsnorm_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::rmsnorm_forward<T>(ptr<T>(out), ptr<T>(rstd), cptr<T>(inp), cptr<T>(weight), rows(inp),
                                last(inp), eps, 1, last(inp), offset);
      },
      LMF_GPU(cuda::rmsnorm_forward(ptr<float>(out), ptr<float>(rstd), cptr<float>(inp),
                                    cptr<float>(weight), rows(inp), last(inp), eps, 1, last(inp),
                                    offset)));
}

void rmsnorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dout,
                      const Tensor& inp, const Tensor& weight, const Tensor& rstd, double offset) {
  same_device("rmsnorm_backward", dout, {&dinp, &dweight, &inp, &weight, &rstd});
  dispatch(
      "rmsnorm_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::rmsnorm_backward<T>(ptr<T>(dinp), ptr<T>(dweight), cptr<T>(dout), cptr<T>(inp),
                                 cptr<T>(weight), cptr<T>(rstd), rows(inp), last(inp), 1, last(inp),
                                 offset);
      },
      LMF_GPU(cuda::rmsnorm_backward(ptr<float>(dinp), ptr<float>(dweight), cptr<float>(dout),
                                     cptr<float>(inp), cptr<float>(weight), cptr<float>(rstd),
                                     rows(inp), last(inp), 1, last(inp), offset)));
}

void qk_norm_forward(const Tensor& out, const Tensor& rstd_q, const Tensor& rstd_k,
                     const Tensor& inp, const Tensor& wq, const Tensor& wk, int64_t NH, int64_t NKV,
                     double eps, double offset) {
  const int64_t HS = wq.numel(), Cq = inp.size(-1), N = inp.numel() / Cq;
  LMF_CHECK(Cq == (NH + 2 * NKV) * HS && out.numel() == inp.numel() && wk.numel() == HS &&
                rstd_q.numel() == N * NH && rstd_k.numel() == N * NKV,
            "qk_norm: inp {} wq {} rstd_q {} NH={} NKV={}", inp.shape().str(), wq.shape().str(),
            rstd_q.shape().str(), NH, NKV);
  same_device("qk_norm_forward", out, {&rstd_q, &rstd_k, &inp, &wq, &wk});
  out.copy_from(inp);  // v passes through
  // q heads: N * NH rows of HS, NH per token row of Cq; k heads likewise after them.
  dispatch(
      "qk_norm_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::rmsnorm_forward<T>(ptr<T>(out), ptr<T>(rstd_q), cptr<T>(inp), cptr<T>(wq), N * NH, HS,
                                eps, NH, Cq, offset);
        cpu::rmsnorm_forward<T>(ptr<T>(out) + NH * HS, ptr<T>(rstd_k), cptr<T>(inp) + NH * HS,
                                cptr<T>(wk), N * NKV, HS, eps, NKV, Cq, offset);
      },
      LMF_GPU(cuda::rmsnorm_forward(ptr<float>(out), ptr<float>(rstd_q), cptr<float>(inp),
                                    cptr<float>(wq), N * NH, HS, eps, NH, Cq, offset);
              cuda::rmsnorm_forward(ptr<float>(out) + NH * HS, ptr<float>(rstd_k),
                                    cptr<float>(inp) + NH * HS, cptr<float>(wk), N * NKV, HS, eps,
                                    NKV, Cq, offset)));
}

void qk_norm_backward(const Tensor& dinp, const Tensor& dwq, const Tensor& dwk, const Tensor& dout,
                      const Tensor& inp, const Tensor& wq, const Tensor& wk, const Tensor& rstd_q,
                      const Tensor& rstd_k, int64_t NH, int64_t NKV, double offset) {
  const int64_t HS = wq.numel(), Cq = inp.size(-1), N = inp.numel() / Cq;
  same_numel("qk_norm_backward", dinp, dout);
  same_device("qk_norm_backward", dout, {&dinp, &dwq, &dwk, &inp, &wq, &wk, &rstd_q, &rstd_k});
  const int64_t v0 = (NH + NKV) * HS, nv = NKV * HS;  // v passes through
  dispatch(
      "qk_norm_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::rmsnorm_backward<T>(ptr<T>(dinp), ptr<T>(dwq), cptr<T>(dout), cptr<T>(inp),
                                 cptr<T>(wq), cptr<T>(rstd_q), N * NH, HS, NH, Cq, offset);
        cpu::rmsnorm_backward<T>(ptr<T>(dinp) + NH * HS, ptr<T>(dwk), cptr<T>(dout) + NH * HS,
                                 cptr<T>(inp) + NH * HS, cptr<T>(wk), cptr<T>(rstd_k), N * NKV, HS,
                                 NKV, Cq, offset);
        T* d = ptr<T>(dinp);
        const T* g = cptr<T>(dout);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N; ++i)
          for (int64_t c = v0; c < v0 + nv; ++c) d[i * Cq + c] += g[i * Cq + c];
      },
      LMF_GPU(cuda::rmsnorm_backward(ptr<float>(dinp), ptr<float>(dwq), cptr<float>(dout),
                                     cptr<float>(inp), cptr<float>(wq), cptr<float>(rstd_q), N * NH,
                                     HS, NH, Cq, offset);
              cuda::rmsnorm_backward(ptr<float>(dinp) + NH * HS, ptr<float>(dwk),
                                     cptr<float>(dout) + NH * HS, cptr<float>(inp) + NH * HS,
                                     cptr<float>(wk), cptr<float>(rstd_k), N * NKV, HS, NKV, Cq,
                                     offset);
              cuda::accumulate_rows(ptr<float>(dinp) + v0, cptr<float>(dout) + v0, N, nv, Cq)));
}

namespace {
void rope(const char* op, bool backward, const Tensor& x, const Tensor& cos, const Tensor& sin,
          int64_t NH, int64_t NKV, int64_t pos0, const Tensor& positions) {
  same_device(op, x, {&cos, &sin, &positions});
  int64_t B = x.size(0), T_ = x.size(1), Cq = x.size(2), HS = Cq / (NH + 2 * NKV);
  LMF_CHECK((positions.defined() || pos0 + T_ <= cos.size(0)) && cos.size(1) * 2 == HS,
            "{}: T={} pos0={} table {} HS={}", op, T_, pos0, cos.shape().str(), HS);
  check_positions(op, positions, B, T_, cos.size(0));
  const int32_t* pos = cptr<int32_t>(positions);
  if (x.dtype() == DType::kBF16) {  // bf16 qkv or dqkv (bf16 activations): in fp32, rounded
    dispatch_device(
        op, x,
        [&] {
          // The q and k heads (the first NH + NKV heads) of each row.
          cpu::rope_bf16(x.bf16_data(), cos.data<float>(), sin.data<float>(), B, T_, NH + NKV, HS,
                         Cq, pos0, pos, backward);
        },
        LMF_GPU(using F = void (*)(uint16_t*, const float*, const float*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, const int32_t*);
                const F f = backward ? F(cuda::rope_backward) : F(cuda::rope_forward);
                f(x.bf16_data(), cos.data<float>(), sin.data<float>(), B, T_, NH + NKV, HS, Cq,
                  pos0, pos)));
    return;
  }
  dispatch(
      op, x,
      [&](auto tag) {
        using T = decltype(tag);
        auto f = backward ? cpu::rope_backward<T> : cpu::rope_forward<T>;
        // q and k heads are adjacent: NH + NKV heads from the start of each row.
        f(ptr<T>(x), cos.data<float>(), sin.data<float>(), B, T_, NH + NKV, HS, Cq, pos0, pos);
      },
      LMF_GPU(using F = void (*)(float*, const float*, const float*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, const int32_t*);
              const F f = backward ? F(cuda::rope_backward) : F(cuda::rope_forward);
              f(ptr<float>(x), cos.data<float>(), sin.data<float>(), B, T_, NH + NKV, HS, Cq, pos0,
                pos)));
}
}  // namespace

void rope_forward(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                  int64_t n_kv_head, int64_t pos0, const Tensor& positions) {
  rope("rope_forward", false, qkv, cos, sin, n_head, n_kv_head, pos0, positions);
}

void rope_backward(const Tensor& dqkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                   int64_t n_kv_head, int64_t pos0, const Tensor& positions) {
  rope("rope_backward", true, dqkv, cos, sin, n_head, n_kv_head, pos0, positions);
}

void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& qkv, int64_t NH,
                       int64_t NKV, int64_t window, [[maybe_unused]] bool bf16,
                       const Tensor& doc_start, const AttnScore& score) {
  same_device("attention_forward", out, {&lse, &qkv, &doc_start});
  int64_t B = qkv.size(0), T_ = qkv.size(1), HS = qkv.size(2) / (NH + 2 * NKV);
  LMF_CHECK(NH % NKV == 0 && qkv.size(2) == (NH + 2 * NKV) * HS && lse.numel() == B * NH * T_ &&
                out.numel() == B * T_ * NH * HS,
            "attention: qkv {} lse {} out {} NH={} NKV={}", qkv.shape().str(), lse.shape().str(),
            out.shape().str(), NH, NKV);
  check_doc_start("attention_forward", doc_start, B, T_);
  const int32_t* ds = cptr<int32_t>(doc_start);
  // cuDNN's fused attention takes no document starts: packed rows run the fp32 kernels.
  bf16 = bf16 && !ds;
  profile::Scope timed("attention_forward", out, attention_flops(B, T_, NH, HS, window));
  if (qkv.dtype() == DType::kBF16) {  // bf16 qkv and out (bf16 matmul outputs)
    LMF_CHECK(out.dtype() == DType::kBF16, "attention_forward: a bf16 qkv needs a bf16 out");
#ifdef LMFORGE_HAVE_CUDA
    if (qkv.device() == Device::kCUDA &&
        try_cudnn_attention(bf16, B, T_, NH, NKV, HS, window, score) &&
        cuda::cudnn_attention_forward(out.bf16_data(), ptr<float>(lse), qkv.bf16_data(), B, T_, NH,
                                      NKV, HS))
      return;
#endif
    if (qkv.device() == Device::kCPU && cpu::bf16_attention_tiles(HS)) {
      cpu::attention_forward_bf16(out.bf16_data(), ptr<float>(lse), qkv.bf16_data(), B, T_, NH, NKV,
                                  HS, window, ds, score);
      return;
    }
    // The fp32 kernel on the widened qkv, its output rounded.
    const Tensor o = f32_scratch(out, 1);
    attention_forward(o, lse, widened(qkv, 0), NH, NKV, window, false, doc_start, score);
    to_bf16(out, o);
    return;
  }
  dispatch(
      "attention_forward", out,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::attention_forward<T>(ptr<T>(out), ptr<T>(lse), cptr<T>(qkv), B, T_, NH, NKV, HS,
                                  window, ds, score);
      },
      LMF_GPU(if (!try_cudnn_attention(bf16, B, T_, NH, NKV, HS, window, score) ||
                  !cuda::cudnn_attention_forward(ptr<float>(out), ptr<float>(lse), cptr<float>(qkv),
                                                 B, T_, NH, NKV, HS))
                  cuda::attention_forward(ptr<float>(out), ptr<float>(lse), cptr<float>(qkv), B, T_,
                                          NH, NKV, HS, window, ds, score)));
}

void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                        const Tensor& out, const Tensor& lse, int64_t NH, int64_t NKV,
                        int64_t window, [[maybe_unused]] bool bf16, const Tensor& doc_start,
                        const AttnScore& score) {
  same_device("attention_backward", dout, {&dqkv, &qkv, &out, &lse, &doc_start});
  int64_t B = qkv.size(0), T_ = qkv.size(1), HS = qkv.size(2) / (NH + 2 * NKV);
  LMF_CHECK(NH % NKV == 0 && qkv.size(2) == (NH + 2 * NKV) * HS && lse.numel() == B * NH * T_ &&
                out.numel() == B * T_ * NH * HS && dout.numel() == out.numel() &&
                dqkv.numel() == qkv.numel(),
            "attention_backward: qkv {} dqkv {} out {} dout {} lse {} NH={} NKV={}",
            qkv.shape().str(), dqkv.shape().str(), out.shape().str(), dout.shape().str(),
            lse.shape().str(), NH, NKV);
  check_doc_start("attention_backward", doc_start, B, T_);
  const int32_t* ds = cptr<int32_t>(doc_start);
  bf16 = bf16 && !ds;  // as the forward
  profile::Scope timed("attention_backward", dout, 2.5 * attention_flops(B, T_, NH, HS, window));
  if (qkv.dtype() == DType::kBF16) {
    // bf16 qkv and out; dout and dqkv both fp32 (dqkv +=) or both bf16 (dqkv written, rounded).
    const bool g16 = dout.dtype() == DType::kBF16;
    LMF_CHECK(out.dtype() == DType::kBF16 && (dqkv.dtype() == DType::kBF16) == g16 &&
                  (g16 || (dout.dtype() == DType::kF32 && dqkv.dtype() == DType::kF32)),
              "attention_backward: a bf16 qkv needs a bf16 out, and dout and dqkv both fp32 or "
              "both bf16");
#ifdef LMFORGE_HAVE_CUDA
    if (qkv.device() == Device::kCUDA &&
        try_cudnn_attention(bf16, B, T_, NH, NKV, HS, window, score) &&
        (g16 ? cuda::cudnn_attention_backward(dqkv.bf16_data(), dout.bf16_data(), qkv.bf16_data(),
                                              out.bf16_data(), cptr<float>(lse), B, T_, NH, NKV, HS)
             : cuda::cudnn_attention_backward(ptr<float>(dqkv), cptr<float>(dout), qkv.bf16_data(),
                                              out.bf16_data(), cptr<float>(lse), B, T_, NH, NKV,
                                              HS)))
      return;
#endif
    // Into a zeroed fp32 dqkv, rounded at the end, for a bf16 one.
    const Tensor dq = g16 ? f32_scratch(dqkv, 3) : dqkv;
    if (g16) dq.zero_();
    if (qkv.device() == Device::kCPU && cpu::bf16_attention_tiles(HS)) {
      if (g16)
        cpu::attention_backward_bf16(
            dq.data<float>(), static_cast<const uint16_t*>(dout.bf16_data()), qkv.bf16_data(),
            out.bf16_data(), cptr<float>(lse), B, T_, NH, NKV, HS, window, ds, score);
      else
        cpu::attention_backward_bf16(dq.data<float>(), cptr<float>(dout), qkv.bf16_data(),
                                     out.bf16_data(), cptr<float>(lse), B, T_, NH, NKV, HS, window,
                                     ds, score);
    } else {  // the fp32 kernel on widened copies
      attention_backward(dq, g16 ? widened(dout, 2) : dout, widened(qkv, 0), widened(out, 1), lse,
                         NH, NKV, window, false, doc_start, score);
    }
    if (g16) to_bf16(dqkv, dq);
    return;
  }
  dispatch(
      "attention_backward", dout,
      [&](auto tag) {
        using T = decltype(tag);
        cpu::attention_backward<T>(ptr<T>(dqkv), cptr<T>(dout), cptr<T>(qkv), cptr<T>(out),
                                   cptr<T>(lse), B, T_, NH, NKV, HS, window, ds, score);
      },
      LMF_GPU(if (!try_cudnn_attention(bf16, B, T_, NH, NKV, HS, window, score) ||
                  !cuda::cudnn_attention_backward(ptr<float>(dqkv), cptr<float>(dout),
                                                  cptr<float>(qkv), cptr<float>(out),
                                                  cptr<float>(lse), B, T_, NH, NKV, HS))
                  cuda::attention_backward(ptr<float>(dqkv), cptr<float>(dout), cptr<float>(qkv),
                                           cptr<float>(out), cptr<float>(lse), B, T_, NH, NKV, HS,
                                           window, ds, score)));
}

}  // namespace lmforge::ops
