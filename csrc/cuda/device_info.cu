// Device queries: build_info() and the argument parser (csrc/python/args.cpp).
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

int pointer_device(const void* ptr, std::string* error) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    if (error != nullptr) *error = cudaGetErrorString(err);
    cudaGetLastError();
    return -1;
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return -1;
  return attr.device;
}

int current_device(std::string* error) {
  int d = -1;
  const cudaError_t err = cudaGetDevice(&d);
  if (err != cudaSuccess) {
    if (error != nullptr) *error = cudaGetErrorString(err);
    cudaGetLastError();
    return -1;
  }
  return d;
}

}  // namespace piper::cuda
