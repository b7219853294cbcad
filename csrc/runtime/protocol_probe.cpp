#include "runtime/protocol_probe.hpp"

#include <unistd.h>

#include <atomic>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>

#include "common/error.hpp"
#include "host/node_channel.hpp"
#include "runtime/exec_context.hpp"
#include "runtime/executor.hpp"

namespace piper::runtime {
namespace {

constexpr double kProbeTimeoutS = 30.0;  // every wait of a probe (threads of one process)

// Messages between the threads of one process: a send is buffered at once (eager), a receive
// completes when a message from its peer with its tag is queued, in sending order.
struct Mailbox {
  std::mutex mu;
  std::map<std::tuple<int64_t, int64_t, int>, std::deque<std::vector<uint8_t>>> queues;
};

class LoopbackTransport final : public Transport {
 public:
  LoopbackTransport(std::shared_ptr<Mailbox> box, int64_t rank, int64_t size)
      : box_(std::move(box)), rank_(rank), size_(size) {}
  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  std::string name() const override { return "loopback"; }
  void post_send(const void* buf, int64_t bytes, int64_t peer, int tag) override {
    const auto* p = static_cast<const uint8_t*>(buf);
    std::lock_guard<std::mutex> lock(box_->mu);
    box_->queues[{rank_, peer, tag}].emplace_back(p, p + bytes);
  }
  void post_recv(void* buf, int64_t bytes, int64_t peer, int tag) override {
    recvs_.push_back({static_cast<uint8_t*>(buf), bytes, peer, tag, false});
  }
  bool test_all() override {
    std::lock_guard<std::mutex> lock(box_->mu);
    bool all = true;
    for (Recv& r : recvs_) {
      if (r.done) continue;
      auto& q = box_->queues[{r.peer, rank_, r.tag}];
      if (q.empty()) {
        all = false;
        continue;
      }
      if (static_cast<int64_t>(q.front().size()) > r.bytes)
        throw Error(ErrorCode::kUsage, fmt("rank ", rank_, ": a message of ", q.front().size(),
                                           " B from rank ", r.peer, " exceeds the receive of ",
                                           r.bytes, " B"));
      std::copy(q.front().begin(), q.front().end(), r.buf);
      q.pop_front();
      r.done = true;
    }
    if (all) recvs_.clear();
    return all;
  }
  std::vector<Message> pending() const override {
    std::vector<Message> out;
    for (const Recv& r : recvs_)
      if (!r.done) out.push_back({false, r.peer, r.bytes});
    return out;
  }
  void cancel_all() override { recvs_.clear(); }
  void progress() override {}

 private:
  struct Recv {
    uint8_t* buf;
    int64_t bytes, peer;
    int tag;
    bool done;
  };
  std::shared_ptr<Mailbox> box_;
  int64_t rank_, size_;
  std::vector<Recv> recvs_;
};

// Records every call, names its buffers, then hands it to the HostContext it wraps.
class RecordingContext final : public ExecContext {
 public:
  RecordingContext(host::NodeChannel* channel, int64_t world_size, const uint8_t* send,
                   const uint8_t* recv, std::vector<std::string>* trace)
      : inner_(channel, world_size), send_(send), recv_(recv), trace_(trace) {}
  void copy(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
            const plan::CopyList& blocks) override {
    trace_->push_back(fmt("copy ", name(src), "->", name(dst), " ", blocks.len.size(), " ",
                          blocks.bytes()));
    inner_.copy(src, src_bytes, dst, dst_bytes, blocks);
  }
  void fence(const std::string& what, double timeout_s) override {
    const size_t open = what.find("(halo: ");
    trace_->push_back("fence " + (open == std::string::npos
                                      ? what
                                      : what.substr(open + 7, what.size() - open - 8)));
    inner_.fence(what, timeout_s);
  }
  void publish_counts(int64_t seq, const std::vector<int64_t>& row) override {
    trace_->push_back("publish_counts");
    inner_.publish_counts(seq, row);
  }
  std::vector<int64_t> read_counts(int64_t seq) const override {
    trace_->push_back("read_counts");
    return inner_.read_counts(seq);
  }
  void ensure_segment(int64_t bytes, const std::string& what, double timeout_s) override {
    trace_->push_back(fmt("ensure_segment ", bytes));
    inner_.ensure_segment(bytes, what, timeout_s);
  }
  uint8_t* segment() const override {
    trace_->push_back("segment");
    return inner_.segment();
  }
  int64_t segment_bytes() const override { return inner_.segment_bytes(); }
  uint8_t* staging(int64_t bytes) override {
    trace_->push_back(fmt("staging ", bytes));
    staging_ = inner_.staging(bytes);
    return staging_;
  }
  int64_t local_size() const override { return inner_.local_size(); }

