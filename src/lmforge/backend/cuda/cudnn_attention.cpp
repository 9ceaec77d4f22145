// cuDNN fused flash attention through the backend graph API (see cudnn_attention.h).
//
// The graphs are the ones cudnn_frontend (NVIDIA/cudnn-frontend, include/cudnn_frontend/node/
// scaled_dot_product_flash_attention.h: CompositeSDPANode / CompositeSDPABackwardNode, with the
// CompositeSoftmaxNode of softmax.h and the CompositeDiagonalBandMaskNode of diagonal_band_mask.h
// that it uses below cuDNN 9.21) lowers sdpa / sdpa_backward to, with a scalar attention scale,
// a top-left causal mask and generate_stats; the fused attention engines recognise exactly these
// patterns. Notation: H = NH, G = NKV, D = HS, W = (H + 2G) D; "f32" and "bf16" are the tensor
// types, "v" marks a virtual (engine-internal) tensor, scalars are fp32 passed by value.
//
// Forward (UIDs Q K V O Stats in the variant pack):
//   S1 v f32 [B,H,T,T]  = matmul(Q bf16 [B,H,T,D], K^T bf16 [B,G,D,T])   (G divides H: GQA)
//   S2                  = S1 * scale                                      (1/sqrt(D))
//   row, col v i32      = gen_index(S2, axis 2), gen_index(S2, axis 3)
//   keep v bool         = row >= col                                      (causal)
//   S3                  = binary_select(S2, -inf, keep)                   (keep ? S2 : -inf)
//   M v f32 [B,H,T,1]   = reduce_max(S3)
//   E                   = exp(S3 - M)
//   Z v f32 [B,H,T,1]   = reduce_add(E)
//   Stats f32 [B,H,T,1] = M + log(Z)                                      (= lse)
//   P v bf16 [B,H,T,T]  = E / Z
//   O bf16 [B,H,T,D]    = matmul(P, V bf16 [B,G,T,D])
//
// Backward (UIDs Q K V O dO Stats dQ dK dV, plus two fp32 buffers the frontend keeps in its
// workspace: the row sums Dsum [B,H,T,1] and the dQ accumulator [B,H,T,D]):
//   Dsum f32 [B,H,T,1]  = reduce_add(dO * O) * 1.0
//   S                   = matmul(Q, K^T) * scale - Stats, causal-masked as above; P = exp(S) f32
//   P^T v bf16          = reshape(P) to [B,H,T,T] with the last two strides swapped
//   dV                  = matmul(P^T, dO)
//                         (GQA: to v bf16 [B,H,T,D], then reduce_add to [B,G,T,D])
//   dS v f32            = (matmul(dO, V^T) - Dsum) * P * scale
//   dS^T v bf16         = reshape(dS), as P^T
//   dK                  = matmul(dS^T, Q)      (GQA: as dV)
//   Kr v f32 [B,G,T,D]  = reshape(K^T)
//   dQacc f32 [B,H,T,D] = matmul(dS, Kr)
//   dQ bf16             = identity(dQacc)
//
// Versions: the composite graphs are what the frontend sends to every cuDNN 9 below 9.21; from
// 9.21 it uses the single SDPA / softmax / diagonal-band operations instead (not used here, so
// that one code path serves all of cuDNN 9). -inf is float lowest below 9.10, as the frontend
// passes it. The frontend zeroes the dQ accumulator itself below 9.6; here it is always zeroed.
// Not done (frontend options off by default): the deterministic backward (a dP workspace of
// B H T^2 bf16 values), dropout, bias, padding masks.
#include "lmforge/backend/cuda/cudnn_attention.h"

#include <cuda_runtime.h>
#include <cudnn_graph.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/cuda/matmul.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/error.h"

