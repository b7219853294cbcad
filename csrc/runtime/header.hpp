// The per-call header every rank sends every other rank before an all-to-all(v) (the
// validation round of piper_comm/validate.py), and the verdict on the gathered table.
//
// Row layout (int64): the kFixed fields below, then send_counts[P], then recv_counts[P]
// (counts in rows; recv_counts -1 when not given). piper_comm/validate.py reads these indices
// from piper_comm._C, so the layout is defined here only.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/call.hpp"

namespace piper::runtime::header {

enum Field : int64_t {
  kSeq, kOp, kAlgo, kDtype, kRowBytes, kTrail, kMem, kErr, kErrA, kErrB, kRecvCap, kFixed
};

/// The fast verdict: true, with S (P x P, row = source, in rows) filled, when every rank is in
/// the same call with the same op, algorithm request, dtype, row shape and memory kind, no rank reported a
/// local error, every given recv count matches what its source sends, and every given recv
/// buffer is large enough. False otherwise: the caller then names the first problem (the slow
/// path of validate.py, the one place where messages are written).
bool agree(const int64_t* table, int64_t P, int64_t W, std::vector<int64_t>& S);

/// Words per header for P ranks.
constexpr int64_t width(int64_t P) { return kFixed + 2 * P; }

/// This rank's header for `call` (counts only when no local error was found).
std::vector<int64_t> row(const Call& call, int64_t P);

/// The in-band signature of a header: a hash of every field, with RECV_CAP reduced to whether
/// the buffer is large enough (ranks may pass larger receive buffers than they need). Equal on
/// two ranks exactly when their headers agree (up to hash collisions).
uint64_t signature(const std::vector<int64_t>& row, int64_t P);

}  // namespace piper::runtime::header
