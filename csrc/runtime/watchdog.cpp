#include "runtime/watchdog.hpp"

#include <cstdio>
#include <exception>
#include <iomanip>
#include <sstream>
#include <utility>

#include "common/error.hpp"

namespace piper::runtime {

Watchdog::Watchdog(double timeout_s, double poll_s, Hooks hooks)
    : timeout_s_(timeout_s),
      poll_(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(poll_s))),
      hooks_(std::move(hooks)) {
  PIPER_HOST_ASSERT(timeout_s > 0 && poll_s > 0 && hooks_.done && hooks_.release &&
                    hooks_.expire);
}

Watchdog::~Watchdog() { stop(); }

void Watchdog::watch(void* token, std::string what) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!expired_ && !stopping_) {
      items_.push_back({token, std::move(what), std::chrono::steady_clock::now()});
      if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
      wake_.notify_one();
      return;
    }
  }
  hooks_.release(token);
}

void Watchdog::stop() {
  std::list<Item> left;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    wake_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    left.swap(items_);
  }
  release_all(left);
}

bool Watchdog::expired() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return expired_;
}

std::string Watchdog::reason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reason_;
}

int64_t Watchdog::watched() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(items_.size());
}

void Watchdog::release_all(std::list<Item>& items) {
  for (Item& it : items) hooks_.release(it.token);
  items.clear();
}

void Watchdog::run() {
  try {
    watch_loop();
  } catch (const std::exception& e) {  // a hook failed: stop watching rather than terminate
    std::fprintf(stderr, "piper: watchdog stopped: %s\n", e.what());
    std::list<Item> left;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;  // later items are released at once
      reason_ = std::string("the watchdog stopped: ") + e.what();
      left.swap(items_);
    }
    left.splice(left.end(), scanning_);  // this thread's: stop() joins before it reads items_
    try {
      release_all(left);
    } catch (...) {
    }
  }
}

void Watchdog::watch_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (items_.empty()) {
      wake_.wait(lock, [this] { return stopping_ || !items_.empty(); });
      continue;
    }
    // The tokens are tested without the lock (a hook may block briefly, e.g. in the driver);
    // items watched meanwhile are younger, so the survivors go back in front of them.
    scanning_.swap(items_);
    lock.unlock();
    const auto now = std::chrono::steady_clock::now();
    const Item* late = nullptr;
    for (auto it = scanning_.begin(); it != scanning_.end();) {
      if (hooks_.done(it->token)) {
        void* token = it->token;
        it = scanning_.erase(it);
        hooks_.release(token);
        continue;
      }
      if (late == nullptr &&
          std::chrono::duration<double>(now - it->since).count() >= timeout_s_)
        late = &*it;
      ++it;
    }
    std::string reason;
    if (late != nullptr) {
      std::ostringstream os;
      os << late->what << ": not completed " << std::fixed << std::setprecision(1)
         << std::chrono::duration<double>(now - late->since).count()
         << " s after it was handed off (limit " << std::defaultfloat << timeout_s_ << " s)";
      reason = os.str();
    }
    lock.lock();
    items_.splice(items_.begin(), scanning_);
    if (late != nullptr && !stopping_) {  // a stopping owner bounds the work itself (close)
      expired_ = true;
      reason_ = reason;
      scanning_.swap(items_);
      lock.unlock();
      hooks_.expire(reason);
      release_all(scanning_);
      return;
    }
    wake_.wait_for(lock, poll_, [this] { return stopping_; });
  }
}

}  // namespace piper::runtime
