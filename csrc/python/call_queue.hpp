// CallQueue: the communicator's asynchronous calls, run in issue order by one C++ worker
// thread (started by the first async call) without the GIL; a synchronous call first waits
// until the queue is empty, so every rank still runs its collectives in program order.
//
// Who calls what: the Python Communicator submits (GIL held), Work.wait() waits on a Handle
// (GIL released) and finishes it; close() and interpreter exit call stop(). The worker never
// touches Python objects except to allocate a receive array (taking the GIL); finished calls
// are handed back to the Python side (retire list) to be destroyed with the GIL held.
#pragma once

#include <pybind11/pybind11.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "python/call.hpp"

namespace piper::python {

class CallQueue : public std::enable_shared_from_this<CallQueue> {
 public:
  /// The executor must outlive the queue (the Communicator stops the queue first).
  explicit CallQueue(runtime::Executor& executor) : ex_(executor) {}
  ~CallQueue();
  runtime::Executor& executor() { return ex_; }

  /// Runs now (after the queue drained; the GIL is released meanwhile) and finishes.
  pybind11::tuple run(const std::shared_ptr<CallState>& state);
  /// Queues the call for the worker and returns at once.
  void submit(const std::shared_ptr<CallState>& state);
  /// Waits (GIL released) until `state` completed or `timeout_s` passed (< 0: no limit).
  bool wait(const std::shared_ptr<CallState>& state, double timeout_s);
  bool done(const std::shared_ptr<CallState>& state);
  /// Calls queued or running.
  int64_t pending();
  /// Lets queued calls finish (each is bounded by PIPER_TIMEOUT; once one failed with a
  /// timeout or a dead peer the rest fail at once), then ends the worker. False if it is still
  /// running after timeout_s.
  bool stop(double timeout_s);
  /// Waits until nothing is queued or running (GIL released).
  void drain();

 private:
  void loop();
  void retire();   // destroys finished calls' references (GIL held)

  runtime::Executor& ex_;
  std::mutex mutex_;
  std::condition_variable queued_, finished_;
  std::deque<std::shared_ptr<CallState>> queue_;
  std::vector<std::shared_ptr<CallState>> retired_;
  int64_t pending_ = 0;
  bool stopping_ = false;
  std::string failed_;  // why calls after a timeout or peer failure fail at once
  std::thread worker_;
};

}  // namespace piper::python
