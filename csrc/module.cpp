// The compiled library is imported as the Python module rglcd_fast._C only so that loading it runs
// the TORCH_LIBRARY_IMPL registrations of csrc/cpu (and csrc/cuda); the op schemas are declared in
// Python (rglcd_fast/ops), so the pure-PyTorch fallback and the kernels share one definition.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
