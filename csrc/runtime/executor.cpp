#include "runtime/executor.hpp"

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <set>

#include "common/error.hpp"
#include "host/process.hpp"

namespace piper::runtime {

namespace {
using Clock = std::chrono::steady_clock;
constexpr auto kSpinPhase = std::chrono::milliseconds(20);   // yield, then sleep
constexpr auto kCheckEvery = std::chrono::milliseconds(100);  // liveness and deadline checks
constexpr long kSleepNs = 200'000;
constexpr size_t kNamedMessages = 8;

std::string describe(const std::vector<Message>& todo) {
  std::string out;
  for (size_t i = 0; i < todo.size() && i < kNamedMessages; ++i) {
    const Message& m = todo[i];
    out += fmt(i ? ", " : "", m.send ? "send " : "recv ", m.bytes, " B ", m.send ? "to" : "from",
               " rank ", m.peer);
  }
  if (todo.size() > kNamedMessages) out += fmt(" and ", todo.size() - kNamedMessages, " more");
  return out;
}

std::string rank_list(const std::vector<int64_t>& ranks) {
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) out += fmt(i ? ", " : "", ranks[i]);
  return out + "]";
}

std::string format_seconds(double s) {  // as Python's {:g}
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", s);
  return buf;
}
}  // namespace

Deadline Deadline::in(double left_s, double timeout_s) {
  const auto left = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::max(left_s, 0.0)));
  return {Clock::now() + left, timeout_s};
}

double Deadline::left_s() const {
  return std::max(std::chrono::duration<double>(at - Clock::now()).count(), 0.0);
}

Executor::Executor(plan::Topology topology, std::shared_ptr<Transport> transport,
                   std::unique_ptr<ExecContext> context, std::vector<int64_t> pids,
                   std::vector<uint8_t> same_host)
    : topology_(std::move(topology)), transport_(std::move(transport)),
      context_(std::move(context)), pids_(std::move(pids)), same_host_(std::move(same_host)),
      ctx_(context_.get()), data_(transport_.get()), me_(transport_->rank()) {
  PIPER_HOST_ASSERT(topology_.size() == transport_->size());
  PIPER_HOST_ASSERT(pids_.empty() || static_cast<int64_t>(pids_.size()) == topology_.size());
}

std::vector<int64_t> Executor::dead_peers(const std::vector<Message>& pending) const {
  std::set<int64_t> peers;
  for (const Message& m : pending) peers.insert(m.peer);
  std::vector<int64_t> dead;
  if (pids_.empty()) return dead;
  for (int64_t p : peers)
    if (p >= 0 && same_host_[p] && !host::process_alive(pids_[p])) dead.push_back(p);
  return dead;
}

void Executor::wait_all(Transport& tr, const std::string& what, const Deadline& deadline) {
  // A transport's error (a truncated message, MPI's report of a dead peer) gets the operation
  // and what was still pending.
  auto test_all = [&] {
    try {
      return tr.test_all();
    } catch (const Error& e) {
      const std::string pending = describe(tr.pending());
      tr.cancel_all();
      throw Error(e.code(), fmt("piper: ", what, ": ", e.what(), " (pending: ", pending, ")"));
    }
  };
  const double deadline_s = std::chrono::duration<double>(deadline.at.time_since_epoch()).count();
  if (tr.wait_all(what, deadline_s, deadline.timeout_s) || test_all()) return;
  const auto start = Clock::now();
  auto next_check = start + kCheckEvery;
  while (true) {
    // Oversubscribed hosts: let the peers we wait for run, but stay responsive; sleep only
    // once the wait is long (a straggler, not a message in flight).
    const auto now = Clock::now();
    if (now - start < kSpinPhase) {
      sched_yield();
    } else {
      struct timespec ts {0, kSleepNs};
      nanosleep(&ts, nullptr);
    }
    if (test_all()) return;
    if (now < next_check && now < deadline.at) continue;
    const std::vector<Message> todo = tr.pending();
    if (const auto dead = dead_peers(todo); !dead.empty()) {
      tr.cancel_all();
      throw Error(ErrorCode::kPeer, fmt("piper: ", what, ": rank ", me_, " found that rank(s) ",
                                        rank_list(dead), " (same host) died while ",
                                        describe(todo), " were pending"));
    }
    if (now >= deadline.at) {
      std::set<int64_t> peers;
      for (const Message& m : todo) peers.insert(m.peer);
      tr.cancel_all();
      throw Error(ErrorCode::kTimeout,
                  fmt("piper: ", what, ": rank ", me_, " timed out after ",
                      format_seconds(deadline.timeout_s), " s waiting for peer(s) ",
                      rank_list({peers.begin(), peers.end()}), ": ", describe(todo),
                      " still pending (set PIPER_TIMEOUT to change the limit)"));
    }
    next_check = now + kCheckEvery;
  }
}

