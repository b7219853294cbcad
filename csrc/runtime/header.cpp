#include "runtime/header.hpp"

#include <algorithm>

#include "common/error.hpp"

namespace piper::runtime::header {

bool agree(const int64_t* table, int64_t P, int64_t W, std::vector<int64_t>& S) {
  PIPER_HOST_ASSERT(W == kFixed + 2 * P);
  auto at = [&](int64_t r, int64_t c) { return table[r * W + c]; };
  for (int64_t r = 0; r < P; ++r) {
    for (int64_t c : {kSeq, kOp, kAlgo, kDtype, kRowBytes, kTrail, kMem})
      if (at(r, c) != at(0, c)) return false;
    if (at(r, kErr) != 0) return false;
  }
  S.assign(P * P, 0);
  for (int64_t i = 0; i < P; ++i)
    for (int64_t j = 0; j < P; ++j) S[i * P + j] = at(i, kFixed + j);
  for (int64_t j = 0; j < P; ++j) {
    int64_t arriving = 0;
    const bool given = at(j, kFixed + P) >= 0;
    for (int64_t i = 0; i < P; ++i) {
      arriving += S[i * P + j];
      if (given && at(j, kFixed + P + i) != S[i * P + j]) return false;
    }
    const int64_t cap = at(j, kRecvCap);
    if (cap >= 0 && cap < arriving) return false;
  }
  return true;
}

std::vector<int64_t> row(const Call& call, int64_t P) {
  std::vector<int64_t> h(width(P), -1);
  h[kSeq] = call.seq;
  h[kOp] = static_cast<int64_t>(call.op);
  h[kAlgo] = static_cast<int64_t>(call.request);
  h[kDtype] = call.send.kind ? call.send.dtype : 0;
  h[kRowBytes] = call.send.kind ? call.send.row_bytes : 0;
  h[kTrail] = call.send.kind ? call.send.trail : 0;
  h[kMem] = static_cast<int64_t>(call.send.mem);
  h[kErr] = call.err;
  h[kErrA] = call.err_a;
  h[kErrB] = call.err_b;
  h[kRecvCap] = call.recv.kind ? call.recv.rows : -1;
  if (call.err == kErrNone) {
    if (static_cast<int64_t>(call.send_counts.size()) == P)
      std::copy(call.send_counts.begin(), call.send_counts.end(), h.begin() + kFixed);
    if (static_cast<int64_t>(call.recv_counts.size()) == P)
      std::copy(call.recv_counts.begin(), call.recv_counts.end(), h.begin() + kFixed + P);
  }
  return h;
}

uint64_t signature(const std::vector<int64_t>& row, int64_t P) {
  int64_t arriving = 0;  // what this rank's buffer must hold, from the counts it expects
  for (int64_t i = 0; i < P; ++i) arriving += std::max<int64_t>(row[kFixed + P + i], 0);
  uint64_t h = 14695981039346656037ull;  // FNV-1a over the words
  for (size_t i = 0; i < row.size(); ++i) {
    uint64_t w = static_cast<uint64_t>(row[i]);
    if (static_cast<int64_t>(i) == kRecvCap) w = row[i] >= 0 && row[i] < arriving;
    for (int b = 0; b < 8; ++b, w >>= 8) h = (h ^ (w & 0xff)) * 1099511628211ull;
  }
  return h;
}

}  // namespace piper::runtime::header
