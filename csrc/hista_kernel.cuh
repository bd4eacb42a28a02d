// Hista (docs/CONTRACT.md §1) as one fused kernel: flash-attention forward with Q = K = hidden states, a varlen
// block mask that drops the query's own rollout, and a value dimension of 1.
//
// A CTA owns a tile of BM consecutive packed tokens as queries (a tile may span several groups;
// the per-row group range does the separation) and walks the key tiles of the key range
// [start of its first row's group, end of its last row's group). Per key tile it computes the
// BM x BN score tile as a full GEMM K-loop over D (the operands cannot stay resident: a 128-row
// panel at D = 4096 is 1 MiB), then folds the tile into a running (max, sum, weighted sum) per
// row in base 2. The value dimension is 1, so the weighted sum of returns is a few FMAs per score,
// not a second GEMM; the cost is the GEMM, 2*BM*BN*D flops per tile.
//
// Two main loops share that structure and epilogue:
//  - bf16/fp16: mma.sync m16n8k16 on tensor cores, fp32 accumulators (products of 16-bit inputs
//    are exact in fp32), operands streamed by cp.async through a multi-stage shared-memory ring.
//  - fp32: FMA on the CUDA cores. TF32 tensor cores are not an option (10-bit mantissa: logit
//    errors of ~1e-2 at temperature 0.1 break the 1e-4 contract) and 3xbf16 splitting is not
//    accurate enough at small temperatures either; fp32 inputs are the minority case.
//
// Every thread keeps one online-softmax state per (row, column subset it owns) and never syncs
// with other warps for the softmax; the states of a row are merged once, at the end, through
// shared memory (the merge is associative). With key_splits > 1, CTAs (q tile, split) share a
// query tile's key tiles round-robin and write partial states that a second kernel merges
// (flash-decoding); consecutive CTA ids are the splits of one query tile, so the CTAs running at
// once read the same query panels and, split by split, the same key tiles: the working set stays
// in L2 instead of each CTA streaming a private query panel from HBM for every key tile.
//
// Memory: inputs, O(N) per-token terms, and 3 * key_splits * N floats of partials. Never [N, N].
//
// This header holds the device code only (host code: hista.cu). Compiled with
// SVEB_CPU_EMULATION defined, it builds with a host compiler against tests/cuda_emulation/,
// which runs the kernels with one OS thread per CUDA thread, so that their logic is tested on
// machines without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef SVEB_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sm80_primitives.cuh"
#define SVEB_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace sveb {
namespace hista_kernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Tile sizes are the same in both main loops, so the host code does not depend on the dtype.
constexpr int kTileM = 128;
constexpr int kTileN = 128;

struct HistaParams {
  const void* hidden;  // [n, dim] row-major, rows 16-byte aligned; columns past D are zeros
  int n;
  int dim;  // padded D: a multiple of the 16-byte chunk
  const float* returns;
  const int64_t* rollout_ids;
  const int64_t* group_offsets;  // num_groups + 1 entries
  int num_groups;
  const float* inv_norm;  // cosine: 1 / max(|h_j|, eps); dot: 1, or NaN for a row with a NaN/inf
  const bool* key_mask;   // null: every key usable
  const float* key_bias;  // null: no bias
  float logit_scale;      // log2(e) / temperature: logits are kept in base 2
  float empty_value;
  int key_splits;
  float* values;  // key_splits == 1: the results
  float* lse;
  float* part_m;  // key_splits > 1: [key_splits, n] partial states
  float* part_l;
  float* part_a;
};

__device__ __forceinline__ int clamp_token(int64_t x, int n) { return static_cast<int>(x < 0 ? 0 : (x > n ? n : x)); }

