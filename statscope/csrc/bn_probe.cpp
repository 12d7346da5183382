// The BatchNorm fast path on the CPU as one C call: the layer's training forward and its probe
// (statscope.probes.fastpath, statscope.probes.hooks._make_batchnorm_hook).
//
// bn_forward is the twin of fastpath._train_forward, a mirror of torch's _BatchNorm.forward that
// calls the same ATen function (torch._batch_norm_impl_index) and keeps BatchNorm's statistics;
// fastpath.native_forward_is_exact checks it against torch bit for bit once per process, as
// mirror_is_exact checks the Python one. It takes only the plain case, deciding before it does
// anything: otherwise it returns None and the Python mirror runs.
//
// After a training-mode BatchNorm's forward (statscope.probes.fastpath) the probe files the
// (C,) mean and inverse std that BatchNorm computed into the probe's block. In Python that is
// two calls and a few dozen attribute reads, a lock and two clock reads: ~1 µs in a timeit
// loop and several times that in a training step, whose kernels have just evicted the
// interpreter's state from the caches; four such probes were ~2 points of the paper's FC net's
// step at batch size 4 (docs/performance.md). Here it is one vectorcall: the same checks, and a
// memcpy of the two (C,) tensors into the block's (2, K, C) buffer (Capture's BnRows), which
// leaves BatchNorm's tensors to be freed with the step, as without the probe, and the block
// stacked already when it is handed over.
//
// Only the common case is taken here: a step being recorded, no mask, the kind of input the
// probe saw last (Capture._bn_memo), CPU statistics, the entry BatchNorm's statistics alone
// make. Anything else calls the Python probe (`fallback`), which handles every case; nothing
// is written before that decision, so the fallback starts from the state this call found.
// The recorder's lock is taken without blocking (a writer thread holding it sends this step
// to the fallback, which waits for it).

#include "kernels.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>

#include <chrono>
#include <cstring>

