#include "lmforge/nn/params.h"

#include <set>

#include "lmforge/backend/ops.h"

namespace lmforge {

Param* ParamSet::add(const std::string& name, Shape shape, bool decay) {
  LMF_CHECK(find(name) == nullptr, "duplicate parameter {}", name);
  params_.push_back(Param{name, shape, decay, {}, {}, false, false, {}, 0, {}, {}});
  return &params_.back();
}

void ParamSet::finalize(DType dtype) {
  finalize_layout(dtype);
  allocate_values();
  allocate_grads();
}

void ParamSet::finalize_layout(DType dtype) {
  dtype_ = dtype;
  Arena measure = Arena::measuring();  // the offsets allocate_grads() would give
  for (Param& p : params_)
    p.flat_offset =
        static_cast<int64_t>(measure.alloc(p.shape, dtype_).byte_offset() / dtype_size(dtype_));
  flat_size_ = static_cast<int64_t>(measure.used() / dtype_size(dtype_));
}

void ParamSet::allocate_grads() {
  // Packed: the trained parameters' elements alone, each run of consecutive ones 64-byte aligned
  // (under LoRA the adapters'; the frozen base weights get no gradient), else the flat space.
  grad_pack_ = PackedRange(0, flat_size_, trainable_ranges(), 64 / dtype_size(dtype_));
  grads_ = Arena::planned([&](Arena& a) { a.alloc({grad_pack_.size()}, dtype_); }, device_);
  const Tensor flat = flat_grads();
  for (Param& p : params_)
    p.grad = p.frozen ? Tensor()
                      : flat.slice(grad_pack_.at(p.flat_offset), p.shape.numel()).view(p.shape);
}

void ParamSet::to(Device device) {
  if (device == device_) return;
  // The old buffers stay alive through these views until the copies are made.
  Tensor values = has_values() ? flat_values() : Tensor();
  Tensor grads = grads_.capacity() ? flat_grads() : Tensor();
  // External copies (full-shard's) point at the owner's buffers on the old device: the moved
  // set makes copies of its own instead.
  const bool bf16 = has_bf16();
  device_ = device;
  if (values.defined()) {
    allocate_values();
    flat_values().copy_from(values);
  }
  if (grads.defined()) {
    allocate_grads();
    flat_grads().copy_from(grads);
  }
  if (bf16 && !master_bf16_) {  // (bf16 masters are their own copies: allocate_values)
    bf16_ = Arena();
    for (Param& p : params_) p.value_bf16 = Tensor();
    if (values.defined()) enable_bf16();
  }
}

void ParamSet::release_grads() {
  for (Param& p : params_) p.grad = Tensor(), p.grad_unwritten = false;
  grads_ = Arena();
}

void ParamSet::allocate_values() {
  if (!master_bf16_) {
    values_ = Arena::planned(
        [&](Arena& a) {
          for (Param& p : params_) p.value = a.alloc(p.shape, dtype_);
        },
        device_);
    return;
  }
  // bf16 masters keep the flat index space of the fp32 gradients (the same element offsets),
  // so the values are views into one flat bf16 tensor rather than separately aligned pieces.
  values_ =
      Arena((static_cast<size_t>(flat_size_) * dtype_size(DType::kBF16) + 63) / 64 * 64, device_);
  const Tensor flat = values_.alloc({flat_size_}, DType::kBF16);
  for (Param& p : params_) {
    p.value = flat.slice(p.flat_offset, p.shape.numel()).view(p.shape);
    if (p.matmul) p.value_bf16 = p.value;
  }
  work_ = Arena::planned(
      [&](Arena& a) {
        for (Param& p : params_)
          if (p.shape.ndim() == 1) p.value_f32 = a.alloc(p.shape, DType::kF32);
      },
      device_);
  bf16_fresh_ = false;
}

Tensor ParamSet::flat_values() const {
  if (!master_bf16_) return values_.as_tensor(dtype_);
  return values_.as_tensor(DType::kBF16).slice(0, flat_size_);
}

void ParamSet::assign_values(const Tensor& src) {
  LMF_CHECK(src.dtype() == DType::kF32 && src.numel() == flat_size_,
            "assign_values: {} fp32 values expected", flat_size_);
  Tensor dst = flat_values();
  if (master_bf16_) {
    Tensor host = src.device() == Device::kCPU ? src : src.to(Device::kCPU);
    Tensor rounded = Tensor::empty({flat_size_}, DType::kBF16);
    ops::to_bf16(rounded, host);
    dst.copy_from(rounded);
  } else {
    dst.copy_from(src);
  }
  invalidate_bf16();
}

void ParamSet::use_bf16_master(bool convert) {
  LMF_CHECK(dtype_ == DType::kF32 && has_values() && !bf16_external_,
            "use_bf16_master needs the set's own fp32 values");
  if (master_bf16_) return;
  const Tensor old = flat_values();  // keeps the fp32 buffer alive until converted
  bf16_ = Arena();                   // the matmul weights become their own bf16 copies
  for (Param& p : params_) p.value_bf16 = Tensor();
  master_bf16_ = true;
  allocate_values();
  if (convert) ops::to_bf16(flat_values(), old);
}

void ParamSet::enable_bf16() {
  LMF_CHECK(dtype_ == DType::kF32 && values_.capacity() > 0, "enable_bf16 needs fp32 parameters");
  if (master_bf16_) {  // the set's own values again (allocate_values): their own copies
    bf16_external_ = false;
    bf16_fresh_ = false;
    return;
  }
  if (bf16_.capacity() > 0) return;
  bf16_external_ = false;
  bf16_ = Arena::planned(
      [&](Arena& a) {
        for (Param& p : params_)
          if (p.matmul) p.value_bf16 = a.alloc(p.shape, DType::kBF16);
      },
      device_);
  bf16_fresh_ = false;
}

void ParamSet::use_external_bf16() {
  bf16_ = Arena();
  for (Param& p : params_) p.value_bf16 = Tensor();
  bf16_external_ = true;
}

void ParamSet::sync_bf16() {
  if (bf16_fresh_ || bf16_external_) return;  // external: the owner converts what it gathers
  if (master_bf16_) {
    for (Param& p : params_)
      if (p.value_f32.defined()) ops::from_bf16(p.value_f32, p.value);
  } else if (bf16_.capacity() > 0) {
    for (Param& p : params_)
      if (p.value_bf16.defined()) ops::to_bf16(p.value_bf16, p.value);
  } else {
    return;
  }
  bf16_fresh_ = true;
}

void ParamSet::release_values() {
  LMF_CHECK(bf16_.capacity() == 0 && (!master_bf16_ || bf16_external_),
            "release_values with bf16 copies");
  for (Param& p : params_) p.value = p.value_bf16 = p.value_f32 = Tensor();
  values_ = work_ = Arena();
}

std::vector<std::pair<int64_t, int64_t>> ParamSet::trainable_ranges() const {
  std::vector<std::pair<int64_t, int64_t>> out;
  bool prev = false;  // the previous parameter trains
  for (const Param& p : params_) {
    if (p.frozen) {
      prev = false;
      continue;
    }
    const int64_t hi = p.flat_offset + p.shape.numel();
    if (prev)
      out.back().second = hi;
    else
      out.emplace_back(p.flat_offset, hi);
    prev = true;
  }
  if (out.size() == 1 && out[0].first == 0 &&
      out[0].second == params_.back().flat_offset + params_.back().shape.numel())
    out[0].second = flat_size_;  // everything trains: the whole space, trailing gap included
  return out;
}

void ParamSet::zero_grad() const {
  if (grads_.capacity() == 0) return;
  const Tensor flat = flat_grads();
  if (device_ != Device::kCPU) {  // one memset on the device is as good as free
    flat.zero_();
    return;
  }
  // The host: matmul weights marked unwritten, the rest zeroed in runs of consecutive parameters
  // (with the gaps between them, zero anyway).
  int64_t lo = -1, hi = -1;
  auto flush = [&] {  // (consecutive trained parameters: consecutive in the packed buffer)
    if (lo >= 0) flat.slice(grad_pack_.at(lo), hi - lo).zero_();
    lo = hi = -1;
  };
  for (const Param& p : params_) {
    if (p.frozen || p.matmul) {
      flush();
      if (!p.frozen) p.grad_unwritten = true;
      continue;
    }
    if (lo < 0) lo = p.flat_offset;
    hi = p.flat_offset + p.shape.numel();
  }
  flush();
}

Param* ParamSet::find(const std::string& name) {
  for (Param& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

void ParamSet::take_stream(
    const ValueStream& values,
    const std::function<void(const Param& q, const Param& p, const float*)>& put) {
  std::set<std::string> given;
  values([&](const Param& p, const float* v) {
    const Param* q = find(p.name);
    LMF_CHECK(q && given.insert(p.name).second, "values streamed for {}: not a parameter, or twice",
              p.name);
    put(*q, p, v);
  });
  LMF_CHECK(given.size() == params_.size(), "values streamed for {} of {} parameters", given.size(),
            params_.size());
}

int64_t ParamSet::numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.shape.numel();
  return n;
}

}  // namespace lmforge
