// Linked when lmforge is built without the CUDA backend: no GPU is available, and any op on a
// CUDA tensor ends in cuda_unavailable().
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/backend/ops.h"

namespace lmforge {

void cuda_unavailable(const char* op) {
  fail(
      "{}: the tensor is on a CUDA device but this lmforge was built without CUDA (nvcc was not "
      "found); install the CUDA toolkit and rebuild, or set train.device=cpu",
      op);
}

namespace cuda {
int device_count() { return 0; }
std::string unavailable_reason() {
  return "this lmforge was built without CUDA (nvcc was not found)";
}
bool no_device() { return true; }
bool available() { return false; }
std::string device_name() { return ""; }
double datasheet_bf16_tflops() { return 0; }
void set_device(int) { cuda_unavailable("set_device"); }
void* stream() { return nullptr; }
void* malloc(size_t) { cuda_unavailable("malloc"); }
void free(void*) {}
size_t free_memory() { return 0; }
size_t peak_allocated() { return 0; }
bool is_device_pointer(const void*) { return false; }
void memcpy(void*, const void*, size_t, Copy) { cuda_unavailable("memcpy"); }
void memset_zero(void*, size_t) { cuda_unavailable("memset"); }
void memcpy_2d(void*, size_t, const void*, size_t, size_t, size_t) { cuda_unavailable("memcpy"); }
void synchronize() {}
void* event_record() { cuda_unavailable("event_record"); }
float event_elapsed_ms(void*, void*) { cuda_unavailable("event_elapsed_ms"); }
void event_release(void*) {}
uint64_t frees() { return 0; }
void begin_capture() { cuda_unavailable("begin_capture"); }
void* end_capture() { return nullptr; }
bool capturing() { return false; }
void graph_launch(void*) { cuda_unavailable("graph_launch"); }
void graph_destroy(void*) {}
}  // namespace cuda

}  // namespace lmforge
