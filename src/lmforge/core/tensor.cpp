#include "lmforge/core/tensor.h"

#include <sys/mman.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/profile.h"

namespace lmforge {

namespace {

constexpr size_t kAlign = 64;  // one cache line; AVX-512 loads want 64-byte alignment

std::string& oom_hint_storage() {
  static std::string hint = "close other programs or use a machine with more memory";
  return hint;
}

// The number of the first line of `path` that `format` (a sscanf format with one %lld) matches,
// e.g. "MemAvailable: %lld kB" in /proc/meminfo; -1 when none does or the file is absent
// (cgroup v2's memory.max says "max" without a limit).
int64_t line_value(const std::string& path, const char* format) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return -1;
  char line[1024];
  long long v = -1;
  while (std::fgets(line, sizeof(line), f))
    if (std::sscanf(line, format, &v) == 1) break;
  std::fclose(f);
  return v;
}

// This process's cgroup v2 directory ("0::/path" in /proc/self/cgroup), or "".
std::string cgroup_dir() {
  std::FILE* f = std::fopen("/proc/self/cgroup", "r");
  if (!f) return "";
  char line[1024];
  std::string dir;
  while (std::fgets(line, sizeof(line), f))
    if (std::strncmp(line, "0::", 3) == 0) {
      dir = line + 3;
      while (!dir.empty() && (dir.back() == '\n' || dir.back() == '/')) dir.pop_back();
      dir = "/sys/fs/cgroup" + dir;
      break;
    }
  std::fclose(f);
  return dir;
}

}  // namespace

void set_oom_hint(std::string hint) { oom_hint_storage() = std::move(hint); }
const std::string& oom_hint() { return oom_hint_storage(); }

// Linux overcommits, so a too-large malloc "succeeds" and the process is killed later; asking
// first turns that into an error. The node's: the lesser of MemAvailable and what this process's
// cgroup (v2) may still take, memory.max - memory.current, less the reclaimable page cache
// (inactive_file) that memory.current counts.
size_t available_host_memory() {
  const int64_t kb = line_value("/proc/meminfo", "MemAvailable: %lld kB");
  size_t avail = kb > 0 ? static_cast<size_t>(kb) * 1024 : 0;
  if (const std::string dir = cgroup_dir(); !dir.empty()) {
    const int64_t max = line_value(dir + "/memory.max", "%lld"),
                  cur = line_value(dir + "/memory.current", "%lld"),
                  cache =
                      std::max<int64_t>(0, line_value(dir + "/memory.stat", "inactive_file %lld"));
    if (max > 0 && cur >= 0) {
      const int64_t used = std::max<int64_t>(0, cur - cache);
      const size_t left = max > used ? static_cast<size_t>(max - used) : 1;  // (0: unknown)
      avail = avail ? std::min(avail, left) : left;
    }
  }
  return avail;
}

// What is left of this process's address-space limit (ulimit -v), or SIZE_MAX without one.
size_t process_address_room() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_AS, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return SIZE_MAX;
  const size_t used = static_cast<size_t>(std::max<int64_t>(
                          0, line_value("/proc/self/status", "VmSize: %lld kB"))) *
                      1024;
  return rl.rlim_cur > used ? rl.rlim_cur - used : 0;
}

void check_host_memory(double bytes, const std::string& what, const std::string& fix,
                       int processes) {
  const size_t avail = available_host_memory();
  if (avail && bytes > static_cast<double>(avail))
    fail("out of memory: {} need {:.2f} GiB but {:.2f} GiB is available; {}", what,
         bytes / 1073741824.0, avail / 1073741824.0, fix);
  const size_t room = process_address_room();
  const double mine = bytes / std::max(1, processes);
  // Beside the planned bytes, what the libraries map as the run goes on: thread stacks (OpenMP's,
  // and the pools a checkpoint's hashing starts), oneDNN's scratchpads. Within ~40 MiB of the
  // limit oneDNN crashed (SIGSEGV) and libgomp exited without naming anything, instead of this
  // line.
  const double headroom =
      (128.0 + 16.0 * std::clamp(std::thread::hardware_concurrency(), 1u, 64u)) * 1048576.0;
  if (room != SIZE_MAX && mine + headroom > static_cast<double>(room))
    fail(
        "out of memory: {} need {:.2f} GiB{} (+ {:.2f} GiB for threads and libraries) but the "
        "address-space limit (ulimit -v) leaves {:.2f} GiB; {}",
        what, mine / 1073741824.0, processes > 1 ? " per process" : "", headroom / 1073741824.0,
        room / 1073741824.0, fix);
}

