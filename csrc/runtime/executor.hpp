// Executor: the all-to-all(v) algorithms, once, over a Transport and an ExecContext.
//
// One call runs a whole exchange (local copies, posting, progress, waiting) without Python:
// the bindings release the GIL around it. Every wait is bounded by the call's deadline and
// watches the processes of peers on this host, so a late peer raises kTimeout and a dead one
// kPeer, both naming the operation, this rank, the peers still pending and their bytes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "plan/schedule.hpp"
#include "plan/topology.hpp"
#include "runtime/call.hpp"
#include "runtime/exec_context.hpp"
#include "runtime/transport.hpp"

namespace piper::runtime {

/// A deadline and the timeout it came from (errors print the timeout).
struct Deadline {
  std::chrono::steady_clock::time_point at;
  double timeout_s;
  static Deadline in(double left_s, double timeout_s);
  double left_s() const;
};

class Executor;

/// Where the data of CUDA calls moves: a CUDA execution context (csrc/cuda/cuda_context.hpp)
/// and the transport of device messages (NCCL, or host-staged over the host transport).
/// Headers and agreement always go over the executor's host transport.
struct DevicePlane {
  std::unique_ptr<ExecContext> context;
  std::shared_ptr<Transport> data;
  int device = -1;
};

/// Builds the device plane collectively on the first CUDA call (every rank is in that call:
/// the header round or the in-band check agreed on the memory kind first). May use the
/// executor's allgather (tag kDeviceTag) to share set-up data such as NCCL's unique id.
/// stream: the first call's (a factory refuses to build the plane inside a CUDA graph capture).
using DevicePlaneFactory = std::function<DevicePlane(Executor& ex, int device, uintptr_t stream,
                                                     const Deadline& deadline)>;

class Executor {
 public:
  /// pids, same_host: every rank's process id and whether it runs on this host (liveness).
  Executor(plan::Topology topology, std::shared_ptr<Transport> transport,
           std::unique_ptr<ExecContext> context, std::vector<int64_t> pids,
           std::vector<uint8_t> same_host);

  /// Step 1 of a call (agree.cpp): what every rank must agree on before data moves. P == 1,
  /// or kTrust with known receive counts: local checks only. kInBand on the equal split under
  /// flat or pairwise (transport with any-tag receives): nothing is exchanged now, the exchange
  /// checks the signature. Otherwise a header round (every rank's header to every rank). A
  /// mismatch anywhere returns kMismatch with every rank's header on every rank.
  Agreement agree(const Call& call, CheckMode mode, const Deadline& deadline);

  /// Step 2: moves the data of an agreed call into call.recv (set, and large enough unless
  /// the in-band check will find it is not); agreement.algo becomes the algorithm that ran
  /// (flat instead of HALO while a CUDA graph is captured). Returns the gathered headers (P x W) when the
  /// in-band check found a mismatch (every rank then has them; recv's content is undefined),
  /// else an empty vector.
  std::vector<int64_t> exchange(const Call& call, Agreement& agreement,
                                const Deadline& deadline);

  /// Seconds per unit of each traffic term (piper_comm.cost.Links.coefficients), for auto.
  void set_links(const std::vector<double>& coefficients);

  /// How the device plane is built (the bindings set it; without one CUDA calls raise kUsage).
  void set_device_factory(DevicePlaneFactory factory) { device_factory_ = std::move(factory); }
  /// The CUDA device of this rank's calls, -1 before the first CUDA call.
  int device() const { return device_.device; }
  /// Fixes this rank's CUDA device when a CUDA call is issued (on the issuing thread, before an
  /// async call reaches the worker that builds the device plane): the first call's device;
  /// returns the device fixed (`device` when this call fixed it). Thread-safe.
  int claim_device(int device) {
    int fixed = -1;
    return claimed_device_.compare_exchange_strong(fixed, device) ? device : fixed;
  }
  /// The device plane's data transport ("nccl 2.28.9", "host-staged over mpi", ...), "" before
  /// the first CUDA call.
  std::string device_transport_name() const { return device_.data ? device_.data->name() : ""; }
  /// Releases the device plane collectively (CUDA IPC mappings, the NCCL communicator);
  /// nothing to do when no CUDA call ran. Every rank must call it (Communicator.close does).
  void close_device(const std::string& what, double timeout_s);

