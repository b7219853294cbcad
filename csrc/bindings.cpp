// Binds csrc/plan, csrc/host and csrc/runtime as piper_comm._C. pybind11 is included here and in
// runtime/py_transport.cpp (the adapter that runs the executor over a Python transport) only.
// Pointers cross as integers (addresses) with their sizes; blocking calls release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <mutex>
#include <set>
#include <tuple>

#include "common/error.hpp"
#include "host/copy.hpp"
#include "host/node_channel.hpp"
#include "plan/schedule.hpp"
#include "plan/topology.hpp"
#include "plan/traffic.hpp"
#include "runtime/exec_context.hpp"
#include "runtime/executor.hpp"
#include "runtime/header.hpp"
#include "runtime/message_summary.hpp"
#include "runtime/py_transport.hpp"
#include "runtime/watchdog.hpp"
#include "python/args.hpp"
#include "python/call_queue.hpp"
#ifdef PIPER_WITH_MPI
#include "runtime/mpi_transport.hpp"
#endif
#ifdef PIPER_WITH_CUDA
#include "cuda/api.hpp"
#include "cuda/device_plane.hpp"
#endif

namespace py = pybind11;
void register_gpu(py::module_& m);  // gpu_py.cpp: the CUDA execution context
using piper::plan::CopyList;
using piper::plan::FlatPlan;
using piper::plan::HaloPlan;
using piper::plan::MessageList;
using piper::plan::Topology;
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

std::vector<int64_t> to_vector(const I64Array& a) {
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

py::array_t<int64_t> to_array(const std::vector<int64_t>& v) {
  return py::array_t<int64_t>(static_cast<py::ssize_t>(v.size()), v.data());
}

void translate(const piper::Error& e) {
  static const char* names[] = {"PiperUsageError", "PiperTimeoutError", "PiperPeerError",
                                "PiperSystemError", "PiperError"};
  auto errors = py::module_::import("piper_comm.errors");
  py::object cls = errors.attr(names[static_cast<int>(e.code())]);
  PyErr_SetString(cls.ptr(), e.what());
}

py::dict build_info() {
  py::dict info;
#ifdef PIPER_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = PIPER_CUDA_ARCHS;
  info["cuda_runtime_version"] = piper::cuda::runtime_version();
  std::string err;
  const int n = piper::cuda::device_count(&err);
  info["cuda_devices"] = n;
  if (n < 0) info["cuda_error"] = err;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef PIPER_WITH_NCCL
  info["nccl_header"] = true;
  info["nccl_build_library"] = PIPER_NCCL_BUILD_LIBRARY;
#else
  info["nccl_header"] = false;
#endif
#ifdef PIPER_WITH_MPI
  info["mpi_linked"] = piper::runtime::MpiTransport::library_version();
#else
  info["mpi_linked"] = false;
#endif
  return info;
}

// How CUDA calls of an executor get their device plane (csrc/cuda/device_plane.hpp); a build
// without CUDA sets none (CUDA arrays are then refused by the argument checks).
void set_device_plane(piper::runtime::Executor& ex,
                      std::shared_ptr<piper::runtime::Transport> transport,
                      piper::host::NodeChannel* channel, const std::string& inter,
                      const std::string& nccl_library) {
#ifdef PIPER_WITH_CUDA
  piper::cuda::DeviceOptions opt;
  opt.inter = inter;
  opt.nccl_library = nccl_library;
  opt.channel = channel;
  opt.host = std::move(transport);
  ex.set_device_factory(piper::cuda::device_plane_factory(std::move(opt)));
#else
  (void)ex, (void)transport, (void)channel, (void)inter, (void)nccl_library;
#endif
}

// An executor over MPI called from C++ (the handle of an mpi4py communicator).
std::unique_ptr<piper::runtime::Executor> executor_over_mpi(
    const Topology& topology, uint64_t mpi_handle, piper::host::NodeChannel* channel,
    std::vector<int64_t> pids, std::vector<uint8_t> same_host, const std::string& inter,
    const std::string& nccl_library) {
#ifdef PIPER_WITH_MPI
  auto transport = std::make_shared<piper::runtime::MpiTransport>(mpi_handle);
  if (channel != nullptr) channel->set_progress([transport] { transport->progress(); });
  auto context = std::make_unique<piper::runtime::HostContext>(channel, topology.size());
  auto ex = std::make_unique<piper::runtime::Executor>(topology, transport, std::move(context),
                                                       std::move(pids), std::move(same_host));
  set_device_plane(*ex, transport, channel, inter, nccl_library);
  return ex;
#else
  (void)topology, (void)mpi_handle, (void)channel, (void)pids, (void)same_host, (void)inter,
      (void)nccl_library;
  throw piper::Error(piper::ErrorCode::kUsage,
                     "piper: Executor.over_mpi: piper_comm._C was built without MPI");
#endif
}

// CUDA block copies (csrc/cuda/api.hpp). Without CUDA the same names exist and raise
// PiperUsageError "built without CUDA": a CUDA call never does nothing silently.
void cuda_copy_blocks(uintptr_t src, uintptr_t dst, uintptr_t blocks, int64_t num_blocks,
                      uintptr_t stream) {
#ifdef PIPER_WITH_CUDA
  piper::cuda::copy_blocks(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst),
                           reinterpret_cast<const int64_t*>(blocks), num_blocks, stream);
#else
  (void)src, (void)dst, (void)blocks, (void)num_blocks, (void)stream;
  throw piper::Error(piper::ErrorCode::kUsage,
                     "piper: cuda_copy_blocks: piper_comm._C was built without CUDA");
#endif
}

