// PIPER_CHECK_CUDA: a CUDA runtime call that throws piper::Error on failure (host code of the
// CUDA backend, .cu and .cpp alike).
#pragma once

#include <cuda_runtime.h>

#include "common/error.hpp"

// A failed CUDA runtime call: names the operation and cudaGetErrorString's text.
#define PIPER_CHECK_CUDA(expr, what)                                                           \
  do {                                                                                         \
    const cudaError_t piper_err_ = (expr);                                                     \
    if (piper_err_ != cudaSuccess)                                                             \
      throw ::piper::Error(::piper::ErrorCode::kSystem,                                        \
                           ::piper::fmt("piper: ", what, " failed: ",                          \
                                        cudaGetErrorString(piper_err_), " (", __FILE__, ":", \
                                        __LINE__, ")"));                                       \
  } while (0)