// The group of token i: the last g with offsets[g] <= i (empty groups, repeated offsets, are
// skipped because a later g with the same offset wins).
__device__ __forceinline__ int group_of(const int64_t* offsets, int num_groups, int i) {
  int lo = 0, hi = num_groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// 2^x in one SFU instruction (ex2.approx.ftz: relative error ~2^-22, 2^-inf = 0). exp2f adds a
// denormal-range fix-up per call; weights below 2^-126 next to a weight of 1 change no fp32 sum.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef SVEB_CPU_EMULATION
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Online-softmax merge of (m, l, a) with (m2, l2, a2); m = -inf is the empty state.
__device__ __forceinline__ void merge_state(float& m, float& l, float& a, float m2, float l2, float a2) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) {  // both without a finite score; a NaN sum (NaN keys only) must survive
    l += l2;
    a += a2;
    return;
  }
  const float w = fast_exp2(m - top), w2 = fast_exp2(m2 - top);  // 2^-inf = 0: an empty side adds nothing
  l = l * w + l2 * w2;
  a = a * w + a2 * w2;
  m = top;
}

// Same rule as the reference: a row without usable keys has l = 0. A NaN l (a NaN/inf input that
// the row depends on, docs/DESIGN.md "GPU readiness") gives NaN outputs, never empty_value.
__device__ __forceinline__ void write_result(float m, float l, float a, const HistaParams& p, int64_t i) {
  if (l != 0.f) {
    p.values[i] = a / l;
    p.lse[i] = (m + log2f(l)) * kLn2;
  } else {
    p.values[i] = p.empty_value;
    p.lse[i] = -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// bf16/fp16 main loop: 8 warps as 4 (rows) x 2 (keys), each a 32 x 64 warp tile of 2 x 8 mma tiles.
template <typename T>
struct TensorCoreTiles {
  using Element = T;
  static constexpr int kThreads = 256;
  // Two CTAs per SM (128 registers, 2 x 65 KiB of shared memory, on sm_80 and sm_90): one CTA's epilogue
  // and barriers overlap the other's MMAs.
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr int BM = kTileM, BN = kTileN, BK = 32, kStages = 3;
  static constexpr int kWarpsM = 4, kWarpsN = 2;
  static constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;
  static constexpr int MI = WM / 16, NI = WN / 8;
  // Row stride in shared memory: 80 bytes, so the 8 row addresses of an ldmatrix fall in 8
  // different 16-byte bank groups (with 64 bytes, 4 of them would collide).
  static constexpr int kLd = BK + 8;
  static constexpr int kChunksPerRow = BK / 8;  // 16-byte cp.async chunks
  static constexpr int kStageElems = (BM + BN) * kLd;
  static constexpr int kSmemBytes = kStages * kStageElems * static_cast<int>(sizeof(T));
  // Per thread: rows (2 per mma tile row) x columns (2 per mma tile column) of accumulators.
  static constexpr int kRows = 2 * MI, kCols = 2 * NI, kSlots = 4 * kWarpsN;
  static_assert(kWarpsM * kWarpsN * 32 == kThreads, "warp grid");
  static_assert((BM * kChunksPerRow) % kThreads == 0 && (BN * kChunksPerRow) % kThreads == 0, "loader");
  static_assert(NI % 2 == 0, "B fragments are loaded two n-tiles at a time");

  struct Acc {
    float c[MI][NI][4];
  };

  // mma C fragment: lane holds (row lane/4 [+8], columns 2*(lane%4) [+1]) of each 16x8 tile.
  __device__ static int row(int r) {
    const int warp_m = (threadIdx.x >> 5) / kWarpsN, lane = threadIdx.x & 31;
    return warp_m * WM + (r >> 1) * 16 + (r & 1) * 8 + (lane >> 2);
  }
  __device__ static int col(int c) {
    const int warp_n = (threadIdx.x >> 5) % kWarpsN, lane = threadIdx.x & 31;
    return warp_n * WN + (c >> 1) * 8 + (lane & 3) * 2 + (c & 1);
  }
  __device__ static int slot() { return ((threadIdx.x >> 5) % kWarpsN) * 4 + (threadIdx.x & 3); }
  __device__ static float& at(Acc& acc, int r, int c) { return acc.c[r >> 1][c >> 1][(r & 1) * 2 + (c & 1)]; }

  // One BK-wide column block of the query tile (rows q0..) and the key tile (rows k0..) into a stage.
  // Rows past their limit and columns past dim are zero-filled (their scores are masked anyway).
  __device__ static void load_stage(T* stage, const HistaParams& p, int q0, int k0, int k_end, int kcol) {
    const T* hidden = static_cast<const T*>(p.hidden);
#pragma unroll
    for (int it = 0; it < (BM + BN) * kChunksPerRow / kThreads; ++it) {
      const int chunk = threadIdx.x + it * kThreads;
      const int tile_row = chunk / kChunksPerRow;  // 0..BM-1: query rows, BM..BM+BN-1: key rows
      const int c = (chunk % kChunksPerRow) * 8;
      const bool is_query = tile_row < BM;
      const int token = is_query ? q0 + tile_row : k0 + (tile_row - BM);
      const bool valid = (is_query ? token < p.n : token < k_end) && kcol + c < p.dim;
      const T* src = valid ? hidden + static_cast<int64_t>(token) * p.dim + kcol + c : hidden;
      sm80::cp_async_16(stage + tile_row * kLd + c, src, valid);
    }
  }

  __device__ static void compute_stage(Acc& acc, const T* stage) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const T* a_tile = stage + ((warp / kWarpsN) * WM) * kLd;
    const T* b_tile = stage + (BM + (warp % kWarpsN) * WN) * kLd;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MI][4];
      uint32_t b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // matrices: rows 0-7 / 8-15 (lanes 0-15) at k 0-7, then at k 8-15 (lanes 16-31) = a0..a3
        sm80::ldmatrix_x4(a[mi], a_tile + (mi * 16 + (lane & 15)) * kLd + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        // matrices: keys 0-7 at k 0-7, k 8-15, then keys 8-15 at k 0-7, k 8-15 = b0,b1 of two n-tiles
        uint32_t r[4];
        sm80::ldmatrix_x4(r, b_tile + (nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLd + kk + ((lane >> 3) & 1) * 8);
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) sm80::mma_16x8x16<T>(acc.c[mi][ni], a[mi], b[ni][0], b[ni][1]);
      }
    }
  }

  // acc = Q_tile . K_tile^T over all of D. Called with every thread of the CTA, after a barrier
  // that ends all use of the stages by the previous tile.
  __device__ static void mainloop(Acc& acc, unsigned char* smem, const HistaParams& p, int q0, int k0, int k_end) {
    T* stages = reinterpret_cast<T*>(smem);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.c[mi][ni][e] = 0.f;
    const int num_k = (p.dim + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_k) load_stage(stages + s * kStageElems, p, q0, k0, k_end, s * BK);
      sm80::cp_async_commit();  // empty groups too: keeps "group kb holds block kb" true
    }
    for (int kb = 0; kb < num_k; ++kb) {
      sm80::cp_async_wait<kStages - 2>();  // this thread's copies of block kb have landed...
      __syncthreads();  // ...everyone's have, and everyone is done with the stage refilled below
      const int next = kb + kStages - 1;
      if (next < num_k) load_stage(stages + (next % kStages) * kStageElems, p, q0, k0, k_end, next * BK);
      sm80::cp_async_commit();
      compute_stage(acc, stages + (kb % kStages) * kStageElems);
    }
    sm80::cp_async_wait<0>();
  }
};

