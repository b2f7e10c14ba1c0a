// The Python module adafisher._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations
// of the kernels; the op schemas themselves are defined in adafisher/ops.py.
#include <Python.h>

#ifndef ADAFISHER_WITH_CUDA
#define ADAFISHER_WITH_CUDA 0
#endif

static struct PyModuleDef adafisher_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&adafisher_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "WITH_CUDA", ADAFISHER_WITH_CUDA);
  return module;
}
