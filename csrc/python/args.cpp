#include "python/args.hpp"

#include <pybind11/numpy.h>

namespace py = pybind11;

namespace piper::python {

namespace {

// dtype object (numpy's or torch's) -> (DTYPE_NAMES id, itemsize), filled on first sight by
// piper_comm.arrays.dtype_info; a dict lookup afterwards.
struct DtypeInfo {
  int64_t id, itemsize;
};

DtypeInfo dtype_info(py::handle dtype) {
  static PyObject* cache = PyDict_New();  // lives as long as the interpreter (never freed)
  PyObject* hit = PyDict_GetItem(cache, dtype.ptr());
  if (hit == nullptr) {
    py::object info = py::module_::import("piper_comm.arrays").attr("dtype_info")(dtype);
    PyDict_SetItem(cache, dtype.ptr(), info.ptr());
    hit = info.ptr();  // the cache holds a reference now
  }
  auto t = py::reinterpret_borrow<py::tuple>(hit);
  return {t[0].cast<int64_t>(), t[1].cast<int64_t>()};
}

// torch.Tensor once the program imported torch (a tensor argument implies it did); never
// imports torch itself, which costs seconds.
PyObject* torch_tensor_type() {
  static PyObject* type = nullptr;
  if (type == nullptr) {
    PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");
    if (torch == nullptr) return nullptr;
    type = PyObject_GetAttrString(torch, "Tensor");  // kept for the interpreter's life
    if (type == nullptr) PyErr_Clear();
  }
  return type;
}

void set_shape(runtime::ArrayArg& out, const std::vector<int64_t>& shape, int64_t itemsize) {
  out.rows = shape[0];
  int64_t row = itemsize;
  for (size_t i = 1; i < shape.size(); ++i) row *= shape[i];
  out.row_bytes = row;
  out.trail = runtime::trailing_hash(shape.data() + 1, static_cast<int64_t>(shape.size()) - 1);
}

}  // namespace

int64_t parse_array(py::handle obj, runtime::ArrayArg& out) {
  using namespace runtime;
  if (py::isinstance<py::array>(obj)) {
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (a.ndim() == 0) return kErrNdim;
    if (!(a.flags() & py::array::c_style)) return kErrNonContig;
    const DtypeInfo d = dtype_info(a.dtype());
    std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
    out.kind = 1;
    out.data = static_cast<uint8_t*>(const_cast<void*>(a.data()));
    out.dtype = d.id;
    set_shape(out, shape, a.itemsize());
    return kErrNone;
  }
  PyObject* tensor = torch_tensor_type();
  if (tensor != nullptr && PyObject_IsInstance(obj.ptr(), tensor) == 1) {
    if (!obj.attr("is_cpu").cast<bool>()) return kErrDevice;
    const py::tuple dims = obj.attr("shape");  // torch.Size, a tuple
    std::vector<int64_t> shape(dims.size());
    for (size_t i = 0; i < shape.size(); ++i) shape[i] = dims[i].cast<int64_t>();
    if (shape.empty()) return kErrNdim;
    if (!obj.attr("is_contiguous")().cast<bool>()) return kErrNonContig;
    const DtypeInfo d = dtype_info(obj.attr("dtype"));
    out.kind = 2;
    out.data = reinterpret_cast<uint8_t*>(obj.attr("data_ptr")().cast<uintptr_t>());
    out.dtype = d.id;
    set_shape(out, shape, d.itemsize);
    return kErrNone;
  }
  if (py::hasattr(obj, "__cuda_array_interface__")) return kErrDevice;
  return kErrType;
}

void parse_counts(py::handle obj, int64_t P, int which, std::vector<int64_t>& out,
                  runtime::Call& call) {
  using namespace runtime;
  out.clear();
  py::object seq = py::reinterpret_borrow<py::object>(obj);
  if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr()) && py::hasattr(obj, "tolist"))
    seq = obj.attr("tolist")();  // numpy arrays, torch tensors: Python ints
  PyObject* fast = PySequence_Fast(seq.ptr(), "counts");
  if (fast == nullptr) {
    PyErr_Clear();
    return call.fail(kErrCountsType, which);
  }
  py::object hold = py::reinterpret_steal<py::object>(fast);
  const int64_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (PyBool_Check(item)) return call.fail(kErrCountsType, which);
    PyObject* index = PyNumber_Index(item);  // ints and numpy integers; not floats
    if (index == nullptr) {
      PyErr_Clear();
      return call.fail(kErrCountsType, which);
    }
    int overflow = 0;
    v[i] = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (overflow) return call.fail(kErrCountsType, which);
  }
  if (n != P) return call.fail(which ? kErrRecvCountsLen : kErrCountsLen, n);
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0) return call.fail(which ? kErrRecvCountsNeg : kErrCountsNeg, i, v[i]);
  out = std::move(v);
}

}  // namespace piper::python
