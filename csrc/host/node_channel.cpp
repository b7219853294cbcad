#include "host/node_channel.hpp"

#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <thread>

#include "common/error.hpp"
#include "host/process.hpp"

namespace piper::host {

namespace {
constexpr uint64_t kMagic = 0x5049504552303031ull;  // "PIPER001"
constexpr int kSpins = 2000;                         // busy polls before sleeping in the kernel
constexpr int64_t kSliceNs = 20'000'000;             // futex sleep slice: 20 ms
constexpr int64_t kProgressSliceNs = 200'000;        // ... 200 us when progress must be driven
constexpr int64_t kMinDataBytes = 1 << 20;

using Clock = std::chrono::steady_clock;

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t ns) {
  struct timespec ts {
    static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)
  };
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

struct NodeChannel::Slot {
  alignas(64) std::atomic<int64_t> pid;
  std::atomic<uint64_t> arrived;  // barrier epochs entered
};

struct NodeChannel::Header {
  uint64_t magic;
  int64_t local_size, world_size;
  alignas(64) std::atomic<uint32_t> bar_count;
  alignas(64) std::atomic<uint32_t> bar_gen;  // futex word: bumped when a barrier completes
  alignas(64) std::atomic<int64_t> grow_errno;
};

NodeChannel::Header* NodeChannel::header() const { return reinterpret_cast<Header*>(control_.data()); }

NodeChannel::Slot* NodeChannel::slot(int64_t l) const {
  return reinterpret_cast<Slot*>(control_.data() + round_up(sizeof(Header), 64)) + l;
}

int64_t* NodeChannel::row(int64_t parity, int64_t l) const {
  auto* base = reinterpret_cast<uint8_t*>(slot(local_size()));
  return reinterpret_cast<int64_t*>(base) + (parity * local_size() + l) * world_size_;
}

uint8_t* NodeChannel::exchange(int64_t l) const {
  PIPER_HOST_ASSERT(l >= 0 && l < local_size() && control_.data() != nullptr);
  auto* rows_end = reinterpret_cast<uint8_t*>(row(0, 0) + 2 * local_size() * world_size_);
  return rows_end + l * kExchangeBytes;
}

NodeChannel::NodeChannel(std::string prefix, int64_t local_rank, std::vector<int64_t> local_ranks,
                         int64_t world_size, bool create)
    : prefix_(std::move(prefix)), local_rank_(local_rank), world_size_(world_size),
      local_ranks_(std::move(local_ranks)) {
  const int64_t L = local_size();
  PIPER_HOST_ASSERT(local_rank_ >= 0 && local_rank_ < L);
  const size_t bytes = round_up(sizeof(Header), 64) + L * sizeof(Slot) + 2 * L * world_size_ * 8 +
                       L * kExchangeBytes;
  const std::string name = prefix_ + ".ctl";
  if (create) {
    control_ = ShmSegment::create(name, bytes);  // zero-filled by ftruncate
    header()->magic = kMagic;
    header()->local_size = L;
    header()->world_size = world_size_;
  } else {
    control_ = ShmSegment::open(name);
    if (control_.bytes() < bytes || header()->magic != kMagic || header()->local_size != L ||
        header()->world_size != world_size_)
      throw Error(ErrorCode::kSystem,
                  fmt("piper: shared segment ", name, " does not match this job (local size ", L,
                      ", world ", world_size_, ")"));
  }
  slot(local_rank_)->pid.store(getpid(), std::memory_order_release);
}

NodeChannel::~NodeChannel() { close(); }

void NodeChannel::unlink() {
  control_.unlink();
  data_.unlink();
}

void NodeChannel::close() {
  data_ = ShmSegment();
  control_ = ShmSegment();
}

void NodeChannel::check_peers(const std::string& what) const {
  for (int64_t l = 0; l < local_size(); ++l) {
    const int64_t pid = slot(l)->pid.load(std::memory_order_acquire);
    if (l == local_rank_ || pid <= 0) continue;
    if (!process_alive(pid))
      throw Error(ErrorCode::kPeer,
                  fmt("piper: ", what, ": rank ", local_ranks_[local_rank_], " found that rank ",
                      local_ranks_[l], " (pid ", pid, ", same node) has died"));
  }
}

void NodeChannel::timeout(const std::string& what, double timeout_s, uint64_t epoch) const {
  std::string missing;
  for (int64_t l = 0; l < local_size(); ++l) {
    if (slot(l)->arrived.load(std::memory_order_acquire) < epoch)
      missing += fmt(missing.empty() ? "" : ", ", local_ranks_[l]);
  }
  throw Error(ErrorCode::kTimeout,
              fmt("piper: ", what, ": rank ", local_ranks_[local_rank_], " timed out after ",
                  timeout_s, " s waiting for local peer(s) [", missing,
                  "] to reach the same step (set PIPER_TIMEOUT to change the limit)"));
}

void NodeChannel::barrier(const std::string& what, double timeout_s) {
  PIPER_HOST_ASSERT(control_.data() != nullptr);
  Header* h = header();
  const uint64_t epoch = ++epoch_;
  slot(local_rank_)->arrived.store(epoch, std::memory_order_release);
  const uint32_t gen = h->bar_gen.load(std::memory_order_acquire);
  if (h->bar_count.fetch_add(1, std::memory_order_acq_rel) + 1 == local_size()) {
    h->bar_count.store(0, std::memory_order_relaxed);
    h->bar_gen.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(&h->bar_gen);
    return;
  }
  for (int i = 0; i < kSpins; ++i) {
    if (h->bar_gen.load(std::memory_order_acquire) != gen) return;
    if (i % 64 == 63) {
      std::this_thread::yield();
      if (progress_) progress_();
    }
  }
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(timeout_s));
  auto next_check = start;
  while (h->bar_gen.load(std::memory_order_acquire) == gen) {
    const auto now = Clock::now();
    if (now >= deadline) timeout(what, timeout_s, epoch);
    if (now >= next_check) {
      check_peers(what);
      next_check = now + std::chrono::milliseconds(100);
    }
    if (progress_) {
      futex_wait(&h->bar_gen, gen, kProgressSliceNs);
      progress_();
    } else {
      futex_wait(&h->bar_gen, gen, kSliceNs);
    }
  }
}

