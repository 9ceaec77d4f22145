// ParamSet: every parameter of a model, by name, in one contiguous buffer, with gradients in a
// second buffer of the same layout, but for frozen parameters (LoRA's base weights), which have
// none (PackedRange). Layers register shapes first; finalize() allocates both
// buffers once. Optimizers and checkpoints walk the list; names are stable across runs.
//
//   ParamSet ps;
//   Param* w = ps.add("blocks.0.attn.qkv.weight", {3 * C, C}, /*decay=*/true);
//   ps.finalize();
//   float* p = w->value.data<float>(); float* g = w->grad.data<float>();
#pragma once

#include <deque>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "lmforge/core/arena.h"
#include "lmforge/core/packed_range.h"

namespace lmforge {

struct Param {
  std::string name;
  Shape shape;
  bool decay = true;        // AdamW weight decay applies (off for norms, biases, embeddings)
  Tensor value;             // the master weights: fp32, or bf16 under ParamSet::use_bf16_master
  Tensor grad;              // fp32
  bool matmul = false;      // used as a matmul weight (gets a bf16 copy under bf16 precision)
  bool frozen = false;      // not trained (LoRA's base weights): no gradient, no optimizer state
  Tensor value_bf16;        // bf16(value) for the matmuls when enabled; see ParamSet
  int64_t flat_offset = 0;  // first element in ParamSet's flat space (ParamSet::offset)
  Tensor value_f32;         // bf16 master weights: the fp32 working copy of a 1-D parameter
  // The rows of each projection stacked in this matrix (attn.qkv: q, k, v; a gated mlp.fc: gate,
  // up), which Muon orthogonalizes apart; empty: one matrix.
  std::vector<int64_t> row_blocks;
  // On the host, zero_grad() leaves a matmul weight's gradient as it was and sets this instead:
  // the step's first GEMM into it then writes rather than adds (PyTorch's zero_grad with
  // set_to_none), which saves the pass that zeroing the buffer costs. Whoever adds to the
  // gradient asks accumulate_grad() (false once: write it); anything else settle_grad() first.
  mutable bool grad_unwritten = false;
  bool accumulate_grad() const {
    const bool add = !grad_unwritten;
    grad_unwritten = false;
    return add;
  }
  void settle_grad() const {
    if (!grad_unwritten) return;
    grad.zero_();
    grad_unwritten = false;
  }
  // The matmul operand: the bf16 copy under bf16 precision, else the fp32 value.
  const Tensor& matmul_weight() const { return value_bf16.defined() ? value_bf16 : value; }
  // The operand of the fp32 ops (norm weights, biases): the value, or its fp32 working copy.
  const Tensor& fp32() const { return value_f32.defined() ? value_f32 : value; }
};

// Where a model that holds part of each parameter (a tensor-parallel share) finds its elements
// in the whole model's tensors: the whole parameter's shape, and runs of elements, each
// [whole, whole + len) of the whole tensor (flat) being [share, share + len) of the part.
struct ShareRun {
  int64_t whole, share, len;
};
struct ParamShare {
  Shape whole_shape;
  std::vector<ShareRun> runs;
};
// For each parameter of the part, its place in the whole (dist::tensor_parallel_share_of); an
// empty function: the model is whole.
using ShareOfWhole = std::function<ParamShare(const Param&)>;

// A model's values one parameter at a time (a seed's initial values, init_from's source):
// calls give(p, values) for parameters of a layout of the model, each with its whole fp32
// values on the host (valid during the call), so that a part of the model (a shard, a
// tensor-parallel share) is made without the whole.
using GiveValues = std::function<void(const Param&, const float*)>;
using ValueStream = std::function<void(const GiveValues&)>;

class ParamSet {
 public:
  Param* add(const std::string& name, Shape shape, bool decay);
  void finalize(DType dtype = DType::kF32);
  // The layout alone (offsets, flat_size()): no buffers; the set cannot hold values.
  void finalize_layout(DType dtype = DType::kF32);
  // Moves every buffer (values, gradients, bf16 copies) to `device`, contents kept (the bf16
  // copies are reconverted on use); Param tensors point at the new buffers. Set-up code only.
  void to(Device device);
  Device device() const { return device_; }
  Param* find(const std::string& name);
  // Takes a stream of another layout's values (a whole model's, for this set's part of it): put(q,
  // p, values) for this set's parameter q named as the streamed p; checks that every parameter of
  // this set came, once.
  void take_stream(const ValueStream& values,
                   const std::function<void(const Param& q, const Param& p, const float*)>& put);

