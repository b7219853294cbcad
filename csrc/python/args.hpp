// Python arguments of a collective turned into the plain pointers, sizes and counts of a
// runtime::Call, without copying: numpy arrays (through numpy's C API, as pybind11 binds it)
// torch tensors (through their Python attributes: the extension does not link torch) and CUDA
// arrays of any library through __cuda_array_interface__.
// Errors are returned as local-check codes (runtime/call.hpp), never raised: every rank must
// first learn of them (validate.py words them).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "runtime/call.hpp"

namespace piper::python {

/// Fills `out` from a numpy array, a torch CPU or CUDA tensor, or an object exporting
/// __cuda_array_interface__ (CuPy, Numba); C-contiguous, >= 1 dimension. CUDA arrays get their
/// device and the caller's current stream (torch's, CuPy's, else the interface's); where CUDA
/// is not usable (no_cuda_reason() >= 0) only their memory kind, and the caller refuses them.
/// Returns kErrNone or kErrType / kErrNonContig / kErrDevice / kErrNdim.
int64_t parse_array(pybind11::handle obj, runtime::ArrayArg& out);

/// Tests on hosts without a device: __cuda_array_interface__ arrays are taken as memory of
/// CUDA device 0 that the host can address (with Executor.emulate_device_plane, the device
/// plane's plumbing runs on host memory). Never set outside tests.
void set_emulated_cuda(bool on);

/// Why CUDA arrays cannot be moved here (the err_a of kErrNoCuda): 0 the extension was built
/// without CUDA, 1 this process sees no CUDA device; -1 when they can.
int64_t no_cuda_reason();

/// Reads `P` non-negative integer counts (a list, tuple, numpy array or torch tensor of
/// integers) into `out`; on an error sets call's error (which: 0 send_counts, 1 recv_counts)
/// and leaves `out` empty.
void parse_counts(pybind11::handle obj, int64_t P, int which, std::vector<int64_t>& out,
                  runtime::Call& call);

}  // namespace piper::python
