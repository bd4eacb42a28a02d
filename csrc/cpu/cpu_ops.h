// The `cpp` backend: C++ CPU kernels, registered as the private ops `sveb::_cpp_<op>` (register.cpp)
// with the arguments of the public ops (minus `backend`), contract in docs/CONTRACT.md.
//
// Threads: every kernel splits its work with at::parallel_for over independent items (rows, groups,
// query blocks) whose results are computed by one thread each in a fixed order, so the outputs are
// bit-identical for any thread count; grain sizes keep small inputs on the calling thread, where
// waking the pool costs more than the work (and on a loaded machine waits for descheduled threads).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace sveb {
namespace cpu {

// Work (in rough element-operations) below which a parallel_for chunk is not worth another thread.
constexpr int64_t kMinWorkPerThread = 1 << 15;

// Grain for at::parallel_for over `items` of `work_per_item` each: chunks of at least kMinWorkPerThread.
inline int64_t grain_for(int64_t work_per_item) {
  if (work_per_item <= 0) work_per_item = 1;
  const int64_t grain = kMinWorkPerThread / work_per_item;
  return grain < 1 ? 1 : grain;
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       double gamma, double lam);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> numeric_spans(const at::Tensor& token_ids,
                                                                         const at::Tensor& table,
                                                                         const std::optional<at::Tensor>& mask);

at::Tensor numca_values(const at::Tensor& end, const at::Tensor& key, const at::Tensor& returns,
                        const at::Tensor& group_index, const at::Tensor& mask, const std::string& match,
                        bool leave_one_out, int64_t min_support, double empty_value);

// query_block: tokens per block (0 = automatic); key_block > 0 makes every group stream its keys in
// steps of that many (0 = only groups too large for the symmetric scheme stream): testing/tuning knobs.
std::tuple<at::Tensor, at::Tensor> hista_values(const at::Tensor& hidden, const at::Tensor& returns,
                                                const at::Tensor& rollout_ids, const at::Tensor& group_offsets,
                                                double temperature, std::string_view similarity,
                                                const std::optional<at::Tensor>& key_mask,
                                                const std::optional<at::Tensor>& key_bias, double empty_value,
                                                int64_t query_block, int64_t key_block);

}  // namespace cpu
}  // namespace sveb
