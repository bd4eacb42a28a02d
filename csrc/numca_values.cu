// Host side of the Numca numca_values CUDA backend: argument checks, the per-row preprocessing with
// ATen ops (the same as the Triton wrapper in sveb_kernels/numca/triton.py), launch.
// The kernel and its design notes are in numca_values_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>
#include <limits>
#include <string>

#include "arg_checks.h"
#include "numca.h"
#include "numca_values_kernel.cuh"

namespace sveb {
namespace {

using namespace numca_values_kernels;

// Odd multipliers of the two polynomial prefix hashes; any pair works (hashes are only compared
// with each other), these are the reference's (PREFIX_MULTIPLIERS in numca/reference.py).
constexpr uint64_t kPrefixMultiplier1 = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kPrefixMultiplier2 = 0xC2B2AE3D27D4EB4Full;

bool mask_dtype(at::ScalarType s) {
  return s == at::kBool || at::isIntegralType(s, /*includeBool=*/false) || at::isFloatingType(s);
}

at::Tensor as_bool(const at::Tensor& t) { return t.scalar_type() == at::kBool ? t : t.ne(0); }

void check_values_args(const at::Tensor& end, const at::Tensor& key, const at::Tensor& returns,
                       const at::Tensor& group_index, const at::Tensor& mask, const std::string& match,
                       int64_t min_support) {
  using namespace checks;
  TORCH_CHECK_VALUE(end.dim() == 2, "spans.end must have shape [B, T], got ", end.sizes());
  TORCH_CHECK_TYPE(end.scalar_type() == at::kBool, "spans.end must have dtype bool, got ", end.scalar_type());
  TORCH_CHECK_TYPE(key.scalar_type() == at::kLong, "spans.key must have dtype int64, got ", key.scalar_type());
  same_shape("spans.key", key, end, "spans.end");
  TORCH_CHECK_VALUE(end.size(0) <= INT_MAX && end.size(1) <= INT_MAX, "spans.end has shape ", end.sizes(),
                    ", more than 2^31 - 1 rows or tokens a row");
  floating("returns", returns);
  vector_of("returns", returns, end.size(0));
  TORCH_CHECK_TYPE(dtype_in(group_index, {at::kChar, at::kShort, at::kInt, at::kLong, at::kByte}),
                   "group_index must have dtype int8/int16/int32/int64/uint8, got ", group_index.scalar_type());
  vector_of("group_index", group_index, end.size(0));
  TORCH_CHECK_TYPE(mask_dtype(mask.scalar_type()), "mask must have dtype bool, an integer or a float dtype, got ",
                   mask.scalar_type());
  same_shape("mask", mask, end, "spans.end");
  TORCH_CHECK_VALUE(match == "last" || match == "prefix", "match must be one of 'last', 'prefix', got '", match,
                    "'");
  TORCH_CHECK_VALUE(min_support >= 1, "min_support must be >= 1, got ", min_support);
  on_cuda("sveb::_cuda_numca_values", "spans.end", end);
  on_device_of("spans.key", key, "spans.end", end);
  on_device_of("returns", returns, "spans.end", end);
  on_device_of("group_index", group_index, "spans.end", end);
  on_device_of("mask", mask, "spans.end", end);
}

// Polynomial hash of every prefix of each row's keys: h[b, m] = sum_{i <= m} key_i * multiplier^(i+1),
// wrapping mod 2^64 (the keys are compacted to the front of the row first).
at::Tensor prefix_hashes(const at::Tensor& compact_keys, uint64_t multiplier) {
  const int64_t length = compact_keys.size(1);
  const at::Tensor powers =
      at::full({length}, static_cast<int64_t>(multiplier), compact_keys.options()).cumprod(0);
  return at::cumsum(compact_keys * powers, 1).contiguous();
}

}  // namespace

at::Tensor numca_values_cuda(const at::Tensor& end, const at::Tensor& key, const at::Tensor& returns,
                             const at::Tensor& group_index, const at::Tensor& mask, const std::string& match,
                             bool leave_one_out, int64_t min_support, double empty_value) {
  check_values_args(end, key, returns, group_index, mask, match, min_support);
  const c10::cuda::CUDAGuard guard(end.device());
  const int64_t batch = end.size(0), length = end.size(1);
  at::Tensor out = at::empty({batch, length}, end.options().dtype(at::kFloat));
  if (batch == 0 || length == 0) return out;

  const at::Tensor keep = as_bool(mask).contiguous();
  const at::Tensor valid = (end & keep).contiguous();  // numbers at masked tokens do not count
  const at::Tensor keys = key.contiguous();
  const at::Tensor ret = returns.to(at::kDouble).contiguous();
  // Rows sorted by group (no host sync): a row's peers are the range [lo, hi) of that order.
  const at::Tensor groups = group_index.to(at::kLong).contiguous();
  const auto sorted = at::sort(groups, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_group = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor lo = at::searchsorted(sorted_group, groups, /*out_int32=*/false, /*right=*/false).contiguous();
  const at::Tensor hi = at::searchsorted(sorted_group, groups, /*out_int32=*/false, /*right=*/true).contiguous();
  const at::Tensor count = at::sum(valid, at::IntArrayRef{1}, /*keepdim=*/false, at::kInt).contiguous();

  const bool prefix = match == "prefix";
  at::Tensor sorted_keys = keys, hash1 = keys, hash2 = keys;
  if (prefix) {
    const at::Tensor ordinal = at::cumsum(valid, 1, at::kLong) - 1;
    const at::Tensor slot = at::where(valid, ordinal, at::full_like(ordinal, length));
    const at::Tensor compact = at::zeros({batch, length + 1}, keys.options())
                                   .scatter_(1, slot, at::where(valid, keys, at::zeros_like(keys)))
                                   .narrow(1, 0, length);
    hash1 = prefix_hashes(compact, kPrefixMultiplier1);
    hash2 = prefix_hashes(compact, kPrefixMultiplier2);
  } else {
    const at::Tensor padded = at::where(valid, keys, at::full_like(keys, std::numeric_limits<int64_t>::max()));
    sorted_keys = std::get<0>(at::sort(padded, /*dim=*/1)).contiguous();
  }

  ValuesParams p{};
  p.valid = valid.data_ptr<bool>();
  p.mask = keep.data_ptr<bool>();
  p.key = keys.data_ptr<int64_t>();
  p.sorted_keys = sorted_keys.data_ptr<int64_t>();
  p.hash1 = hash1.data_ptr<int64_t>();
  p.hash2 = hash2.data_ptr<int64_t>();
  p.count = count.data_ptr<int32_t>();
  p.returns = ret.data_ptr<double>();
  p.order = order.data_ptr<int64_t>();
  p.lo = lo.data_ptr<int64_t>();
  p.hi = hi.data_ptr<int64_t>();
  p.length = length;
  p.prefix = prefix;
  p.leave_one_out = leave_one_out;
  p.min_support = min_support < batch + 1 ? min_support : batch + 1;  // support <= batch: the same test
  p.empty_value = empty_value;
  p.out = out.data_ptr<float>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  numca_values_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sveb
