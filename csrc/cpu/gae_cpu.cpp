// GAE on CPU (docs/CONTRACT.md §3): the trainers' recurrence itself, one backward pass per row, in
// float64 throughout (the contract's accuracy needs a float64 delta when |values| >> |advantages|;
// float64 state costs nothing extra here). Rows are independent: at::parallel_for over blocks of
// rows, and inside a block kLanes rows advance together so that their dependency chains
// (last = delta + gamma*lam*last) overlap instead of each waiting on its own multiply-add latency.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "../arg_checks.h"
#include "cpu_ops.h"

namespace sveb {
namespace cpu {
namespace {

constexpr int64_t kLanes = 8;

void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                    double lam) {
  using namespace checks;
  gae_args(rewards, values, mask, gamma, lam);
  TORCH_CHECK_VALUE(rewards.device().is_cpu(),
                    "sveb::_cpp_gae is the cpp backend and needs CPU tensors; got rewards on ", rewards.device());
  on_device_of("values", values, "rewards", rewards);
  on_device_of("mask", mask, "rewards", rewards);
}

template <class T>
void gae_rows(const T* r, const T* v, const bool* m, int64_t row_begin, int64_t row_end, int64_t length,
              double gamma, double gamma_lam, float* adv, float* ret) {
  for (int64_t b0 = row_begin; b0 < row_end; b0 += kLanes) {
    const int64_t lanes = row_end - b0 < kLanes ? row_end - b0 : kLanes;
    double nextv[kLanes] = {}, last[kLanes] = {};
    for (int64_t t = length - 1; t >= 0; --t) {
      for (int64_t k = 0; k < lanes; ++k) {
        const int64_t at = (b0 + k) * length + t;
        const double vt = static_cast<double>(v[at]);
        const double cand = (static_cast<double>(r[at]) + gamma * nextv[k] - vt) + gamma_lam * last[k];
        // Masked positions carry both states unchanged (the loop's m*x + (1-m)*y with m in {0, 1}).
        last[k] = m[at] ? cand : last[k];
        nextv[k] = m[at] ? vt : nextv[k];
        adv[at] = static_cast<float>(last[k]);
        ret[at] = static_cast<float>(last[k] + vt);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       double gamma, double lam) {
  check_gae_args(rewards, values, mask, gamma, lam);
  const int64_t batch = rewards.size(0), length = rewards.size(1);
  const auto f32 = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({batch, length}, f32);
  at::Tensor returns = at::empty({batch, length}, f32);
  if (batch == 0 || length == 0) return {advantages, returns};

  at::ScalarType common = rewards.scalar_type();
  if (values.scalar_type() != common) {
    common = (common == at::kDouble || values.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  }
  const at::Tensor r = rewards.to(common).contiguous();
  const at::Tensor v = values.to(common).contiguous();
  const at::Tensor m = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();  // nonzero = valid
  float* adv = advantages.data_ptr<float>();
  float* ret = returns.data_ptr<float>();
  const bool* mp = m.data_ptr<bool>();
  // Whole lane blocks per item, so the split never depends on the thread count.
  const int64_t blocks = (batch + kLanes - 1) / kLanes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, common, "sveb_cpp_gae", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_for(kLanes * length), [&](int64_t begin, int64_t end) {
      gae_rows(rp, vp, mp, begin * kLanes, std::min(end * kLanes, batch), length, gamma, gamma * lam, adv, ret);
    });
  });
  return {advantages, returns};
}

}  // namespace cpu
}  // namespace sveb
