#include "runtime/py_transport.hpp"

#include <pybind11/numpy.h>

namespace py = pybind11;

namespace piper::runtime {

PyTransport::PyTransport(py::object transport) : transport_(std::move(transport)) {
  pending_cls_ = py::module_::import("piper_comm.transport").attr("Pending");
  rank_ = transport_.attr("rank").cast<int64_t>();
  size_ = transport_.attr("size").cast<int64_t>();
  name_ = "python:" + transport_.attr("name").cast<std::string>();
}

PyTransport::~PyTransport() {
  py::gil_scoped_acquire gil;
  requests_.clear();
  pending_cls_ = py::object();
  transport_ = py::object();
}

void PyTransport::post(bool send, const void* buf, int64_t bytes, int64_t peer, int tag) {
  py::gil_scoped_acquire gil;
  // A uint8 numpy view of the caller's memory (no copy: the capsule is the owner of record;
  // the executor keeps the memory alive until the batch completed or was cancelled).
  py::array view(py::dtype("uint8"), {bytes}, {int64_t{1}}, buf, py::capsule(buf, [](void*) {}));
  requests_.push_back(transport_.attr(send ? "isend" : "irecv")(view, peer, tag));
  messages_.push_back({send, peer, bytes});
}

void PyTransport::post_send(const void* buf, int64_t bytes, int64_t peer, int tag) {
  post(true, buf, bytes, peer, tag);
}

void PyTransport::post_recv(void* buf, int64_t bytes, int64_t peer, int tag) {
  post(false, buf, bytes, peer, tag);
}

py::list PyTransport::pending_list() const {
  py::list out;
  for (size_t i = 0; i < requests_.size(); ++i)
    out.append(pending_cls_(requests_[i], messages_[i].send ? "send" : "recv", messages_[i].peer,
                            messages_[i].bytes));
  return out;
}

bool PyTransport::test_all() {
  py::gil_scoped_acquire gil;
  if (requests_.empty()) return true;
  py::list reqs;
  for (const auto& r : requests_) reqs.append(r);
  if (!transport_.attr("test_all")(reqs).cast<bool>()) return false;
  requests_.clear();
  messages_.clear();
  return true;
}

std::vector<Message> PyTransport::pending() const { return messages_; }

void PyTransport::cancel_all() {
  py::gil_scoped_acquire gil;
  if (!requests_.empty()) transport_.attr("abandon")(pending_list());
  requests_.clear();
  messages_.clear();
}

void PyTransport::progress() {
  py::gil_scoped_acquire gil;
  transport_.attr("progress")();
}

bool PyTransport::wait_all(const std::string& what, double deadline_monotonic_s,
                           double timeout_s) {
  py::gil_scoped_acquire gil;
  if (!requests_.empty()) {
    py::list todo = pending_list();
    requests_.clear();  // whatever happens, the batch is the Python transport's now
    messages_.clear();
    transport_.attr("wait_all")(todo, what, deadline_monotonic_s, timeout_s);
  }
  return true;
}

}  // namespace piper::runtime