// ---------------------------------------------------------------------------------------------
// fp32 main loop: 16 x 16 threads, each an 8 x 8 block of scores at rows ty + 16 r, keys tx + 16 c.
// Operands staged through registers into two shared buffers with an odd row stride (BK + 1), which
// makes both the transposed stores and the column reads of the inner product conflict-free.
struct SimtTiles {
  using Element = float;
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr int BM = kTileM, BN = kTileN, BK = 16;
  static constexpr int kLd = BK + 1;
  static constexpr int kStageElems = (BM + BN) * kLd;
  static constexpr int kSmemBytes = 2 * kStageElems * static_cast<int>(sizeof(float));
  static constexpr int kRows = 8, kCols = 8, kSlots = 16;
  static constexpr int kLoads = (BM + BN) * BK / 4 / kThreads;  // float4 per thread per stage
  static_assert((BM + BN) * BK / 4 % kThreads == 0, "loader");
  static_assert(BM == 16 * kRows && BN == 16 * kCols && kThreads == 256, "thread grid");

  struct Acc {
    float c[kRows][kCols];
  };

  __device__ static int row(int r) { return (threadIdx.x >> 4) + 16 * r; }
  __device__ static int col(int c) { return (threadIdx.x & 15) + 16 * c; }
  __device__ static int slot() { return threadIdx.x & 15; }
  __device__ static float& at(Acc& acc, int r, int c) { return acc.c[r][c]; }

