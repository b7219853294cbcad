// The whole Python entry of one all-to-all(v), in three steps so that it can run on the
// caller's thread or on the communicator's C++ worker (call_queue.hpp):
//   prepare  (GIL held)   arguments parsed without copies (args.hpp) into a CallState;
//   execute  (no GIL)     agreement and data movement in the executor; takes the GIL only to
//                         allocate the receive array when the caller gave none;
//   finish   (GIL held)   the result, or the error: a mismatch found by the ranks is worded
//                         by piper_comm.validate (the one place where messages are written)
//                         and raised on every rank.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "runtime/executor.hpp"

namespace piper::python {

struct CallOptions {
  int64_t request;       // header ALGO id (runtime::Request), -1 for an unknown name
  bool exact_recv;       // torch.distributed semantics: recv has exactly the rows that arrive
  bool recv_only;        // return recv alone (all_to_all), not (recv, recv_counts)
  int check;             // runtime::CheckMode
  int64_t seq;
  std::string what;      // "all_to_all #12"
  double timeout_s;      // PIPER_TIMEOUT: the call's deadline is this long after it starts
};

/// One call in flight. Holds references to the caller's arrays until it is destroyed (with
/// the GIL held: by finish's caller or the queue's Python-side clean-up).
struct CallState {
  runtime::Call call;
  CallOptions opt;
  int64_t rank = 0, size = 0;
  pybind11::object send, out, new_rows;  // out: recv, or the array allocated for it
  runtime::Agreement agreement;
  std::vector<int64_t> mismatch;         // headers gathered after an in-band mismatch
  std::exception_ptr error;              // a piper::Error of execute (no Python objects)
  std::unique_ptr<pybind11::error_already_set> py_error;  // new_rows failed
  bool done = false;                     // guarded by the queue's mutex when queued
};

/// op: 1 all_to_all, 2 all_to_all_v. new_rows(like, rows) allocates a receive array like
/// `send` when recv is None.
std::shared_ptr<CallState> prepare(runtime::Executor& ex, int op, pybind11::handle send,
                                   pybind11::handle send_counts, pybind11::handle recv,
                                   pybind11::handle recv_counts, const CallOptions& opt,
                                   pybind11::handle new_rows);

/// Runs the call (without the GIL); never throws: errors are kept for finish.
void execute(runtime::Executor& ex, CallState& state);

/// (out, recv_counts list or None, algorithm name), or raises the call's error.
pybind11::tuple finish(CallState& state);

}  // namespace piper::python
