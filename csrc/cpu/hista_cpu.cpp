// Hista on CPU (docs/CONTRACT.md §1): per group, blocks of queries against all the group's keys,
// the raw products <h_i, h_j> from the BLAS GEMM (at::mm_out into a bounded per-thread buffer), and
// a fused epilogue per query row: scale (cosine norms, 1/temperature), key bias and masks, then an
// online softmax across key blocks with `returns` as the value column. Memory: the fp32 copy of
// `hidden` when it is not fp32 already, plus one [query block, key block] buffer per thread: O(N*D).
//
// Why not the reference's tiles: it spends its time outside the GEMM (a dozen elementwise passes
// over every score block, and query tiles that span groups compute products that are then masked);
// here only the group's own products are computed and every score is touched twice, by
// vectorizable loops. Work items (group, query block) go to at::parallel_for; each is computed by
// one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../arg_checks.h"
#include "cpu_ops.h"

namespace sveb {
namespace cpu {
namespace {

constexpr float kEps = 1e-6f;
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 2048;
constexpr int kAcc = 16;  // partial sums per reduction: a fixed order, and room for the compiler's SIMD

// exp(x) for x <= 0 (and NaN), within ~2 ulp: Cody-Waite reduction and the Cephes polynomial, written
// with no library call or branch so that the loop around it vectorizes. Below -87.3 it returns 0.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;  // NaN stays NaN
  const float shifter = 12582912.0f;                // 1.5 * 2^23: adding it rounds to an integer
  const float t = clamped * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t bits = (tb - 0x4B400000 + 127) << 23;  // 2^n, n = round(x / ln 2) in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = y * scale;
  return x < -87.0f ? 0.0f : e;
}

struct Inputs {
  const float* hidden;  // [N, D] fp32 contiguous
  const float* returns;
  const int64_t* rollout;
  const float* query_scale;  // 1/temperature, times 1/|h_i| for cosine
  const float* key_scale;    // 1/|h_j| for cosine, else 1
  const float* key_add;      // key_bias, -inf for masked keys
  int64_t dim;
};

struct RowState {
  float max = -INFINITY, denom = 0.0f, numer = 0.0f;
  bool any = false;  // some usable key seen
};

// Scores of query i against keys [k0, k1) (raw products in `row`, overwritten with the weights),
// folded into the row's online softmax.
void epilogue_row(const Inputs& in, int64_t i, int64_t k0, int64_t k1, float* row, RowState& st) {
  const int64_t count = k1 - k0;
  const float qs = in.query_scale[i];
  const int64_t rid = in.rollout[i];
  const float* ks = in.key_scale + k0;
  const float* add = in.key_add + k0;
  const int64_t* rids = in.rollout + k0;
  float block_max = -INFINITY;
  bool any = false, nan = false;
  for (int64_t j = 0; j < count; ++j) {
    const bool usable = rids[j] != rid && add[j] != -INFINITY;
    const float s = usable ? row[j] * qs * ks[j] + add[j] : -INFINITY;
    row[j] = s;
    block_max = s > block_max ? s : block_max;
    any |= usable;
    nan |= s != s;
  }
  if (!any) return;
  const float new_max = nan ? NAN : (block_max > st.max ? block_max : st.max);
  for (int64_t j = 0; j < count; ++j) row[j] = exp_nonpositive(row[j] - new_max);
  float dsum[kAcc] = {}, nsum[kAcc] = {};
  const float* r = in.returns + k0;
  int64_t j = 0;
  for (; j + kAcc <= count; j += kAcc) {
    for (int k = 0; k < kAcc; ++k) {
      dsum[k] += row[j + k];
      nsum[k] += row[j + k] * r[j + k];
    }
  }
  for (int k = 0; j < count; ++j, ++k) {
    dsum[k] += row[j];
    nsum[k] += row[j] * r[j];
  }
  float d = 0.0f, nu = 0.0f;
  for (int k = 0; k < kAcc; ++k) {
    d += dsum[k];
    nu += nsum[k];
  }
  const float rescale = st.any ? exp_nonpositive(st.max - new_max) : 0.0f;
  st.denom = st.denom * rescale + d;
  st.numer = st.numer * rescale + nu;
  st.max = new_max;
  st.any = true;
}

void check_hista_args(const at::Tensor& hidden, const at::Tensor& returns, const at::Tensor& rollout_ids,
                      const at::Tensor& group_offsets, double temperature, std::string_view similarity,
                      const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& key_bias,
                      int64_t query_block, int64_t key_block) {
  using namespace checks;
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
  TORCH_CHECK_VALUE(query_block >= 0 && key_block >= 0, "query_block and key_block must be >= 0 (0 = automatic), got ",
                    query_block, " and ", key_block);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(),
                    "sveb::_cpp_hista_values is the cpp backend and needs CPU tensors; got hidden on ", hidden.device());
  on_device_of("returns", returns, "hidden", hidden);
  on_device_of("rollout_ids", rollout_ids, "hidden", hidden);
  on_device_of("group_offsets", group_offsets, "hidden", hidden);
  if (key_mask) on_device_of("key_mask", *key_mask, "hidden", hidden);
  if (key_bias) on_device_of("key_bias", *key_bias, "hidden", hidden);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hista_values(const at::Tensor& hidden, const at::Tensor& returns,
                                                const at::Tensor& rollout_ids, const at::Tensor& group_offsets,
                                                double temperature, std::string_view similarity,
                                                const std::optional<at::Tensor>& key_mask,
                                                const std::optional<at::Tensor>& key_bias, double empty_value,
                                                int64_t query_block, int64_t key_block) {
  check_hista_args(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias,
                   query_block, key_block);
  const int64_t n = hidden.size(0), dim = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor values = at::empty({n}, f32);
  at::Tensor lse = at::empty({n}, f32);

  // The offsets are read here, on the host: a malformed one must be an error, never a wild read.
  const at::Tensor offsets_t = group_offsets.to(at::kLong).contiguous();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int64_t groups = offsets_t.size(0) - 1;
  TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[groups] == n, "group_offsets must start at 0 and end at N = ", n,
                    ", got ", offsets[0], " and ", offsets[groups]);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK_VALUE(offsets[g] <= offsets[g + 1], "group_offsets must be non-decreasing, got ", offsets[g],
                      " then ", offsets[g + 1], " at index ", g);
  }
  if (n == 0) return {values, lse};

  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  const at::Tensor ret = returns.to(at::kFloat).contiguous();
  const at::Tensor rid = rollout_ids.to(at::kLong).contiguous();
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  at::Tensor query_scale, key_scale;
  if (similarity == "cosine") {
    const at::Tensor inv_norm = at::linalg_vector_norm(h, 2, {1}, false, at::kFloat).clamp_min(kEps).reciprocal();
    query_scale = (inv_norm * inv_temperature).contiguous();
    key_scale = inv_norm.contiguous();
  } else {
    query_scale = at::full({n}, inv_temperature, f32);
    key_scale = at::ones({n}, f32);
  }
  at::Tensor key_add = key_bias ? key_bias->to(at::kFloat).contiguous().clone() : at::zeros({n}, f32);
  if (key_mask) key_add.masked_fill_(key_mask->logical_not(), -INFINITY);