void NodeChannel::publish_row(int64_t parity, const int64_t* src) {
  std::memcpy(row(parity & 1, local_rank_), src, world_size_ * sizeof(int64_t));
}

void NodeChannel::read_rows(int64_t parity, int64_t* out) const {
  std::memcpy(out, row(parity & 1, 0), local_size() * world_size_ * sizeof(int64_t));
}

bool NodeChannel::ensure_data(int64_t bytes, const std::string& what, double timeout_s) {
  if (bytes <= data_bytes()) return false;
  // Every local rank computes the same size from the same shared rows.
  const int64_t new_bytes = round_up(std::max({bytes, 2 * data_bytes(), kMinDataBytes}), 1 << 16);
  const std::string name = fmt(prefix_, ".d", ++data_gen_);
  ShmSegment fresh;
  if (local_rank_ == 0) {
    header()->grow_errno.store(0, std::memory_order_relaxed);
    try {
      fresh = ShmSegment::create(name, new_bytes);
    } catch (const Error&) {
      header()->grow_errno.store(errno ? errno : EIO, std::memory_order_release);
    }
  }
  barrier(what + " (grow shared segment)", timeout_s);
  if (const int64_t err = header()->grow_errno.load(std::memory_order_acquire); err != 0)
    throw Error(ErrorCode::kSystem,
                fmt("piper: ", what, ": cannot create a ", new_bytes, " B shared segment ", name,
                    " on rank ", local_ranks_[0], ": ", std::strerror(static_cast<int>(err)),
                    " (is /dev/shm large enough?)"));
  if (local_rank_ != 0) fresh = ShmSegment::open(name);
  barrier(what + " (map shared segment)", timeout_s);
  fresh.unlink();
  data_ = std::move(fresh);  // the old segment is unmapped here
  return true;
}

}  // namespace piper::host
