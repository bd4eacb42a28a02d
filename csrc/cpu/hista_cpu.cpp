// Hista on CPU (docs/CONTRACT.md §1): per group, the raw products <h_i, h_j> of blocks of tokens
// from the BLAS GEMM (at::mm_out into a bounded per-thread buffer), and a fused epilogue per query
// row: scale (cosine norms, 1/temperature), key bias and masks, exp, and the softmax statistics with
// `returns` as the value column, merged across key blocks as in an online softmax. The similarity
// matrix is symmetric, so one GEMM serves a pair of blocks both ways (see Item below). Memory: the fp32
// copy of `hidden` when it is not fp32 already, O(N) statistics, and two block-sized buffers per
// thread: O(N*D).
//
// Why not the reference's tiles: it spends its time outside the GEMM (a dozen elementwise passes
// over every score block, and query tiles that span groups compute products that are then masked);
// here only the group's own products are computed, half of them once for both triangles, and every
// score is touched by two vectorizable loops. Work items go to at::parallel_for; each is computed by
// one thread, and the statistics are merged in a fixed order, so results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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
constexpr int64_t kQueryBlock = 128;      // tokens a block (symmetric pairs) or a query block (streaming)
constexpr int64_t kKeyBlock = 2048;       // keys a step when streaming
constexpr int64_t kMaxBlocks = 64;        // blocks a group at most in the symmetric scheme
constexpr int64_t kMaxSymmetricBlock = 512;  // beyond 64 * 512 tokens a group streams
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

// Softmax statistics of one query row over some keys: max score, sum of exp(s - max), and of that
// times returns. `any`: some usable key among them.
struct Stats {
  float max = -INFINITY, denom = 0.0f, numer = 0.0f;
  bool any = false;
};

// Statistics of query i over keys [k0, k0 + count), from the raw products <h_i, h_j> in `row`
// (overwritten).
Stats row_block(const Inputs& in, int64_t i, int64_t k0, int64_t count, float* row) {
  const float qs = in.query_scale[i];
  const int64_t rid = in.rollout[i];
  const float* ks = in.key_scale + k0;
  const float* add = in.key_add + k0;
  const int64_t* rids = in.rollout + k0;
  float block_max = -INFINITY;
  bool any = false, nan = false;
  // Returns of the keys in K(i), 0 elsewhere: a non-key's weight is 0, and 0 * a NaN return (the
  // query's own rollout, a masked key) must not poison the row (the fuzzer found it: tests/test_fuzz.py).
  thread_local std::vector<float> key_returns;
  if (static_cast<int64_t>(key_returns.size()) < count) key_returns.resize(static_cast<size_t>(count));
  float* kr = key_returns.data();
  for (int64_t j = 0; j < count; ++j) {
    const bool usable = rids[j] != rid && add[j] != -INFINITY;
    // Key scale first: |<h_i,h_j>| / |h_j| stays near |h_i|, so the product with 1/temperature cannot
    // overflow for a cosine logit. A -inf before the key term can only come from a non-finite hidden
    // state (cosine logits are bounded, dot logits overflow to +inf): NaN, never a silent zero weight
    // (docs/DESIGN.md "NaN and inf"; the fuzzer found it: dot, D=1, one +inf hidden state).
    float raw = row[j] * ks[j] * qs;
    if (raw == -INFINITY) raw = NAN;
    const float s = usable ? raw + add[j] : -INFINITY;
    row[j] = s;
    kr[j] = usable ? in.returns[k0 + j] : 0.0f;
    block_max = s > block_max ? s : block_max;
    any |= usable;
    nan |= s != s;
  }
  Stats out;
  if (!any) return out;
  out.any = true;
  out.max = nan ? NAN : block_max;
  for (int64_t j = 0; j < count; ++j) row[j] = exp_nonpositive(row[j] - out.max);
  float dsum[kAcc] = {}, nsum[kAcc] = {};
  const float* r = kr;
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
  for (int k = 0; k < kAcc; ++k) {
    out.denom += dsum[k];
    out.numer += nsum[k];
  }
  return out;
}

