// Argument checks of the private CUDA ops, in the words of the Python API (sveb_kernels/_checks.py):
// a ValueError (wrong shape, value or device) or TypeError (wrong dtype) naming the argument.
// The public functions check first; these guard direct calls of torch.ops.sveb._cuda_* so that a
// mistake there is an exception, never an out-of-bounds kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>

namespace sveb {
namespace checks {

inline bool dtype_in(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed) {
  for (at::ScalarType s : allowed) {
    if (t.scalar_type() == s) return true;
  }
  return false;
}

inline void floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(dtype_in(t, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}), name,
                   " must have dtype float16/bfloat16/float32/float64, got ", t.scalar_type());
}

inline void vector_of(const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
}

inline void same_shape(const char* name, const at::Tensor& t, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(),
                    ", got ", t.sizes());
}

inline void number_in(const char* name, double x, double low, double high, bool low_open) {
  TORCH_CHECK_VALUE(std::isfinite(x), name, " must be finite, got ", x);
  TORCH_CHECK_VALUE(low_open ? x > low : x >= low, name, " must be ", low_open ? "> " : ">= ", low, ", got ", x);
  TORCH_CHECK_VALUE(x <= high, name, " must be <= ", high, ", got ", x);
}

// Last of the checks, so that on a machine without a GPU every other check can be tested.
inline void on_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, " is the cuda backend and needs CUDA tensors; got ", name, " on ", t.device());
}

inline void on_device_of(const char* name, const at::Tensor& t, const char* first_name, const at::Tensor& first) {
  TORCH_CHECK_VALUE(t.device() == first.device(), name, " must be on ", first.device(), " like ", first_name,
                    ", got ", t.device());
}

}  // namespace checks
}  // namespace sveb
