// Numca milestone values (docs/CONTRACT.md §2c) as one kernel: one CTA per row, its threads over the row's tokens
// in chunks of kThreads, the design of the Triton kernel (sveb_kernels/numca/triton.py).
//
// The host (numca_values.cu) sorts the rows by group, so a row's peers are the range lo..hi of that
// order, and prepares per row either its valid keys sorted (match="last": a binary search answers
// "did this peer write key k anywhere") or two polynomial hashes of every prefix of its keys
// (match="prefix": "are this peer's first m keys mine" is two comparisons at ordinal m - 1).
// In a chunk: (1) a CTA-wide prefix sum of the number flags gives each number its ordinal m;
// (2) each thread holding a number walks the peers, counting support and summing returns in fp64;
// (3) a CTA-wide max-scan of "index of the last number with enough support" forward-fills the
// milestone values; the value at the chunk's end carries into the next chunk (the row's baseline,
// the peers' mean, before any milestone).
//
// The scans go through shared memory with barriers only (no warp shuffles): they are a small part of
// the work, which is the peer walk. Device code only; builds with a host compiler under
// SVEB_CPU_EMULATION for the CPU tests in tests/cuda_emulation/.
#pragma once

#include <cstdint>

#include "shared_array.cuh"

namespace sveb {
namespace numca_values_kernels {

constexpr int kThreads = 256;  // tokens per chunk, one thread each

struct ValuesParams {
  const bool* valid;          // [B, T] a number ends here and the token is not masked
  const bool* mask;           // [B, T] tokens to value (the others get 0)
  const int64_t* key;         // [B, T] keys (read only where valid)
  const int64_t* sorted_keys; // [B, T] each row's valid keys sorted first (match="last")
  const int64_t* hash1;       // [B, T] prefix hashes at ordinal m - 1 (match="prefix")
  const int64_t* hash2;
  const int32_t* count;       // [B] numbers a row has
  const double* returns;      // [B]
  const int64_t* order;       // [B] rows sorted by group (stable)
  const int64_t* lo;          // [B] a row's peers: order[lo[b] .. hi[b])
  const int64_t* hi;
  int64_t length;             // T
  bool prefix;                // match="prefix"
  bool leave_one_out;
  int64_t min_support;        // capped to B + 1 by the host
  double empty_value;
  float* out;                 // [B, T]
};

// Inclusive scan over the CTA of s[0 .. kThreads) (Hillis-Steele); every thread must call it.
template <class T, class Op>
__device__ T cta_inclusive_scan(SharedArray<T, kThreads>& s, T x, Op op) {
  const int tid = threadIdx.x;
  s[tid] = x;
  __syncthreads();
  for (int d = 1; d < kThreads; d <<= 1) {
    const T v = tid >= d ? op(s[tid - d], s[tid]) : s[tid];
    __syncthreads();
    s[tid] = v;
    __syncthreads();
  }
  return s[tid];
}

struct Sum {
  __device__ int operator()(int a, int b) const { return a + b; }
};
struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// Does the peer's sorted key list (its first n entries) hold `k`?
__device__ __forceinline__ bool holds_key(const int64_t* sorted, int32_t n, int64_t k) {
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < k) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < n && sorted[lo] == k;
}

__global__ void __launch_bounds__(kThreads) numca_values_kernel(ValuesParams p) {
  __shared__ SharedArray<int, kThreads> s_scan;
  __shared__ SharedArray<double, kThreads> s_milestone;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t T = p.length;
  const int64_t first_peer = p.lo[row], last_peer = p.hi[row];

  // The peers' mean: the value before the first milestone (every thread computes the same sum).
  double peer_sum = 0.0;
  int64_t peers = 0;
  for (int64_t q = first_peer; q < last_peer; ++q) {
    const int64_t peer = p.order[q];
    if (p.leave_one_out && peer == row) continue;
    peer_sum += p.returns[peer];
    ++peers;
  }
  double carry = peers > 0 ? peer_sum / static_cast<double>(peers) : p.empty_value;

  int seen = 0;  // numbers of the row before this chunk
  for (int64_t start = 0; start < T; start += kThreads) {
    const int64_t t = start + tid;
    const int64_t at = row * T + t;
    const bool number = t < T && p.valid[at];
    const int ordinal = seen + cta_inclusive_scan(s_scan, static_cast<int>(number), Sum{});  // m
    const int chunk_numbers = s_scan[kThreads - 1];

    int64_t support = 0;
    double total = 0.0;
    if (number) {
      const int64_t mine = p.key[at];
      const int64_t mine_at = row * T + (ordinal - 1);
      const int64_t mine1 = p.prefix ? p.hash1[mine_at] : 0, mine2 = p.prefix ? p.hash2[mine_at] : 0;
      for (int64_t q = first_peer; q < last_peer; ++q) {
        const int64_t peer = p.order[q];
        if (p.leave_one_out && peer == row) continue;
        const int32_t n_peer = p.count[peer];
        bool same;
        if (p.prefix) {
          const int64_t peer_at = peer * T + (ordinal - 1);
          same = ordinal <= n_peer && p.hash1[peer_at] == mine1 && p.hash2[peer_at] == mine2;
        } else {
          same = holds_key(p.sorted_keys + peer * T, n_peer, mine);
        }
        if (same) {
          ++support;
          total += p.returns[peer];
        }
      }
    }
    const bool enough = number && support >= p.min_support;
    __syncthreads();  // every thread has read s_scan[kThreads - 1]
    s_milestone[tid] = enough ? total / static_cast<double>(support) : 0.0;
    const int last_ok = cta_inclusive_scan(s_scan, enough ? tid : -1, Max{});
    const double value = last_ok >= 0 ? s_milestone[last_ok] : carry;
    if (t < T) p.out[at] = p.mask[at] ? static_cast<float>(value) : 0.0f;
    const int chunk_last = s_scan[kThreads - 1];
    if (chunk_last >= 0) carry = s_milestone[chunk_last];
    seen += chunk_numbers;
    __syncthreads();  // the next chunk overwrites the shared arrays
  }
}

}  // namespace numca_values_kernels
}  // namespace sveb