namespace statscope_native {
namespace {

struct Names {
  PyObject *on, *quiet, *func, *pending_end, *skip, *backward_seen, *mask, *lock, *slot,
      *dirty, *probe_seconds, *reduce_bn, *count, *memo, *rows, *kind_own, *sum_bn_mean,
      *start, *per_channel, *eps, *buffer, *present, *overflow, *acquire, *release, *invstd,
      *block_steps;
};

Names* names() {
  static Names* n = [] {
    auto* s = new Names;
    s->on = PyUnicode_InternFromString("_on");
    s->quiet = PyUnicode_InternFromString("_quiet");
    s->func = PyUnicode_InternFromString("_func");
    s->pending_end = PyUnicode_InternFromString("_pending_end");
    s->skip = PyUnicode_InternFromString("_skip");
    s->backward_seen = PyUnicode_InternFromString("_backward_seen");
    s->mask = PyUnicode_InternFromString("_mask");
    s->lock = PyUnicode_InternFromString("_lock");
    s->slot = PyUnicode_InternFromString("_slot");
    s->dirty = PyUnicode_InternFromString("_dirty");
    s->probe_seconds = PyUnicode_InternFromString("probe_seconds");
    s->reduce_bn = PyUnicode_InternFromString("reduce_bn");
    s->count = PyUnicode_InternFromString("count");
    s->memo = PyUnicode_InternFromString("_bn_memo");
    s->rows = PyUnicode_InternFromString("_rows");
    s->kind_own = PyUnicode_InternFromString("own");
    s->sum_bn_mean = PyUnicode_InternFromString("sum_bn_mean");
    s->start = PyUnicode_InternFromString("_start");
    s->per_channel = PyUnicode_InternFromString("_per_channel");
    s->eps = PyUnicode_InternFromString("eps");
    s->buffer = PyUnicode_InternFromString("buffer");
    s->present = PyUnicode_InternFromString("present");
    s->overflow = PyUnicode_InternFromString("overflow");
    s->acquire = PyUnicode_InternFromString("acquire");
    s->release = PyUnicode_InternFromString("release");
    s->invstd = PyUnicode_InternFromString("invstd");
    s->block_steps = PyUnicode_InternFromString("block_steps");
    return s;
  }();
  return n;
}

// A new reference to obj.name, or nullptr with the error cleared.
PyObject* get(PyObject* obj, PyObject* name) {
  PyObject* value = PyObject_GetAttr(obj, name);
  if (value == nullptr) PyErr_Clear();
  return value;
}

// obj.name is True (the object True itself: the recorder's flags are bools).
bool is_true(PyObject* obj, PyObject* name) {
  PyObject* value = get(obj, name);
  bool result = value == Py_True;
  Py_XDECREF(value);
  return result;
}

bool is_none(PyObject* obj, PyObject* name) {
  PyObject* value = get(obj, name);
  bool result = value == Py_None;
  Py_XDECREF(value);
  return result;
}

// obj.name as an integer; -1 when it is not one.
Py_ssize_t integer(PyObject* obj, PyObject* name) {
  PyObject* value = get(obj, name);
  if (value == nullptr || !PyLong_CheckExact(value)) {
    Py_XDECREF(value);
    return -1;
  }
  Py_ssize_t result = PyLong_AsSsize_t(value);
  Py_DECREF(value);
  if (result == -1 && PyErr_Occurred()) PyErr_Clear();
  return result;
}

// Whether the ints of a tuple (a torch.Size or a stride tuple) are `values`.
bool same_ints(PyObject* tuple, c10::IntArrayRef values) {
  if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != static_cast<Py_ssize_t>(values.size()))
    return false;
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* item = PyTuple_GET_ITEM(tuple, i);
    if (!PyLong_CheckExact(item) || PyLong_AsLongLong(item) != values[i]) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

bool same_dtype(PyObject* dtype, at::ScalarType type) {
  return THPDtype_Check(dtype) && reinterpret_cast<THPDtype*>(dtype)->scalar_type == type;
}

// The memo's key (shape, strides, dtype, device index, invstd's dtype: capture._input_key)
// matches this step's input and statistics.
bool same_key(PyObject* key, const at::Tensor& x, const at::Tensor& invstd) {
  if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 5) return false;
  PyObject* device = PyTuple_GET_ITEM(key, 3);
  return same_ints(PyTuple_GET_ITEM(key, 0), x.sizes()) &&
         same_ints(PyTuple_GET_ITEM(key, 1), x.strides()) &&
         same_dtype(PyTuple_GET_ITEM(key, 2), x.scalar_type()) && PyLong_CheckExact(device) &&
         PyLong_AsLong(device) == (x.is_cpu() ? -1 : x.get_device()) &&
         same_dtype(PyTuple_GET_ITEM(key, 4), invstd.scalar_type());
}

enum class Filed { done, fallback, error };

// BatchNorm's (C,) statistics, with their Python objects made only where needed (a list's
// entry, the fallback's arguments).
struct Stats {
  at::Tensor mean, invstd;
  PyObject* mean_obj = nullptr;  // borrowed when given, else owned once wrapped
  PyObject* invstd_obj = nullptr;
  bool owned = false;

