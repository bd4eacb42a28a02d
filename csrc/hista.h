#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace sveb {

// Implementation of the private op sveb::_cuda_hista_values (schema in ops.cpp, contract in docs/CONTRACT.md §1).
// key_splits: how many CTAs share one query tile's keys (0 = pick from the shape; tests force it).
// Registered for CPU too, where it checks the arguments and then refuses the CPU tensors with a
// ValueError, so that mistakes get a clear message rather than the dispatcher's "no kernel" error.
std::tuple<at::Tensor, at::Tensor> hista_values_cuda(const at::Tensor& hidden, const at::Tensor& returns,
                                                     const at::Tensor& rollout_ids, const at::Tensor& group_offsets,
                                                     double temperature, std::string_view similarity,
                                                     const std::optional<at::Tensor>& key_mask,
                                                     const std::optional<at::Tensor>& key_bias, double empty_value,
                                                     int64_t key_splits);

}  // namespace sveb