namespace lmforge::cuda {

namespace {

using Dims = std::array<int64_t, 4>;

// Tensor UIDs of the variant pack; virtual tensors are numbered from kFirstVirtual.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kDO,
  kDQ,
  kDK,
  kDV,
  kRowSum,
  kDQAccum,
  kScale,
  kNegInf,
  kOne,
  kFirstVirtual = 100,
};

int64_t cudnn_version() {
  static const int64_t v = static_cast<int64_t>(cudnnGetVersion());
  return v;
}

struct Key {
  int64_t B, T, NH, NKV, HS;
  bool backward;
  bool operator==(const Key&) const = default;
  std::string str() const { return fmt::format("B={} T={} NH={} NKV={} HS={}", B, T, NH, NKV, HS); }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = k.backward;
    for (int64_t v : {k.B, k.T, k.NH, k.NKV, k.HS}) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

// A finalized execution plan and everything it was built from (kept for the process: nothing is
// destroyed at exit, when the driver may be gone). The by-value scalars live here, so the
// variant pack can point at them.
struct Plan {
  bool ok = false;
  cudnnBackendDescriptor_t exec = nullptr;
  int64_t workspace = 0;
  std::vector<cudnnBackendDescriptor_t> descriptors;
  float scale = 0, neg_inf = 0, one = 1;
};

// Makes backend descriptors, remembering the first failing call; after it every call is a no-op,
// so a graph is written straight through and checked once at the end.
class GraphBuilder {
 public:
  bool ok() const { return status_ == CUDNN_STATUS_SUCCESS; }
  cudnnStatus_t status() const { return status_; }
  const std::string& failed() const { return failed_; }

  cudnnBackendDescriptor_t make(cudnnBackendDescriptorType_t type, const char* what) {
    cudnnBackendDescriptor_t d = nullptr;
    if (!ok()) return nullptr;
    check(cudnnBackendCreateDescriptor(type, &d), what);
    if (d) owned_.push_back(d);
    return d;
  }
  void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name,
           cudnnBackendAttributeType_t type, int64_t count, const void* values, const char* what) {
    if (ok()) check(cudnnBackendSetAttribute(d, name, type, count, values), what);
  }
  void link(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name,
            cudnnBackendDescriptor_t value, const char* what) {
    set(d, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value, what);
  }
  void finalize(cudnnBackendDescriptor_t d, const char* what) {
    if (ok()) check(cudnnBackendFinalize(d), what);
  }

