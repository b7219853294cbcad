#include "python/call_queue.hpp"

#include <chrono>

#include "common/error.hpp"

namespace py = pybind11;

namespace piper::python {

CallQueue::~CallQueue() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  queued_.notify_all();
  if (worker_.joinable()) {
    // Normally stopped by close() or at exit. A worker still running here is bounded by
    // PIPER_TIMEOUT; it must not find this object gone.
    py::gil_scoped_release nogil;
    worker_.join();
  }
}

void CallQueue::retire() {
  std::vector<std::shared_ptr<CallState>> gone;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    gone.swap(retired_);
  }
  // `gone` releases the references here, with the GIL held.
}

void CallQueue::drain() {
  py::gil_scoped_release nogil;
  std::unique_lock<std::mutex> lock(mutex_);
  finished_.wait(lock, [&] { return pending_ == 0; });
}

py::tuple CallQueue::run(const std::shared_ptr<CallState>& state) {
  if (pending() > 0) drain();
  retire();
  {
    py::gil_scoped_release nogil;
    execute(ex_, *state);
  }
  state->done = true;
  return finish(*state);
}

void CallQueue::submit(const std::shared_ptr<CallState>& state) {
  retire();
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_)
    throw Error(ErrorCode::kUsage, fmt("piper: ", state->call.what, " on rank ", state->rank,
                                       ": communicator is closed"));
  if (!worker_.joinable()) worker_ = std::thread([this] { loop(); });
  queue_.push_back(state);
  ++pending_;
  queued_.notify_one();
}

bool CallQueue::wait(const std::shared_ptr<CallState>& state, double timeout_s) {
  bool ok;
  {
    py::gil_scoped_release nogil;
    std::unique_lock<std::mutex> lock(mutex_);
    auto ready = [&] { return state->done; };
    if (timeout_s < 0)
      finished_.wait(lock, ready), ok = true;
    else
      ok = finished_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
  }
  retire();
  return ok;
}

bool CallQueue::done(const std::shared_ptr<CallState>& state) {
  std::lock_guard<std::mutex> lock(mutex_);
  return state->done;
}

int64_t CallQueue::pending() {
  std::lock_guard<std::mutex> lock(mutex_);
  return pending_;
}

bool CallQueue::stop(double timeout_s) {
  bool drained;
  {
    py::gil_scoped_release nogil;
    std::unique_lock<std::mutex> lock(mutex_);
    stopping_ = true;
    queued_.notify_all();
    drained = finished_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                                 [&] { return pending_ == 0; });
    lock.unlock();
    if (drained && worker_.joinable()) worker_.join();
  }
  retire();
  return drained;
}

void CallQueue::loop() {
  while (true) {
    std::shared_ptr<CallState> st;
    std::string failed;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queued_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left
      st = queue_.front();
      queue_.pop_front();
      failed = failed_;
    }
    if (failed.empty()) {
      execute(ex_, *st);
      if (st->error) {
        try {
          std::rethrow_exception(st->error);
        } catch (const Error& e) {
          if (e.code() == ErrorCode::kTimeout || e.code() == ErrorCode::kPeer) failed = e.what();
        } catch (...) {
        }
      }
    } else {
      st->error = std::make_exception_ptr(Error(
          ErrorCode::kInternal, fmt("piper: ", st->call.what, " on rank ", st->rank,
                                    ": communicator is unusable after an earlier failure: ",
                                    failed)));
      failed.clear();  // already recorded
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failed.empty()) failed_ = failed;
      st->done = true;
      --pending_;
      retired_.push_back(std::move(st));
    }
    finished_.notify_all();
  }
}

}  // namespace piper::python
