// Typed errors raised by the C++ core and translated to piper_comm.errors in bindings.cpp.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace piper {

enum class ErrorCode { kUsage, kTimeout, kPeer, kSystem, kInternal };

/// An error with a code; the message names the operation, rank, peer and sizes.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

/// Builds a message from stream-able parts: fmt("rank ", r, " waited ", s, " s").
template <typename... Args>
std::string fmt(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace piper

// Internal invariant: a failure here is a bug in Piper, not in the caller's input.
#define PIPER_HOST_ASSERT(cond)                                                          \
  do {                                                                                   \
    if (!(cond))                                                                         \
      throw ::piper::Error(::piper::ErrorCode::kInternal,                                \
                           ::piper::fmt("piper internal error: ", __FILE__, ":", __LINE__, \
                                        ": assertion '", #cond, "' failed"));            \
  } while (0)

// A failed system call: names the call and errno's text.
#define PIPER_CHECK_SYS(expr, what)                                                          \
  do {                                                                                       \
    if ((expr) < 0)                                                                          \
      throw ::piper::Error(::piper::ErrorCode::kSystem,                                      \
                           ::piper::fmt("piper: ", what, " failed: ", std::strerror(errno), \
                                        " (", __FILE__, ":", __LINE__, ")"));                \
  } while (0)
