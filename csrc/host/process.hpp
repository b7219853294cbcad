// Liveness of a process on this host (peer failure detection).
#pragma once

#include <cstdint>

namespace piper::host {

/// False once the process is gone or a zombie (dead but not yet reaped by its launcher,
/// which kill(pid, 0) would still report as alive).
bool process_alive(int64_t pid);

}  // namespace piper::host
