// Binds the CUDA execution context (csrc/cuda/cuda_context.hpp) and its host-side parts
// (csrc/cuda/ipc_record.hpp) into piper_comm._C; called from bindings.cpp. Compiled in every
// build: without CUDA, CudaContext.create raises PiperUsageError "built without CUDA".
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "common/error.hpp"
#include "cuda/cuda_context.hpp"
#include "cuda/ipc_record.hpp"
#include "host/node_channel.hpp"
#include "runtime/executor.hpp"
#include "runtime/protocol_probe.hpp"
#include "runtime/transport.hpp"

namespace py = pybind11;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::vector<int64_t> to_vector(const I64Array& a) {
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

piper::plan::CopyList copy_list(const I64Array& src_off, const I64Array& dst_off,
                                const I64Array& len) {
  piper::plan::CopyList c;
  c.src_off = to_vector(src_off);
  c.dst_off = to_vector(dst_off);
  c.len = to_vector(len);
  if (c.src_off.size() != c.len.size() || c.dst_off.size() != c.len.size())
    throw piper::Error(piper::ErrorCode::kUsage,
                       piper::fmt("piper: copy list of ", c.src_off.size(), " src offsets, ",
                                  c.dst_off.size(), " dst offsets and ", c.len.size(),
                                  " lengths: they must be equally long"));
  return c;
}

py::bytes encode_record(const py::dict& d) {
  piper::cuda::IpcRecord r = piper::cuda::empty_record();
  if (d.contains("pid")) r.pid = d["pid"].cast<int64_t>();
  if (d.contains("device")) r.device = d["device"].cast<int64_t>();
  if (d.contains("bus_id"))
    std::strncpy(r.bus_id, d["bus_id"].cast<std::string>().c_str(), sizeof(r.bus_id) - 1);
  if (d.contains("segment_gen")) r.segment_gen = d["segment_gen"].cast<int64_t>();
  if (d.contains("segment_bytes")) r.segment_bytes = d["segment_bytes"].cast<int64_t>();
  if (d.contains("error"))
    std::strncpy(r.error, d["error"].cast<std::string>().c_str(), sizeof(r.error) - 1);
  if (d.contains("segment_handle")) {
    const std::string h = d["segment_handle"].cast<std::string>();
    std::memcpy(r.segment_handle, h.data(), std::min<size_t>(h.size(), sizeof(r.segment_handle)));
  }
  std::string out(piper::host::NodeChannel::kExchangeBytes, '\0');
  piper::cuda::write_record(reinterpret_cast<uint8_t*>(out.data()),
                            static_cast<int64_t>(out.size()), r);
  return py::bytes(out);
}

py::dict decode_record(const py::bytes& area, int64_t rank, const std::string& what) {
  const std::string s = area;
  if (static_cast<int64_t>(s.size()) < piper::host::NodeChannel::kExchangeBytes)
    throw piper::Error(piper::ErrorCode::kUsage,
                       piper::fmt("piper: an exchange area holds ",
                                  piper::host::NodeChannel::kExchangeBytes, " B, got ", s.size()));
  const auto r = piper::cuda::read_record(reinterpret_cast<const uint8_t*>(s.data()),
                                          static_cast<int64_t>(s.size()), rank, what);
  py::dict d;
  d["pid"] = r.pid;
  d["device"] = r.device;
  d["bus_id"] = std::string(r.bus_id);
  d["segment_gen"] = r.segment_gen;
  d["segment_bytes"] = r.segment_bytes;
  d["error"] = std::string(r.error);
  d["segment_handle"] =
      py::bytes(reinterpret_cast<const char*>(r.segment_handle), sizeof(r.segment_handle));
  return d;
}

// The transport of CudaNodeExecutor: HALO on one node sends no message, and nothing else runs
// there (the communicator's device plane has the NCCL and staged transports).
class NoInterNodeTransport final : public piper::runtime::Transport {
 public:
  NoInterNodeTransport(int64_t rank, int64_t size) : rank_(rank), size_(size) {}
  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  std::string name() const override { return "none (one node)"; }
  void post_send(const void*, int64_t bytes, int64_t peer, int) override { refuse(bytes, peer); }
  void post_recv(void*, int64_t bytes, int64_t peer, int) override { refuse(bytes, peer); }
  bool test_all() override { return true; }
  std::vector<piper::runtime::Message> pending() const override { return {}; }
  void cancel_all() override {}
  void progress() override {}

