#include "lmforge/backend/cuda/runtime.h"

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/ops.h"
#include "lmforge/core/error.h"

namespace lmforge {

void cuda_unavailable(const char* op) {
  fail("{}: not implemented on CUDA yet (see the CUDA issue); set train.device=cpu", op);
}

}  // namespace lmforge

namespace lmforge::cuda {

namespace detail {
void cuda_failed(int error, const char* call, const char* file, int line) {
  const auto e = static_cast<cudaError_t>(error);
  fail("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(e), cudaGetErrorString(e), call, file,
       line);
}
void raise(const std::string& message) { throw Error(message); }
}  // namespace detail

namespace {
struct Probe {
  int count = 0;
  cudaError_t error = cudaSuccess;
  int driver = 0;  // the CUDA version the driver supports; 0 when no driver is installed
  bool no_device() const {
    return count == 0 && (error == cudaSuccess || error == cudaErrorNoDevice || driver == 0);
  }
};
const Probe& probe() {
  static const Probe p = [] {
    Probe r;
    r.error = cudaGetDeviceCount(&r.count);
    if (r.error != cudaSuccess) {
      cudaGetLastError();
      r.count = 0;
    }
    if (cudaDriverGetVersion(&r.driver) != cudaSuccess) r.driver = 0;
    return r;
  }();
  return p;
}
}  // namespace

int device_count() { return probe().count; }

bool no_device() { return probe().no_device(); }

std::string unavailable_reason() {
  const Probe& p = probe();
  if (p.count > 0) return "";
  if (p.no_device())
    return p.driver == 0 ? "no CUDA GPU is visible (no CUDA driver is installed)"
                         : "no CUDA GPU is visible";
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  return fmt::format(
      "the CUDA runtime cannot use the GPU: {} ({}; the driver supports CUDA {}.{}, lmforge was "
      "built with {}.{})",
      cudaGetErrorName(p.error), cudaGetErrorString(p.error), p.driver / 1000, p.driver % 1000 / 10,
      runtime / 1000, runtime % 1000 / 10);
}

bool available() { return device_count() > 0; }

std::string device_name() {
  if (!available()) return "";
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp p{};
  LMF_CUDA(cudaGetDeviceProperties(&p, dev));
  return p.name;
}

double datasheet_bf16_tflops() {
  const std::string name = device_name();
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos)
    return name.find("PCIe") != std::string::npos  ? 756.0
           : name.find("NVL") != std::string::npos ? 835.0  // H100 NVL, H200 NVL
                                                   : 989.4;
  if (name.find("A100") != std::string::npos) return 312.0;
  return 0;
}

void set_device(int index) {
  if (index < 0 || index >= device_count())
    fail("CUDA device {} does not exist ({} device(s) visible)", index, device_count());
  LMF_CUDA(cudaSetDevice(index));
}