void cuda_alltoallv(bool pack, uintptr_t src, uintptr_t dst, uintptr_t counts, int64_t num_peers,
                    int64_t row_bytes, int64_t slot_bytes, uintptr_t stream) {
#ifdef PIPER_WITH_CUDA
  auto* fn = pack ? &piper::cuda::pack_alltoallv : &piper::cuda::unpack_alltoallv;
  fn(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst),
     reinterpret_cast<const int64_t*>(counts), num_peers, row_bytes, slot_bytes, stream);
#else
  (void)src, (void)dst, (void)counts, (void)num_peers, (void)row_bytes, (void)slot_bytes,
      (void)stream;
  throw piper::Error(piper::ErrorCode::kUsage,
                     piper::fmt("piper: cuda_", pack ? "pack" : "unpack",
                                "_alltoallv: piper_comm._C was built without CUDA"));
#endif
}

// An executor over a Python transport object (piper_comm/transport.py).
std::unique_ptr<piper::runtime::Executor> executor_over_python(
    const Topology& topology, py::object transport, piper::host::NodeChannel* channel,
    std::vector<int64_t> pids, std::vector<uint8_t> same_host, const std::string& inter,
    const std::string& nccl_library) {
  auto tr = std::make_shared<piper::runtime::PyTransport>(std::move(transport));
  auto context = std::make_unique<piper::runtime::HostContext>(channel, topology.size());
  auto ex = std::make_unique<piper::runtime::Executor>(topology, tr, std::move(context),
                                                       std::move(pids), std::move(same_host));
  set_device_plane(*ex, tr, channel, inter, nccl_library);
  return ex;
}

// Executor.emulate_device_plane (tests): a device plane on host memory, its messages over the
// host transport, or over an NcclTransport on a mock NCCL when nccl_library is given.
void emulate_device_plane(piper::runtime::Executor& ex, piper::host::NodeChannel* channel,
                          const std::string& nccl_library) {
  using piper::runtime::Deadline;
  using piper::runtime::Executor;
  if (!nccl_library.empty()) {
#ifdef PIPER_WITH_NCCL
    piper::cuda::DeviceOptions opt;
    opt.nccl_library = nccl_library;
    opt.channel = channel;
    opt.host = ex.shared_transport();
    ex.set_device_factory(piper::cuda::host_memory_nccl_plane_factory(std::move(opt)));
    return;
#else
    throw piper::Error(piper::ErrorCode::kUsage,
                       "piper: emulate_device_plane(nccl_library=...): piper_comm._C was built "
                       "without NCCL's header");
#endif
  }
  const int64_t P = ex.topology().size();
  ex.set_device_factory([channel, P](Executor& e, int device, uintptr_t, const Deadline& d) {
    const int64_t mine = device;  // a set-up round, as the real plane's
    e.allgather(&mine, 1, piper::runtime::kDeviceTag, "emulated device plane", d);
    piper::runtime::DevicePlane plane;
    plane.context = std::make_unique<piper::runtime::HostContext>(channel, P);
    plane.data = e.shared_transport();
    plane.device = device;
    return plane;
  });
}

