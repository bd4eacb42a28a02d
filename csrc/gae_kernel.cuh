// GAE (docs/CONTRACT.md §3) as one kernel: one CTA per row, the row walked from its end in segments of
// kThreads * kItems positions, each segment solved with two CTA-wide reverse scans.
//
// The trainer loop carries two states backwards in time. With m = mask[t]:
//   nextv_t = m ? v_t : nextv_{t+1}                 the value at the next valid position
//   adv_t   = m ? g*l*adv_{t+1} + b_t : adv_{t+1}   with b_t = r_t + g*nextv_{t+1} - v_t
// so per segment: (1) a reverse scan of "the value at the first valid position of a span" gives
// every thread the nextv entering its chunk, which fixes its b_t; (2) a reverse scan of the affine
// maps x -> A*x + B of the chunks gives every thread the advantage entering its chunk; a final
// sweep of its chunk writes the advantages. Across segments two scalars carry (the advantage and
// the next valid value at the segment start), so rows of any length run in O(kSegment) shared memory.
//
// Arithmetic is in fp64: the scan reassociates sums, and with gamma*lam = 1 a row telescopes over
// up to 32k+ terms; fp64 keeps the error at the final rounding to fp32 (docs/CONTRACT.md §3 allows
// 1e-5 * (1 + max|adv|) * log2(T+1)). The kernel is bound by memory traffic, not by fp64 rate.
//
// Device code only (host code: gae.cu); builds with a host compiler under SVEB_CPU_EMULATION
// for the CPU tests in tests/cuda_emulation/.
#pragma once

#include <cmath>
#include <cstdint>

namespace sveb {
namespace gae_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;  // consecutive positions per thread
constexpr int kSegment = kThreads * kItems;
// Shared-memory slot of segment position idx: one pad double per chunk, so that the 32 lanes
// walking their chunks (stride kItems doubles) hit distinct banks (two wavefronts, the minimum
// for 8-byte words) instead of a 16-way conflict.
constexpr int kPaddedSegment = kSegment + kSegment / kItems;
__device__ __forceinline__ int slot(int idx) { return idx + idx / kItems; }

constexpr unsigned kFullWarp = 0xffffffffu;

// The value at the first valid position of a span, if it has one.
struct FirstValue {
  bool found;
  double value;
  __device__ static FirstValue identity() { return {false, 0.0}; }
  // `nearer` is the earlier span (scans run from the end of the row to its start).
  __device__ static FirstValue combine(const FirstValue& nearer, const FirstValue& farther) {
    return nearer.found ? nearer : farther;
  }
  __device__ FirstValue shfl_down(int delta) const {
    const int found_below = __shfl_down_sync(kFullWarp, static_cast<int>(found), delta);
    return {found_below != 0, __shfl_down_sync(kFullWarp, value, delta)};
  }
};

// A span's map from the advantage after it to the advantage at its start: x -> scale * x + shift.
struct AffineMap {
  double scale;
  double shift;
  __device__ static AffineMap identity() { return {1.0, 0.0}; }
  __device__ static AffineMap combine(const AffineMap& nearer, const AffineMap& farther) {
    return {nearer.scale * farther.scale, fma(nearer.scale, farther.shift, nearer.shift)};
  }
  __device__ AffineMap shfl_down(int delta) const {
    return {__shfl_down_sync(kFullWarp, scale, delta), __shfl_down_sync(kFullWarp, shift, delta)};
  }
};

// Reverse exclusive scan over the CTA's threads: thread k gets combine(x_{k+1}, ..., x_last), the
// identity for the last thread; `total` gets combine(x_0, ..., x_last). Every thread must call it.
template <class S>
__device__ S reverse_exclusive_scan(const S& x, S* warp_totals, S& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  S inclusive = x;  // after step d: lanes lane .. lane + 2d - 1 of this warp
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const S other = inclusive.shfl_down(d);
    if (lane + d < 32) inclusive = S::combine(inclusive, other);
  }
  S exclusive = inclusive.shfl_down(1);
  if (lane == 31) exclusive = S::identity();
  if (lane == 0) warp_totals[warp] = inclusive;
  __syncthreads();
  S later = S::identity();  // the warps after this one
  for (int w = kWarps - 1; w > warp; --w) later = S::combine(warp_totals[w], later);
  total = later;
  for (int w = warp; w >= 0; --w) total = S::combine(warp_totals[w], total);
  __syncthreads();  // warp_totals is free for the next scan
  return S::combine(exclusive, later);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gae_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
               const bool* __restrict__ mask, int64_t length, double gamma, double gamma_lam,
               float* __restrict__ advantages, float* __restrict__ returns) {
  __shared__ double s_work[kPaddedSegment];  // rewards, then b_t, then advantages
  __shared__ double s_value[kPaddedSegment];
  __shared__ bool s_valid[kSegment];
  __shared__ FirstValue first_totals[kWarps];
  __shared__ AffineMap map_totals[kWarps];

  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * length;
  const int tid = threadIdx.x;
  const int first = tid * kItems;  // this thread's chunk: segment positions first .. first + kItems - 1
  const int first_slot = slot(first);

  double adv_after = 0.0;    // the advantage just after the segment (0 past the row's end)
  double value_after = 0.0;  // the value at the first valid position after the segment (0: none)
  for (int64_t start = (length - 1) / kSegment * kSegment; start >= 0; start -= kSegment) {
    for (int idx = tid; idx < kSegment; idx += kThreads) {
      const int64_t t = start + idx;
      const bool in_row = t < length;  // positions past the end: masked, so they change nothing
      s_work[slot(idx)] = in_row ? static_cast<double>(rewards[row_start + t]) : 0.0;
      s_value[slot(idx)] = in_row ? static_cast<double>(values[row_start + t]) : 0.0;
      s_valid[idx] = in_row && mask[row_start + t];
    }
    __syncthreads();

    // (1) nextv entering each chunk.
    FirstValue mine = FirstValue::identity();
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      if (s_valid[first + i]) mine = {true, s_value[first_slot + i]};
    }
    FirstValue segment_first;
    const FirstValue after = reverse_exclusive_scan(mine, first_totals, segment_first);
    double nextv = after.found ? after.value : value_after;

    // (2) b_t, and the chunk's map from the advantage after it to the one at its start.
    AffineMap map = AffineMap::identity();
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      double b = 0.0;
      if (s_valid[first + i]) {
        const double v = s_value[first_slot + i];
        b = s_work[first_slot + i] + gamma * nextv - v;
        nextv = v;
        map = AffineMap::combine({gamma_lam, b}, map);
      }
      s_work[first_slot + i] = b;  // only this thread touches its chunk between the barriers
    }
    AffineMap segment_map;
    const AffineMap later = reverse_exclusive_scan(map, map_totals, segment_map);

    // (3) advantages of the chunk.
    double adv = fma(later.scale, adv_after, later.shift);
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      if (s_valid[first + i]) adv = fma(gamma_lam, adv, s_work[first_slot + i]);
      s_work[first_slot + i] = adv;
    }
    __syncthreads();

    for (int idx = tid; idx < kSegment; idx += kThreads) {
      const int64_t t = start + idx;
      if (t < length) {
        const double a = s_work[slot(idx)];
        advantages[row_start + t] = static_cast<float>(a);
        returns[row_start + t] = static_cast<float>(a + s_value[slot(idx)]);
      }
    }
    adv_after = s_work[slot(0)];
    if (segment_first.found) value_after = segment_first.value;
    __syncthreads();  // the next segment's loads overwrite the shared arrays
  }
}

}  // namespace gae_kernels
}  // namespace sveb
