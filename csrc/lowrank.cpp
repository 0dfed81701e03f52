// The `lowrank` op namespace and the Python module that loads it.
// Each op family declares its schemas with TORCH_LIBRARY_FRAGMENT in its own file
// (sep_conv.cpp, batched_svd.cpp, ...) next to its CPU kernels.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing lowrank_kernels._C runs the static registrations below and in the other files.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lowrank, m) {}