std::vector<int64_t> Executor::allgather(const int64_t* mine, int64_t words, int tag,
                                         const std::string& what, const Deadline& deadline) {
  std::vector<int64_t> table;
  gather(std::vector<int64_t>(mine, mine + words), tag, false, what, deadline, table);
  return table;
}

void Executor::alltoallv(const uint8_t* send, int64_t send_n, uint8_t* recv, int64_t recv_n,
                         const std::vector<int64_t>& send_bytes,
                         const std::vector<int64_t>& recv_bytes, Algorithm algo, int64_t seq,
                         int tag, const std::string& what, const Deadline& deadline) {
  const int64_t P = topology_.size();
  PIPER_HOST_ASSERT(static_cast<int64_t>(send_bytes.size()) == P &&
                    static_cast<int64_t>(recv_bytes.size()) == P);
  // HALO on a topology of one-rank nodes is the flat schedule.
  if (algo == Algorithm::kHalo && topology_.num_nodes() < P)
    halo(send, send_n, recv, recv_n, send_bytes, recv_bytes, seq, tag, what, deadline);
  else
    flat(send, send_n, recv, recv_n, send_bytes, recv_bytes, algo == Algorithm::kPairwise, tag,
         what, deadline);
}

void Executor::flat(const uint8_t* send, int64_t send_n, uint8_t* recv, int64_t recv_n,
                    const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
                    bool pairwise, int tag, const std::string& what, const Deadline& deadline) {
  const plan::FlatPlan plan = plan::plan_flat(me_, send_bytes, recv_bytes);
  ctx_->copy(send, send_n, recv, recv_n, plan.self);
  Transport& tr = *data_;
  auto check = [&](const plan::MessageList& l, size_t i, int64_t cap) {
    if (l.off[i] + l.len[i] > cap)
      throw Error(ErrorCode::kInternal, fmt("piper internal error: ", what, ": message of ",
                                            l.len[i], " B at offset ", l.off[i],
                                            " exceeds a buffer of ", cap, " B"));
  };
  if (!pairwise) {
    for (size_t i = 0; i < plan.recvs.len.size(); ++i) {
      check(plan.recvs, i, recv_n);
      tr.post_recv(recv + plan.recvs.off[i], plan.recvs.len[i], plan.recvs.peer[i], tag);
    }
    for (size_t i = 0; i < plan.sends.len.size(); ++i) {
      check(plan.sends, i, send_n);
      tr.post_send(send + plan.sends.off[i], plan.sends.len[i], plan.sends.peer[i], tag);
    }
    wait_all(tr, what + " (flat exchange)", deadline);
    return;
  }
  // Pairwise: step k receives from me-k and sends to me+k (the plan lists peers in that
  // order, skipping zero-byte blocks), at most two messages in flight.
  const int64_t P = topology_.size();
  size_t si = 0, ri = 0;
  for (int64_t k = 1; k < P; ++k) {
    const int64_t src = (me_ - k + P) % P, dst = (me_ + k) % P;
    if (ri < plan.recvs.peer.size() && plan.recvs.peer[ri] == src) {
      check(plan.recvs, ri, recv_n);
      tr.post_recv(recv + plan.recvs.off[ri], plan.recvs.len[ri], src, tag);
      ++ri;
    }
    if (si < plan.sends.peer.size() && plan.sends.peer[si] == dst) {
      check(plan.sends, si, send_n);
      tr.post_send(send + plan.sends.off[si], plan.sends.len[si], dst, tag);
      ++si;
    }
    wait_all(tr, fmt(what, " (pairwise step ", k, ")"), deadline);
  }
}

