// How the ranks agree on a call before (or while) data moves: the header round, the in-band
// signature of the equal split, the agreement round after a mismatch, and algorithm="auto".
//
// Every rank's first phase of a call consumes exactly one message from every peer and sends
// exactly one to every peer (a header, or an in-band data block, zero bytes included), and on
// a transport with any-tag receives that first receive accepts whatever the peer sent next.
// A peer in another call, another operation or another check path is then seen by its tag or
// size; comparison is pairwise and equality is transitive, so if any two ranks differ, every
// rank sees a difference and joins the agreement round (kAgreeTag), which gathers the full
// headers for one error message on every rank.
#include <algorithm>

#include "common/error.hpp"
#include "plan/traffic.hpp"
#include "runtime/executor.hpp"
#include "runtime/header.hpp"

namespace piper::runtime {

namespace {
// In-band tags need room above the header and data tags (a 16-bit signature at least).
constexpr int kInBandTagSpan = 1 << 16;
}  // namespace

void Executor::set_links(const std::vector<double>& coefficients) {
  PIPER_HOST_ASSERT(coefficients.size() == plan::kNumTerms);
  links_ = coefficients;
  uniform_.clear();
}

Algorithm Executor::choose(const Call& call, const std::vector<int64_t>* S) {
  const int64_t P = topology_.size();
  if (P == 1) return Algorithm::kFlat;
  switch (call.request) {
    case Request::kFlat: return Algorithm::kFlat;
    case Request::kPairwise: return Algorithm::kPairwise;
    case Request::kHalo: return Algorithm::kHalo;
    default: break;
  }
  const bool uniform = call.op == Op::kEqual;
  if (!S && !uniform) return topology_.num_nodes() == 1 ? Algorithm::kFlat : Algorithm::kHalo;
  const int64_t rb = call.send.row_bytes;
  const int64_t block = uniform && !call.send_counts.empty() ? call.send_counts[0] * rb : 0;
  if (uniform) {
    for (const auto& [bytes, algo] : uniform_)
      if (bytes == block) return algo;
  }
  std::vector<double> bytes(P * P);
  for (int64_t i = 0; i < P * P; ++i) bytes[i] = uniform ? block : (*S)[i] * rb;
  const std::vector<double> t = plan::a2a_traffic(topology_, bytes.data());
  double worst[2] = {0.0, 0.0};
  for (int a = 0; a < 2; ++a)
    for (int64_t r = 0; r < P; ++r) {
      double s = 0.0;
      for (int64_t k = 0; k < plan::kNumTerms; ++k) s += links_[k] * t[(a * plan::kNumTerms + k) * P + r];
      worst[a] = std::max(worst[a], s);
    }
  const Algorithm algo = worst[1] < worst[0] ? Algorithm::kHalo : Algorithm::kFlat;
  if (uniform) {
    if (uniform_.size() >= 64) uniform_.clear();
    uniform_.emplace_back(block, algo);
  }
  return algo;
}

bool Executor::gather(const std::vector<int64_t>& row, int tag, bool any, const std::string& what,
                      const Deadline& deadline, std::vector<int64_t>& table) {
  const int64_t P = topology_.size(), W = static_cast<int64_t>(row.size()), bytes = W * 8;
  table.assign(P * W, 0);
  std::copy(row.begin(), row.end(), table.begin() + me_ * W);
  for (int64_t k = 1; k < P; ++k) {
    const int64_t src = (me_ - k + P) % P, dst = (me_ + k) % P;
    if (any)
      transport_->post_recv_any(table.data() + src * W, bytes, src);
    else
      transport_->post_recv(table.data() + src * W, bytes, src, tag);
    transport_->post_send(row.data(), bytes, dst, tag);
  }
  wait_all(what + " (metadata exchange)", deadline);
  bool same = true;
  if (any)
    for (const Arrival& a : transport_->take_arrivals())
      same = same && a.tag == tag && a.bytes == bytes && !a.truncated;
  return same;
}

std::vector<int64_t> Executor::agree_round(const Call& call, const Deadline& deadline) {
  std::vector<int64_t> table;
  ++check_counts_.agreement_rounds;
  gather(header::row(call, topology_.size()), kAgreeTag, false,
         call.what + " (agreement after a mismatch)", deadline, table);
  return table;
}

bool Executor::in_band_usable() const {
  return transport_->any_tag() &&
         transport_->max_tag() - kInBandTagBase + 1 >= kInBandTagSpan;
}

Agreement Executor::agree(const Call& call, CheckMode mode, const Deadline& deadline) {
  const int64_t P = topology_.size();
  Agreement ag;
  const bool counts_known = call.op == Op::kEqual || !call.recv_counts.empty();
  // One rank goes through the header round too (no messages): the same verdict and words.
  if (P > 1 && mode == CheckMode::kTrust && counts_known) {
    ag.recv_counts = call.recv_counts;
    if (call.err != kErrNone)
      ag.verdict = Verdict::kLocalError;
    else if (call.recv.kind && call.recv.rows < ag.recv_rows())
      ag.verdict = Verdict::kRecvTooSmall;
    else
      ag.algo = choose(call, nullptr);
    return ag;
  }
  if (P > 1 && mode == CheckMode::kInBand && call.op == Op::kEqual && in_band_usable() &&
      call.send.mem == Memory::kHost) {
    const Algorithm algo = choose(call, nullptr);
    if (algo != Algorithm::kHalo || topology_.num_nodes() == P) {
      ag.algo = algo;
      ag.in_band = true;
      ag.recv_counts = call.recv_counts;
      return ag;
    }
  }
  // The header round.
  if (P > 1) ++check_counts_.header_rounds;
  const std::vector<int64_t> row = header::row(call, P);
  std::vector<int64_t> S;
  if (!gather(row, header_tag(call.seq), in_band_usable(), call.what, deadline, ag.table)) {
    ag.table = agree_round(call, deadline);
    ag.verdict = Verdict::kMismatch;
    return ag;
  }
  if (!header::agree(ag.table.data(), P, static_cast<int64_t>(row.size()), S)) {
    ag.verdict = Verdict::kMismatch;
    return ag;
  }
  ag.table.clear();
  ag.recv_counts.resize(P);
  for (int64_t i = 0; i < P; ++i) ag.recv_counts[i] = S[i * P + me_];
  ag.algo = choose(call, &S);
  return ag;
}

bool Executor::flat_in_band(const Call& call, const Agreement& ag, const Deadline& deadline) {
  const int64_t P = topology_.size();
  const int64_t m = call.send_counts.empty() ? 0 : call.send_counts[0];
  const bool problem = call.err != kErrNone || !call.recv.kind || call.recv.rows < P * m;
  const int64_t block = problem ? 0 : m * call.send.row_bytes;
  const uint64_t sig = header::signature(header::row(call, P), P);
  const int span = transport_->max_tag() - kInBandTagBase + 1;
  const int tag = kInBandTagBase + static_cast<int>(sig % static_cast<uint64_t>(span));
  static uint8_t none;  // the buffer of zero-byte messages
  uint8_t* recv = problem ? &none : call.recv.data;
  const uint8_t* send = problem ? &none : call.send.data;
  if (!problem && block > 0) {
    plan::CopyList self;
    self.add(me_ * block, me_ * block, block);
    context_->copy(send, P * block, recv, call.recv.nbytes(), self);
  }
  const bool pairwise = ag.algo == Algorithm::kPairwise;
  ++check_counts_.in_band;
  std::vector<Arrival> arrived;
  for (int64_t k = 1; k < P; ++k) {
    const int64_t src = (me_ - k + P) % P, dst = (me_ + k) % P;
    transport_->post_recv_any(recv + (problem ? 0 : src * block), block, src);
    transport_->post_send(send + (problem ? 0 : dst * block), block, dst, tag);
    if (pairwise || k == P - 1) {
      wait_all(pairwise ? fmt(call.what, " (pairwise step ", k, ")")
                        : call.what + " (flat exchange)",
               deadline);
      for (const Arrival& a : transport_->take_arrivals()) arrived.push_back(a);
    }
  }
  bool same = !problem;
  for (const Arrival& a : arrived) same = same && a.tag == tag && a.bytes == block && !a.truncated;
  return same;
}

std::vector<int64_t> Executor::exchange(const Call& call, Agreement& ag,
                                        const Deadline& deadline) {
  const int64_t P = topology_.size();
  if (ag.in_band) {
    if (flat_in_band(call, ag, deadline)) return {};
    return agree_round(call, deadline);
  }
  std::vector<int64_t> send_bytes(P), recv_bytes(P);
  for (int64_t p = 0; p < P; ++p) {
    send_bytes[p] = call.send_counts[p] * call.send.row_bytes;
    recv_bytes[p] = ag.recv_counts[p] * call.send.row_bytes;
  }
  struct HostPlaneAfter {  // whatever happens, later calls start on the host plane
    Executor* ex;
    ~HostPlaneAfter() { ex->use_host_plane(); }
  } restore{this};
  ag.algo = use_plane(call, ag.algo, deadline);
  alltoallv(call.send.data, call.send.nbytes(), call.recv.data, call.recv.nbytes(), send_bytes,
            recv_bytes, ag.algo, call.seq, data_tag(call.seq), call.what, deadline);
  return {};
}

}  // namespace piper::runtime
