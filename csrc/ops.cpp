// Entry point of the optional CUDA extension `sveb_kernels._C`.
//
// The public ops (`sveb::hista_values`, ...) are defined once, in Python (sveb_kernels/_ops.py),
// because the extension is optional and the reference backend must work without it. Compiled
// kernels register here as private ops `sveb::_cuda_<op>` with a CUDA implementation; the Python
// `cuda` backend calls them. Loading this module is what performs the registrations below.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "device_info.h"

namespace sveb {

// Why: lets `sveb-kernels info` and the tests confirm that the library loaded is the one built
// here, and what it was compiled for, without needing a GPU.
std::string cuda_extension_info() {
  return "torch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH) + ", cudart " + std::to_string(compiled_cudart_version());
}

}  // namespace sveb

TORCH_LIBRARY_FRAGMENT(sveb, m) {
  m.def("_cuda_extension_info() -> str", &sveb::cuda_extension_info);
}

// A plain (pybind-free) module init: `import sveb_kernels._C` only needs to load the library so
// that the static registrations above run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
