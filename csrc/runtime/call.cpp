#include "runtime/call.hpp"

#include <numeric>

namespace piper::runtime {

const char* const kLocalErrorNames[kNumLocalErrors] = {
    "NONE",       "TYPE",        "NONCONTIG",   "DEVICE",         "NDIM",
    "RECV_TYPE",  "RECV_NONCONTIG", "RECV_DTYPE", "COUNTS_LEN",   "COUNTS_NEG",
    "COUNTS_SUM", "ROWS_DIV",    "RCOUNTS_LEN", "RCOUNTS_NEG",    "ALGORITHM",
    "COUNTS_TYPE", "RECV_ROWS",  "MIXED_MEMORY", "OTHER_DEVICE",   "NO_CUDA",
    "STREAM"};

const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::kFlat: return "flat";
    case Algorithm::kPairwise: return "pairwise";
    case Algorithm::kHalo: return "halo";
  }
  return "?";
}

int64_t trailing_hash(const int64_t* dims, int64_t n) {
  // FNV over (n, dims...) modulo 2^61: piper_comm's former Python hash, kept for stability.
  constexpr unsigned __int128 kMod = static_cast<unsigned __int128>(1) << 61;
  unsigned __int128 acc = 1469598103934665603ull;
  auto mix = [&](int64_t d) { acc = ((acc ^ static_cast<uint64_t>(d)) * 1099511628211ull) % kMod; };
  mix(n);
  for (int64_t i = 0; i < n; ++i) mix(dims[i]);
  return static_cast<int64_t>(acc);
}

void Call::fail(int64_t code, int64_t a, int64_t b) {
  if (err != kErrNone) return;
  err = code, err_a = a, err_b = b;
}

void Call::check_local(int64_t P) {
  if (recv.kind && err == kErrNone) {
    if (recv.mem != send.mem)
      fail(kErrMixedMemory, static_cast<int64_t>(send.mem), static_cast<int64_t>(recv.mem));
    else if (recv.mem == Memory::kCuda && recv.device != send.device)
      fail(kErrOtherDevice, recv.device, send.device);
    else if (recv.kind != send.kind)
      fail(kErrRecvType);
    else if (recv.dtype != send.dtype || recv.row_bytes != send.row_bytes ||
             recv.trail != send.trail)
      fail(kErrRecvDtype);
  }
  if (op == Op::kEqual) {
    if (err == kErrNone && send.rows % P) fail(kErrRowsDiv, send.rows, P);
    const int64_t m = err == kErrNone ? send.rows / P : 0;
    send_counts.assign(P, m);
    recv_counts.assign(P, m);
  } else if (err == kErrNone) {
    const int64_t sum = std::accumulate(send_counts.begin(), send_counts.end(), int64_t{0});
    if (sum != send.rows) fail(kErrCountsSum, sum, send.rows);
  }
  if (exact_recv && err == kErrNone && recv.kind) {
    const int64_t want = op == Op::kEqual ? send.rows
                         : recv_counts.empty()
                             ? -1
                             : std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
    if (want >= 0 && recv.rows != want) fail(kErrRecvRows, recv.rows, want);
  }
}

int64_t Agreement::recv_rows() const {
  return std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
}

}  // namespace piper::runtime
