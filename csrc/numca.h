#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace sveb {

// Implementation of the private op sveb::_cuda_numeric_spans (schema in ops.cpp, contract in SPEC 2b):
// (end, key, value, start) per token. Registered for CPU too, where it checks the arguments and then
// refuses the CPU tensors with a ValueError.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> numeric_spans_cuda(const at::Tensor& token_ids,
                                                                              const at::Tensor& table,
                                                                              const std::optional<at::Tensor>& mask);

}  // namespace sveb