  Stats(at::Tensor m, at::Tensor i) : mean(std::move(m)), invstd(std::move(i)), owned(true) {}
  Stats(PyObject* m, PyObject* i)
      : mean(THPVariable_Unpack(m)), invstd(THPVariable_Unpack(i)), mean_obj(m), invstd_obj(i) {}
  Stats(const Stats&) = delete;
  Stats& operator=(const Stats&) = delete;
  ~Stats() {
    if (owned) {
      Py_XDECREF(mean_obj);
      Py_XDECREF(invstd_obj);
    }
  }
  // Makes the Python objects; false with an error set if that failed.
  bool wrap() {
    if (mean_obj == nullptr) mean_obj = THPVariable_Wrap(mean);
    if (invstd_obj == nullptr) invstd_obj = THPVariable_Wrap(invstd);
    return mean_obj != nullptr && invstd_obj != nullptr;
  }
};

// The probe's work under the recorder's lock (held by the caller): Filed::fallback leaves
// everything as it found it.
Filed file(PyObject* rec, PyObject* cap, PyObject* module, PyObject* x_obj, Stats& stats) {
  const at::Tensor& mean = stats.mean;
  const at::Tensor& invstd = stats.invstd;
  Names* n = names();
  const Py_ssize_t slot = integer(rec, n->slot);
  const Py_ssize_t block_steps = integer(cap, n->block_steps);
  if (slot < 0 || slot >= block_steps) return Filed::fallback;  // the fallback dispatches
  PyObject* count = get(cap, n->count);
  if (count == nullptr || !PyList_CheckExact(count) || PyList_GET_SIZE(count) <= slot) {
    Py_XDECREF(count);
    return Filed::fallback;
  }
  PyObject* counted = PyList_GET_ITEM(count, slot);
  if (!PyLong_CheckExact(counted) || PyObject_IsTrue(counted) != 0) {
    Py_DECREF(count);  // captured already: the first forward of a step wins
    return PyLong_CheckExact(counted) ? Filed::done : Filed::fallback;
  }
  if (is_true(cap, n->reduce_bn)) {
    Py_DECREF(count);
    return Filed::fallback;
  }
  PyObject* memo = get(cap, n->memo);
  PyObject* rows = get(cap, n->rows);
  Filed result = Filed::fallback;
  const at::Tensor& x = THPVariable_Unpack(x_obj);
  const Py_ssize_t start = integer(cap, n->start);
  const Py_ssize_t per_channel = integer(cap, n->per_channel);
  if (memo != nullptr && rows != nullptr && PyTuple_Check(memo) && PyTuple_GET_SIZE(memo) == 3 &&
      PyTuple_GET_ITEM(memo, 0) == rows && same_key(PyTuple_GET_ITEM(memo, 1), x, invstd) &&
      start >= 0 && start <= slot && per_channel > 0) {
    PyObject* kind = PyTuple_GET_ITEM(memo, 2);
    const bool own = PyUnicode_Check(kind) && PyUnicode_Compare(kind, n->kind_own) == 0;
    if (own || !is_true(cap, n->sum_bn_mean)) {
      const Py_ssize_t row = slot - start;
      if (PyList_CheckExact(rows)) {
        if (row < PyList_GET_SIZE(rows)) {
          PyObject* eps = get(module, n->eps);
          PyObject* entry = eps == nullptr || !stats.wrap()
                                ? nullptr
                                : PyTuple_Pack(4, n->invstd, stats.mean_obj, stats.invstd_obj, eps);
          Py_XDECREF(eps);
          if (entry == nullptr) {
            result = Filed::error;
          } else {
            PyList_SetItem(rows, row, entry);  // steals entry
            result = Filed::done;
          }
        }
      } else {
        result = Filed::fallback;
        PyObject* buffer = get(rows, n->buffer);
        PyObject* present = get(rows, n->present);
        PyObject* overflow = get(rows, n->overflow);
        PyObject* eps = get(module, n->eps);
        PyObject* own_eps = get(rows, n->eps);
        if (buffer != nullptr && THPVariable_CheckExact(buffer) && present != nullptr &&
            PyByteArray_CheckExact(present) && row < PyByteArray_GET_SIZE(present) &&
            overflow != nullptr && PyDict_CheckExact(overflow) && PyDict_GET_SIZE(overflow) == 0 &&
            eps != nullptr && own_eps != nullptr && PyFloat_CheckExact(eps) &&
            PyFloat_CheckExact(own_eps) &&
            PyFloat_AS_DOUBLE(eps) == PyFloat_AS_DOUBLE(own_eps)) {
          const at::Tensor& buf = THPVariable_Unpack(buffer);
          const int64_t channels = mean.numel();
          if (buf.is_cpu() && buf.is_contiguous() && buf.dim() == 3 && buf.size(0) == 2 &&
              row < buf.size(1) && buf.size(2) == channels &&
              buf.scalar_type() == mean.scalar_type()) {
            const size_t bytes = static_cast<size_t>(channels) * mean.element_size();
            char* base = static_cast<char*>(buf.data_ptr());
            std::memcpy(base + row * bytes, mean.data_ptr(), bytes);
            std::memcpy(base + (buf.size(1) + row) * bytes, invstd.data_ptr(), bytes);
            PyByteArray_AS_STRING(present)[row] = 1;
            result = Filed::done;
          }
        }
        Py_XDECREF(buffer);
        Py_XDECREF(present);
        Py_XDECREF(overflow);
        Py_XDECREF(eps);
        Py_XDECREF(own_eps);
      }
      if (result == Filed::done) {
        PyObject* number = PyLong_FromSsize_t(per_channel);
        if (number == nullptr) {
          result = Filed::error;
        } else {
          PyList_SetItem(count, slot, number);  // steals number
        }
      }
    }
  }
  Py_XDECREF(memo);
  Py_XDECREF(rows);
  Py_DECREF(count);
  return result;
}

// The statistics can be copied as they are: CPU tensors of one floating dtype, contiguous,
// (C,) like the buffer's rows.
bool plain_stats(const at::Tensor& mean, const at::Tensor& invstd) {
  return mean.is_cpu() && invstd.is_cpu() && mean.dim() == 1 && invstd.dim() == 1 &&
         mean.numel() == invstd.numel() && mean.scalar_type() == invstd.scalar_type() &&
         (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble) &&
         mean.is_contiguous() && invstd.is_contiguous() && !mean.is_neg() && !mean.is_conj() &&
         !invstd.is_neg() && !invstd.is_conj();
}

// Calls the Python probe with (module, x, mean, invstd).
PyObject* call_fallback(PyObject* fallback, PyObject* module, PyObject* x_obj, Stats& stats) {
  if (!stats.wrap()) return nullptr;
  PyObject* args[4] = {module, x_obj, stats.mean_obj, stats.invstd_obj};
  return PyObject_Vectorcall(fallback, args, 4, nullptr);
}

// The probe of one training-mode forward; state is (recorder, capture, fallback, ...).
PyObject* probe(PyObject* state, PyObject* module, PyObject* x_obj, Stats& stats) {
  PyObject* rec = PyTuple_GET_ITEM(state, 0);
  PyObject* cap = PyTuple_GET_ITEM(state, 1);
  PyObject* fallback = PyTuple_GET_ITEM(state, 2);
  Names* n = names();
  if (!is_true(rec, n->on) || torch::autograd::get_current_graph_task_id() != -1 ||
      is_true(rec, n->quiet) || !is_none(rec, n->func) || is_true(rec, n->pending_end) ||
      is_true(rec, n->skip) || is_true(rec, n->backward_seen) || !is_none(rec, n->mask) ||
      !plain_stats(stats.mean, stats.invstd)) {
    return call_fallback(fallback, module, x_obj, stats);
  }
  const auto t0 = std::chrono::steady_clock::now();
  PyObject* lock = get(rec, n->lock);
  if (lock == nullptr) return call_fallback(fallback, module, x_obj, stats);
  PyObject* got = PyObject_CallMethodOneArg(lock, n->acquire, Py_False);
  if (got != Py_True) {  // held by the writer thread: the fallback waits for it
    Py_XDECREF(got);
    PyErr_Clear();
    Py_DECREF(lock);
    return call_fallback(fallback, module, x_obj, stats);
  }
  Py_DECREF(got);
  Filed filed = file(rec, cap, module, x_obj, stats);
  if (filed == Filed::done) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    PyObject* total = get(rec, n->probe_seconds);
    PyObject* sum = total != nullptr && PyFloat_CheckExact(total)
                        ? PyFloat_FromDouble(PyFloat_AS_DOUBLE(total) + seconds)
                        : nullptr;
    if (PyObject_SetAttr(rec, n->dirty, Py_True) != 0 ||
        (sum != nullptr && PyObject_SetAttr(rec, n->probe_seconds, sum) != 0)) {
      filed = Filed::error;
    }
    Py_XDECREF(total);
    Py_XDECREF(sum);
  }
  // the error of a failed filing waits while the lock is released (no call with one set)
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  if (filed == Filed::error) PyErr_Fetch(&type, &value, &traceback);
  PyObject* released = PyObject_CallMethodNoArgs(lock, n->release);
  Py_DECREF(lock);
  if (filed == Filed::error) {
    Py_XDECREF(released);
    PyErr_Restore(type, value, traceback);
    return nullptr;
  }
  if (released == nullptr) return nullptr;
  Py_DECREF(released);
  if (filed == Filed::fallback) return call_fallback(fallback, module, x_obj, stats);
  Py_RETURN_NONE;
}

