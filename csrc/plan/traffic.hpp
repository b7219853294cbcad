// What each rank does in one all-to-all under each algorithm the executor runs: the terms of
// the alpha-beta cost model of piper_comm/cost.py (which prices them; the formulas are in its
// docstring). Pure C++, so that algorithm="auto" costs microseconds per call.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/topology.hpp"

namespace piper::plan {

/// Terms of one rank's traffic, in this order (piper_comm.cost.Traffic's fields).
enum TrafficTerm : int64_t {
  kMsgsIntra, kBytesIntra, kMsgsInter, kBytesInter, kBarriers, kCopyBytes, kNumTerms
};

/// Traffic of every rank for a P x P byte matrix (row-major, row = source rank): a vector of
/// 2 x kNumTerms x P doubles, [algorithm][term][rank], algorithm 0 = flat, 1 = HALO.
std::vector<double> a2a_traffic(const Topology& topo, const double* send_bytes);

}  // namespace piper::plan
