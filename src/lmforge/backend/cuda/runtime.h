// The CUDA runtime as the rest of lmforge sees it: plain C++ types only (no CUDA headers), so
// core/ and backend/ops.cpp compile the same with or without the CUDA backend. Built when CMake
// finds nvcc (LMFORGE_HAVE_CUDA); otherwise unavailable.cpp makes available() false and every
// other call a clear error.
//
// One device per process (a rank's LOCAL_RANK picks it under data parallelism) and one compute
// stream: every kernel and cuBLASLt/cuDNN call of a step is queued on stream(), so a step runs
// without host synchronization except where a result is read back (the loss for logging).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lmforge::cuda {

bool available();    // a usable GPU is present (cudaGetDeviceCount > 0), cached
int device_count();  // 0 without a GPU or without the CUDA backend
// Why available() is false, for error messages ("" when it is true): no GPU, a driver older than
// the runtime (with both versions), a GPU taken in exclusive mode, or no CUDA backend.
std::string unavailable_reason();
// True when there is simply no GPU (or no CUDA backend), as opposed to a GPU the runtime cannot
// use: train.device auto falls back to the CPU quietly only then.
bool no_device();
std::string device_name();  // "NVIDIA H100 80GB HBM3" or "" without a GPU
// The datasheet's dense bf16 tensor-core TFLOP/s of the GPU (H100/H200 SXM 989.4, H100 PCIe
// 756, H100/H200 NVL 835, A100 312), the denominator of MFU; 0 for a GPU not in the list or without
// one.
double datasheet_bf16_tflops();
void set_device(int index);  // before any allocation; Error naming the index when invalid
void* stream();              // the compute stream (cudaStream_t)

// Device memory. malloc: Error naming the request and the free memory when it does not fit.
void* malloc(size_t bytes);
void free(void* p);
size_t free_memory();                   // bytes free on the current device
size_t peak_allocated();                // the most bytes this process held through malloc() at once
bool is_device_pointer(const void* p);  // memory of a CUDA device (false without CUDA)
enum class Copy { kHostToDevice, kDeviceToHost, kDeviceToDevice };
void memcpy(void* dst, const void* src, size_t bytes, Copy kind);  // ordered on stream()
void memset_zero(void* p, size_t bytes);                           // ordered on stream()
// `rows` rows of `width` bytes, device to device, their starts pitch bytes apart in each.
void memcpy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
               size_t rows);  // ordered on stream()
void synchronize();  // waits for stream(); Error naming the failing kernel's message if any

// Device scratch that grows to the largest request and is then reused. Growing waits for the
// stream first (kernels queued earlier may still read the old buffer), frees the old buffer and
// allocates the new size; get(0) before any request is null. Not locked: the owner serializes
// its calls. Never freed (scratch lives until exit, when the driver may be gone).
class GrowingBuffer {
 public:
  void* get(size_t bytes);

 private:
  void* buf_ = nullptr;
  size_t cap_ = 0;
};

// How many device buffers free() has released so far: a captured graph that may read one of them
// is stale once this moves (nn/transformer.cpp recaptures).
uint64_t frees();

// CUDA graphs (train.cuda_graphs): between begin_capture() and end_capture() the work queued on
// stream() by this thread is recorded, not run; end_capture() returns the executable graph
// (cudaGraphExec_t), or null when the capture failed (something in it synchronized or
// allocated): then nothing of it ran. graph_launch() queues a graph on stream().
void begin_capture();
void* end_capture();
bool capturing();  // stream() is being captured (false without CUDA)
void graph_launch(void* exec);
void graph_destroy(void* exec);  // null is a no-op

// Timing events (core/profile.h): event_record() takes an event from a pool and records it on
// stream(); event_elapsed_ms waits for `end` and returns the milliseconds since `start`;
// event_release puts an event back.
void* event_record();
float event_elapsed_ms(void* start, void* end);
void event_release(void* event);

}  // namespace lmforge::cuda