// probe(module, x, mean, invstd), bound to (recorder, capture, fallback).
PyObject* bn_probe(PyObject* state, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !THPVariable_CheckExact(args[1]) || !THPVariable_CheckExact(args[2]) ||
      !THPVariable_CheckExact(args[3])) {
    return PyObject_Vectorcall(PyTuple_GET_ITEM(state, 2), args, nargs, nullptr);
  }
  Stats stats(args[2], args[3]);
  return probe(state, args[0], args[1], stats);
}

PyMethodDef bn_probe_def = {"bn_probe", reinterpret_cast<PyCFunction>(bn_probe), METH_FASTCALL,
                            "The BatchNorm fast path's probe (statscope.probes.hooks)."};

// Inputs up to this many elements keep the GIL through BatchNorm's kernel: a few microseconds,
// where handing the GIL to a waiting thread (the writer's) would stall the training thread for
// that thread's whole turn. Larger ones release it, as torch's own bindings do.
constexpr int64_t kHoldGil = 1 << 16;

// A tensor or None from a module's dict; false where it is something else (a subclass, a
// parametrization, a missing entry: the Python mirror reads those as torch does).
bool optional_tensor(PyObject* dict, const char* key, std::optional<at::Tensor>& out,
                     PyObject** object = nullptr) {
  PyObject* value = PyDict_GetItemString(dict, key);  // borrowed
  if (value == nullptr) return false;
  if (object != nullptr) *object = value;
  if (value == Py_None) {
    out = std::nullopt;
    return true;
  }
  if (!THPVariable_CheckExact(value)) return false;
  out = THPVariable_Unpack(value);
  return true;
}