  /// All-to-all(v) of raw bytes: send holds send_bytes[p] bytes for every rank p back to back,
  /// recv receives recv_bytes[p] from every rank p back to back. The counts must agree between
  /// ranks (the caller checked them, or trusts them; a receive too small raises kUsage).
  /// tag: the call's message tag. what: "all_to_all_v #12", for errors.
  void alltoallv(const uint8_t* send, int64_t send_n, uint8_t* recv, int64_t recv_n,
                 const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
                 Algorithm algo, int64_t seq, int tag, const std::string& what,
                 const Deadline& deadline);

  /// All-gather of `words` int64 per rank: returns P x words, row r = rank r's (errors name
  /// `what` + " (metadata exchange)").
  std::vector<int64_t> allgather(const int64_t* mine, int64_t words, int tag,
                                 const std::string& what, const Deadline& deadline);

  /// Completes the host transport's batch or throws (kTimeout / kPeer) before the deadline.
  void wait_all(const std::string& what, const Deadline& deadline) {
    wait_all(*transport_, what, deadline);
  }

  /// How this executor's calls were checked so far (P > 1 calls only).
  struct CheckCounts {
    int64_t header_rounds = 0;     // header rounds before the data
    int64_t in_band = 0;           // calls checked in-band (no message beyond the data)
    int64_t agreement_rounds = 0;  // rounds after a mismatch
  };
  const CheckCounts& check_counts() const { return check_counts_; }

  Transport& transport() { return *transport_; }
  std::shared_ptr<Transport> shared_transport() const { return transport_; }
  const plan::Topology& topology() const { return topology_; }

 private:
  void flat(const uint8_t* send, int64_t send_n, uint8_t* recv, int64_t recv_n,
            const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
            bool pairwise, int tag, const std::string& what, const Deadline& deadline);
  void halo(const uint8_t* send, int64_t send_n, uint8_t* recv, int64_t recv_n,
            const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
            int64_t seq, int tag, const std::string& what, const Deadline& deadline);
  std::vector<int64_t> dead_peers(const std::vector<Message>& pending) const;
  void wait_all(Transport& tr, const std::string& what, const Deadline& deadline);
  /// Points ctx_ / data_ at the plane of the call's memory (building the device plane on the
  /// first CUDA call) and sets the call's stream; returns the algorithm that can run there.
  Algorithm use_plane(const Call& call, Algorithm algo, const Deadline& deadline);
  void use_host_plane() { ctx_ = context_.get(), data_ = transport_.get(); }
  // agree.cpp
  Algorithm choose(const Call& call, const std::vector<int64_t>* S);
  bool gather(const std::vector<int64_t>& row, int tag, bool any, const std::string& what,
              const Deadline& deadline, std::vector<int64_t>& table);
  std::vector<int64_t> agree_round(const Call& call, const Deadline& deadline);
  bool in_band_usable() const;
  bool flat_in_band(const Call& call, const Agreement& agreement, const Deadline& deadline);

  plan::Topology topology_;
  std::shared_ptr<Transport> transport_;
  std::unique_ptr<ExecContext> context_;
  std::vector<int64_t> pids_;
  std::vector<uint8_t> same_host_;
  DevicePlaneFactory device_factory_;
  DevicePlane device_;
  std::atomic<int> claimed_device_{-1};  // claim_device
  ExecContext* ctx_;  // the plane of the call being exchanged: context_ or device_.context
  Transport* data_;   // its data transport: transport_ or device_.data
  int64_t me_;
  CheckCounts check_counts_;
  std::vector<double> links_;                            // per traffic term, for choose()
  std::vector<std::pair<int64_t, Algorithm>> uniform_;  // choose() of the equal split, by bytes
};

}  // namespace piper::runtime