  // A tensor: 16-byte aligned, fp32 scalars [1,1,1,1] passed by value.
  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t type, const Dims& dims,
                                  const Dims& strides, bool is_virtual = false,
                                  bool by_value = false) {
    cudnnBackendDescriptor_t t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor");
    const int64_t alignment = 16;
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, "tensor uid");
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type, "tensor type");
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data(), "tensor dims");
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data(), "tensor strides");
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment, "tensor alignment");
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual, "tensor virtual");
    set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value, "tensor by value");
    finalize(t, "tensor finalize");
    return t;
  }
  cudnnBackendDescriptor_t virt(cudnnDataType_t type, const Dims& dims, const Dims& strides) {
    return tensor(next_virtual_++, type, dims, strides, true);
  }
  cudnnBackendDescriptor_t scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = mode(x [, b [, t]]); axis for GEN_INDEX. Both scaling constants 1, as the frontend sets.
  void pointwise(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b,
                 cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y,
                 cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    cudnnBackendDescriptor_t pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise");
    set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode, "pointwise mode");
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &math, "pointwise precision");
    if (axis >= 0) set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis, "pointwise axis");
    finalize(pw, "pointwise finalize");
    cudnnBackendDescriptor_t op =
        make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise op");
    link(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw, "pointwise op descriptor");
    link(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x, "pointwise x");
    if (b) link(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b, "pointwise b");
    if (t) link(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t, "pointwise t");
    link(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y, "pointwise y");
    const float alpha = 1.0f;
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &alpha, "pointwise alpha1");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &alpha, "pointwise alpha2");
    add_op(op, "pointwise op finalize");
  }

  // c = a b over the last two dimensions, batched (and broadcast: GQA) over the first two.
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    cudnnBackendDescriptor_t mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul");
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp, "matmul compute type");
    finalize(mm, "matmul finalize");
    cudnnBackendDescriptor_t op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "matmul op");
    link(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a, "matmul a");
    link(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b, "matmul b");
    link(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c, "matmul c");
    link(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm, "matmul op descriptor");
    add_op(op, "matmul op finalize");
  }

  // y = reduce(x) over the dimensions where y is smaller (a whole dimension, or head groups).
  void reduction(cudnnReduceTensorOp_t mode, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t red = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction");
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(red, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode,
        "reduction operator");
    set(red, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp,
        "reduction compute type");
    finalize(red, "reduction finalize");
    cudnnBackendDescriptor_t op =
        make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "reduction op");
    link(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x, "reduction x");
    link(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y, "reduction y");
    link(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, red, "reduction op descriptor");
    add_op(op, "reduction op finalize");
  }

  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t op = make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "reshape op");
    link(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x, "reshape x");
    link(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y, "reshape y");
    add_op(op, "reshape op finalize");
  }

  // The operation graph, heuristics (mode A) and the first engine config that finalizes into an
  // execution plan. On failure every descriptor is destroyed and p.ok stays false.
  void finish(cudnnHandle_t handle, Plan& p) {
    cudnnBackendDescriptor_t graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "graph");
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
        static_cast<int64_t>(ops_.size()), ops_.data(), "graph ops");
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle, "graph handle");
    finalize(graph, "operation graph finalize");
    cudnnBackendDescriptor_t heur = make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "heuristics");
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    link(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph, "heuristics graph");
    set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, "heuristics mode");
    finalize(heur, "heuristics finalize");
    int64_t count = 0;
    if (ok())
      check(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                     CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
            "heuristics result count");
    if (ok() && count < 1) check(CUDNN_STATUS_NOT_SUPPORTED, "heuristics (no engine config)");
    std::vector<cudnnBackendDescriptor_t> configs;
    for (int64_t i = 0; ok() && i < count; ++i)
      configs.push_back(make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config"));
    if (ok())
      check(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                     CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &count, configs.data()),
            "heuristics results");
    cudnnStatus_t last = CUDNN_STATUS_NOT_SUPPORTED;
    for (int64_t i = 0; ok() && !p.exec && i < count; ++i) {
      cudnnBackendDescriptor_t plan = nullptr;
      if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan) !=
          CUDNN_STATUS_SUCCESS)
        break;
      cudnnStatus_t st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                                                  CUDNN_TYPE_HANDLE, 1, &handle);
      if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                      CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &configs[i]);
      if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(plan);
      int64_t ws = 0, n = 0;
      if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                      CUDNN_TYPE_INT64, 1, &n, &ws);
      if (st == CUDNN_STATUS_SUCCESS) {
        owned_.push_back(plan);
        p.exec = plan;
        p.workspace = ws;
      } else {
        last = st;
        cudnnBackendDestroyDescriptor(plan);
      }
    }
    // An engine config that cuDNN refused may leave a (non-sticky) CUDA error behind, e.g. from
    // a kernel attribute it could not set; clear it, or the next launch check would report it
    // against an unrelated kernel. A sticky error (a fault) survives this and still surfaces.
    (void)cudaGetLastError();
    if (ok() && !p.exec) check(last, "execution plan (no engine config finalized)");
    if (ok()) {
      p.ok = true;
      p.descriptors = std::move(owned_);
    } else {
      for (auto it = owned_.rbegin(); it != owned_.rend(); ++it) cudnnBackendDestroyDescriptor(*it);
      p.exec = nullptr;
    }
    owned_.clear();
  }

 private:
  void check(cudnnStatus_t st, const char* what) {
    if (st != CUDNN_STATUS_SUCCESS && ok()) {
      status_ = st;
      failed_ = what;
    }
  }
  void add_op(cudnnBackendDescriptor_t op, const char* what) {
    finalize(op, what);
    if (ok()) ops_.push_back(op);
  }

  cudnnStatus_t status_ = CUDNN_STATUS_SUCCESS;
  std::string failed_;
  int64_t next_virtual_ = kFirstVirtual;
  std::vector<cudnnBackendDescriptor_t> owned_, ops_;
};