  __device__ static void fetch(float4 (&regs)[kLoads], const HistaParams& p, int q0, int k0, int k_end, int kcol) {
    const float* hidden = static_cast<const float*>(p.hidden);
#pragma unroll
    for (int it = 0; it < kLoads; ++it) {
      const int chunk = threadIdx.x + it * kThreads;
      const int tile_row = chunk / (BK / 4);
      const int c = (chunk % (BK / 4)) * 4;
      const bool is_query = tile_row < BM;
      const int token = is_query ? q0 + tile_row : k0 + (tile_row - BM);
      const bool valid = (is_query ? token < p.n : token < k_end) && kcol + c < p.dim;
      regs[it] = valid ? *reinterpret_cast<const float4*>(hidden + static_cast<int64_t>(token) * p.dim + kcol + c)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  __device__ static void store(float* stage, const float4 (&regs)[kLoads]) {
#pragma unroll
    for (int it = 0; it < kLoads; ++it) {
      const int chunk = threadIdx.x + it * kThreads;
      float* dst = stage + (chunk / (BK / 4)) * kLd + (chunk % (BK / 4)) * 4;
      dst[0] = regs[it].x;
      dst[1] = regs[it].y;
      dst[2] = regs[it].z;
      dst[3] = regs[it].w;
    }
  }

  __device__ static void compute_stage(Acc& acc, const float* stage) {
    const float* a_tile = stage + (threadIdx.x >> 4) * kLd;
    const float* b_tile = stage + (BM + (threadIdx.x & 15)) * kLd;
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[kRows], b[kCols];
#pragma unroll
      for (int r = 0; r < kRows; ++r) a[r] = a_tile[16 * r * kLd + k];
#pragma unroll
      for (int c = 0; c < kCols; ++c) b[c] = b_tile[16 * c * kLd + k];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc.c[r][c] = fmaf(a[r], b[c], acc.c[r][c]);
    }
  }

  __device__ static void mainloop(Acc& acc, unsigned char* smem, const HistaParams& p, int q0, int k0, int k_end) {
    float* stages = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc.c[r][c] = 0.f;
    const int num_k = (p.dim + BK - 1) / BK;
    float4 regs[kLoads];
    fetch(regs, p, q0, k0, k_end, 0);
    store(stages, regs);
    __syncthreads();
    // Two-level summation: kStagesPerPart stages (64 columns) into a fresh partial tile, then added to
    // acc. One running fp32 sum over D = 4096 products missed the fp32 bound at temperature 1e-3 (its
    // ~D roundings reach the logits multiplied by 1/temperature); this rounds ~64 + D/64 times
    // (docs/DESIGN.md "GPU readiness", bench/tf32_model.py).
    constexpr int kStagesPerPart = 4;
    Acc part;
    for (int kb = 0; kb < num_k; ++kb) {
      const bool more = kb + 1 < num_k;
      if (kb % kStagesPerPart == 0) {
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int c = 0; c < kCols; ++c) part.c[r][c] = 0.f;
      }
      if (more) fetch(regs, p, q0, k0, k_end, (kb + 1) * BK);  // global loads in flight during the FMAs
      compute_stage(part, stages + (kb & 1) * kStageElems);
      if (more) store(stages + ((kb + 1) & 1) * kStageElems, regs);
      if (kb % kStagesPerPart == kStagesPerPart - 1 || !more) {
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int c = 0; c < kCols; ++c) acc.c[r][c] += part.c[r][c];
      }
      __syncthreads();  // block kb+1 visible; nobody reads buffer kb&1 any more when it is refilled
    }
  }
};