// WatchdogProbe (tests): runtime::Watchdog over integer tokens the test completes by hand,
// recording what the hooks saw.
class WatchdogProbe {
 public:
  WatchdogProbe(double timeout_s, double poll_s)
      : wd_(timeout_s, poll_s,
            {[this](void* t) {
               std::lock_guard<std::mutex> lock(m_);
               if (failing_.count(reinterpret_cast<intptr_t>(t)))
                 throw std::runtime_error("the probe's done hook failed on purpose");
               return completed_.count(reinterpret_cast<intptr_t>(t)) > 0;
             },
             [this](void* t) {
               std::lock_guard<std::mutex> lock(m_);
               released_.push_back(reinterpret_cast<intptr_t>(t));
             },
             [this](const std::string& why) {
               std::lock_guard<std::mutex> lock(m_);
               expiries_.push_back(why);
             }}) {}
  piper::runtime::Watchdog& watchdog() { return wd_; }
  void complete(int64_t token) {
    std::lock_guard<std::mutex> lock(m_);
    completed_.insert(token);
  }
  void fail(int64_t token) {  // the done hook throws when it tests this token
    std::lock_guard<std::mutex> lock(m_);
    failing_.insert(token);
  }
  std::vector<int64_t> released() {
    std::lock_guard<std::mutex> lock(m_);
    return released_;
  }
  std::vector<std::string> expiries() {
    std::lock_guard<std::mutex> lock(m_);
    return expiries_;
  }