  std::deque<Param>& params() { return params_; }
  const std::deque<Param>& params() const { return params_; }
  int64_t numel() const;
  // Zeroes the gradients of the parameters that train (trainable_ranges): frozen ones are never
  // written, so on the host their part of the buffer is never even paged in. On the host the
  // matmul weights' are marked Param::grad_unwritten instead (their first GEMM writes them; the
  // model settles any left unwritten before it reports a group's gradients ready).
  void zero_grad() const;
  // The flat ranges [lo, hi) that hold the parameters that train, consecutive ones merged (with
  // the alignment gaps between them): one range, the whole space, without frozen parameters.
  std::vector<std::pair<int64_t, int64_t>> trainable_ranges() const;
  // The whole gradient buffer as one flat tensor: the trained parameters' elements packed
  // (grad_pack(): a flat index's place in it; without frozen parameters the flat index itself;
  // alignment gaps included, zero).
  Tensor flat_grads() const { return grads_.as_tensor(dtype_).slice(0, grad_pack_.size()); }
  const PackedRange& grad_pack() const { return grad_pack_; }
  // The flat index space of both buffers: parameter p occupies elements
  // [offset(p), offset(p) + numel) of flat_size() (the gaps keep every parameter 64-byte aligned).
  // Sharding (dist/) cuts this space into contiguous per-rank ranges.
  int64_t offset(const Param& p) const { return p.flat_offset; }
  int64_t flat_size() const { return flat_size_; }
  // Full-shard training keeps only a shard of the values: frees the value buffer and leaves
  // every Param::value undefined until something points it at gathered memory.
  void release_values();
  void allocate_values();  // again, after release_values (contents undefined)
  // Grad-/full-shard training points each group's gradients at a small workspace instead: frees
  // the gradient buffer and leaves every Param::grad undefined.
  void release_grads();
  bool has_values() const { return values_.capacity() > 0; }
  // The values in the flat index space (bf16 under bf16 master weights).
  Tensor flat_values() const;
  // Sets every value from src, fp32 of flat_size() elements on any device (converted to the
  // master dtype, rounding to nearest even).
  void assign_values(const Tensor& src);
  size_t value_bytes() const { return values_.capacity(); }
  // Everything the weights take: the values, bf16 copies and fp32 working copies.
  size_t weight_bytes() const { return values_.capacity() + bf16_.capacity() + work_.capacity(); }
  size_t grad_bytes() const { return grads_.capacity(); }

  // bf16 mixed precision: matmul parameters get a bf16 copy (value_bf16) that the matmuls read.
  // The optimizer rewrites the copies in its fused update and calls bf16_refreshed(); anything
  // else that writes values (init, loading) leaves them stale, and sync_bf16() (called at the
  // start of every forward) converts them again. enable_bf16 after finalize.
  void enable_bf16();
  // Full-shard keeps no whole-model copies: use_external_bf16() frees them and the owner of the
  // gathered values (DataParallel) points each value_bf16 at its own buffers and converts them
  // when a group is gathered; sync_bf16() then does nothing. With bf16 master weights the owner
  // gathers the bf16 values themselves and points value, value_bf16 and the 1-D parameters' fp32
  // working copies (value_f32) at its buffers. enable_bf16() goes back to copies of this set's
  // own (after allocate_values).
  void use_external_bf16();
  bool has_bf16() const { return bf16_.capacity() > 0 || bf16_external_ || master_bf16_; }

  // bf16 master weights (train.master_weights: bf16): the values themselves become bf16 (rounded
  // to nearest even once, here), half the memory of fp32 ones and no separate bf16 copies: a
  // matmul weight's value_bf16 is its value. AdamW updates them in fp32 and rounds stochastically
  // (ops::adamw_update). The 1-D parameters (norm weights, biases) get fp32 working copies
  // (value_f32, read through Param::fp32()) that sync_bf16() refreshes; the embedding tables are
  // read as bf16 by ops::embedding_forward. Gradients stay fp32. Before or after enable_bf16,
  // before use_external_bf16. convert = false: the values are not written yet (full-shard's, which
  // DataParallel makes from a stream, or a load's that writes them next): the bf16 buffer is left
  // unwritten too.
  void use_bf16_master(bool convert = true);
  bool bf16_master() const { return master_bf16_; }
  void invalidate_bf16() { bf16_fresh_ = false; }
  void bf16_refreshed() { bf16_fresh_ = true; }
  void sync_bf16();

 private:
  std::deque<Param> params_;  // deque: Param* handles stay valid while adding
  Arena values_, grads_, bf16_, work_;
  int64_t flat_size_ = 0;
  PackedRange grad_pack_;
  bool bf16_fresh_ = false, bf16_external_ = false, master_bf16_ = false;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCPU;
  void allocate_grads();
};

}  // namespace lmforge
