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
#include "gae.h"
#include "hista.h"
#include "numca.h"

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
  // Same arguments as the public ops (minus `backend`); key_splits is a tuning/testing knob (0 = auto).
  m.def(
      "_cuda_hista_values(Tensor hidden, Tensor returns, Tensor rollout_ids, Tensor group_offsets, "
      "float temperature, str similarity, Tensor? key_mask, Tensor? key_bias, float empty_value, "
      "int key_splits=0) -> (Tensor, Tensor)");
  m.def("_cuda_gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def(
      "_cuda_numeric_spans(Tensor token_ids, Tensor table, Tensor? mask) "
      "-> (Tensor end, Tensor key, Tensor value, Tensor start)");
  m.def(
      "_cuda_numca_values(Tensor end, Tensor key, Tensor returns, Tensor group_index, Tensor mask, str match, "
      "bool leave_one_out, SymInt min_support, float empty_value) -> Tensor");
}

TORCH_LIBRARY_IMPL(sveb, CUDA, m) {
  m.impl("_cuda_hista_values", &sveb::hista_values_cuda);
  m.impl("_cuda_gae", &sveb::gae_cuda);
  m.impl("_cuda_numeric_spans", &sveb::numeric_spans_cuda);
  m.impl("_cuda_numca_values", &sveb::numca_values_cuda);
}

// Why CPU too: the same host functions check every argument and then reject CPU tensors with a
// ValueError that says the cuda backend needs CUDA tensors (instead of the dispatcher's generic
// "could not run ... with arguments from the 'CPU' backend"); it also makes the host-side checks
// testable on machines without a GPU.
TORCH_LIBRARY_IMPL(sveb, CPU, m) {
  m.impl("_cuda_hista_values", &sveb::hista_values_cuda);
  m.impl("_cuda_gae", &sveb::gae_cuda);
  m.impl("_cuda_numeric_spans", &sveb::numeric_spans_cuda);
  m.impl("_cuda_numca_values", &sveb::numca_values_cuda);
}

// A plain (pybind-free) module init: `import sveb_kernels._C` only needs to load the library so
// that the static registrations above run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