std::shared_ptr<Storage> Storage::allocate(size_t bytes, Device device) {
  if (device == Device::kCUDA) {  // zero-filled, like host storage
    if (!cuda::available()) fail("cannot allocate on cuda: {}", cuda::unavailable_reason());
    void* p = bytes ? cuda::malloc(bytes) : nullptr;
    if (p) cuda::memset_zero(p, bytes);
    return std::shared_ptr<Storage>(new Storage(p, bytes, device, true));
  }
  size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  if (rounded > (size_t{1} << 26))
    check_host_memory(static_cast<double>(rounded), "new buffers", oom_hint());
  // Large buffers come straight from the kernel: zero pages that only become resident when
  // first written (a full-shard model never touches its whole-model buffer; start-up does not
  // page in every arena twice). Small ones from the heap, zeroed.
  const bool map = rounded >= (size_t{1} << 20);
  void* p = nullptr;
  if (map) {
    p = ::mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) p = nullptr;
    // Transparent huge pages where the kernel grants them on request (THP "madvise" mode, the
    // common default): start-up faults the arenas in per 2 MiB instead of per 4 KiB (GPT-2 8x512:
    // 1.29 M page faults -> 39 K; the step rate did not move beyond this VM's noise). Advice
    // only: no error if refused.
    if (p && rounded >= (size_t{4} << 20)) ::madvise(p, rounded, MADV_HUGEPAGE);
  } else if (rounded) {
    p = std::aligned_alloc(kAlign, rounded);
    if (p) std::memset(p, 0, rounded);
  }
  if (rounded && !p) fail("out of memory allocating {:.1f} MiB; {}", bytes / 1048576.0, oom_hint());
  auto s = std::shared_ptr<Storage>(new Storage(p, bytes, device, true));
  s->mapped_ = map ? rounded : 0;
  return s;
}

std::shared_ptr<Storage> Storage::borrow(void* data, size_t bytes, std::shared_ptr<void> keepalive,
                                         Device device) {
  auto s = std::shared_ptr<Storage>(new Storage(data, bytes, device, false));
  s->keepalive_ = std::move(keepalive);
  return s;
}

Storage::~Storage() {
  if (owned_ && device_ == Device::kCUDA)
    cuda::free(data_);
  else if (owned_ && mapped_)
    ::munmap(data_, mapped_);
  else if (owned_)
    std::free(data_);
}

Shape::Shape(std::initializer_list<int64_t> dims) {
  LMF_CHECK(dims.size() <= kMaxDims, "too many dims: {}", dims.size());
  for (int64_t d : dims) dims_[ndim_++] = d;
}

