#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace sveb {

// Implementation of the private op sveb::_cuda_numeric_spans (schema in ops.cpp, contract in docs/CONTRACT.md §2b):
// (end, key, value, start) per token. Registered for CPU too, where it checks the arguments and then
// refuses the CPU tensors with a ValueError.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> numeric_spans_cuda(const at::Tensor& token_ids,
                                                                              const at::Tensor& table,
                                                                              const std::optional<at::Tensor>& mask);

// Implementation of the private op sveb::_cuda_numca_values (docs/CONTRACT.md §2c; host code numca_values.cu):
// values [B, T] float32. Registered for CPU too, like numeric_spans_cuda.
at::Tensor numca_values_cuda(const at::Tensor& end, const at::Tensor& key, const at::Tensor& returns,
                             const at::Tensor& group_index, const at::Tensor& mask, const std::string& match,
                             bool leave_one_out, int64_t min_support, double empty_value);

}  // namespace sveb