 private:
  std::mutex m_;
  std::set<int64_t> completed_, failing_;
  std::vector<int64_t> released_;
  std::vector<std::string> expiries_;
  piper::runtime::Watchdog wd_;  // last: destroyed (stopped) before the records it writes
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Piper's C++ core: schedules (plan), host shared-memory exchange (host).";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const piper::Error& e) {
      translate(e);
    }
  });
  m.def("build_info", &build_info, "What this build of the extension contains.");

  py::class_<Topology>(m, "Topology", "Ranks grouped into nodes (see csrc/plan/topology.hpp).")
      .def(py::init([](const I64Array& node_of) { return Topology(to_vector(node_of)); }),
           py::arg("node_of"))
      .def_property_readonly("size", &Topology::size)
      .def_property_readonly("num_nodes", &Topology::num_nodes)
      .def_property_readonly("uniform", &Topology::uniform)
      .def("node_of", &Topology::node_of)
      .def("local_of", &Topology::local_of)
      .def("node_size", &Topology::node_size)
      .def("node_ranks", &Topology::node_ranks)
      .def("contiguous", &Topology::contiguous)
      .def("proxy", &Topology::proxy, py::arg("src_node"), py::arg("dst"));

  py::class_<CopyList>(m, "CopyList")
      .def_property_readonly("src_off", [](const CopyList& c) { return to_array(c.src_off); })
      .def_property_readonly("dst_off", [](const CopyList& c) { return to_array(c.dst_off); })
      .def_property_readonly("len", [](const CopyList& c) { return to_array(c.len); })
      .def_property_readonly("bytes", &CopyList::bytes)
      .def("__len__", [](const CopyList& c) { return c.len.size(); });

  py::class_<MessageList>(m, "MessageList")
      .def_readonly("peer", &MessageList::peer)
      .def_readonly("off", &MessageList::off)
      .def_readonly("len", &MessageList::len)
      .def("__len__", [](const MessageList& l) { return l.len.size(); });

  py::class_<FlatPlan>(m, "FlatPlan")
      .def_readonly("sends", &FlatPlan::sends)
      .def_readonly("recvs", &FlatPlan::recvs)
      .def_readonly("self_copy", &FlatPlan::self);

  py::class_<HaloPlan>(m, "HaloPlan")
      .def_readonly("segment_bytes", &HaloPlan::segment_bytes)
      .def_readonly("staging_bytes", &HaloPlan::staging_bytes)
      .def_readonly("intra_bytes", &HaloPlan::intra_bytes)
      .def_readonly("pack", &HaloPlan::pack)
      .def_readonly("local", &HaloPlan::local)
      .def_readonly("sends", &HaloPlan::sends)
      .def_readonly("recvs", &HaloPlan::recvs)
      .def_readonly("recv_staged", &HaloPlan::recv_staged)
      .def_readonly("unpack", &HaloPlan::unpack);

  m.def(
      "plan_flat",
      [](int64_t me, const I64Array& send_bytes, const I64Array& recv_bytes) {
        return piper::plan::plan_flat(me, to_vector(send_bytes), to_vector(recv_bytes));
      },
      py::arg("me"), py::arg("send_bytes"), py::arg("recv_bytes"));
  m.def(
      "plan_halo",
      [](const Topology& topo, int64_t me, const I64Array& node_send_bytes,
         const I64Array& recv_bytes) {
        return piper::plan::plan_halo(topo, me, to_vector(node_send_bytes), to_vector(recv_bytes));
      },
      py::arg("topology"), py::arg("me"), py::arg("node_send_bytes"), py::arg("recv_bytes"));

  m.def(
      "a2a_traffic",
      [](const Topology& topo,
         const py::array_t<double, py::array::c_style | py::array::forcecast>& send_bytes) {
        const int64_t P = topo.size();
        PIPER_HOST_ASSERT(send_bytes.size() == P * P);
        const auto t = piper::plan::a2a_traffic(topo, send_bytes.data());
        py::array_t<double> out({int64_t{2}, static_cast<int64_t>(piper::plan::kNumTerms), P});
        std::copy(t.begin(), t.end(), out.mutable_data());
        return out;
      },
      py::arg("topology"), py::arg("send_bytes"),
      "Per-rank traffic terms of flat and HALO (csrc/plan/traffic.hpp) for a P x P byte\n"
      "matrix: float64 [2 (flat, halo), 6 (msgs/bytes intra, msgs/bytes inter, barriers,\n"
      "copy bytes), P].");

  m.def(
      "copy_blocks",
      [](uintptr_t src, int64_t src_bytes, uintptr_t dst, int64_t dst_bytes,
         const CopyList& blocks) {
        py::gil_scoped_release nogil;
        piper::host::copy_blocks(reinterpret_cast<const uint8_t*>(src), src_bytes,
                                 reinterpret_cast<uint8_t*>(dst), dst_bytes, blocks);
      },
      py::arg("src"), py::arg("src_bytes"), py::arg("dst"), py::arg("dst_bytes"),
      py::arg("blocks"), "Copies every block of `blocks` from address src to address dst.");

  m.def("cuda_copy_blocks", &cuda_copy_blocks, py::arg("src_ptr"), py::arg("dst_ptr"),
        py::arg("blocks_dev_ptr"), py::arg("num_blocks"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Copies blocks between device buffers in one launch on `stream`, no host sync.\n"
        "src_ptr, dst_ptr: device addresses (int). blocks_dev_ptr: device address of int64\n"
        "[3, num_blocks] (src offsets, dst offsets, byte counts; a CopyList). stream: a\n"
        "cudaStream_t as int (torch: torch.cuda.current_stream().cuda_stream). Units: bytes.");
  m.def(
      "cuda_pack_alltoallv",
      [](uintptr_t src, uintptr_t dst, uintptr_t counts, int64_t num_peers, int64_t row_bytes,
         int64_t slot_bytes, uintptr_t stream) {
        cuda_alltoallv(true, src, dst, counts, num_peers, row_bytes, slot_bytes, stream);
      },
      py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("counts_dev_ptr"), py::arg("num_peers"),
      py::arg("row_bytes"), py::arg("slot_bytes"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "All-to-all(v) pack on `stream`, no host sync: src holds counts[p] rows (row_bytes each)\n"
      "per peer p back to back; peer p's rows go to dst + p * slot_bytes. counts_dev_ptr: device\n"
      "address of int64 [num_peers] (rows; counts[p] * row_bytes <= slot_bytes, unchecked).");
  m.def(
      "cuda_unpack_alltoallv",
      [](uintptr_t src, uintptr_t dst, uintptr_t counts, int64_t num_peers, int64_t row_bytes,
         int64_t slot_bytes, uintptr_t stream) {
        cuda_alltoallv(false, src, dst, counts, num_peers, row_bytes, slot_bytes, stream);
      },
      py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("counts_dev_ptr"), py::arg("num_peers"),
      py::arg("row_bytes"), py::arg("slot_bytes"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Inverse of cuda_pack_alltoallv: counts[p] rows from src + p * slot_bytes go to dst,\n"
      "back to back in peer order. Same arguments and units.");

  namespace hdr = piper::runtime::header;
  py::dict fields;
  for (auto [name, index] : {std::pair{"SEQ", hdr::kSeq}, {"OP", hdr::kOp}, {"ALGO", hdr::kAlgo},
                             {"DTYPE", hdr::kDtype}, {"ROW_BYTES", hdr::kRowBytes},
                             {"TRAIL", hdr::kTrail}, {"MEM", hdr::kMem}, {"ERR", hdr::kErr}, {"ERR_A", hdr::kErrA},
                             {"ERR_B", hdr::kErrB}, {"RECV_CAP", hdr::kRecvCap},
                             {"NFIXED", hdr::kFixed}})
    fields[name] = static_cast<int64_t>(index);
  m.attr("HEADER_FIELDS") = fields;
  py::dict local_errors;  // the local-check codes of runtime/call.hpp, worded by validate.py
  for (int64_t i = 0; i < piper::runtime::kNumLocalErrors; ++i)
    local_errors[piper::runtime::kLocalErrorNames[i]] = i;
  m.attr("LOCAL_ERRORS") = local_errors;
  py::class_<WatchdogProbe>(m, "WatchdogProbe",
                            "Tests only: csrc/runtime/watchdog.hpp over integer tokens that the "
                            "test completes with complete() (or whose test throws: fail()); "
                            "released() and expiries() are what its hooks were called with.")
      .def(py::init<double, double>(), py::arg("timeout_s"), py::arg("poll_s"))
      .def("watch", [](WatchdogProbe& p, int64_t token, std::string what) {
        p.watchdog().watch(reinterpret_cast<void*>(static_cast<intptr_t>(token)),
                           std::move(what));
      })
      .def("complete", &WatchdogProbe::complete)
      .def("fail", &WatchdogProbe::fail)
      .def("stop", [](WatchdogProbe& p) { p.watchdog().stop(); },
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("expired", [](WatchdogProbe& p) { return p.watchdog().expired(); })
      .def_property_readonly("reason", [](WatchdogProbe& p) { return p.watchdog().reason(); })
      .def_property_readonly("watched", [](WatchdogProbe& p) { return p.watchdog().watched(); })
      .def("released", &WatchdogProbe::released)
      .def("expiries", &WatchdogProbe::expiries);
  m.def(
      "summarize_messages",
      [](const std::vector<std::tuple<bool, int64_t, int64_t>>& batches, int64_t repeat) {
        piper::runtime::MessageSummary summary;
        std::string line;
        for (int64_t r = 0; r < repeat; ++r) {  // the same object again: take() resets it
          for (const auto& [send, peer, bytes] : batches) summary.add({send, peer, bytes});
          line = summary.take();
        }
        return line;
      },
      py::arg("messages"), py::arg("repeat") = 1,
      "Tests only: csrc/runtime/message_summary.hpp's line for (send, peer, bytes) messages, "
      "added and taken `repeat` times on one summary (the last line).");
  m.def("emulate_cuda_arrays", &piper::python::set_emulated_cuda, py::arg("on"),
        "Tests only: __cuda_array_interface__ arrays count as host-addressable memory of CUDA\n"
        "device 0 (see Executor.emulate_device_plane); process-wide, switch it off after.");
  m.def("header_tag", &piper::runtime::header_tag, py::arg("seq"),
        "The tag of call seq's header round (csrc/runtime/call.hpp), also the barrier's.");
  m.def(
      "agree",
      [](const I64Array& table) -> py::object {
        PIPER_HOST_ASSERT(table.ndim() == 2);
        const int64_t P = table.shape(0), W = table.shape(1);
        std::vector<int64_t> S;
        if (!hdr::agree(table.data(), P, W, S)) return py::none();
        py::array_t<int64_t> out({P, P});
        std::copy(S.begin(), S.end(), out.mutable_data());
        return out;
      },
      py::arg("table"),
      "The fast verdict on the gathered P x W headers (csrc/runtime/header.hpp): the P x P\n"
      "send-count matrix when every check passes, else None (validate.py names the problem).");

  using piper::runtime::Deadline;
  using piper::runtime::Executor;
  py::class_<Executor>(m, "Executor",
                       "The all-to-all(v) algorithms over a transport and an execution context\n"
                       "(csrc/runtime/executor.hpp); every call runs with the GIL released.")
      .def_static("over_mpi", &executor_over_mpi, py::arg("topology"), py::arg("mpi_handle"),
                  py::arg("channel").none(true), py::arg("pids"), py::arg("same_host"),
                  py::arg("inter") = "auto", py::arg("nccl_library") = "",
                  py::keep_alive<0, 3>(),
                  "mpi_handle: mpi4py Comm.handle (MPI_ERRORS_RETURN set). channel: the node's\n"
                  "NodeChannel, or None on a node of one rank. pids, same_host: per rank.\n"
                  "inter: PIPER_INTER (auto | nccl | mpi), the transport of CUDA calls'\n"
                  "messages; nccl_library: libnccl.so.2 to load ('' the loader's search).")
      .def_static("over_python", &executor_over_python, py::arg("topology"),
                  py::arg("transport"), py::arg("channel").none(true), py::arg("pids"),
                  py::arg("same_host"), py::arg("inter") = "auto", py::arg("nccl_library") = "",
                  py::keep_alive<0, 3>(),
                  "transport: a piper_comm.transport.Transport (torch/gloo, mpi4py, single);\n"
                  "the executor calls it with the GIL held. Other arguments as over_mpi.")
      .def_property_readonly("transport_name",
                             [](Executor& ex) { return ex.transport().name(); })
      .def_property_readonly("device", &Executor::device,
                             "The CUDA device of this rank's calls (-1 before the first one).")
      .def_property_readonly("device_transport", &Executor::device_transport_name,
                             "The transport of CUDA calls' messages ('' before the first one).")
      .def("close_device", &Executor::close_device, py::arg("what"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(),
           "Releases the device plane collectively (no-op when no CUDA call ran).")
      .def("emulate_device_plane", &emulate_device_plane, py::arg("channel").none(true),
           py::arg("nccl_library") = "", py::keep_alive<1, 2>(),
           "Tests on hosts without a device: the device plane becomes a host context over the\n"
           "host transport; with emulate_cuda_arrays(True) the device plane's plumbing (memory\n"
           "kind in the header, set-up on the first call, one device per rank, close) runs on\n"
           "host memory. nccl_library (a mock NCCL moving host bytes, tests/comm/mock_nccl.c):\n"
           "the plane's messages go through Piper's NCCL transport over it instead, set up as\n"
           "with PIPER_INTER=nccl.")
      .def_property_readonly(
          "check_counts",
          [](const Executor& ex) {
            const auto& c = ex.check_counts();
            py::dict d;
            d["header_rounds"] = c.header_rounds;
            d["in_band"] = c.in_band;
            d["agreement_rounds"] = c.agreement_rounds;
            return d;
          },
          "How calls on more than one rank were checked so far: header rounds before the\n"
          "data, calls checked in-band, agreement rounds after a mismatch.")
      .def("set_links",
           [](Executor& ex, const std::vector<double>& c) { ex.set_links(c); },
           py::arg("coefficients"),
           "Seconds per unit of each traffic term (piper_comm.cost.Links.coefficients).")
      .def(
          "allgather",
          [](Executor& ex, const I64Array& mine, int tag, const std::string& what, double left_s,
             double timeout_s) {
            const auto row = to_vector(mine);
            std::vector<int64_t> table;
            {
              py::gil_scoped_release nogil;
              table = ex.allgather(row.data(), static_cast<int64_t>(row.size()), tag, what,
                                   Deadline::in(left_s, timeout_s));
            }
            py::array_t<int64_t> out({ex.topology().size(), static_cast<int64_t>(row.size())});
            std::copy(table.begin(), table.end(), out.mutable_data());
            return out;
          },
          py::arg("mine"), py::arg("tag"), py::arg("what"), py::arg("left_s"),
          py::arg("timeout_s"), "All-gather of one int64 row per rank: P x len(mine).");

  using piper::host::NodeChannel;
  using piper::python::CallQueue;
  using piper::python::CallState;
  py::class_<CallState, std::shared_ptr<CallState>>(
      m, "PendingCall", "An asynchronous call in a CallQueue (opaque; see piper_comm/work.py).");
  py::class_<CallQueue, std::shared_ptr<CallQueue>>(
      m, "CallQueue",
      "A communicator's calls in issue order: synchronous ones on the caller's thread once\n"
      "the queue drained, asynchronous ones on a C++ worker (csrc/python/call_queue.hpp).")
      .def(py::init([](Executor& ex) { return std::make_shared<CallQueue>(ex); }),
           py::arg("executor"), py::keep_alive<1, 2>())
      .def(
          "call",
          [](CallQueue& q, int op, py::handle send, py::handle send_counts, py::handle recv,
             py::handle recv_counts, int64_t request, bool exact_recv, bool recv_only, int check,
             int64_t seq, const std::string& what, double timeout_s, py::handle new_rows,
             bool async_op) -> py::object {
            const piper::python::CallOptions opt{request, exact_recv, recv_only, check, seq,
                                                 what, timeout_s};
            auto st = piper::python::prepare(q.executor(), op, send, send_counts, recv,
                                             recv_counts, opt, new_rows);
            if (!async_op) return q.run(st);
            q.submit(st);
            return py::cast(st);
          },
          "call(op, send, send_counts, recv, recv_counts, request, exact_recv, recv_only,\n"
          "check, seq, what, timeout_s, new_rows, async_op): one all-to-all (op 1) or\n"
          "all-to-all-v (op 2) of numpy arrays / torch CPU tensors (csrc/python/call.hpp).\n"
          "Returns (out, recv_counts, algorithm), or a PendingCall when async_op.")
      .def("wait", &CallQueue::wait, py::arg("call"), py::arg("timeout_s"),
           "Waits for a PendingCall (GIL released); False if timeout_s (< 0: none) passed.")
      .def("done", &CallQueue::done, py::arg("call"))
      .def(
          "result",
          [](CallQueue&, const std::shared_ptr<CallState>& st) {
            return piper::python::finish(*st);
          },
          py::arg("call"), "A completed PendingCall's (out, recv_counts, algorithm), or its error.")
      .def_property_readonly("pending", &CallQueue::pending)
      .def("drain", &CallQueue::drain, "Waits until no call is queued or running.")
      .def("stop", &CallQueue::stop, py::arg("timeout_s"),
           "Finishes queued calls and ends the worker; False if still running after timeout_s.");

  py::class_<NodeChannel>(m, "NodeChannel", "Shared memory of one node (csrc/host/node_channel.hpp).")
      .def(py::init<std::string, int64_t, std::vector<int64_t>, int64_t, bool>(), py::arg("prefix"),
           py::arg("local_rank"), py::arg("local_ranks"), py::arg("world_size"), py::arg("create"))
      .def("unlink", &NodeChannel::unlink)
      .def("set_progress", &NodeChannel::set_progress, py::arg("progress"),
           "Callable run while barriers wait (drives the transport; see node_channel.hpp).")
      .def("close", &NodeChannel::close)
      .def("barrier", &NodeChannel::barrier, py::arg("what"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "publish_row",
          [](NodeChannel& ch, int64_t parity, const I64Array& row) {
            PIPER_HOST_ASSERT(row.size() > 0);
            ch.publish_row(parity, row.data());
          },
          py::arg("parity"), py::arg("row"))
      .def(
          "read_rows",
          [](const NodeChannel& ch, int64_t parity, int64_t world_size) {
            py::array_t<int64_t> out({ch.local_size(), world_size});
            ch.read_rows(parity, out.mutable_data());
            return out;
          },
          py::arg("parity"), py::arg("world_size"))
      .def("ensure_data", &NodeChannel::ensure_data, py::arg("bytes"), py::arg("what"),
           py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("data_address",
                             [](const NodeChannel& ch) { return reinterpret_cast<uintptr_t>(ch.data()); })
      .def_property_readonly("data_bytes", &NodeChannel::data_bytes)
      .def("data_view", [](const NodeChannel& ch) {
        return py::memoryview::from_memory(ch.data(), ch.data_bytes(), /*readonly=*/false);
      });

  register_gpu(m);
}