// torch's _BatchNorm.forward in training mode, with BatchNorm's saved statistics: the C++ twin
// of statscope.probes.fastpath._train_forward (mirror_is_exact checks both against torch).
// Returns false, having done nothing, wherever the Python mirror must run instead: a module or
// input of another kind, a torch function mode, a check of torch's that could raise.
bool train(PyObject* module, PyObject* input_obj, PyObject* dims, at::Tensor& out,
           at::Tensor& mean, at::Tensor& invstd) {
  if (!THPVariable_CheckExact(input_obj) || at::impl::torch_function_mode_enabled()) return false;
  const at::Tensor& input = THPVariable_Unpack(input_obj);
  // the CPU only: the check against torch runs there, and no GPU checked it (CUDA inputs keep
  // the Python mirror, which the GPU tests cover)
  if (!input.is_cpu()) return false;
  const int64_t ndim = input.dim();
  bool allowed = false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(dims); ++i) {
    allowed = allowed || PyLong_AsLongLong(PyTuple_GET_ITEM(dims, i)) == ndim;
  }
  // more than one value per channel, else torch's _verify_batch_size may raise
  if (!allowed || ndim < 2 || input.numel() == input.size(1)) return false;
  PyObject* dict = PyObject_GenericGetDict(module, nullptr);
  if (dict == nullptr) {
    PyErr_Clear();
    return false;
  }
  PyObject* params = PyDict_GetItemString(dict, "_parameters");
  PyObject* buffers = PyDict_GetItemString(dict, "_buffers");
  PyObject* track_obj = PyDict_GetItemString(dict, "track_running_stats");
  PyObject* momentum_obj = PyDict_GetItemString(dict, "momentum");
  PyObject* eps_obj = PyDict_GetItemString(dict, "eps");
  std::optional<at::Tensor> weight, bias, running_mean, running_var, tracked;
  PyObject* tracked_obj = nullptr;
  bool ok = params != nullptr && buffers != nullptr && PyDict_CheckExact(params) &&
            PyDict_CheckExact(buffers) && (track_obj == Py_True || track_obj == Py_False) &&
            momentum_obj != nullptr && (momentum_obj == Py_None || PyFloat_CheckExact(momentum_obj)) &&
            eps_obj != nullptr && PyFloat_CheckExact(eps_obj) && PyFloat_AS_DOUBLE(eps_obj) > 0.0 &&
            optional_tensor(params, "weight", weight) && optional_tensor(params, "bias", bias);
  const bool track = track_obj == Py_True;
  if (ok && track) {
    ok = optional_tensor(buffers, "running_mean", running_mean) &&
         optional_tensor(buffers, "running_var", running_var) &&
         optional_tensor(buffers, "num_batches_tracked", tracked, &tracked_obj);
  }
  const double momentum = ok && momentum_obj != Py_None ? PyFloat_AS_DOUBLE(momentum_obj) : 0.0;
  const double eps = ok ? PyFloat_AS_DOUBLE(eps_obj) : 0.0;
  Py_DECREF(dict);
  if (!ok) return false;
  double factor = momentum;
  if (tracked.has_value()) {
    tracked->add_(1);
    if (momentum_obj == Py_None) {  // cumulative moving average
      factor = 1.0 / tracked->item().toDouble();
    }
  }
  const bool cudnn = at::globalContext().userEnabledCuDNN();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> result;
  if (input.numel() <= kHoldGil) {
    result = at::_batch_norm_impl_index(input, weight, bias, running_mean, running_var, true,
                                        factor, eps, cudnn);
  } else {
    pybind11::gil_scoped_release no_gil;
    result = at::_batch_norm_impl_index(input, weight, bias, running_mean, running_var, true,
                                        factor, eps, cudnn);
  }
  out = std::move(std::get<0>(result));
  mean = std::move(std::get<1>(result));
  invstd = std::move(std::get<2>(result));
  return true;
}