 private:
  [[noreturn]] void refuse(int64_t bytes, int64_t peer) const {
    throw piper::Error(piper::ErrorCode::kUsage,
                       piper::fmt("piper: rank ", rank_, ": a message of ", bytes, " B to or from ",
                                  "rank ", peer, ": CudaNodeExecutor has no transport; only ",
                                  "HALO on one node runs (comm.all_to_all has the others)"));
  }
  int64_t rank_, size_;
};

// HALO over a CudaContext on a topology of one node (every rank a process on this host), without
// a communicator: the GPU tests' way to check the context apart from the call path.
class CudaNodeExecutor {
 public:
  CudaNodeExecutor(piper::host::NodeChannel* channel, int64_t world_size, int64_t rank,
                   int device, double timeout_s) {
    auto ctx = piper::cuda::CudaContext::create(channel, world_size, rank, device, timeout_s);
    context_ = ctx.get();
    executor_ = std::make_unique<piper::runtime::Executor>(
        piper::plan::Topology(std::vector<int64_t>(world_size, 0)),
        std::make_shared<NoInterNodeTransport>(rank, world_size), std::move(ctx),
        std::vector<int64_t>{}, std::vector<uint8_t>{});
  }
  void alltoallv(uintptr_t send, int64_t send_n, uintptr_t recv, int64_t recv_n,
                 const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
                 uintptr_t stream, int64_t seq, double timeout_s) {
    context_->set_stream(stream);
    const std::string what = piper::fmt("all_to_all_v #", seq, " (cuda, one node)");
    executor_->alltoallv(reinterpret_cast<const uint8_t*>(send), send_n,
                         reinterpret_cast<uint8_t*>(recv), recv_n, send_bytes, recv_bytes,
                         piper::runtime::Algorithm::kHalo, seq, 0, what,
                         piper::runtime::Deadline::in(timeout_s, timeout_s));
  }
  void close(double timeout_s) { context_->close("cuda executor close", timeout_s); }

 private:
  piper::cuda::CudaContext* context_;  // owned by executor_
  std::unique_ptr<piper::runtime::Executor> executor_;
};

}  // namespace

