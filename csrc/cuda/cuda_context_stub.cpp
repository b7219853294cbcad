// CudaContext::create in a build without CUDA: the name exists and refuses clearly.
#ifndef PIPER_WITH_CUDA
#include "common/error.hpp"
#include "cuda/cuda_context.hpp"

namespace piper::cuda {

std::unique_ptr<CudaContext> CudaContext::create(host::NodeChannel* channel, int64_t world_size,
                                                 int64_t rank, int device, double timeout_s) {
  (void)channel, (void)world_size, (void)timeout_s;
  throw Error(ErrorCode::kUsage,
              fmt("piper: CudaContext on rank ", rank, " (device ", device,
                  "): piper_comm._C was built without CUDA (nvcc not found, or PIPER_CUDA=OFF)"));
}

}  // namespace piper::cuda
#endif
