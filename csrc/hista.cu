// Host side of the Hista CUDA backend: argument checks, operand preparation, launches.
// The kernels and their design notes are in hista_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "arg_checks.h"
#include "hista.h"
#include "hista_kernel.cuh"

namespace sveb {
namespace {

using namespace hista_kernels;

constexpr int kMaxKeySplits = 64;
constexpr int kAutoMaxKeySplits = 16;
constexpr float kNormEps = 1e-6f;  // docs/CONTRACT.md §1: norms clamped to at least eps

template <class Tiles>
void launch_hista(const HistaParams& p, int64_t blocks, cudaStream_t stream) {
  auto kernel = hista_kernel<Tiles>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tiles::kSmemBytes));
  kernel<<<static_cast<unsigned>(blocks), Tiles::kThreads, Tiles::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// hidden as the main loops read it, in 16-byte vectors: row-major, rows 16-byte aligned and a whole
// number of vectors long. Already true for LLM hidden states (D a multiple of 64); otherwise one
// zero-padded copy (zero columns change neither dot products nor norms).
at::Tensor rows_for_vector_loads(const at::Tensor& h) {
  const int64_t align = 16 / h.element_size();
  const int64_t d = h.size(1), padded = ceil_div(d, align) * align;
  if (padded == d && h.is_contiguous() && reinterpret_cast<uintptr_t>(h.data_ptr()) % 16 == 0) return h;
  at::Tensor out = at::zeros({h.size(0), padded}, h.options());
  out.narrow(1, 0, d).copy_(h);
  return out;
}

// Key splits when the caller leaves it to us (0): enough to fill the GPU with CTAs, and about one
// split per 4 key tiles of an average group, so that the CTAs running at once share query panels in
// L2 (see the file comment); the per-split partials cost 12 bytes per token each.
int auto_key_splits(int64_t n, int64_t num_groups, int64_t q_tiles) {
  const int64_t tiles_per_group = ceil_div(ceil_div(n, std::max<int64_t>(num_groups, 1)), kTileN);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = ceil_div(tiles_per_group, 4);
  splits = std::max(splits, std::min(tiles_per_group, ceil_div(2 * sms, q_tiles)));
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kAutoMaxKeySplits));
}

void check_hista_args(const at::Tensor& hidden, const at::Tensor& returns, const at::Tensor& rollout_ids,
                      const at::Tensor& group_offsets, double temperature, std::string_view similarity,
                      const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& key_bias,
                      int64_t key_splits) {
  using namespace checks;
  hista_args(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias);
  const int64_t n = hidden.size(0);
  TORCH_CHECK_VALUE(n <= INT_MAX - 2 * kTileM, "hidden has N = ", n, " rows; the cuda backend takes N < 2^31 - 256");
  TORCH_CHECK_VALUE(hidden.size(1) <= INT_MAX - 64, "hidden has D = ", hidden.size(1), " columns, too many");
  TORCH_CHECK_VALUE(group_offsets.size(0) <= INT_MAX, "group_offsets has too many entries");
  TORCH_CHECK_VALUE(key_splits >= 0 && key_splits <= kMaxKeySplits, "key_splits must be in [0, ", kMaxKeySplits,
                    "] (0 = automatic), got ", key_splits);
  checks::on_cuda("sveb::_cuda_hista_values", "hidden", hidden);
  on_device_of("returns", returns, "hidden", hidden);
  on_device_of("rollout_ids", rollout_ids, "hidden", hidden);
  on_device_of("group_offsets", group_offsets, "hidden", hidden);
  if (key_mask) on_device_of("key_mask", *key_mask, "hidden", hidden);
  if (key_bias) on_device_of("key_bias", *key_bias, "hidden", hidden);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hista_values_cuda(const at::Tensor& hidden, const at::Tensor& returns,
                                                     const at::Tensor& rollout_ids, const at::Tensor& group_offsets,
                                                     double temperature, std::string_view similarity,
                                                     const std::optional<at::Tensor>& key_mask,
                                                     const std::optional<at::Tensor>& key_bias, double empty_value,
                                                     int64_t key_splits) {
  check_hista_args(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias,
                   key_splits);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor values = at::full({n}, empty_value, f32);
  at::Tensor lse = at::full({n}, -INFINITY, f32);
  if (n == 0) return {values, lse};

  const bool tensor_cores = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  if (tensor_cores) {
    TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
                "the cuda backend's Hista kernel for bf16/fp16 needs compute capability 8.0 or newer; use "
                "backend='triton' or 'reference' on this GPU");
  }
  // fp64 is computed in fp32 (docs/CONTRACT.md §1), like the other backends.
  const at::Tensor h = rows_for_vector_loads(tensor_cores ? hidden : hidden.to(at::kFloat));
  const at::Tensor ret = returns.to(at::kFloat).contiguous();
  const at::Tensor ids = rollout_ids.to(at::kLong).contiguous();
  const at::Tensor offsets = group_offsets.to(at::kLong).contiguous();
  at::Tensor inv_norm, mask, bias;
  const at::Tensor norms = at::linalg_vector_norm(h, 2, at::IntArrayRef{1}, false, at::kFloat);
  if (similarity == "cosine") {
    // Norms in fp32 from the stored values, as in the reference.
    inv_norm = norms.clamp_min(kNormEps).reciprocal();
  } else {
    // dot: scale 1, NaN for a row holding a NaN/inf (its norm is not finite), so that a -inf logit
    // from it is NaN, never a silent zero weight (docs/DESIGN.md, "GPU readiness"). One read of
    // hidden on the device; no host synchronisation.
    inv_norm = norms.mul(0).add(1);
  }
  if (key_mask) mask = key_mask->contiguous();
  if (key_bias) bias = key_bias->to(at::kFloat).contiguous();

  const int64_t q_tiles = ceil_div(n, kTileM);
  const int64_t num_groups = group_offsets.size(0) - 1;
  const int splits = key_splits > 0 ? static_cast<int>(key_splits) : auto_key_splits(n, num_groups, q_tiles);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({3, splits, n}, f32);

  HistaParams p{};
  p.hidden = h.data_ptr();
  p.n = static_cast<int>(n);
  p.dim = static_cast<int>(h.size(1));
  p.returns = ret.data_ptr<float>();
  p.rollout_ids = ids.data_ptr<int64_t>();
  p.group_offsets = offsets.data_ptr<int64_t>();
  p.num_groups = static_cast<int>(num_groups);
  p.inv_norm = inv_norm.defined() ? inv_norm.data_ptr<float>() : nullptr;
  p.key_mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.key_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.logit_scale = static_cast<float>(static_cast<double>(kLog2e) / temperature);
  p.empty_value = static_cast<float>(empty_value);
  p.key_splits = splits;
  p.values = values.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  if (splits > 1) {
    p.part_m = partial[0].data_ptr<float>();
    p.part_l = partial[1].data_ptr<float>();
    p.part_a = partial[2].data_ptr<float>();
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = q_tiles * splits;
  switch (h.scalar_type()) {
    case at::kBFloat16:
      launch_hista<TensorCoreTiles<__nv_bfloat16>>(p, blocks, stream);
      break;
    case at::kHalf:
      launch_hista<TensorCoreTiles<__half>>(p, blocks, stream);
      break;
    default:
      launch_hista<SimtTiles>(p, blocks, stream);
      break;
  }
  if (splits > 1) {
    constexpr int kThreads = 256;
    hista_merge_splits_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {values, lse};
}

}  // namespace sveb