 private:
  std::string name(const uint8_t* p) const {
    if (p == send_) return "send";
    if (p == recv_) return "recv";
    if (p == inner_.segment()) return "segment";
    if (p == staging_) return "staging";
    return "other";
  }
  HostContext inner_;
  const uint8_t *send_, *recv_;
  uint8_t* staging_ = nullptr;
  std::vector<std::string>* trace_;
};

}  // namespace

ProbeResult probe_protocol(const std::vector<int64_t>& node_of, const std::vector<int64_t>& S,
                           Algorithm algorithm) {
  static std::atomic<int> probes{0};
  const plan::Topology topo(node_of);
  const int64_t P = topo.size();
  if (static_cast<int64_t>(S.size()) != P * P)
    throw Error(ErrorCode::kUsage, fmt("piper: probe_protocol: send_bytes has ", S.size(),
                                       " entries, expected P x P = ", P * P));
  for (int64_t b : S)
    if (b < 0) throw Error(ErrorCode::kUsage, "piper: probe_protocol: negative byte count");

  // Each node's channels: local rank 0 creates, the others open, then the names go.
  const int probe = probes++;
  std::vector<std::unique_ptr<host::NodeChannel>> channels(P);
  for (int64_t n = 0; n < topo.num_nodes(); ++n) {
    const auto ranks = topo.node_ranks(n);
    if (ranks.size() < 2) continue;
    const std::string prefix = fmt("/piper-probe-", getpid(), "-", probe, "-n", n);
    for (size_t l = 0; l < ranks.size(); ++l)
      channels[ranks[l]] = std::make_unique<host::NodeChannel>(prefix, l, ranks, P, l == 0);
    channels[ranks[0]]->unlink();
  }

  ProbeResult res;
  res.traces.resize(P);
  res.recv.resize(P);
  std::vector<std::vector<uint8_t>> send(P);
  std::vector<std::vector<int64_t>> send_bytes(P, std::vector<int64_t>(P)), recv_bytes = send_bytes;
  for (int64_t r = 0; r < P; ++r) {
    for (int64_t d = 0; d < P; ++d) {
      send_bytes[r][d] = S[r * P + d];
      recv_bytes[r][d] = S[d * P + r];
      for (int64_t i = 0; i < S[r * P + d]; ++i)
        send[r].push_back(static_cast<uint8_t>((r * 31 + d * 7 + i) & 0xff));
    }
    int64_t in = 0;
    for (int64_t b : recv_bytes[r]) in += b;
    res.recv[r].assign(in, 0);
  }

  auto box = std::make_shared<Mailbox>();
  std::vector<std::unique_ptr<Executor>> executors;
  for (int64_t r = 0; r < P; ++r) {
    auto ctx = std::make_unique<RecordingContext>(channels[r].get(), P, send[r].data(),
                                                  res.recv[r].data(), &res.traces[r]);
    executors.push_back(std::make_unique<Executor>(
        topo, std::make_shared<LoopbackTransport>(box, r, P), std::move(ctx),
        std::vector<int64_t>(P, getpid()), std::vector<uint8_t>(P, 1)));
  }
  std::vector<std::exception_ptr> errors(P);
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        executors[r]->alltoallv(send[r].data(), static_cast<int64_t>(send[r].size()),
                                res.recv[r].data(), static_cast<int64_t>(res.recv[r].size()),
                                send_bytes[r], recv_bytes[r], algorithm, 1, 1, "probe #1",
                                Deadline::in(kProbeTimeoutS, kProbeTimeoutS));
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return res;
}

}  // namespace piper::runtime
