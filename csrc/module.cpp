// The Python module adafisher._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations
// of the kernels; the op schemas themselves are defined in adafisher/ops.py.
// It also exposes which variant of the CPU statistics and step leaves runs (cpu_leaves.h):
//   cpu_isa() -> "baseline" | "avx2"        the active one (the best the CPU supports at import)
//   cpu_isas() -> tuple of names             the ones this CPU and build support
//   set_cpu_isa(name) -> previous name       force one (tests and benchmarks; restore it after)
// how the kernels' at::parallel_for runs: WITH_OPENMP (built with OpenMP; without it, ATen's
// parallel_for runs inline on one thread) and parallel_threads() (threads one region runs on
// now); and register_commit_hook(...) (commit_hooks.cpp), which commits a layer's pass from a
// C++ autograd hook (called by adafisher/backends/native_statistics.py).
#include <Python.h>

#include "cpu_leaves.h"

#ifndef ADAFISHER_WITH_CUDA
#define ADAFISHER_WITH_CUDA 0
#endif

namespace adafisher {
int parallel_region_threads();                          // cpu_kernels.cpp
PyObject* register_commit_hook(PyObject*, PyObject*);  // commit_hooks.cpp
}

static PyObject* parallel_threads(PyObject*, PyObject*) {
  return PyLong_FromLong(adafisher::parallel_region_threads());
}

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(adafisher::active_cpu_isa());
}

static PyObject* cpu_isas(PyObject*, PyObject*) {
  PyObject* names = PyUnicode_FromString(adafisher::supported_cpu_isas());
  if (names == nullptr) return nullptr;
  PyObject* comma = PyUnicode_FromString(",");
  PyObject* parts = comma == nullptr ? nullptr : PyUnicode_Split(names, comma, -1);
  Py_XDECREF(comma);
  Py_DECREF(names);
  if (parts == nullptr) return nullptr;
  PyObject* tuple = PyList_AsTuple(parts);
  Py_DECREF(parts);
  return tuple;
}

static PyObject* set_cpu_isa(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s:set_cpu_isa", &name)) return nullptr;
  const char* previous = adafisher::set_cpu_isa(name);
  if (previous == nullptr) {
    PyErr_Format(PyExc_ValueError,
                 "set_cpu_isa: isa must be one of the ISAs this CPU and build support (%s), "
                 "got '%s'",
                 adafisher::supported_cpu_isas(), name);
    return nullptr;
  }
  return PyUnicode_FromString(previous);
}

static PyMethodDef adafisher_methods[] = {
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "The threads one at::parallel_for of these kernels runs on now (1 when built without "
     "OpenMP)."},
    {"register_commit_hook", adafisher::register_commit_hook, METH_VARARGS,
     "Commit a layer's pass from a C++ autograd hook (see csrc/commit_hooks.cpp)."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA of the CPU statistics leaves in use."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The ISAs this CPU and build support."},
    {"set_cpu_isa", set_cpu_isa, METH_VARARGS,
     "Use the CPU statistics leaves of ISA `name`; returns the previous one."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef adafisher_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                              adafisher_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&adafisher_module);
#ifdef _OPENMP
  constexpr int with_openmp = 1;
#else
  constexpr int with_openmp = 0;
#endif
  if (module != nullptr) PyModule_AddIntConstant(module, "WITH_CUDA", ADAFISHER_WITH_CUDA);
  if (module != nullptr) PyModule_AddIntConstant(module, "WITH_OPENMP", with_openmp);
  return module;
}
