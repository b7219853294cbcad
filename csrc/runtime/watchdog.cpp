#include "runtime/watchdog.hpp"

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
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (items_.empty()) {
      wake_.wait(lock, [this] { return stopping_ || !items_.empty(); });
      continue;
    }
    // The tokens are tested without the lock (a hook may block briefly, e.g. in the driver);
    // items watched meanwhile are younger, so the survivors go back in front of them.
    std::list<Item> mine;
    mine.swap(items_);
    lock.unlock();
    const auto now = std::chrono::steady_clock::now();
    std::list<Item> done;
    const Item* late = nullptr;
    for (auto it = mine.begin(); it != mine.end();) {
      if (hooks_.done(it->token)) {
        auto next = std::next(it);
        done.splice(done.end(), mine, it);
        it = next;
        continue;
      }
      if (late == nullptr &&
          std::chrono::duration<double>(now - it->since).count() >= timeout_s_)
        late = &*it;
      ++it;
    }
    release_all(done);
    std::string reason;
    if (late != nullptr) {
      std::ostringstream os;
      os << late->what << ": not completed " << std::fixed << std::setprecision(1)
         << std::chrono::duration<double>(now - late->since).count()
         << " s after it was handed off (limit " << std::defaultfloat << timeout_s_ << " s)";
      reason = os.str();
    }
    lock.lock();
    items_.splice(items_.begin(), mine);
    if (late != nullptr) {
      expired_ = true;
      reason_ = reason;
      mine.swap(items_);
      lock.unlock();
      hooks_.expire(reason);
      release_all(mine);
      return;
    }
    wake_.wait_for(lock, poll_, [this] { return stopping_; });
  }
}

}  // namespace piper::runtime