// The shapes of one problem as [B, H, T, D] views (see the file comment).
struct Layout {
  int64_t B, T, H, G, D, W;
  explicit Layout(const Key& k)
      : B(k.B), T(k.T), H(k.NH), G(k.NKV), D(k.HS), W((k.NH + 2 * k.NKV) * k.HS) {}
  Dims q() const { return {B, H, T, D}; }
  Dims kv() const { return {B, G, T, D}; }
  Dims kv_t() const { return {B, G, D, T}; }
  Dims qkv_strides() const { return {T * W, D, W, 1}; }        // Q, K, V, dQ, dK, dV in qkv rows
  Dims qkv_t_strides() const { return {T * W, D, 1, W}; }      // K^T, V^T
  Dims o_strides() const { return {T * H * D, D, H * D, 1}; }  // O, dO in (B, T, H*D) rows
  Dims packed_q() const { return {H * T * D, T * D, D, 1}; }   // [B, H, T, D] contiguous
  Dims s() const { return {B, H, T, T}; }
  Dims s_strides() const { return {H * T * T, T * T, T, 1}; }
  Dims s_t_strides() const { return {H * T * T, T * T, 1, T}; }  // S^T: last two swapped
  Dims row() const { return {B, H, T, 1}; }
  Dims row_strides() const { return {H * T, T, 1, 1}; }  // lse (B, NH, T)
};

// x masked to -inf above the diagonal (query row t sees keys [0, t]), as the frontend's
// composite diagonal band mask with a top-left right bound of 0.
cudnnBackendDescriptor_t causal_mask(GraphBuilder& g, const Layout& l, cudnnBackendDescriptor_t x,
                                     cudnnBackendDescriptor_t neg_inf) {
  cudnnBackendDescriptor_t row = g.virt(CUDNN_DATA_INT32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, row, CUDNN_DATA_FLOAT, 2);
  cudnnBackendDescriptor_t col = g.virt(CUDNN_DATA_INT32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, col, CUDNN_DATA_FLOAT, 3);
  cudnnBackendDescriptor_t keep = g.virt(CUDNN_DATA_BOOLEAN, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  cudnnBackendDescriptor_t y = g.virt(CUDNN_DATA_FLOAT, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, x, neg_inf, keep, y);
  return y;
}

void build_forward(GraphBuilder& g, const Layout& l) {
  const cudnnDataType_t bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  auto Q = g.tensor(kQ, bf16, l.q(), l.qkv_strides());
  auto KT = g.tensor(kK, bf16, l.kv_t(), l.qkv_t_strides());
  auto V = g.tensor(kV, bf16, l.kv(), l.qkv_strides());
  auto O = g.tensor(kO, bf16, l.q(), l.o_strides());
  auto stats = g.tensor(kStats, f32, l.row(), l.row_strides());
  auto scale = g.scalar(kScale), neg_inf = g.scalar(kNegInf);

  auto s1 = g.virt(f32, l.s(), l.s_strides());
  g.matmul(Q, KT, s1);
  auto s2 = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, s1, scale, nullptr, s2);
  auto s3 = causal_mask(g, l, s2, neg_inf);
  // softmax with Stats = max + log(sum of exp)
  auto max = g.virt(f32, l.row(), l.row_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s3, max);
  auto shifted = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_SUB, s3, max, nullptr, shifted);
  auto e = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_EXP, shifted, nullptr, nullptr, e);
  auto sum = g.virt(f32, l.row(), l.row_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, sum);
  auto log_sum = g.virt(f32, l.row(), l.row_strides());
  g.pointwise(CUDNN_POINTWISE_LOG, sum, nullptr, nullptr, log_sum);
  g.pointwise(CUDNN_POINTWISE_ADD, max, log_sum, nullptr, stats);
  auto p = g.virt(bf16, l.s(), l.s_strides());  // the second matmul's A is in the io type
  g.pointwise(CUDNN_POINTWISE_DIV, e, sum, nullptr, p);
  g.matmul(p, V, O);
}