  const Inputs in{h.data_ptr<float>(), ret.data_ptr<float>(), rid.data_ptr<int64_t>(), query_scale.data_ptr<float>(),
                  key_scale.data_ptr<float>(), key_add.data_ptr<float>(), dim};
  const int64_t bq = query_block > 0 ? query_block : kQueryBlock;
  const int64_t bk = key_block > 0 ? key_block : kKeyBlock;

  // Work items: (group, query block).
  std::vector<int64_t> item_group, item_start;
  int64_t total_work = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = offsets[g + 1] - offsets[g];
    for (int64_t q0 = offsets[g]; q0 < offsets[g + 1]; q0 += bq) {
      item_group.push_back(g);
      item_start.push_back(q0);
      total_work += std::min(bq, offsets[g + 1] - q0) * size * dim;
    }
  }
  const int64_t items = static_cast<int64_t>(item_group.size());
  float* out_values = values.data_ptr<float>();
  float* out_lse = lse.data_ptr<float>();
  const float empty = static_cast<float>(empty_value);
  at::parallel_for(0, items, grain_for(total_work / std::max<int64_t>(items, 1)), [&](int64_t begin, int64_t end) {
    at::Tensor buffer;
    std::vector<RowState> states;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item_group[item];
      const int64_t q0 = item_start[item], q1 = std::min(q0 + bq, offsets[g + 1]);
      const int64_t lo = offsets[g], hi = offsets[g + 1];
      states.assign(static_cast<size_t>(q1 - q0), RowState{});
      const at::Tensor queries = h.narrow(0, q0, q1 - q0);
      for (int64_t k0 = lo; k0 < hi; k0 += bk) {
        const int64_t k1 = std::min(k0 + bk, hi);
        if (!buffer.defined() || buffer.numel() < (q1 - q0) * (k1 - k0)) buffer = at::empty({bq * std::min(bk, hi - lo)}, f32);
        at::Tensor products = buffer.narrow(0, 0, (q1 - q0) * (k1 - k0)).view({q1 - q0, k1 - k0});
        at::mm_out(products, queries, h.narrow(0, k0, k1 - k0).t());
        float* p = products.data_ptr<float>();
        for (int64_t i = q0; i < q1; ++i) epilogue_row(in, i, k0, k1, p + (i - q0) * (k1 - k0), states[i - q0]);
      }
      for (int64_t i = q0; i < q1; ++i) {
        const RowState& st = states[i - q0];
        out_values[i] = st.any ? st.numer / st.denom : empty;
        out_lse[i] = st.any ? st.max + std::log(st.denom) : -INFINITY;
      }
    }
  });
  return {values, lse};
}

}  // namespace cpu
}  // namespace sveb
