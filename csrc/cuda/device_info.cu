// Device queries for build_info(); the first file of the CUDA backend.
#include <cuda_runtime.h>

#include "cuda/api.hpp"

namespace piper::cuda {

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int device_count(std::string* error) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (error != nullptr) *error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return -1;
  }
  return n;
}

}  // namespace piper::cuda