void build_backward(GraphBuilder& g, const Layout& l) {
  const cudnnDataType_t bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  auto Q = g.tensor(kQ, bf16, l.q(), l.qkv_strides());
  auto KT = g.tensor(kK, bf16, l.kv_t(), l.qkv_t_strides());
  auto VT = g.tensor(kV, bf16, l.kv_t(), l.qkv_t_strides());
  auto O = g.tensor(kO, bf16, l.q(), l.o_strides());
  auto dO = g.tensor(kDO, bf16, l.q(), l.o_strides());
  auto stats = g.tensor(kStats, f32, l.row(), l.row_strides());
  auto dQ = g.tensor(kDQ, bf16, l.q(), l.qkv_strides());
  auto dK = g.tensor(kDK, bf16, l.kv(), l.qkv_strides());
  auto dV = g.tensor(kDV, bf16, l.kv(), l.qkv_strides());
  auto row_sum = g.tensor(kRowSum, f32, l.row(), l.row_strides());
  auto dq_accum = g.tensor(kDQAccum, f32, l.q(), l.packed_q());
  auto scale = g.scalar(kScale), neg_inf = g.scalar(kNegInf), one = g.scalar(kOne);

  // Dsum = rowsum(dO * O), the softmax backward's D
  auto do_o = g.virt(f32, l.q(), l.packed_q());
  g.pointwise(CUDNN_POINTWISE_MUL, dO, O, nullptr, do_o);
  auto dsum = g.virt(f32, l.row(), l.row_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, do_o, dsum);
  g.pointwise(CUDNN_POINTWISE_MUL, dsum, one, nullptr, row_sum);

  // P = exp(scale Q K^T - Stats), causal
  auto s1 = g.virt(f32, l.s(), l.s_strides());
  g.matmul(Q, KT, s1);
  auto s2 = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, s1, scale, nullptr, s2);
  auto s3 = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_SUB, s2, stats, nullptr, s3);
  auto s4 = causal_mask(g, l, s3, neg_inf);
  auto p = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_EXP, s4, nullptr, nullptr, p);

  // dV = P^T dO; with GQA per query head, then summed over each kv head's group
  auto p_t = g.virt(bf16, l.s(), l.s_t_strides());
  g.reshape(p, p_t);
  // A gradient of K or V: with GQA per query head first, then summed over each kv group.
  auto kv_grad = [&](cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
                     cudnnBackendDescriptor_t out) {
    if (l.H == l.G) {
      g.matmul(a, b, out);
      return;
    }
    auto full = g.virt(bf16, l.q(), l.packed_q());
    g.matmul(a, b, full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, full, out);
  };
  kv_grad(p_t, dO, dV);

  // dS = scale P (dO V^T - Dsum)
  auto dp = g.virt(f32, l.s(), l.s_strides());
  g.matmul(dO, VT, dp);
  auto dp_d = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_SUB, dp, row_sum, nullptr, dp_d);
  auto ds_unscaled = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, dp_d, p, nullptr, ds_unscaled);
  auto ds = g.virt(f32, l.s(), l.s_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, ds_unscaled, scale, nullptr, ds);

  // dK = dS^T Q
  auto ds_t = g.virt(bf16, l.s(), l.s_t_strides());
  g.reshape(ds, ds_t);
  kv_grad(ds_t, Q, dK);

  // dQ = dS K, accumulated in fp32
  auto k = g.virt(f32, l.kv(), l.qkv_strides());
  g.reshape(KT, k);
  g.matmul(ds, k, dq_accum);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, nullptr, dQ);
}

// Device scratch per role, grown to the largest request and then reused by every shape (calls
// are ordered on the one stream). Growing waits for the stream: queued work may still use the
// old buffer.
enum Slot { kQkv16, kO16, kDout16, kDqkv16, kRowSumBuf, kDqAccumBuf, kWorkspace, kSlots };

class State {
 public:
  static State& get() {
    static State* s = new State;  // never destroyed (see Plan)
    return *s;
  }

  std::mutex mu;