// The online softmax's step: `st` becomes the statistics over its keys and b's.
void merge(Stats& st, const Stats& b) {
  if (!b.any) return;
  if (!st.any) {
    st = b;
    return;
  }
  const bool nan = st.max != st.max || b.max != b.max;
  const float m = nan ? NAN : (st.max > b.max ? st.max : b.max);
  const float sa = exp_nonpositive(st.max - m), sb = exp_nonpositive(b.max - m);
  st.denom = st.denom * sa + b.denom * sb;
  st.numer = st.numer * sa + b.numer * sb;
  st.max = m;
}

// Work items. A group of up to kMaxBlocks blocks of `block` tokens is done as the pairs of blocks
// (I <= J) of its symmetric product matrix: one GEMM serves the queries of I against the keys of J
// and, transposed, those of J against I, so about half the products of a full matrix are computed.
// The per-(row, key block) statistics go to a buffer of n_g * blocks entries (O(N): blocks is bounded)
// and are merged in key-block order afterwards, so the result does not depend on which thread did
// which pair. Larger groups stream: a query block against the group's keys, key block by key block.
struct Item {
  int64_t group;
  int64_t a0, a1;  // pair: rows of block I; stream: the query block
  int64_t b0, b1;  // pair: rows of block J (== I on the diagonal); stream: unused
  int64_t block_i, block_j;
  bool stream;
};

struct GroupPlan {
  int64_t block = 0, blocks = 0;  // blocks == 0: the group streams
  int64_t stats_base = 0;         // first entry of its rows' statistics
};

