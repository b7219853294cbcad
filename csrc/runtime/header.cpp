#include "runtime/header.hpp"

#include "common/error.hpp"

namespace piper::runtime::header {

bool agree(const int64_t* table, int64_t P, int64_t W, std::vector<int64_t>& S) {
  PIPER_HOST_ASSERT(W == kFixed + 2 * P);
  auto at = [&](int64_t r, int64_t c) { return table[r * W + c]; };
  for (int64_t r = 0; r < P; ++r) {
    for (int64_t c : {kSeq, kOp, kAlgo, kDtype, kRowBytes, kTrail})
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

}  // namespace piper::runtime::header
