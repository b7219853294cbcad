// Watchdog: a deadline for work the host hands off and never waits for itself.
//
// With NCCL the data of a call moves on the device after the call returned (no host wait on
// the data path): a peer that never posts its half of a group leaves the NCCL kernel spinning,
// and a later host synchronisation would wait for ever. The transport gives each handed-off
// item to a Watchdog with a token it can test (a CUDA event recorded after the group); the
// watchdog's thread tests the tokens every `poll_s` while any is watched, releases those that
// completed, and when one is older than `timeout_s` (PIPER_TIMEOUT) calls `expire` once with a
// message naming it and how long it waited, then stops watching (the owner aborts the work:
// ncclCommAbort ends the kernels). Generic: no CUDA here, so the protocol is tested on hosts
// without a device (tests/comm/test_watchdog.py).
//
// Threads: watch() and stop() from the owner's threads; the hooks run on the watchdog's
// thread (release also inside stop()), never while the watchdog holds its lock, so a hook may
// take the owner's locks; a hook that throws ends the watching (the error on stderr), it does
// not terminate the process. An item found late while stop() is under way does not expire:
// the stopping owner bounds its work itself. Costs the owner a lock and a list append per watched item; the
// thread sleeps on a condition variable while nothing is watched.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <thread>

namespace piper::runtime {

class Watchdog {
 public:
  struct Hooks {
    std::function<bool(void*)> done;                  // true once the token's work completed
    std::function<void(void*)> release;               // the token is no longer watched
    std::function<void(const std::string&)> expire;   // once: the message of the late item
  };

  /// timeout_s > 0: the age at which an item expires; poll_s > 0: how often tokens are tested.
  Watchdog(double timeout_s, double poll_s, Hooks hooks);
  ~Watchdog();  // stop()
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  /// Watches `token` (its work described by `what`, e.g. "NCCL group 7 of 6 messages, 4096
  /// B") from now on. After an expiry or stop() the token is released at once, unwatched.
  void watch(void* token, std::string what);
  /// Joins the thread and releases every token still watched; idempotent.
  void stop();
  bool expired() const;
  std::string reason() const;  // the expiry's message (or the failure of a hook), "" before
  int64_t watched() const;     // tokens watched now

 private:
  struct Item {
    void* token;
    std::string what;
    std::chrono::steady_clock::time_point since;
  };
  void run();         // the thread: watch_loop(), and a hook's exception ends watching
  void watch_loop();
  void release_all(std::list<Item>& items);

  const double timeout_s_;
  const std::chrono::steady_clock::duration poll_;
  Hooks hooks_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::list<Item> items_;
  std::list<Item> scanning_;  // the thread's: items being tested, outside the lock
  std::thread thread_;
  bool stopping_ = false;
  bool expired_ = false;
  std::string reason_;
};

}  // namespace piper::runtime
