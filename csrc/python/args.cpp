#include "python/args.hpp"

#include <pybind11/numpy.h>

#ifdef PIPER_WITH_CUDA
#include "cuda/api.hpp"
#endif

namespace py = pybind11;

namespace piper::python {

namespace {

bool emulated_cuda = false;  // set_emulated_cuda

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

// A module the program imported (never imports one).
PyObject* imported(const char* name) {
  return PyDict_GetItemString(PyImport_GetModuleDict(), name);
}

// torch.cuda.current_stream(device).cuda_stream: the stream torch orders its work on.
uintptr_t torch_stream(int device) {
  static py::object current_stream;  // torch.cuda.current_stream, kept for the interpreter's life
  if (!current_stream) {
    auto cuda = py::reinterpret_borrow<py::object>(imported("torch")).attr("cuda");
    current_stream = cuda.attr("current_stream");
    current_stream.inc_ref();  // never released: no destructor runs after the interpreter
  }
  return current_stream(device).attr("cuda_stream").cast<uintptr_t>();
}

// The stream of a __cuda_array_interface__ array: CuPy's current stream for a CuPy array, else
// the interface's "stream" entry (version 3; 1 is the legacy default stream; 2, the per-thread
// default stream, is refused by the caller: kPerThreadDefaultStream), else the legacy default.
uintptr_t interface_stream(py::handle obj, const py::dict& cai) {
  if (PyObject* cupy = imported("cupy")) {
    auto ndarray = py::reinterpret_borrow<py::object>(cupy).attr("ndarray");
    if (py::isinstance(obj, ndarray))
      return py::reinterpret_borrow<py::object>(cupy)
          .attr("cuda").attr("get_current_stream")().attr("ptr").cast<uintptr_t>();
  }
  if (cai.contains("stream") && !cai["stream"].is_none()) return cai["stream"].cast<uintptr_t>();
  return 0;
}

constexpr uintptr_t kPerThreadDefaultStream = 2;  // cudaStreamPerThread

// Whether this build and process can move CUDA memory (see no_cuda_reason).
bool cuda_usable() { return no_cuda_reason() < 0; }

void set_shape(runtime::ArrayArg& out, const std::vector<int64_t>& shape, int64_t itemsize) {
  out.rows = shape[0];
  int64_t row = itemsize;
  for (size_t i = 1; i < shape.size(); ++i) row *= shape[i];
  out.row_bytes = row;
  out.trail = runtime::trailing_hash(shape.data() + 1, static_cast<int64_t>(shape.size()) - 1);
}

// An array exporting __cuda_array_interface__ (CuPy, Numba, ...): C-contiguous device memory.
int64_t parse_cuda_interface(py::handle obj, runtime::ArrayArg& out) {
  using namespace runtime;
  const py::dict cai = obj.attr("__cuda_array_interface__");
  const py::tuple dims = cai["shape"];
  std::vector<int64_t> shape(dims.size());
  for (size_t i = 0; i < shape.size(); ++i) shape[i] = dims[i].cast<int64_t>();
  if (shape.empty()) return kErrNdim;
  const py::dtype dtype(cai["typestr"].cast<std::string>());
  const int64_t itemsize = dtype.itemsize();
  if (cai.contains("strides") && !cai["strides"].is_none()) {  // None means C-contiguous
    const py::tuple strides = cai["strides"];
    int64_t expect = itemsize;
    for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i].cast<int64_t>() != expect) return kErrNonContig;
      expect *= shape[i];
    }
  }
  const py::tuple data = cai["data"];
  const auto ptr = data[0].cast<uintptr_t>();
  out.kind = 3;
  out.mem = Memory::kCuda;  // without a usable device the caller refuses it (kErrNoCuda)
  // Emulated (tests): device 0, or the interface's "piper_emulated_device" entry.
  if (emulated_cuda)
    out.device = cai.contains("piper_emulated_device") ? cai["piper_emulated_device"].cast<int>()
                                                       : 0;
#ifdef PIPER_WITH_CUDA
  if (cuda_usable() && !emulated_cuda) {
    // An empty array may have no pointer: it is taken to be on the current device.
    out.device = ptr ? cuda::pointer_device(reinterpret_cast<const void*>(ptr), nullptr)
                     : cuda::current_device(nullptr);
    if (out.device < 0) return kErrDevice;
    out.stream = interface_stream(obj, cai);
  }
#endif
  if (emulated_cuda) out.stream = interface_stream(obj, cai);  // checked alike, unused
  // another stream on each thread: Piper's worker and NCCL's threads would not order their
  // work with the caller's
  if (out.stream == kPerThreadDefaultStream) return kErrStream;
  out.data = reinterpret_cast<uint8_t*>(ptr);
  out.dtype = dtype_info(dtype).id;
  set_shape(out, shape, itemsize);
  return kErrNone;
}

}  // namespace

void set_emulated_cuda(bool on) { emulated_cuda = on; }

int64_t no_cuda_reason() {
  if (emulated_cuda) return -1;
#ifdef PIPER_WITH_CUDA
  static const int devices = cuda::device_count(nullptr);
  return devices > 0 ? -1 : 1;
#else
  return 0;
#endif
}

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
    const bool cpu = obj.attr("is_cpu").cast<bool>();
    if (!cpu && !obj.attr("is_cuda").cast<bool>()) return kErrDevice;
    if (!cpu) {  // without a usable device the caller refuses it (kErrNoCuda)
      out.mem = Memory::kCuda;
      if (cuda_usable()) {
        out.device = obj.attr("get_device")().cast<int>();
        out.stream = torch_stream(out.device);
      }
    }
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
  if (py::hasattr(obj, "__cuda_array_interface__")) return parse_cuda_interface(obj, out);
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