  // The plan for k, built on first use; nullptr when cuDNN built none (warned once). Both
  // directions or neither: a forward through cuDNN (lse of bf16-rounded q/k, a bf16-rounded O)
  // followed by the fp32 kernel's backward (P recomputed from the unrounded q/k against that lse)
  // would give wrong gradients, so a shape whose backward cuDNN cannot build never takes its
  // forward either (and the reverse).
  // A shape whose build failed transiently (not cached, tried again later) stays on the fp32
  // kernel until its next forward: the backward of that step must not take cuDNN alone.
  const Plan* plan(const Key& k) {
    Key fwd = k, other = k;
    fwd.backward = false;
    other.backward = !k.backward;
    if (retry_.count(fwd)) {
      if (k.backward) return nullptr;
      retry_.erase(fwd);
    }
    const Plan* p = one(k);
    const Plan* q = p ? one(other) : nullptr;
    if (p && q) return p;
    if (!plans_.count(k) || (p && !plans_.count(other)))
      retry_.insert(fwd);  // not cached: transient
    return nullptr;
  }

  cudnnHandle_t handle() const { return handle_; }

  void* scratch(Slot slot, size_t bytes) { return buf_[slot].get(std::max<size_t>(bytes, 256)); }

 private:
  const Plan* one(const Key& k) {
    auto it = plans_.find(k);
    if (it == plans_.end()) {
      Plan p = build(k);
      // A failure that may pass (out of memory, a build inside a graph capture) is not
      // remembered: the next call tries again.
      if (!p.ok && transient_) return nullptr;
      it = plans_.emplace(k, std::move(p)).first;
    }
    return it->second.ok ? &it->second : nullptr;
  }

  Plan build(const Key& k) {
    Plan p;
    cudnnStatus_t st = CUDNN_STATUS_SUCCESS;
    std::string failed;
    if (!handle_) {
      st = cudnnCreate(&handle_);
      if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnSetStream(handle_, static_cast<cudaStream_t>(stream()));
      if (st != CUDNN_STATUS_SUCCESS) {
        if (handle_) cudnnDestroy(handle_);
        handle_ = nullptr;
        failed = "cudnnCreate";
      }
    }
    if (handle_) {
      GraphBuilder g;
      const Layout l(k);
      if (k.backward)
        build_backward(g, l);
      else
        build_forward(g, l);
      g.finish(handle_, p);
      st = g.status();
      failed = g.failed();
    }
    transient_ = !p.ok && (st == CUDNN_STATUS_ALLOC_FAILED || capturing());
    if (!p.ok) {
      fmt::print(stderr,
                 "warning: cuDNN fused attention {} is unavailable for {} ({}: {}, cuDNN {}); "
                 "using the fp32 attention kernel\n",
                 k.backward ? "backward" : "forward", k.str(), failed, cudnnGetErrorString(st),
                 cudnn_version());
      return p;
    }
    p.scale = 1.0f / std::sqrt(static_cast<float>(k.HS));  // as the fp32 kernels
    p.neg_inf = cudnn_version() < 91000 ? std::numeric_limits<float>::lowest()
                                        : -std::numeric_limits<float>::infinity();
    p.one = 1.0f;
    return p;
  }

  cudnnHandle_t handle_ = nullptr;
  bool transient_ = false;                  // the last build failed for a reason that may pass
  std::unordered_set<Key, KeyHash> retry_;  // forward keys of shapes that failed transiently
  std::unordered_map<Key, Plan, KeyHash> plans_;
  GrowingBuffer buf_[kSlots];
};

// Runs a plan with the given (uid, device pointer) bindings; any failure is an Error.
void execute(const Plan& p, const Key& k, const std::vector<std::pair<int64_t, void*>>& bindings,
             void* workspace) {
  std::vector<int64_t> uids;
  std::vector<void*> ptrs;
  for (const auto& [uid, ptr] : bindings) {
    uids.push_back(uid);
    ptrs.push_back(ptr);
  }
  cudnnBackendDescriptor_t pack = nullptr;
  const char* what = "variant pack";
  cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
  const auto n = static_cast<int64_t>(uids.size());
  if (st == CUDNN_STATUS_SUCCESS)
    st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n,
                                  uids.data());
  if (st == CUDNN_STATUS_SUCCESS)
    st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                  n, ptrs.data());
  if (st == CUDNN_STATUS_SUCCESS)
    st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1,
                                  &workspace);
  if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(pack);
  if (st == CUDNN_STATUS_SUCCESS) {
    what = "cudnnBackendExecute";
    st = cudnnBackendExecute(State::get().handle(), p.exec, pack);
  }
  if (pack) cudnnBackendDestroyDescriptor(pack);
  if (st != CUDNN_STATUS_SUCCESS)
    fail("cuDNN fused attention {} for {}: {} failed: {}", k.backward ? "backward" : "forward",
         k.str(), what, cudnnGetErrorString(st));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void require_supported(const char* op, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS) {
  if (!cudnn_attention_supported(B, T, NH, NKV, HS, 0))
    fail("cuda::{}: B={} T={} NH={} NKV={} HS={} is not a shape cuDNN attention takes (cuDNN {})",
         op, B, T, NH, NKV, HS, cudnn_version());
}

}  // namespace

