// The `cpp` backend: C++ CPU kernels, registered as the private ops `sveb::_cpp_<op>` (register.cpp)
// with the arguments of the public ops (minus `backend`), contract in docs/CONTRACT.md.
//
// Threads: every kernel splits its work with at::parallel_for over independent items (rows, groups,
// query blocks) whose results are computed by one thread each in a fixed order, so the outputs are
// bit-identical for any thread count; grain sizes keep small inputs on the calling thread, where
// waking the pool costs more than the work (and on a loaded machine waits for descheduled threads).
// The split never changes a result, only who computes it.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace sveb {
namespace cpu {

// Work (in rough element-operations, ~1 ns each) below which a parallel_for chunk is not worth
// another thread: a few milliseconds. Why that much: on a loaded machine a parallel region waits for
// its slowest thread, and a woken or preempted thread waits a scheduler slice (milliseconds) for a
// core; below this, a second thread makes the call slower there, not faster (measured: GAE at
// 64x4096 took 40 ms on 2 threads against 0.8 ms on one, with other processes busy).
// `sveb::_cpp_set_min_work_per_thread` changes it (tests use small values to exercise the split).
constexpr int64_t kDefaultMinWorkPerThread = int64_t{1} << 22;

inline std::atomic<int64_t>& min_work_per_thread() {
  static std::atomic<int64_t> value{kDefaultMinWorkPerThread};
  return value;
}

// Grain for at::parallel_for over items of `work_per_item` each: chunks of at least min_work_per_thread().
inline int64_t grain_for(int64_t work_per_item) {
  if (work_per_item <= 0) work_per_item = 1;
  const int64_t grain = min_work_per_thread().load(std::memory_order_relaxed) / work_per_item;
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
