// Registers the cpp backend's kernels as private ops `sveb::_cpp_<op>` (CPU only), with the
// arguments of the public ops (minus `backend`); the Python `cpp` backend (sveb_kernels/*/cpp.py)
// calls them. Compiled into `sveb_kernels._C` both with the CUDA kernels and without them.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu_ops.h"

namespace sveb {
namespace cpu {

// Why: lets `sveb-kernels info` and the tests confirm that the library loaded is the one built here.
std::string extension_info() {
  return "torch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH) + ", cpp kernels";
}

// Sets the work a thread must get before at::parallel_for splits (cpu_ops.h); returns the old value.
int64_t set_min_work_per_thread(int64_t work) {
  TORCH_CHECK_VALUE(work >= 1, "work must be >= 1, got ", work);
  return min_work_per_thread().exchange(work);
}

}  // namespace cpu
}  // namespace sveb

TORCH_LIBRARY_FRAGMENT(sveb, m) {
  m.def("_cpp_extension_info() -> str", &sveb::cpu::extension_info);
  m.def("_cpp_set_min_work_per_thread(int work) -> int", &sveb::cpu::set_min_work_per_thread);
  // query_block (tokens a block) and key_block (> 0: every group streams, that many keys a step) are
  // tuning/testing knobs (0 = automatic).
  m.def(
      "_cpp_hista_values(Tensor hidden, Tensor returns, Tensor rollout_ids, Tensor group_offsets, "
      "float temperature, str similarity, Tensor? key_mask, Tensor? key_bias, float empty_value, "
      "int query_block=0, int key_block=0) -> (Tensor, Tensor)");
  m.def("_cpp_gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def(
      "_cpp_numeric_spans(Tensor token_ids, Tensor table, Tensor? mask) "
      "-> (Tensor end, Tensor key, Tensor value, Tensor start)");
  m.def(
      "_cpp_numca_values(Tensor end, Tensor key, Tensor returns, Tensor group_index, Tensor mask, str match, "
      "bool leave_one_out, SymInt min_support, float empty_value) -> Tensor");
}

// Why CompositeExplicitAutograd rather than CPU: tensors of any other device then reach the kernels'
// own checks, which say that the cpp backend needs CPU tensors, instead of the dispatcher's "could
// not run ... with arguments from the 'CUDA' backend". Meta tensors never get here: the public ops
// have fake implementations and the private ones are only called eagerly.
TORCH_LIBRARY_IMPL(sveb, CompositeExplicitAutograd, m) {
  m.impl("_cpp_hista_values", &sveb::cpu::hista_values);
  m.impl("_cpp_gae", &sveb::cpu::gae);
  m.impl("_cpp_numeric_spans", &sveb::cpu::numeric_spans);
  m.impl("_cpp_numca_values", &sveb::cpu::numca_values);
}