void register_gpu(py::module_& m) {
  using piper::cuda::CudaContext;
  m.attr("CUDA_EXCHANGE_BYTES") = piper::host::NodeChannel::kExchangeBytes;
  m.attr("CUDA_IPC_RECORD_BYTES") = sizeof(piper::cuda::IpcRecord);
  m.def(
      "cuda_device_table",
      [](const I64Array& src_off, const I64Array& dst_off, const I64Array& len,
         int64_t src_bytes, int64_t dst_bytes, const std::string& what) {
        const auto t = piper::cuda::device_table(copy_list(src_off, dst_off, len), src_bytes,
                                                 dst_bytes, what);
        py::array_t<int64_t> out({static_cast<py::ssize_t>(3),
                                  static_cast<py::ssize_t>(t.size() / 3)});
        std::copy(t.begin(), t.end(), out.mutable_data());
        return out;
      },
      py::arg("src_off"), py::arg("dst_off"), py::arg("len"), py::arg("src_bytes"),
      py::arg("dst_bytes"), py::arg("what") = "cuda copy",
      "The block-copy kernel's table of a copy list: int64 [3, n] (src offsets, dst offsets,\n"
      "bytes), zero-byte blocks left out; raises PiperError naming the block and both sizes\n"
      "when a block leaves a buffer (csrc/cuda/ipc_record.hpp).");
  m.def(
      "node_exchange_view",
      [](const piper::host::NodeChannel& ch, int64_t local_rank) {
        return py::memoryview::from_memory(ch.exchange(local_rank),
                                           piper::host::NodeChannel::kExchangeBytes,
                                           /*readonly=*/false);
      },
      py::arg("channel"), py::arg("local_rank"),
      "Local rank l's exchange area of a NodeChannel (where the CUDA context publishes its IPC\n"
      "handles), as a writable memoryview of CUDA_EXCHANGE_BYTES.");
  m.def("cuda_grown_segment_bytes", &piper::cuda::grown_segment_bytes, py::arg("bytes"),
        py::arg("current"), "The node segment's size after growing to hold `bytes`.");
  m.def("cuda_ipc_encode", &encode_record, py::arg("fields"),
        "An exchange area (CUDA_EXCHANGE_BYTES) holding an IPC record with these fields.");
  m.def("cuda_ipc_decode", &decode_record, py::arg("area"), py::arg("rank"), py::arg("what"),
        "The IPC record of an exchange area, checked (PiperSystemError naming rank and what).");
  m.def(
      "cuda_check_segment",
      [](const py::bytes& area, int64_t owner, int64_t gen, int64_t bytes,
         const std::string& what) {
        const std::string s = area;
        const auto r = piper::cuda::read_record(reinterpret_cast<const uint8_t*>(s.data()),
                                                static_cast<int64_t>(s.size()), owner, what);
        piper::cuda::check_segment(r, owner, gen, bytes, what);
      },
      py::arg("area"), py::arg("owner"), py::arg("gen"), py::arg("bytes"), py::arg("what"),
      "Raises unless the owner's record publishes segment generation gen of >= bytes.");

  py::class_<CudaContext>(m, "CudaContext",
                          "The execution context on CUDA device memory (csrc/cuda/\n"
                          "cuda_context.hpp). Pointers are device addresses as integers.")
      .def_static("create", &CudaContext::create, py::arg("channel").none(true),
                  py::arg("world_size"), py::arg("rank"), py::arg("device"), py::arg("timeout_s"),
                  py::keep_alive<0, 1>(), py::call_guard<py::gil_scoped_release>(),
                  "Collective over the node: opens the local peers' IPC fence events.")
      .def_property("stream", &CudaContext::stream, &CudaContext::set_stream,
                    "The cudaStream_t (int) every call orders its work on.")
      .def(
          "copy",
          [](CudaContext& c, uintptr_t src, int64_t src_bytes, uintptr_t dst, int64_t dst_bytes,
             const I64Array& src_off, const I64Array& dst_off, const I64Array& len) {
            const auto blocks = copy_list(src_off, dst_off, len);
            py::gil_scoped_release nogil;
            c.copy(reinterpret_cast<const uint8_t*>(src), src_bytes,
                   reinterpret_cast<uint8_t*>(dst), dst_bytes, blocks);
          },
          py::arg("src_ptr"), py::arg("src_bytes"), py::arg("dst_ptr"), py::arg("dst_bytes"),
          py::arg("src_off"), py::arg("dst_off"), py::arg("len"))
      .def("fence", &CudaContext::fence, py::arg("what"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("ensure_segment", &CudaContext::ensure_segment, py::arg("bytes"), py::arg("what"),
           py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly(
          "segment_ptr",
          [](const CudaContext& c) { return reinterpret_cast<uintptr_t>(c.segment()); })
      .def_property_readonly("segment_bytes", &CudaContext::segment_bytes)
      .def(
          "staging", [](CudaContext& c, int64_t bytes) {
            return reinterpret_cast<uintptr_t>(c.staging(bytes));
          },
          py::arg("bytes"))
      .def("close", &CudaContext::close, py::arg("what"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>());

  py::class_<CudaNodeExecutor>(
      m, "CudaNodeExecutor",
      "HALO on device memory for the ranks of one node (csrc/gpu_py.cpp): the real executor\n"
      "over a CudaContext, no inter-node transport. For the GPU tests, until CUDA tensors\n"
      "reach comm.all_to_all_v.")
      .def(py::init<piper::host::NodeChannel*, int64_t, int64_t, int, double>(),
           py::arg("channel").none(true), py::arg("world_size"), py::arg("rank"),
           py::arg("device"), py::arg("timeout_s"), py::keep_alive<1, 2>(),
           py::call_guard<py::gil_scoped_release>())
      .def("alltoallv", &CudaNodeExecutor::alltoallv, py::arg("send_ptr"),
           py::arg("send_bytes_total"),
           py::arg("recv_ptr"), py::arg("recv_bytes_total"), py::arg("send_bytes"),
           py::arg("recv_bytes"), py::arg("stream"), py::arg("seq"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(),
           "Bytes: send_bytes[p] to rank p back to back; ordered on `stream`, no host sync.")
      .def("close", &CudaNodeExecutor::close, py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>());

  m.def(
      "probe_context_protocol",
      [](const std::vector<int64_t>& node_of, const I64Array& send_bytes, int algorithm) {
        const auto S = to_vector(send_bytes);
        piper::runtime::ProbeResult res;
        {
          py::gil_scoped_release nogil;
          res = piper::runtime::probe_protocol(node_of, S,
                                               static_cast<piper::runtime::Algorithm>(algorithm));
        }
        py::list ranks;
        for (size_t r = 0; r < res.traces.size(); ++r) {
          py::dict d;
          d["trace"] = res.traces[r];
          d["recv"] = py::bytes(reinterpret_cast<const char*>(res.recv[r].data()),
                                res.recv[r].size());
          ranks.append(d);
        }
        return ranks;
      },
      py::arg("node_of"), py::arg("send_bytes"), py::arg("algorithm"),
      "Runs Executor::alltoallv for every rank of the topology as threads of this process\n"
      "(an in-process transport, each node's real NodeChannel) with a context that records\n"
      "every call before passing it to a HostContext. send_bytes: P x P (row r: what rank r\n"
      "sends each rank); rank r's send buffer holds bytes f(r, d, i). Returns per rank its\n"
      "trace (one string per context call) and its receive buffer (csrc/runtime/\n"
      "protocol_probe.hpp).");
}