// forward(module, input), bound to (recorder, capture, fallback, dims): the layer's output, its
// statistics filed; None, having done nothing, where the Python fast path must run instead.
PyObject* bn_forward(PyObject* state, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) Py_RETURN_NONE;
  at::Tensor out, mean, invstd;
  if (!train(args[0], args[1], PyTuple_GET_ITEM(state, 3), out, mean, invstd)) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  PyObject* output = THPVariable_Wrap(std::move(out));
  if (output == nullptr) return nullptr;
  Stats stats(std::move(mean), std::move(invstd));
  PyObject* probed = probe(state, args[0], args[1], stats);
  if (probed == nullptr) {
    Py_DECREF(output);
    return nullptr;
  }
  Py_DECREF(probed);
  return output;
  END_HANDLE_TH_ERRORS
}

PyMethodDef bn_forward_def = {"bn_forward", reinterpret_cast<PyCFunction>(bn_forward),
                              METH_FASTCALL,
                              "The BatchNorm fast path's training forward and probe."};

}  // namespace

py::object make_bn_probe(py::object recorder, py::object capture, py::object fallback) {
  py::tuple state = py::make_tuple(recorder, capture, fallback);
  PyObject* probe = PyCFunction_NewEx(&bn_probe_def, state.ptr(), nullptr);
  if (probe == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(probe);
}

py::object make_bn_forward(py::object recorder, py::object capture, py::object fallback,
                           py::tuple dims) {
  py::tuple state = py::make_tuple(recorder, capture, fallback, dims);
  PyObject* forward = PyCFunction_NewEx(&bn_forward_def, state.ptr(), nullptr);
  if (forward == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(forward);
}

py::object batchnorm_train(py::object module, py::object input, py::tuple dims) {
  at::Tensor out, mean, invstd;
  if (!train(module.ptr(), input.ptr(), dims.ptr(), out, mean, invstd)) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return py::none();
  }
  return py::make_tuple(out, mean, invstd);
}

}  // namespace statscope_native
