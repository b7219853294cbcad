// The whole Python entry of one all-to-all(v): arguments parsed in C++ (args.hpp), agreement
// and data movement in the executor with the GIL released, the receive buffer allocated in
// between when the caller gave none. Errors: a mismatch found by the ranks is worded by
// piper_comm.validate (the one place where messages are written) and raised on every rank.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "runtime/executor.hpp"

namespace piper::python {

struct CallOptions {
  int64_t request;       // header ALGO id (runtime::Request), -1 for an unknown name
  bool exact_recv;       // torch.distributed semantics: recv has exactly the rows that arrive
  bool recv_only;        // return recv alone (all_to_all), not (recv, recv_counts)
  int check;             // runtime::CheckMode
  int64_t seq;
  std::string what;      // "all_to_all #12"
  double left_s, timeout_s;
};

/// Runs one call. op: 1 all_to_all, 2 all_to_all_v. new_rows(like, rows) allocates a receive
/// array like `send` when recv is None. Returns (out, recv_counts list or None, algorithm).
pybind11::tuple run_call(runtime::Executor& ex, int op, pybind11::handle send,
                         pybind11::handle send_counts, pybind11::handle recv,
                         pybind11::handle recv_counts, const CallOptions& opt,
                         pybind11::handle new_rows);

}  // namespace piper::python
