// Argument checks of the private CUDA and cpp ops, in the words of the Python API (sveb_kernels/_checks.py):
// a ValueError (wrong shape, value or device) or TypeError (wrong dtype) naming the argument.
// The public functions check first; these guard direct calls of torch.ops.sveb._cuda_* so that a
// mistake there is an exception, never an out-of-bounds kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

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

// The checks an op's CUDA and cpp host code share (one home, as the Python ops' checks live in their
// package's __init__): what is specific to a backend (its size limits, tuning knobs, the device) is
// checked by that backend after these.
inline void hista_args(const at::Tensor& hidden, const at::Tensor& returns, const at::Tensor& rollout_ids,
                       const at::Tensor& group_offsets, double temperature, std::string_view similarity,
                       const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& key_bias) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must have shape [N, D], got ", hidden.sizes());
  floating("hidden", hidden);
  const int64_t n = hidden.size(0);
  TORCH_CHECK_VALUE(hidden.size(1) >= 1, "hidden must have D >= 1 columns, got shape ", hidden.sizes());
  floating("returns", returns);
  vector_of("returns", returns, n);
  TORCH_CHECK_TYPE(dtype_in(rollout_ids, {at::kInt, at::kLong}), "rollout_ids must have dtype int32/int64, got ",
                   rollout_ids.scalar_type());
  vector_of("rollout_ids", rollout_ids, n);
  TORCH_CHECK_TYPE(dtype_in(group_offsets, {at::kInt, at::kLong}), "group_offsets must have dtype int32/int64, got ",
                   group_offsets.scalar_type());
  TORCH_CHECK_VALUE(group_offsets.dim() == 1 && group_offsets.size(0) >= (n > 0 ? 2 : 1),
                    "group_offsets must have shape [G+1] with G >= 1 groups when N > 0, got ", group_offsets.sizes());
  if (key_mask) {
    TORCH_CHECK_TYPE(key_mask->scalar_type() == at::kBool, "key_mask must have dtype bool, got ",
                     key_mask->scalar_type());
    vector_of("key_mask", *key_mask, n);
  }
  if (key_bias) {
    floating("key_bias", *key_bias);
    vector_of("key_bias", *key_bias, n);
  }
  number_in("temperature", temperature, 0.0, INFINITY, /*low_open=*/true);
  TORCH_CHECK_VALUE(similarity == "cosine" || similarity == "dot", "similarity must be one of ('cosine', 'dot'), got '",
                    std::string(similarity), "'");
}

inline void gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                     double lam) {
  TORCH_CHECK_VALUE(rewards.dim() == 2, "rewards must have shape [B, T], got ", rewards.sizes());
  floating("rewards", rewards);
  floating("values", values);
  same_shape("values", values, rewards, "rewards");
  const at::ScalarType s = mask.scalar_type();
  TORCH_CHECK_TYPE(s == at::kBool || at::isIntegralType(s, /*includeBool=*/false) || at::isFloatingType(s),
                   "mask must have dtype bool, an integer or a float dtype, got ", s);
  same_shape("mask", mask, rewards, "rewards");
  number_in("gamma", gamma, 0.0, 1.0, /*low_open=*/false);
  number_in("lam", lam, 0.0, 1.0, /*low_open=*/false);
}

}  // namespace checks
}  // namespace sveb