void Executor::halo(const uint8_t* send, int64_t send_n, uint8_t* recv, int64_t recv_n,
                    const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
                    int64_t seq, int tag, const std::string& what, const Deadline& deadline) {
  ExecContext& ctx = *ctx_;
  Transport& tr = *data_;
  // A fence names its operation, this rank and the local peers it waits for; add the bytes.
  auto fence = [&](const char* step) {
    try {
      ctx.fence(fmt(what, " (halo: ", step, ")"), deadline.left_s());
    } catch (const Error& e) {
      int64_t out = 0, in = 0;
      for (int64_t b : send_bytes) out += b;
      for (int64_t b : recv_bytes) in += b;
      throw Error(e.code(), fmt(e.what(), "; this rank's call sends ", out, " B and receives ",
                                in, " B"));
    }
  };
  // 1. The node's ranks share their counts and pack their blocks into the node segment.
  ctx.publish_counts(seq, send_bytes);
  fence("counts shared");
  const plan::HaloPlan plan = plan::plan_halo(topology_, me_, ctx.read_counts(seq), recv_bytes);
  ctx.ensure_segment(plan.segment_bytes, what, deadline.left_s());
  uint8_t* seg = ctx.segment();
  const int64_t seg_n = ctx.segment_bytes();
  ctx.copy(send, send_n, seg, seg_n, plan.pack);
  uint8_t* staging = ctx.staging(plan.staging_bytes);
  for (size_t i = 0; i < plan.recvs.len.size(); ++i) {
    const bool staged = plan.recv_staged[i];
    const int64_t off = plan.recvs.off[i], len = plan.recvs.len[i];
    PIPER_HOST_ASSERT(off + len <= (staged ? plan.staging_bytes : recv_n));
    tr.post_recv((staged ? staging : recv) + off, len, plan.recvs.peer[i], tag);
  }
  fence("blocks packed");
  // 2. Proxies send one aggregated message per remote destination straight from the segment.
  for (size_t i = 0; i < plan.sends.len.size(); ++i) {
    PIPER_HOST_ASSERT(plan.sends.off[i] + plan.sends.len[i] <= seg_n);
    tr.post_send(seg + plan.sends.off[i], plan.sends.len[i], plan.sends.peer[i], tag);
  }
  // 3. Blocks of this node's ranks come out of the segment; the rest arrive in place.
  ctx.copy(seg, seg_n, recv, recv_n, plan.local);
  wait_all(tr, what + " (halo inter-node stage)", deadline);
  if (!plan.unpack.len.empty()) ctx.copy(staging, plan.staging_bytes, recv, recv_n, plan.unpack);
}

Algorithm Executor::use_plane(const Call& call, Algorithm algo, const Deadline& deadline) {
  use_host_plane();
  if (call.send.mem != Memory::kCuda) return algo;
  if (!device_.context) {
    if (!device_factory_)
      throw Error(ErrorCode::kUsage, fmt("piper: ", call.what, ": rank ", me_, ": this ",
                                         "communicator cannot move CUDA memory (no device plane)"));
    device_ = device_factory_(*this, call.send.device, call.send.stream, deadline);
  }
  ctx_ = device_.context.get();
  data_ = device_.data.get();
  ctx_->set_stream(call.send.stream);
  data_->set_stream(call.send.stream);
  // A graph replays only device work: HALO's node fences pass a host barrier, which a replay
  // would skip, so captured calls run flat, over NCCL only (the staged transport waits for the
  // device on the host). Every rank captures the same call, so every rank raises.
  const bool capturing = ctx_->capturing();
  if (capturing && !data_->graph_capturable())
    throw Error(ErrorCode::kUsage,
                fmt("piper: ", call.what, ": rank ", me_, ": device messages through ",
                    data_->name(), " cannot be captured in a CUDA graph (it waits for the ",
                    "device on the host); use NCCL (PIPER_INTER=nccl)"));
  const bool halo = algo == Algorithm::kHalo && topology_.num_nodes() < topology_.size();
  if (halo && capturing) {
    if (call.request == Request::kHalo)
      throw Error(ErrorCode::kUsage,
                  fmt("piper: ", call.what, ": rank ", me_, ": HALO cannot be captured in a ",
                      "CUDA graph (its node fences pass a host barrier that a replay skips); ",
                      "use algorithm='flat' or 'auto' while capturing"));
    return Algorithm::kFlat;
  }
  return algo;
}

void Executor::close_device(const std::string& what, double timeout_s) {
  if (!device_.context) return;
  use_host_plane();
  std::exception_ptr first;
  for (auto step : {0, 1}) {
    try {
      if (step == 0) device_.data->close(what, timeout_s);
      else device_.context->close(what, timeout_s);
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  device_ = DevicePlane{};
  if (first) std::rethrow_exception(first);
}

}  // namespace piper::runtime
