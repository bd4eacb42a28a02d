// Host side of the Numca numeric_spans CUDA backend: argument checks, output defaults, launch.
// The kernel and its design notes are in numca_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "arg_checks.h"
#include "numca.h"
#include "numca_kernel.cuh"

namespace sveb {
namespace {

using namespace numca_kernels;

void check_spans_args(const at::Tensor& token_ids, const at::Tensor& table, const std::optional<at::Tensor>& mask) {
  using namespace checks;
  TORCH_CHECK_VALUE(token_ids.dim() == 2, "token_ids must have shape [B, T], got ", token_ids.sizes());
  TORCH_CHECK_TYPE(dtype_in(token_ids, {at::kInt, at::kLong}), "token_ids must have dtype int32/int64, got ",
                   token_ids.scalar_type());
  TORCH_CHECK_VALUE(token_ids.size(1) <= INT_MAX, "token_ids has T = ", token_ids.size(1),
                    " tokens a row, more than 2^31 - 1 (start is int32)");
  TORCH_CHECK_VALUE(token_ids.size(0) <= INT_MAX, "token_ids has B = ", token_ids.size(0),
                    " rows, more than 2^31 - 1 (one CTA a row)");
  TORCH_CHECK_TYPE(table.scalar_type() == at::kLong, "vocab table must have dtype int64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) > kColClasses,
                    "vocab table must have shape [V, >2] as NumericVocab builds it, got ", table.sizes());
  if (mask.has_value()) {
    const at::ScalarType s = mask->scalar_type();
    TORCH_CHECK_TYPE(s == at::kBool || at::isIntegralType(s, /*includeBool=*/false) || at::isFloatingType(s),
                     "mask must have dtype bool, an integer or a float dtype, got ", s);
    same_shape("mask", *mask, token_ids, "token_ids");
  }
  on_cuda("sveb::_cuda_numeric_spans", "token_ids", token_ids);
  on_device_of("vocab table", table, "token_ids", token_ids);
  if (mask.has_value()) on_device_of("mask", *mask, "token_ids", token_ids);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> numeric_spans_cuda(const at::Tensor& token_ids,
                                                                              const at::Tensor& table,
                                                                              const std::optional<at::Tensor>& mask) {
  check_spans_args(token_ids, table, mask);
  const c10::cuda::CUDAGuard guard(token_ids.device());
  const int64_t batch = token_ids.size(0), length = token_ids.size(1);
  const auto options = token_ids.options();
  // The kernel writes every element (end = false, key = 0, value = NaN, start = -1 where no number ends).
  at::Tensor end = at::empty({batch, length}, options.dtype(at::kBool));
  at::Tensor key = at::empty({batch, length}, options.dtype(at::kLong));
  at::Tensor value = at::empty({batch, length}, options.dtype(at::kDouble));
  at::Tensor start = at::empty({batch, length}, options.dtype(at::kInt));
  if (batch == 0 || length == 0) return {end, key, value, start};

  const at::Tensor ids = token_ids.contiguous();
  const at::Tensor tab = table.contiguous();
  at::Tensor m;  // nonzero means valid, as in the reference
  if (mask.has_value()) m = (mask->scalar_type() == at::kBool ? *mask : mask->ne(0)).contiguous();

  SpansParams p{};
  p.ids = ids.data_ptr();
  p.mask = m.defined() ? m.data_ptr<bool>() : nullptr;
  p.table = tab.data_ptr<int64_t>();
  p.batch = batch;
  p.length = length;
  p.vocab = tab.size(0);
  p.cols = tab.size(1);
  p.end = end.data_ptr<bool>();
  p.key = key.data_ptr<int64_t>();
  p.value = value.data_ptr<double>();
  p.start = start.data_ptr<int32_t>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(batch);  // one CTA per row (an empty vocab table is never read)
  if (ids.scalar_type() == at::kInt) {
    numeric_spans_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    numeric_spans_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {end, key, value, start};
}

}  // namespace sveb
