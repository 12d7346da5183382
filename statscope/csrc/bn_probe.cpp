// The BatchNorm fast path's probe as one C call (statscope.probes.hooks, _make_batchnorm_hook).
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

#include <torch/csrc/Dtype.h>
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

// The probe's work under the recorder's lock (held by the caller): Filed::fallback leaves
// everything as it found it.
Filed file(PyObject* rec, PyObject* cap, PyObject* module, PyObject* x_obj, PyObject* mean_obj,
           PyObject* invstd_obj, const at::Tensor& mean, const at::Tensor& invstd) {
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
          PyObject* entry = eps == nullptr ? nullptr
                                           : PyTuple_Pack(4, n->invstd, mean_obj, invstd_obj, eps);
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

// probe(module, x, mean, invstd), bound to (recorder, capture, fallback).
PyObject* bn_probe(PyObject* state, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* rec = PyTuple_GET_ITEM(state, 0);
  PyObject* cap = PyTuple_GET_ITEM(state, 1);
  PyObject* fallback = PyTuple_GET_ITEM(state, 2);
  Names* n = names();
  if (nargs != 4 || !THPVariable_CheckExact(args[1]) || !THPVariable_CheckExact(args[2]) ||
      !THPVariable_CheckExact(args[3]) || !is_true(rec, n->on) ||
      torch::autograd::get_current_graph_task_id() != -1 || is_true(rec, n->quiet) ||
      !is_none(rec, n->func) || is_true(rec, n->pending_end) || is_true(rec, n->skip) ||
      is_true(rec, n->backward_seen) || !is_none(rec, n->mask)) {
    return PyObject_Vectorcall(fallback, args, nargs, nullptr);
  }
  const at::Tensor& mean = THPVariable_Unpack(args[2]);
  const at::Tensor& invstd = THPVariable_Unpack(args[3]);
  if (!plain_stats(mean, invstd)) return PyObject_Vectorcall(fallback, args, nargs, nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  PyObject* lock = get(rec, n->lock);
  if (lock == nullptr) return PyObject_Vectorcall(fallback, args, nargs, nullptr);
  PyObject* got = PyObject_CallMethodOneArg(lock, n->acquire, Py_False);
  if (got != Py_True) {  // held by the writer thread: the fallback waits for it
    Py_XDECREF(got);
    PyErr_Clear();
    Py_DECREF(lock);
    return PyObject_Vectorcall(fallback, args, nargs, nullptr);
  }
  Py_DECREF(got);
  Filed filed = file(rec, cap, args[0], args[1], args[2], args[3], mean, invstd);
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
  PyObject* released = PyObject_CallMethodNoArgs(lock, n->release);
  Py_DECREF(lock);
  if (released == nullptr) return nullptr;
  Py_DECREF(released);
  if (filed == Filed::error) return nullptr;
  if (filed == Filed::fallback) return PyObject_Vectorcall(fallback, args, nargs, nullptr);
  Py_RETURN_NONE;
}

PyMethodDef bn_probe_def = {"bn_probe", reinterpret_cast<PyCFunction>(bn_probe), METH_FASTCALL,
                            "The BatchNorm fast path's probe (statscope.probes.hooks)."};

}  // namespace

py::object make_bn_probe(py::object recorder, py::object capture, py::object fallback) {
  py::tuple state = py::make_tuple(recorder, capture, fallback);
  PyObject* probe = PyCFunction_NewEx(&bn_probe_def, state.ptr(), nullptr);
  if (probe == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(probe);
}

}  // namespace statscope_native
