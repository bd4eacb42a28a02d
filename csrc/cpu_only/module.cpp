// Module init of `sveb_kernels._C` when it is built without CUDA (no toolkit, or SVEB_SKIP_CUDA_BUILD=1):
// only the cpp backend's kernels (csrc/cpu/) are in it. With CUDA, csrc/ops.cpp has this role.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