void check_hista_args(const at::Tensor& hidden, const at::Tensor& returns, const at::Tensor& rollout_ids,
                      const at::Tensor& group_offsets, double temperature, std::string_view similarity,
                      const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& key_bias,
                      int64_t query_block, int64_t key_block) {
  using namespace checks;
  hista_args(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias);
  TORCH_CHECK_VALUE(query_block >= 0 && key_block >= 0, "query_block and key_block must be >= 0 (0 = automatic), got ",
                    query_block, " and ", key_block);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(),
                    "sveb::_cpp_hista_values is the cpp backend and needs CPU tensors; got hidden on ",
                    hidden.device());
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

  std::vector<GroupPlan> plans(static_cast<size_t>(groups));
  std::vector<Item> items;
  int64_t stats_entries = 0, total_work = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lo = offsets[g], hi = offsets[g + 1], size = hi - lo;
    if (size == 0) continue;
    total_work += size * size * dim;
    // Blocks of at least bq tokens, at most kMaxBlocks of them (rounded to 64 tokens when grown).
    int64_t block = bq;
    if ((size + block - 1) / block > kMaxBlocks) block = ((size + kMaxBlocks - 1) / kMaxBlocks + 63) / 64 * 64;
    // Too large a buffer: stream instead. key_block > 0 (tests, tuning) makes every group stream.
    if (key_block > 0 || block > kMaxSymmetricBlock) block = 0;
    if (block > 0) {
      GroupPlan& plan = plans[g];
      plan.block = block;
      plan.blocks = (size + block - 1) / block;
      plan.stats_base = stats_entries;
      stats_entries += size * plan.blocks;
      for (int64_t bi = 0; bi < plan.blocks; ++bi) {
        for (int64_t bj = bi; bj < plan.blocks; ++bj) {
          items.push_back({g, lo + bi * block, std::min(lo + (bi + 1) * block, hi), lo + bj * block,
                           std::min(lo + (bj + 1) * block, hi), bi, bj, false});
        }
      }
    } else {
      for (int64_t q0 = lo; q0 < hi; q0 += bq) {
        items.push_back({g, q0, std::min(q0 + bq, hi), 0, 0, 0, 0, true});
      }
    }
  }
  // Working memory comes from torch's allocator, so that its profiler (and the bench's peak) sees it.
  const at::Tensor stats_storage = at::empty({stats_entries * static_cast<int64_t>(sizeof(Stats))},
                                             hidden.options().dtype(at::kByte));
  Stats* stats = reinterpret_cast<Stats*>(stats_storage.data_ptr());
  int64_t buffer_elements = 0;
  for (const Item& it : items) {
    const int64_t rows = it.a1 - it.a0;
    const int64_t cols = it.stream ? std::min(bk, offsets[it.group + 1] - offsets[it.group]) : it.b1 - it.b0;
    buffer_elements = std::max(buffer_elements, rows * cols);
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  float* out_values = values.data_ptr<float>();
  float* out_lse = lse.data_ptr<float>();
  const float empty = static_cast<float>(empty_value);
  auto finish = [&](int64_t i, const Stats& st) {
    out_values[i] = st.any ? st.numer / st.denom : empty;
    out_lse[i] = st.any ? st.max + std::log(st.denom) : -INFINITY;
  };
  // Items are handed out one at a time from a shared counter rather than in fixed chunks: on a
  // loaded machine a preempted thread then delays the call by one item, not by its whole share (the
  // others take the rest). Who computes an item never changes its result.
  const int64_t item_grain = grain_for(total_work / std::max<int64_t>(num_items, 1));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (num_items + item_grain - 1) / item_grain);
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    // Per thread: the products of one GEMM, and their transpose.
    const at::Tensor scratch = at::empty({2 * buffer_elements}, f32);
    float* buffer = scratch.data_ptr<float>();
    float* transposed = buffer + buffer_elements;
    for (int64_t index = next_item++; index < num_items; index = next_item++) {
      const Item& it = items[index];
      const int64_t lo = offsets[it.group], hi = offsets[it.group + 1];
      if (it.stream) {
        std::vector<Stats> row_stats(static_cast<size_t>(it.a1 - it.a0));
        const at::Tensor queries = h.narrow(0, it.a0, it.a1 - it.a0);
        for (int64_t k0 = lo; k0 < hi; k0 += bk) {
          const int64_t k1 = std::min(k0 + bk, hi), rows = it.a1 - it.a0, cols = k1 - k0;
          at::Tensor products = at::from_blob(buffer, {rows, cols}, f32);
          at::mm_out(products, queries, h.narrow(0, k0, cols).t());
          for (int64_t i = it.a0; i < it.a1; ++i) {
            merge(row_stats[i - it.a0], row_block(in, i, k0, cols, buffer + (i - it.a0) * cols));
          }
        }
        for (int64_t i = it.a0; i < it.a1; ++i) finish(i, row_stats[i - it.a0]);
        continue;
      }
      const GroupPlan& plan = plans[it.group];
      const int64_t rows = it.a1 - it.a0, cols = it.b1 - it.b0;
      at::Tensor products = at::from_blob(buffer, {rows, cols}, f32);
      at::mm_out(products, h.narrow(0, it.a0, rows), h.narrow(0, it.b0, cols).t());
      if (it.block_i != it.block_j) {  // the transpose serves block J's queries against block I's keys
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) transposed[c * rows + r] = buffer[r * cols + c];
        }
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = it.b0 + c;
          stats[plan.stats_base + (i - lo) * plan.blocks + it.block_i] =
              row_block(in, i, it.a0, rows, transposed + c * rows);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = it.a0 + r;
        stats[plan.stats_base + (i - lo) * plan.blocks + it.block_j] = row_block(in, i, it.b0, cols,
                                                                                 buffer + r * cols);
      }
    }
  });
  // Merge each row's per-key-block statistics in key-block order.
  at::parallel_for(0, groups, grain_for(n / std::max<int64_t>(groups, 1) * 8), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const GroupPlan& plan = plans[g];
      if (plan.blocks == 0) continue;
      for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) {
        const Stats* row = stats + plan.stats_base + (i - offsets[g]) * plan.blocks;
        Stats st;
        for (int64_t b = 0; b < plan.blocks; ++b) merge(st, row[b]);
        finish(i, st);
      }
    }
  });
  return {values, lse};
}

}  // namespace cpu
}  // namespace sveb
