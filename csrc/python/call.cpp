#include "python/call.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "common/error.hpp"
#include "python/args.hpp"
#include "runtime/header.hpp"

namespace py = pybind11;

namespace piper::python {

namespace {

// Raises the error validate.verdict words for the gathered headers (never returns).
[[noreturn]] void raise_mismatch(const std::vector<int64_t>& table, int64_t P,
                                 const std::string& what) {
  const int64_t W = static_cast<int64_t>(table.size()) / P;
  py::array_t<int64_t> t({P, W});
  std::copy(table.begin(), table.end(), t.mutable_data());
  py::module_::import("piper_comm.validate").attr("verdict")(t, what);
  throw Error(ErrorCode::kInternal,
              fmt("piper internal error: ", what, ": the ranks found a mismatch, but the "
                  "gathered headers agree (does PIPER_CHECK differ between ranks?)"));
}

}  // namespace

std::shared_ptr<CallState> prepare(runtime::Executor& ex, int op, py::handle send,
                                   py::handle send_counts, py::handle recv,
                                   py::handle recv_counts, const CallOptions& opt,
                                   py::handle new_rows) {
  using namespace runtime;
  auto st = std::make_shared<CallState>();
  const int64_t P = ex.topology().size();
  st->opt = opt;
  st->rank = ex.transport().rank();
  st->size = P;
  st->send = py::reinterpret_borrow<py::object>(send);
  st->out = py::reinterpret_borrow<py::object>(recv);
  st->new_rows = py::reinterpret_borrow<py::object>(new_rows);
  Call& c = st->call;
  c.op = static_cast<Op>(op);
  c.seq = opt.seq;
  c.what = opt.what;
  c.exact_recv = opt.exact_recv;
  c.request = static_cast<Request>(opt.request);
  if (const int64_t e = parse_array(send, c.send); e != kErrNone) {
    c.send = ArrayArg{};
    c.fail(e, 0);
  }
  if (!recv.is_none()) {
    if (const int64_t e = parse_array(recv, c.recv); e != kErrNone) {
      c.recv = ArrayArg{};
      c.fail(e == kErrNonContig ? kErrRecvNonContig : e, 1);
    }
  }
  // One device per rank: the first CUDA call issued fixes it (the executor's device plane).
  if (c.send.mem == Memory::kCuda && c.send.device >= 0)
    if (const int fixed = ex.claim_device(c.send.device); fixed != c.send.device)
      c.fail(kErrOtherDevice, c.send.device, fixed);
  if (opt.request < 0) c.fail(kErrAlgorithm);
  if (c.op == Op::kV) {
    parse_counts(send_counts, P, 0, c.send_counts, c);
    if (!recv_counts.is_none()) parse_counts(recv_counts, P, 1, c.recv_counts, c);
  }
  c.check_local(P);
  if (c.send.mem == Memory::kCuda || c.recv.mem == Memory::kCuda)
    if (const int64_t why = no_cuda_reason(); why >= 0) c.fail(kErrNoCuda, why);
  return st;
}

void execute(runtime::Executor& ex, CallState& st) {
  using namespace runtime;
  try {
    const Deadline deadline = Deadline::in(st.opt.timeout_s, st.opt.timeout_s);
    Call& c = st.call;
    st.agreement = ex.agree(c, static_cast<CheckMode>(st.opt.check), deadline);
    if (st.agreement.verdict != Verdict::kOk) return;
    if (!c.recv.kind && c.err == kErrNone) {
      py::gil_scoped_acquire gil;
      try {
        st.out = st.new_rows(st.send, st.agreement.recv_rows());
        if (python::parse_array(st.out, c.recv) != kErrNone)
          throw Error(ErrorCode::kInternal, "piper internal error: new_rows made an unusable "
                                            "array");
      } catch (py::error_already_set& e) {
        st.py_error = std::make_unique<py::error_already_set>(std::move(e));
        return;
      }
    }
    st.mismatch = ex.exchange(c, st.agreement, deadline);
  } catch (...) {
    st.error = std::current_exception();
  }
}

py::tuple finish(CallState& st) {
  using namespace runtime;
  if (st.error) std::rethrow_exception(st.error);
  if (st.py_error) {
    st.py_error->restore();
    st.py_error.reset();
    throw py::error_already_set();
  }
  const Call& c = st.call;
  const Agreement& ag = st.agreement;
  switch (ag.verdict) {
    case Verdict::kOk: break;
    case Verdict::kMismatch: raise_mismatch(ag.table, st.size, c.what);
    case Verdict::kLocalError:
      py::module_::import("piper_comm.validate").attr("raise_local")(c.what, st.rank, c.err,
                                                                     c.err_a, c.err_b);
      throw Error(ErrorCode::kInternal, "piper internal error: raise_local returned");
    case Verdict::kRecvTooSmall:
      throw Error(ErrorCode::kUsage, fmt("piper: ", c.what, ": rank ", st.rank, ": recv has ",
                                         c.recv.rows, " rows but ", ag.recv_rows(),
                                         " rows arrive"));
  }
  if (!st.mismatch.empty()) raise_mismatch(st.mismatch, st.size, c.what);
  py::object out = st.out;
  const int64_t rows = ag.recv_rows();
  // recv longer than what arrived: its first rows, or recv itself for an array that cannot be
  // sliced (a bare __cuda_array_interface__ exporter); the rows after them are untouched.
  if (rows != c.recv.rows && py::hasattr(out, "__getitem__")) out = out[py::slice(0, rows, 1)];
  py::object counts = py::none();
  if (!st.opt.recv_only) counts = py::cast(ag.recv_counts);
  return py::make_tuple(out, counts, algorithm_name(ag.algo));
}

}  // namespace piper::python
