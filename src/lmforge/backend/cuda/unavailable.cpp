// Linked when lmforge is built without CUDA (the default): any op on a CUDA tensor ends here.
#include "lmforge/backend/ops.h"

namespace lmforge {

void cuda_unavailable(const char* op) {
  fail(
      "{}: the tensor is on a CUDA device but this lmforge was built without CUDA; rebuild with "
      "-DLMFORGE_CUDA=ON or set train.device=cpu",
      op);
}

}  // namespace lmforge
