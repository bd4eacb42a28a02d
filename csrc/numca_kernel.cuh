// Numeric spans (docs/CONTRACT.md §2b) as one kernel: one CTA of kThreads threads per row, one token
// per thread, the row in chunks of kThreads tokens from left to right. The design of the Triton kernel
// (sveb_kernels/numca/triton.py), with the closed-form grammar that reference.py and triton.py use.
//
// Per chunk:
//  1. The two small automata as associative scans over the CTA (warp shuffles, then the warp totals
//     through shared memory). Each token's transition vectors come from the vocab table
//     (sveb_kernels/numca/vocab.py: forward map 4 bits a state in column 0, backward map 3 bits a
//     state in column 1): the forward state at each token's start and end (what the text before
//     means for a digit) and the backward state at its end (what the text after means).
//  2. The backward state entering the chunk from the right needs no pass of its own: a composition of
//     backward maps that has read 5 classes no longer depends on what follows (",ddd" + a non-digit is
//     the longest pattern the backward automaton tells), so it is the scan total of the next chunk,
//     and only if that chunk has fewer than 5 classes (zero-length tokens) of the chunks after it.
//     The next chunk's scan is kept for its own turn, so every token is loaded and scanned once.
//  3. A token holding digits walks its own classes with the backward state of a 6-class window
//     (the next 5 classes decide it; past the token's end the window reads the scanned state) and
//     applies the closed-form regex: the last number ending in it, and the numbers starting in it.
//     A digit-free token can only hold the '-' of a number whose digits come later; the two states
//     tell that without a walk.
//  4. A max-scan of (token << 16 | class) of the latest number start carries starts along the row;
//     each token where a number ends re-reads that number's classes from its start (in this chunk or
//     an earlier one) and hashes its canonical form (FNV-1a) and builds its value on the way.
// Every thread writes its token's four outputs, so the host allocates them uninitialised.
//
// The chunk carries (forward state, backward state, latest start) are scan totals: values one thread
// per warp stores in shared memory and every thread reads back, so a barrier sits between the stores
// and the reads, and another before the next scan stores again (tests/test_cuda_emulation.py removes
// the first and checks that the emulator's shared-memory race check catches it).
//
// Values: M * 10^E with M the first 19 significant digits. One correctly rounded IEEE operation when
// M <= 2^53 and |E| <= 22 (nothing was cut then), as in the reference; otherwise M and 10^|E| as
// double-doubles, within 1 ulp of float(canonical string) (the contract allows 1 ulp for kernels).
//
// Device code only (host code: numca.cu); builds with a host compiler under SVEB_CPU_EMULATION
// for the CPU tests in tests/cuda_emulation/, where SharedArray (shared_array.cuh) checks every
// shared-memory access for races between barriers.
#pragma once

#include <cmath>
#include <cstdint>

#include "numeric_grammar.h"
#include "shared_array.cuh"