void* stream() {
  static cudaStream_t s = [] {
    cudaStream_t x = nullptr;
    LMF_CUDA(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
    return x;
  }();
  return s;
}

size_t free_memory() {
  size_t free_b = 0, total = 0;
  LMF_CUDA(cudaMemGetInfo(&free_b, &total));
  return free_b;
}

namespace {
// What malloc() handed out (allocations are set-up-time events, so a map and a lock are cheap).
struct Ledger {
  std::mutex mu;
  std::unordered_map<void*, size_t> sizes;
  size_t now = 0, peak = 0;
};
Ledger& ledger() {
  static Ledger* l = new Ledger;  // never destroyed: frees may come from static destructors
  return *l;
}
std::atomic<uint64_t> g_frees{0};
}  // namespace

uint64_t frees() { return g_frees.load(); }

size_t peak_allocated() {
  std::lock_guard<std::mutex> lock(ledger().mu);
  return ledger().peak;
}

bool is_device_pointer(const void* p) {
  if (!p || !available()) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

void* malloc(size_t bytes) {
  void* p = nullptr;
  if (const cudaError_t e = cudaMalloc(&p, bytes); e != cudaSuccess) {
    cudaGetLastError();  // clear the error of a failed allocation
    // Not every failure is memory: an earlier kernel's fault (sticky) or an allocation inside a
    // graph capture surfaces here too, and must not be reported as "lower the batch size".
    if (e != cudaErrorMemoryAllocation)
      fail("cudaMalloc of {:.2f} GiB failed: {} ({}); an earlier kernel may have faulted",
           bytes / 1073741824.0, cudaGetErrorString(e), cudaGetErrorName(e));
    fail(
        "out of GPU memory: {:.2f} GiB requested, {:.2f} GiB free on {}; lower "
        "train.batch_size or train.seq_len, or set train.activation_checkpointing",
        bytes / 1073741824.0, free_memory() / 1073741824.0, device_name());
  }
  Ledger& l = ledger();
  std::lock_guard<std::mutex> lock(l.mu);
  l.sizes[p] = bytes;
  l.now += bytes;
  l.peak = std::max(l.peak, l.now);
  return p;
}

void free(void* p) {
  if (!p) return;
  {
    Ledger& l = ledger();
    std::lock_guard<std::mutex> lock(l.mu);
    auto it = l.sizes.find(p);
    if (it != l.sizes.end()) {
      l.now -= it->second;
      l.sizes.erase(it);
    }
  }
  g_frees.fetch_add(1);
  // Not thrown (free runs in destructors), but cleared: a failed free left unread would be
  // reported by the next launch check, against an unrelated kernel. A sticky error (an earlier
  // fault) stays and is reported by the next check, as it should be.
  if (cudaFree(p) != cudaSuccess) cudaGetLastError();
}

void memcpy(void* dst, const void* src, size_t bytes, Copy kind) {
  cudaMemcpyKind k = kind == Copy::kHostToDevice   ? cudaMemcpyHostToDevice
                     : kind == Copy::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                   : cudaMemcpyDeviceToDevice;
  auto s = static_cast<cudaStream_t>(stream());
  LMF_CUDA(cudaMemcpyAsync(dst, src, bytes, k, s));
  if (kind == Copy::kDeviceToHost) LMF_CUDA(cudaStreamSynchronize(s));  // the host reads it next
}

void memcpy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
               size_t rows) {
  LMF_CUDA(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice,
                             static_cast<cudaStream_t>(stream())));
}

void memset_zero(void* p, size_t bytes) {
  LMF_CUDA(cudaMemsetAsync(p, 0, bytes, static_cast<cudaStream_t>(stream())));
}

void synchronize() { LMF_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream()))); }

void* GrowingBuffer::get(size_t bytes) {
  if (bytes > cap_) {
    // Growing synchronizes and allocates, neither of which a capture allows; say so plainly
    // (the capture is dropped and the step runs eagerly, see nn/transformer.cpp).
    if (capturing())
      fail("device scratch must grow to {} bytes inside a CUDA graph capture", bytes);
    if (buf_) {
      synchronize();
      void* old = buf_;
      buf_ = nullptr;
      cap_ = 0;
      cuda::free(old);
    }
    buf_ = cuda::malloc(bytes);
    cap_ = bytes;
  }
  return buf_;
}

void begin_capture() {
  // Thread-local: another thread's calls (a data loader's) do not break this capture.
  LMF_CUDA(cudaStreamBeginCapture(static_cast<cudaStream_t>(stream()),
                                  cudaStreamCaptureModeThreadLocal));
}

bool capturing() {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  LMF_CUDA(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream()), &st));
  return st != cudaStreamCaptureStatusNone;
}

void* end_capture() {
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture(static_cast<cudaStream_t>(stream()), &graph);
  cudaGraphExec_t exec = nullptr;
  if (e == cudaSuccess && graph) e = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    cudaGetLastError();  // a failed capture is not a sticky error: the stream works on
    return nullptr;
  }
  return exec;
}

void graph_launch(void* exec) {
  LMF_CUDA(
      cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), static_cast<cudaStream_t>(stream())));
}

void graph_destroy(void* exec) {
  if (exec) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
}

namespace {
std::vector<cudaEvent_t>& event_pool() {
  static auto* pool = new std::vector<cudaEvent_t>;  // never destroyed, as the ledger
  return *pool;
}
}  // namespace

void* event_record() {
  cudaEvent_t e = nullptr;
  if (event_pool().empty()) {
    LMF_CUDA(cudaEventCreate(&e));
  } else {
    e = event_pool().back();
    event_pool().pop_back();
  }
  LMF_CUDA(cudaEventRecord(e, static_cast<cudaStream_t>(stream())));
  return e;
}

float event_elapsed_ms(void* start, void* end) {
  LMF_CUDA(cudaEventSynchronize(static_cast<cudaEvent_t>(end)));
  float ms = 0;
  LMF_CUDA(
      cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
  return ms;
}

void event_release(void* event) {
  if (event) event_pool().push_back(static_cast<cudaEvent_t>(event));
}

}  // namespace lmforge::cuda