Shape Shape::of(const int64_t* dims, int n) {
  LMF_CHECK(n <= kMaxDims, "too many dims: {}", n);
  Shape s;
  for (int i = 0; i < n; ++i) s.dims_[i] = dims[i];
  s.ndim_ = n;
  return s;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim_ != o.ndim_) return false;
  for (int i = 0; i < ndim_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "(";
  for (int i = 0; i < ndim_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
  return s + ")";
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t byte_offset, Shape shape, DType dtype)
    : storage_(std::move(storage)),
      byte_offset_(byte_offset),
      shape_(shape),
      dtype_(dtype),
      dtype_set_(true) {
  if (storage_)
    LMF_CHECK(byte_offset_ + nbytes() <= storage_->bytes(),
              "view {} {} at {} past storage of {} bytes", shape_.str(), dtype_name(dtype_),
              byte_offset_, storage_->bytes());
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  size_t bytes = static_cast<size_t>(shape.numel()) * dtype_size(dtype);
  return Tensor(Storage::allocate(bytes, device), 0, shape, dtype);
}

Tensor Tensor::view(Shape shape) const {
  int infer = -1;
  int64_t known = 1;
  for (int i = 0; i < shape.ndim(); ++i) {
    if (shape[i] == -1) {
      LMF_CHECK(infer < 0, "view {}: two -1 dims", shape.str());
      infer = i;
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) shape[infer] = known ? numel() / known : 0;
  LMF_CHECK(shape.numel() == numel(), "view {} of tensor {}", shape.str(), shape_.str());
  return Tensor(storage_, byte_offset_, shape, dtype_);
}

Tensor Tensor::slice(int64_t start, int64_t len) const {
  LMF_CHECK(ndim() >= 1 && start >= 0 && start + len <= shape_[0], "slice [{}, {}) of {}", start,
            start + len, shape_.str());
  Shape s = shape_;
  s[0] = len;
  size_t row = static_cast<size_t>(shape_[0] ? numel() / shape_[0] : 0) * dtype_size(dtype_);
  return Tensor(storage_, byte_offset_ + start * row, s, dtype_);
}

Tensor Tensor::operator[](int64_t i) const {
  Tensor row = slice(i, 1);
  int64_t dims[kMaxDims];
  for (int d = 1; d < ndim(); ++d) dims[d - 1] = shape_[d];
  return row.view(Shape::of(dims, ndim() - 1));
}

void Tensor::zero_() const {
  if (!numel()) return;
  profile::Scope timed("zero", *this);
  if (device() == Device::kCUDA) {
    cuda::memset_zero(raw(), nbytes());
    return;
  }
  // Large buffers in one piece per thread: one core's stores do not fill the memory bandwidth.
  constexpr size_t kPiece = size_t{1} << 20;
  const size_t n = nbytes(), pieces = (n + kPiece - 1) / kPiece;
  char* p = static_cast<char*>(raw());
#pragma omp parallel for schedule(static) if (pieces > 1)
  for (size_t i = 0; i < pieces; ++i)
    std::memset(p + i * kPiece, 0, std::min(kPiece, n - i * kPiece));
}

// Same dtype and numel; across devices too (host <-> GPU, ordered on the CUDA stream; a copy to
// the host waits for it).
void Tensor::copy_from(const Tensor& src) const {
  LMF_CHECK(src.dtype() == dtype_ && src.numel() == numel(), "copy {} {} into {} {}",
            src.shape().str(), dtype_name(src.dtype()), shape_.str(), dtype_name(dtype_));
  if (!numel()) return;
  const bool to_gpu = device() == Device::kCUDA, from_gpu = src.device() == Device::kCUDA;
  // Keyed on the GPU side of a transfer: its time is on the stream.
  profile::Scope timed(to_gpu && !from_gpu   ? "copy_to_gpu"
                       : from_gpu && !to_gpu ? "copy_to_host"
                                             : "copy",
                       from_gpu ? src : *this);
  if (!to_gpu && !from_gpu)
    std::memcpy(raw(), src.raw(), nbytes());
  else
    cuda::memcpy(raw(), src.raw(), nbytes(),
                 to_gpu && from_gpu ? cuda::Copy::kDeviceToDevice
                 : to_gpu           ? cuda::Copy::kHostToDevice
                                    : cuda::Copy::kDeviceToHost);
}

void Tensor::fill_(double v) const {
  if (device() == Device::kCUDA) {  // set-up code only: through a host copy
    Tensor host = empty(shape_, dtype_);
    host.fill_(v);
    copy_from(host);
    return;
  }
  int64_t n = numel();
  switch (dtype_) {
    case DType::kF64:
      for (int64_t i = 0; i < n; ++i) data<double>()[i] = v;
      break;
    case DType::kF32:
      for (int64_t i = 0; i < n; ++i) data<float>()[i] = static_cast<float>(v);
      break;
    case DType::kI32:
      for (int64_t i = 0; i < n; ++i) data<int32_t>()[i] = static_cast<int32_t>(v);
      break;
    default:
      LMF_CHECK(false, "fill_ on {}", dtype_name(dtype_));
  }
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(Device d) const {
  Tensor t = empty(shape_, dtype_, d);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dt) const {
  if (dt == dtype_) return clone();
  LMF_CHECK(device() == Device::kCPU, "to({}) of a CUDA tensor: copy it to the host first",
            dtype_name(dt));
  Tensor t = empty(shape_, dt, device());
  int64_t n = numel();
  auto get = [&](int64_t i) -> double {
    switch (dtype_) {
      case DType::kF64:
        return static_cast<const double*>(raw())[i];
      case DType::kF32:
        return static_cast<const float*>(raw())[i];
      case DType::kBF16:
        return bf16_to_fp32(static_cast<const uint16_t*>(raw())[i]);
      case DType::kI32:
        return static_cast<const int32_t*>(raw())[i];
      case DType::kU16:
        return static_cast<const uint16_t*>(raw())[i];
      case DType::kU32:
        return static_cast<const uint32_t*>(raw())[i];
      default:
        LMF_CHECK(false, "to() from {}", dtype_name(dtype_));
    }
    return 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    double v = get(i);
    switch (dt) {
      case DType::kF64:
        static_cast<double*>(t.raw())[i] = v;
        break;
      case DType::kF32:
        static_cast<float*>(t.raw())[i] = static_cast<float>(v);
        break;
      case DType::kBF16:
        static_cast<uint16_t*>(t.raw())[i] = fp32_to_bf16(static_cast<float>(v));
        break;
      case DType::kI32:
        static_cast<int32_t*>(t.raw())[i] = static_cast<int32_t>(v);
        break;
      default:
        LMF_CHECK(false, "to() into {}", dtype_name(dt));
    }
  }
  return t;
}

}  // namespace lmforge
