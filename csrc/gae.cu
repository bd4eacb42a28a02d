// Host side of the GAE CUDA backend: argument checks, dtype handling, launch.
// The kernel and its design notes are in gae_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>

#include "arg_checks.h"
#include "gae.h"
#include "gae_kernel.cuh"

namespace sveb {
namespace {

using namespace gae_kernels;

void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                    double lam) {
  using namespace checks;
  gae_args(rewards, values, mask, gamma, lam);
  TORCH_CHECK_VALUE(rewards.size(0) <= INT_MAX, "rewards has B = ", rewards.size(0), " rows, more than 2^31 - 1");
  on_cuda("sveb::_cuda_gae", "rewards", rewards);
  on_device_of("values", values, "rewards", rewards);
  on_device_of("mask", mask, "rewards", rewards);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_gae_args(rewards, values, mask, gamma, lam);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t batch = rewards.size(0), length = rewards.size(1);
  const auto f32 = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({batch, length}, f32);
  at::Tensor returns = at::empty({batch, length}, f32);
  if (batch == 0 || length == 0) return {advantages, returns};

  // One dtype for both float inputs (the kernel reads them natively when they agree, the usual case).
  at::ScalarType common = rewards.scalar_type();
  if (values.scalar_type() != common) {
    common = (common == at::kDouble || values.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  }
  const at::Tensor r = rewards.to(common).contiguous();
  const at::Tensor v = values.to(common).contiguous();
  // Nonzero means valid, as in the reference (mask.to(bool)).
  const at::Tensor m = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, common, "sveb_cuda_gae", [&] {
    gae_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<bool>(), length, gamma, gamma * lam,
        advantages.data_ptr<float>(), returns.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {advantages, returns};
}

}  // namespace sveb
