// Python arguments of a collective turned into the plain pointers, sizes and counts of a
// runtime::Call, without copying: numpy arrays (through numpy's C API, as pybind11 binds it)
// and torch CPU tensors (through their Python attributes: the extension does not link torch).
// Errors are returned as local-check codes (runtime/call.hpp), never raised: every rank must
// first learn of them (validate.py words them).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "runtime/call.hpp"

namespace piper::python {

/// Fills `out` from a numpy array or a torch CPU tensor (C-contiguous, >= 1 dimension);
/// returns kErrNone or kErrType / kErrNonContig / kErrDevice / kErrNdim.
int64_t parse_array(pybind11::handle obj, runtime::ArrayArg& out);

/// Reads `P` non-negative integer counts (a list, tuple, numpy array or torch tensor of
/// integers) into `out`; on an error sets call's error (which: 0 send_counts, 1 recv_counts)
/// and leaves `out` empty.
void parse_counts(pybind11::handle obj, int64_t P, int which, std::vector<int64_t>& out,
                  runtime::Call& call);

}  // namespace piper::python