// ---------------------------------------------------------------------------------------------
template <class Tiles>
__global__ void __launch_bounds__(Tiles::kThreads, Tiles::kMinBlocksPerSm) hista_kernel(const HistaParams p) {
  constexpr int BM = Tiles::BM, BN = Tiles::BN, kRows = Tiles::kRows, kCols = Tiles::kCols;
  constexpr int kSlots = Tiles::kSlots;
  static_assert(BM <= Tiles::kThreads && BN <= Tiles::kThreads, "one thread per query row and per key");
  static_assert(3 * BM * kSlots * static_cast<int>(sizeof(float)) <= Tiles::kSmemBytes, "merge buffer");

  SVEB_DYNAMIC_SHARED(smem);
  // Query rows of this tile: logit scale, rollout, and the key range [begin, end) of their group.
  __shared__ float q_scale[BM];
  __shared__ long long q_rollout[BM];
  __shared__ int q_begin[BM], q_end[BM];
  // Keys of the current key tile: scale (inverse norm), additive term (base-2 bias, -inf = not a
  // key), return, rollout.
  __shared__ float k_scale[BN], k_add[BN], k_return[BN];
  __shared__ long long k_rollout[BN];
  __shared__ int key_range[2];

  const int tid = threadIdx.x;
  const int q_tile = blockIdx.x / p.key_splits, split = blockIdx.x % p.key_splits;
  const int q0 = q_tile * BM;  // < n: the grid has ceil(n / BM) query tiles

  if (tid < BM) {
    const int i = q0 + tid;
    float scale = 0.f;
    long long rollout = 0;
    int begin = 0, end = 0;  // rows past n: no keys
    if (i < p.n) {
      const int g = group_of(p.group_offsets, p.num_groups, i);
      // Clamped so that offsets that break the contract (the public API checks them) can only
      // give wrong numbers, never out-of-bounds reads.
      begin = clamp_token(p.group_offsets[g], p.n);
      end = clamp_token(p.group_offsets[g + 1], p.n);
      scale = p.logit_scale * (p.inv_norm ? p.inv_norm[i] : 1.f);
      rollout = p.rollout_ids[i];
    }
    q_scale[tid] = scale;
    q_rollout[tid] = rollout;
    q_begin[tid] = begin;
    q_end[tid] = end;
    if (tid == 0) key_range[0] = begin;
    if (i == (q0 + BM < p.n ? q0 + BM : p.n) - 1) key_range[1] = end;  // the tile's last row
  }
  __syncthreads();
  // All rows with one rollout id: a key tile whose keys all have that id is skipped without its GEMM
  // (such a key is of the row's own rollout or of another group: never a key). These are the
  // diagonal blocks of a group, 1/R of its work for R rollouts of equal length.
  const bool one_rollout = __syncthreads_and(tid >= BM || q0 + tid >= p.n || q_rollout[tid] == q_rollout[0]);
  const int k_begin = key_range[0], k_end = key_range[1];
  const int num_key_tiles = k_end > k_begin ? (k_end - k_begin + BN - 1) / BN : 0;

  typename Tiles::Acc acc;
  float run_m[kRows], run_l[kRows], run_a[kRows];  // base-2 max, sum of weights, weighted sum of returns
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    run_m[r] = -INFINITY;
    run_l[r] = 0.f;
    run_a[r] = 0.f;
  }

  for (int t = split; t < num_key_tiles; t += p.key_splits) {
    const int k0 = k_begin + t * BN;
    __syncthreads();  // the previous tile's epilogue is done with the key terms
    bool usable = false;
    if (tid < BN) {
      const int j = k0 + tid;
      float scale = 0.f, add = -INFINITY, ret = 0.f;
      long long rollout = 0;
      if (j < k_end) {
        scale = p.inv_norm ? p.inv_norm[j] : 1.f;
        add = p.key_bias ? p.key_bias[j] * kLog2e : 0.f;
        if (p.key_mask && !p.key_mask[j]) add = -INFINITY;
        ret = p.returns[j];
        rollout = p.rollout_ids[j];
        // `!=`: a NaN key_bias makes the key poisoned, not masked.
        usable = add != -INFINITY && !(one_rollout && rollout == q_rollout[0]);
      }
      k_scale[tid] = scale;
      k_add[tid] = add;
      k_return[tid] = ret;
      k_rollout[tid] = rollout;
    }
    if (!__syncthreads_or(usable)) continue;  // uniform: every thread skips, or none

    Tiles::mainloop(acc, smem, p, q0, k0, k_end);

    // Epilogue, column by column so that each key's terms are loaded once: the scores replace the
    // accumulators (-inf where the key is not one of the row's keys), then fold into the states.
    float tile_max[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) tile_max[r] = -INFINITY;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = Tiles::col(c);
      const int j = k0 + col;
      const float add = k_add[col], scale = k_scale[col];
      const long long rollout = k_rollout[col];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = Tiles::row(r);
        // `&`, not `&&`: every operand is a cheap shared load; without short-circuits, no branches.
        const bool key = (j >= q_begin[row]) & (j < q_end[row]) & (add != -INFINITY) & (rollout != q_rollout[row]);
        float& x = Tiles::at(acc, r, c);
        // A non-finite hidden state gives NaN here, never a silent -inf (zero weight): its scale
        // (inv_norm) is 0 (cosine: 0 * inf) or NaN (dot, set by the host code). A select that turned
        // -inf into NaN here instead made ptxas spill the tensor-core kernels.
        // Key scale first: x * inv_norm_j stays near |h_i|, so the query scale (1/temperature) cannot
        // overflow it to inf for a cosine logit at any admitted temperature (docs/DESIGN.md).
        const float s = fmaf(x * scale, q_scale[row], add);
        x = key ? s : -INFINITY;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    }
    float shift[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float m_new = fmaxf(run_m[r], tile_max[r]);
      shift[r] = m_new == -INFINITY ? 0.f : m_new;  // a row without keys so far keeps l = a = 0, not NaN
      const float rescale = fast_exp2(run_m[r] - shift[r]);
      run_l[r] *= rescale;
      run_a[r] *= rescale;
      run_m[r] = m_new;
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const float ret = k_return[Tiles::col(c)];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float x = Tiles::at(acc, r, c);
        const float w = fast_exp2(x - shift[r]);
        run_l[r] += w;
        // Non-keys (x = -inf) add nothing: 0 * a NaN return of a non-key must not poison the row.
        run_a[r] = x == -INFINITY ? run_a[r] : fmaf(w, ret, run_a[r]);
      }
    }
  }

  // Merge the kSlots states of every row (thread-private column subsets) through shared memory.
  __syncthreads();  // every warp is past its last main loop: the stages can hold the states
  float* merge = reinterpret_cast<float*>(smem);  // [3][BM][kSlots]
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int at = Tiles::row(r) * kSlots + Tiles::slot();
    merge[at] = run_m[r];
    merge[BM * kSlots + at] = run_l[r];
    merge[2 * BM * kSlots + at] = run_a[r];
  }
  __syncthreads();
  if (tid < BM && q0 + tid < p.n) {
    float m = -INFINITY, l = 0.f, a = 0.f;
    for (int s = 0; s < kSlots; ++s) {
      const int at = tid * kSlots + s;
      merge_state(m, l, a, merge[at], merge[BM * kSlots + at], merge[2 * BM * kSlots + at]);
    }
    const int64_t i = q0 + tid;
    if (p.key_splits == 1) {
      write_result(m, l, a, p, i);
    } else {
      const int64_t at = static_cast<int64_t>(split) * p.n + i;
      p.part_m[at] = m;
      p.part_l[at] = l;
      p.part_a[at] = a;
    }
  }
}

__global__ void hista_merge_splits_kernel(const HistaParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  float m = -INFINITY, l = 0.f, a = 0.f;
  for (int s = 0; s < p.key_splits; ++s) {
    const int64_t at = static_cast<int64_t>(s) * p.n + i;
    merge_state(m, l, a, p.part_m[at], p.part_l[at], p.part_a[at]);
  }
  write_result(m, l, a, p, i);
}
}  // namespace hista_kernels
}  // namespace sveb
