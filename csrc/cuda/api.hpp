// Entry points of the CUDA backend (compiled only when nvcc is found; see CMakeLists.txt).
// Plain C++ signatures: no pybind11 and no torch in .cu files.
#pragma once

#include <string>

namespace piper::cuda {

/// CUDA runtime version the extension was built against (e.g. 13000).
int runtime_version();
/// Number of visible devices; on failure returns -1 and sets `error` (e.g. no driver).
int device_count(std::string* error);

}  // namespace piper::cuda