namespace sveb {
namespace numca_kernels {

// The table layout, the classes, both automata's steps, NumberBuilder and decimal_to_double: the
// grammar the cpp backend uses too.
using namespace grammar;

constexpr int kThreads = 256;  // tokens per chunk, one thread each; one CTA per row
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullWarp = 0xffffffffu;

constexpr int kWindow = 6;  // the current class and the 5 after it

// Transition maps packed as the vocab table holds them; the identities leave every state alone.
constexpr int kFwdStates = 11, kBwdStates = 7;
constexpr uint64_t kFwdIdentity = 0xA9876543210ull;  // state s -> s, 4 bits a state
constexpr uint64_t kBwdIdentity = 0x1AC688ull;       // state s -> s, 3 bits a state: sum of s << 3s
constexpr uint64_t kBwdReplicate = 0x49249ull;      // sum of 1 << 3s: a constant map is its state times this
constexpr int64_t kBwdMapMask = 0x1FFFFF;
constexpr uint64_t kSeparatorFwd = 0;  // a separator sends every state to O (forward) and N (backward)
constexpr uint64_t kSeparatorBwd = 0;

// ---- transition maps -------------------------------------------------------------------------------
__device__ __forceinline__ int fwd_apply(uint64_t map, int s) { return static_cast<int>((map >> (4 * s)) & 15u); }
__device__ __forceinline__ int bwd_apply(uint64_t map, int s) { return static_cast<int>((map >> (3 * s)) & 7u); }

// Apply `first`, then `then` (forward maps: the earlier text first).
struct ThenFwd {
  __device__ __forceinline__ uint64_t operator()(uint64_t first, uint64_t then) const {
    uint64_t out = 0;
#pragma unroll
    for (int s = 0; s < kFwdStates; ++s) out |= static_cast<uint64_t>(fwd_apply(then, fwd_apply(first, s))) << (4 * s);
    return out;
  }
};
// Apply `first`, then `then` (backward maps: the later text first).
struct ThenBwd {
  __device__ __forceinline__ uint64_t operator()(uint64_t first, uint64_t then) const {
    uint64_t out = 0;
#pragma unroll
    for (int s = 0; s < kBwdStates; ++s) out |= static_cast<uint64_t>(bwd_apply(then, bwd_apply(first, s))) << (3 * s);
    return out;
  }
};
struct Latest {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

__device__ __forceinline__ bool bwd_constant(uint64_t map) {
  return map == static_cast<uint64_t>(bwd_apply(map, 0)) * kBwdReplicate;
}

// Scan over the CTA, forwards (kReverse = false: lanes in order, op(earlier, later)) or backwards
// (op(later, earlier)); op need not commute. exclusive / inclusive: this thread's scan without / with
// its own element; total: all kThreads elements. Every thread must call it (two barriers).
template <bool kReverse, class T, class Op>
__device__ __forceinline__ void block_scan(T x, T identity, Op op, SharedArray<T, kWarps>& warp_totals, T& exclusive,
                                           T& inclusive, T& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T incl = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T y = kReverse ? __shfl_down_sync(kFullWarp, incl, d) : __shfl_up_sync(kFullWarp, incl, d);
    if (kReverse ? lane + d < 32 : lane >= d) incl = op(y, incl);
  }
  T excl = kReverse ? __shfl_down_sync(kFullWarp, incl, 1) : __shfl_up_sync(kFullWarp, incl, 1);
  if (lane == (kReverse ? 31 : 0)) excl = identity;
  if (lane == (kReverse ? 0 : 31)) warp_totals[warp] = incl;
  __syncthreads();  // the warp totals are stored before any thread reads them
  T before = identity, all = identity;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) {
    const int w = kReverse ? kWarps - 1 - k : k;
    if (w == warp) before = all;
    all = op(all, static_cast<T>(warp_totals[w]));
  }
  __syncthreads();  // every thread has read them before the next scan stores again
  exclusive = op(before, excl);
  inclusive = op(before, incl);
  total = all;
}

// ---- tokens ------------------------------------------------------------------------------------------
struct SpansParams {
  const void* ids;  // int32 or int64 [batch, length], row-major
  const bool* mask;  // [batch, length] or null
  const int64_t* table;  // [vocab, cols]
  int64_t batch, length, vocab, cols;
  // outputs [batch, length]: every element is written
  bool* end;
  int64_t* key;
  double* value;
  int32_t* start;
};

// What the scans and walks need of one token. Masked tokens and ids outside [0, V) are separators (one
// "other" class); positions past the row's end change nothing (identity maps, no classes).
struct Token {
  const int64_t* words;  // its class words; null for a separator or past the end
  uint64_t fwd, bwd;     // transition maps
  int length;            // classes
  bool digits;           // holds a digit
};

template <class Id>
__device__ __forceinline__ Token load_token(const SpansParams& p, const Id* ids, const bool* mask, int64_t t) {
  if (t >= p.length) return {nullptr, kFwdIdentity, kBwdIdentity, 0, false};
  const int64_t id = static_cast<int64_t>(ids[t]);
  if ((mask != nullptr && !mask[t]) || id < 0 || id >= p.vocab) {
    return {nullptr, kSeparatorFwd, kSeparatorBwd, 1, false};
  }
  const int64_t* row = p.table + id * p.cols;
  const int64_t meta = row[kColMeta];
  const int64_t stored = (meta >> kMetaLenShift) & kMetaLenMask;
  const int64_t room = (p.cols - kColClasses) * kClassesPerWord;  // a malformed table is never overread
  return {row + kColClasses, static_cast<uint64_t>(row[kColFwd]), static_cast<uint64_t>(meta & kBwdMapMask),
          static_cast<int>(stored < room ? stored : room), ((meta >> kMetaDigitShift) & 1) != 0};
}

__device__ __forceinline__ int class_at(const int64_t* words, int j) {
  return static_cast<int>((static_cast<uint64_t>(words[j / kClassesPerWord]) >> (4 * (j % kClassesPerWord))) & 15u);
}

// Backward state at window class k (0 = the current class): classes k .. 4 of the window on top of
// `after`, the backward state at the token's end. Window slots past the token's end hold kEnd, which
// leaves a state alone; 5 real classes decide the state whatever `after` is.
__device__ __forceinline__ int window_state(uint32_t window, int k, int after) {
  int s = after;
  for (int i = k + 4; i >= k; --i) s = backward_step(s, static_cast<int>((window >> (4 * i)) & 15u));
  return s;
}

// The closed-form regex over one token's classes, given the forward state at its start and the
// backward state at its end: the last class where a number ends (or -1), the class where that number
// starts if it starts in this token (or -1), and the last class where any number starts (or -1).
struct TokenNumbers {
  int last_end = -1, start_of_last_end = -1, last_start = -1;
};

__device__ TokenNumbers walk_token(const int64_t* words, int length, int state, int after) {
  TokenNumbers out;
  uint32_t window = 0;  // classes j .. j + 5, 4 bits each; kEnd past the token
  for (int k = 0; k < kWindow; ++k) window |= static_cast<uint32_t>(k < length ? class_at(words, k) : kEnd) << (4 * k);
  for (int j = 0; j < length; ++j) {
    const int c = static_cast<int>(window & 15u);
    const int next = forward_step(state, c);
    const int back_here = window_state(window, 0, after);
    const int back_next = window_state(window, 1, after);
    const bool digit = c < 10;
    const bool next_digit = back_next >= kD1 && back_next <= kD4;
    const bool in_integer = next >= kA1 && next <= kA4;
    const bool goes_on = (back_next == kG && next <= kA3) || back_next == kFR;
    const bool starts_digit = digit && (state == kO || (state == kOC && back_here != kD3));  // not a ",ddd" group
    const bool starts_sign = c == kMinus && next == kMS && next_digit;
    if (starts_digit || starts_sign) out.last_start = j;
    if (digit && !next_digit && (next == kF || (in_integer && !goes_on))) {
      out.last_end = j;
      out.start_of_last_end = out.last_start;  // -1: the number started in an earlier token
    }
    state = next;
    window = (window >> 4) | (static_cast<uint32_t>(j + kWindow < length ? class_at(words, j + kWindow) : kEnd)
                              << (4 * (kWindow - 1)));
  }
  return out;
}

// Canonical key and value of the number from class `first_class` of token `first_token` to class
// `last_class` of token `last_token`: one pass over its classes (the tokens between are valid and
// belong to the number; zero-length ones are skipped).
template <class Id>
__device__ void read_number(const SpansParams& p, const Id* ids, const bool* mask, int64_t first_token,
                            int first_class, int64_t last_token, int last_class, int64_t& key, double& value) {
  int64_t tok = first_token;
  Token here = load_token(p, ids, mask, tok);
  int j = first_class;
  NumberBuilder number{};
  number.begin(first_token, here.words != nullptr && class_at(here.words, j) == kMinus);
  while (true) {
    if (here.words != nullptr) number.add(class_at(here.words, j));
    if (tok >= last_token && j >= last_class) break;
    ++j;
    while (j >= here.length && tok < last_token) {
      here = load_token(p, ids, mask, ++tok);
      j = 0;
    }
    if (j >= here.length) break;  // not reached for spans the scan found
  }
  number.finish(key, value);
}

template <class Id>
__global__ void __launch_bounds__(kThreads) numeric_spans_kernel(SpansParams p) {
  __shared__ SharedArray<uint64_t, kWarps> s_maps;
  __shared__ SharedArray<int64_t, kWarps> s_starts;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t T = p.length;
  const Id* ids = static_cast<const Id*>(p.ids) + row * T;
  const bool* mask = p.mask == nullptr ? nullptr : p.mask + row * T;
  const int64_t chunks = (T + kThreads - 1) / kThreads;

  // This chunk's token and its backward scan (the maps of the tokens after it in the chunk).
  Token here = load_token(p, ids, mask, tid);
  uint64_t back_after, unused, total;
  block_scan<true>(here.bwd, kBwdIdentity, ThenBwd{}, s_maps, back_after, unused, total);

  int fwd_carry = kO;         // forward state entering the chunk: the row starts as after a separator
  int64_t start_carry = -1;   // latest number start before the chunk, token << 16 | class
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t = c * kThreads + tid;

    // Backward state entering the chunk from the right: the next chunks' maps until they are constant.
    Token next{};
    uint64_t next_back_after = kBwdIdentity;
    uint64_t beyond = kBwdIdentity;  // the text after this chunk, as a map of what follows it
    if (c + 1 < chunks) {
      next = load_token(p, ids, mask, t + kThreads);
      block_scan<true>(next.bwd, kBwdIdentity, ThenBwd{}, s_maps, next_back_after, unused, beyond);
      for (int64_t cc = c + 2; cc < chunks && !bwd_constant(beyond); ++cc) {  // CTA-uniform
        const Token far = load_token(p, ids, mask, cc * kThreads + tid);
        uint64_t far_total, far_unused;
        block_scan<true>(far.bwd, kBwdIdentity, ThenBwd{}, s_maps, far_unused, far_unused, far_total);
        beyond = ThenBwd{}(far_total, beyond);
      }
    }
    const int back_carry = bwd_apply(beyond, kN);  // after the row come separators
    const int back_end = bwd_apply(back_after, back_carry);  // backward state at this token's end

    uint64_t fwd_before, fwd_upto, fwd_total;
    block_scan<false>(here.fwd, kFwdIdentity, ThenFwd{}, s_maps, fwd_before, fwd_upto, fwd_total);
    const int fwd_start = fwd_apply(fwd_before, fwd_carry);
    const int fwd_end = fwd_apply(fwd_upto, fwd_carry);

    TokenNumbers found;
    if (here.words != nullptr && here.digits) {
      found = walk_token(here.words, here.length, fwd_start, back_end);
    } else if (here.words != nullptr && fwd_end == kMS && back_end >= kD1 && back_end <= kD4) {
      found.last_start = here.length - 1;  // a '-' whose digits come in later tokens
    }

    const int64_t tagged = found.last_start >= 0 ? (t << 16) | found.last_start : -1;
    int64_t start_before, start_upto, start_total;
    block_scan<false>(tagged, int64_t{-1}, Latest{}, s_starts, start_before, start_upto, start_total);
    start_before = Latest{}(start_before, start_carry);

    if (t < T) {
      const int64_t out = row * T + t;
      if (found.last_end >= 0) {
        const int64_t from = found.start_of_last_end >= 0 ? (t << 16) | found.start_of_last_end : start_before;
        int64_t k;
        double v;
        read_number(p, ids, mask, from >> 16, static_cast<int>(from & 0xFFFF), t, found.last_end, k, v);
        p.end[out] = true;
        p.key[out] = k;
        p.value[out] = v;
        p.start[out] = static_cast<int32_t>(from >> 16);
      } else {
        p.end[out] = false;
        p.key[out] = 0;
        p.value[out] = NAN;
        p.start[out] = -1;
      }
    }

    fwd_carry = fwd_apply(fwd_total, fwd_carry);
    start_carry = Latest{}(start_total, start_carry);
    here = next;
    back_after = next_back_after;
  }
}

}  // namespace numca_kernels
}  // namespace sveb