bool cudnn_attention_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LMFORGE_CUDNN_ATTENTION");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

bool cudnn_attention_takes(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                           int64_t window) {
  return cudnn_attention_enabled() && cudnn_attention_supported(B, T, NH, NKV, HS, window);
}

bool cudnn_attention_supported(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                               int64_t window) {
  // T = 1: cudnn-frontend rejects the backward with s_q = s_kv = 1 (sdpa_support_surface.h).
  if (B < 1 || T < 2 || NH < 1 || NKV < 1 || window != 0) return false;
  if (HS < 8 || HS > 128 || HS % 8 != 0 || NH % NKV != 0) return false;
  const int64_t v = cudnn_version();
  if (v < 90000 || v == 91000 || v == 91001) return false;
  return T % 128 == 0 || v >= 91600;
}

namespace {

// The plans on bf16 operands; qkv16/o16 (forward) or qkv16/o16/do16 (backward) are either the
// caller's bf16 activations or this file's scratch copies of fp32 ones.
bool forward16(uint16_t* o16, float* lse, const uint16_t* qkv16, int64_t B, int64_t T, int64_t NH,
               int64_t NKV, int64_t HS) {
  // Every tensor is declared 16-byte aligned: a caller's odd offset takes the fp32 kernel.
  if (!aligned16(lse) || !aligned16(o16) || !aligned16(qkv16)) return false;
  State& s = State::get();
  const Key k{B, T, NH, NKV, HS, false};
  const Plan* p = s.plan(k);
  if (!p) return false;
  void* ws = p->workspace > 0 ? s.scratch(kWorkspace, size_t(p->workspace)) : nullptr;
  auto* q = const_cast<uint16_t*>(qkv16);
  execute(*p, k,
          {{kQ, q},
           {kK, q + NH * HS},
           {kV, q + (NH + NKV) * HS},
           {kO, o16},
           {kStats, lse},
           {kScale, const_cast<float*>(&p->scale)},
           {kNegInf, const_cast<float*>(&p->neg_inf)}},
          ws);
  return true;
}

// dQ/dK/dV: written straight into dqkv16 when it is given (bf16 activations), else into scratch
// and added (widened) into the fp32 dqkv.
bool backward16(float* dqkv, uint16_t* dqkv16, const uint16_t* do16, const uint16_t* qkv16,
                const uint16_t* o16, const float* lse, int64_t B, int64_t T, int64_t NH,
                int64_t NKV, int64_t HS) {
  if (!aligned16(lse) || !aligned16(do16) || !aligned16(qkv16) || !aligned16(o16) ||
      (dqkv16 && !aligned16(dqkv16)))
    return false;
  State& s = State::get();
  const Key k{B, T, NH, NKV, HS, true};
  const Plan* p = s.plan(k);
  if (!p) return false;
  const int64_t W = (NH + 2 * NKV) * HS, n_qkv = B * T * W, n_out = B * T * NH * HS;
  if (!dqkv16) dqkv16 = static_cast<uint16_t*>(s.scratch(kDqkv16, size_t(n_qkv) * 2));
  void* row_sum = s.scratch(kRowSumBuf, size_t(B * NH * T) * 4);
  void* dq_accum = s.scratch(kDqAccumBuf, size_t(n_out) * 4);
  void* ws = p->workspace > 0 ? s.scratch(kWorkspace, size_t(p->workspace)) : nullptr;
  memset_zero(dq_accum, size_t(n_out) * 4);
  auto* q = const_cast<uint16_t*>(qkv16);
  execute(*p, k,
          {{kQ, q},
           {kK, q + NH * HS},
           {kV, q + (NH + NKV) * HS},
           {kO, const_cast<uint16_t*>(o16)},
           {kDO, const_cast<uint16_t*>(do16)},
           {kStats, const_cast<float*>(lse)},
           {kDQ, dqkv16},
           {kDK, dqkv16 + NH * HS},
           {kDV, dqkv16 + (NH + NKV) * HS},
           {kRowSum, row_sum},
           {kDQAccum, dq_accum},
           {kScale, const_cast<float*>(&p->scale)},
           {kNegInf, const_cast<float*>(&p->neg_inf)},
           {kOne, const_cast<float*>(&p->one)}},
          ws);
  if (dqkv) detail::accumulate_bf16(dqkv, dqkv16, n_qkv);
  return true;
}

}  // namespace

