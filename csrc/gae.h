#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sveb {

// Implementation of the private op sveb::_cuda_gae (schema in ops.cpp, contract in docs/CONTRACT.md §3).
// Registered for CPU too, where it checks the arguments and then refuses the CPU tensors with a
// ValueError.
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam);

}  // namespace sveb