bool cudnn_attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HS) {
  require_supported("cudnn_attention_forward", B, T, NH, NKV, HS);
  State& s = State::get();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!aligned16(lse) || !s.plan({B, T, NH, NKV, HS, false})) return false;
  const int64_t W = (NH + 2 * NKV) * HS, n_qkv = B * T * W, n_out = B * T * NH * HS;
  auto* qkv16 = static_cast<uint16_t*>(s.scratch(kQkv16, size_t(n_qkv) * 2));
  auto* o16 = static_cast<uint16_t*>(s.scratch(kO16, size_t(n_out) * 2));
  to_bf16(qkv16, qkv, n_qkv);
  if (!forward16(o16, lse, qkv16, B, T, NH, NKV, HS)) return false;
  detail::bf16_to_fp32(out, o16, n_out);
  return true;
}

bool cudnn_attention_forward(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HS) {
  require_supported("cudnn_attention_forward", B, T, NH, NKV, HS);
  State& s = State::get();
  std::lock_guard<std::mutex> lock(s.mu);
  return forward16(out, lse, qkv, B, T, NH, NKV, HS);
}

bool cudnn_attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                              const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                              int64_t HS) {
  require_supported("cudnn_attention_backward", B, T, NH, NKV, HS);
  State& s = State::get();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!aligned16(lse) || !s.plan({B, T, NH, NKV, HS, true})) return false;
  const int64_t W = (NH + 2 * NKV) * HS, n_qkv = B * T * W, n_out = B * T * NH * HS;
  auto* qkv16 = static_cast<uint16_t*>(s.scratch(kQkv16, size_t(n_qkv) * 2));
  auto* o16 = static_cast<uint16_t*>(s.scratch(kO16, size_t(n_out) * 2));
  auto* do16 = static_cast<uint16_t*>(s.scratch(kDout16, size_t(n_out) * 2));
  to_bf16(qkv16, qkv, n_qkv);
  to_bf16(o16, out, n_out);
  to_bf16(do16, dout, n_out);
  return backward16(dqkv, nullptr, do16, qkv16, o16, lse, B, T, NH, NKV, HS);
}

bool cudnn_attention_backward(float* dqkv, const float* dout, const uint16_t* qkv,
                              const uint16_t* out, const float* lse, int64_t B, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HS) {
  require_supported("cudnn_attention_backward", B, T, NH, NKV, HS);
  State& s = State::get();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!aligned16(lse) || !s.plan({B, T, NH, NKV, HS, true})) return false;
  const int64_t n_out = B * T * NH * HS;
  auto* do16 = static_cast<uint16_t*>(s.scratch(kDout16, size_t(n_out) * 2));
  to_bf16(do16, dout, n_out);
  return backward16(dqkv, nullptr, do16, qkv, out, lse, B, T, NH, NKV, HS);
}

bool cudnn_attention_backward(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                              const uint16_t* out, const float* lse, int64_t B, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HS) {
  require_supported("cudnn_attention_backward", B, T, NH, NKV, HS);
  State& s = State::get();
  std::lock_guard<std::mutex> lock(s.mu);
  return backward16(nullptr, dqkv, dout, qkv, out, lse, B, T, NH, NKV, HS);
}

}  // namespace lmforge::cuda
