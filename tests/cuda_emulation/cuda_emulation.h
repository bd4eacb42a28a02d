// Just enough of CUDA, on the CPU, to run the kernels of csrc/*_kernel.cuh: one OS thread per CUDA
// thread, CTAs one after another, __shared__ as static storage (one CTA at a time), barriers and
// warp collectives (shuffles, ldmatrix, mma.sync) as exchanges through per-thread slots between two
// CTA-wide barriers. That is valid for these kernels because every collective is reached by all
// threads of the CTA (checked: a thread that reaches a collective alone deadlocks, and the test's
// timeout reports it).
//
// It checks what the hardware would not report clearly: cp.async/ldmatrix accesses out of the
// dynamic shared buffer or misaligned, cp.async reads of unaligned global addresses; and for shared
// arrays a kernel declares as CheckedShared (numca_kernel.cuh's SharedArray), races: two threads
// touching one element between the same two __syncthreads, one of them writing, fail however the
// OS threads happen to interleave (warp shuffles do not count as barriers, as on the GPU, where
// they order nothing in shared memory); so do reads of elements this CTA never wrote.
// Dynamic shared memory starts as NaN bytes, so reading a stage that was never filled shows up.
// cp.async copies land either at issue ("early") or only when cp.async.wait_group retires their group
// ("late"): a kernel that reads a stage before waiting for it fails in late mode, one that refills a
// stage still being read fails in early mode.
//
// What it cannot check: timing, occupancy, bank conflicts, and the PTX fragment layouts themselves
// (emulated from the PTX ISA tables, the same reading the kernel was written from). GPU tests and
// compute-sanitizer on a lent GPU cover those.
#pragma once

#define SVEB_CPU_EMULATION 1

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Storage-only 16-bit float types: the kernels never compute on them, the emulated mma converts.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

enum class CopyMode { kEarly, kLate };

struct Block {
  unsigned threads;
  std::barrier<> barrier;
  std::vector<unsigned char> dynamic_shared;
  std::vector<std::array<uint64_t, 8>> slots;  // per-thread exchange slots for collectives
  Block(unsigned n, size_t shared_bytes) : threads(n), barrier(n), dynamic_shared(shared_bytes + 16), slots(n) {
    std::memset(dynamic_shared.data(), 0xff, dynamic_shared.size());  // NaN in every float / double
  }
  unsigned char* shared_base() {
    auto p = reinterpret_cast<uintptr_t>(dynamic_shared.data());
    return dynamic_shared.data() + ((16 - p % 16) % 16);
  }
};

inline Block* g_block = nullptr;
inline size_t g_shared_bytes = 0;
inline CopyMode g_copy_mode = CopyMode::kEarly;
inline thread_local dim3 thread_idx, block_idx, block_dim;
inline std::atomic<uint64_t> g_block_serial{0};  // distinguishes CTAs, across launches too
inline thread_local uint64_t barriers_passed = 0;  // __syncthreads this thread has passed in its CTA

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<PendingCopy> pending_copies;
inline thread_local std::vector<size_t> group_ends;  // committed groups, as end offsets in pending_copies

inline void sync() { g_block->barrier.arrive_and_wait(); }

// A CTA-wide barrier in the kernel's sense (__syncthreads and its reductions): it orders shared memory.
inline void block_barrier() {
  sync();
  ++barriers_passed;
}

// A __shared__ T[N] whose accesses are checked for races. Two accesses of one element by different
// threads of a CTA are ordered only if a barrier lies between them, i.e. the threads had passed
// different numbers of barriers; with barriers as the kernel's only synchronisation that is exact,
// so the check does not depend on how the OS interleaves the threads.
template <class T, int N>
class CheckedShared {
  struct Record {
    uint64_t block = ~0ull;     // CTA of the last write
    uint64_t epoch = 0;         // barriers its writer had passed
    unsigned writer = 0;
    uint64_t read_block = ~0ull, read_epoch = 0;  // the reads since
    unsigned reader = 0;
    bool many_readers = false;
  };
  T data_[N];
  Record records_[N];
  std::mutex lock_;

  Record& record(int i, const char* what) {
    if (i < 0 || i >= N) fail(what);
    return records_[i];
  }
  [[noreturn]] static void race(const char* kind, int i, unsigned other) {
    char text[200];
    std::snprintf(text, sizeof text, "shared memory race (%s): element %d, threads %u and %u, no barrier between",
                  kind, i, other, thread_idx.x);
    fail(text);
  }

 public:
  T load(int i) {
    const std::lock_guard<std::mutex> hold(lock_);
    Record& r = record(i, "shared array read out of bounds");
    const uint64_t block = g_block_serial.load(), epoch = barriers_passed;
    const unsigned me = thread_idx.x;
    if (r.block != block) fail("shared memory race or uninitialised read: element read before this CTA wrote it");
    if (r.epoch == epoch && r.writer != me) race("read after write", i, r.writer);
    if (r.read_block == block && r.read_epoch == epoch) {
      r.many_readers |= r.reader != me;
    } else {
      r.read_block = block;
      r.read_epoch = epoch;
      r.reader = me;
      r.many_readers = false;
    }
    return data_[i];
  }
  void store(int i, T v) {
    const std::lock_guard<std::mutex> hold(lock_);
    Record& r = record(i, "shared array write out of bounds");
    const uint64_t block = g_block_serial.load(), epoch = barriers_passed;
    const unsigned me = thread_idx.x;
    if (r.block == block && r.epoch == epoch && r.writer != me) race("write after write", i, r.writer);
    if (r.read_block == block && r.read_epoch == epoch && (r.many_readers || r.reader != me)) {
      race("write after read", i, r.reader);
    }
    r = Record{block, epoch, me, ~0ull, 0, 0, false};
    data_[i] = v;
  }

  struct Element {
    CheckedShared& array;
    int i;
    operator T() const { return array.load(i); }
    Element& operator=(T v) {
      array.store(i, v);
      return *this;
    }
    Element& operator=(const Element& other) { return *this = static_cast<T>(other); }
  };
  Element operator[](int i) { return {*this, i}; }
};

inline void check_shared_range(const void* p, size_t bytes, const char* what) {
  auto* base = g_block->shared_base();
  auto* q = static_cast<const unsigned char*>(p);
  if (q < base || q + bytes > base + g_shared_bytes) fail(what);
}

// Runs `body` as a grid of `grid` CTAs of `threads` threads, CTAs one after another.
template <class F>
void launch(unsigned grid, unsigned threads, size_t shared_bytes, F body) {
  for (unsigned b = 0; b < grid; ++b) {
    ++g_block_serial;
    auto block = std::make_unique<Block>(threads, shared_bytes);
    g_block = block.get();
    g_shared_bytes = shared_bytes;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx = {t, 0, 0};
        barriers_passed = 0;
        block_idx = {b, 0, 0};
        block_dim = {threads, 1, 1};
        pending_copies.clear();
        group_ends.clear();
        body();
        if (!pending_copies.empty()) fail("a thread ended with cp.async copies never waited for");
      });
    }
    for (auto& th : pool) th.join();
    g_block = nullptr;
  }
}

inline float to_float(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(__half x) {  // IEEE binary16, by hand: no compiler support for _Float16 needed
  const int exponent = (x.bits >> 10) & 0x1f, mantissa = x.bits & 0x3ff;
  float v;
  if (exponent == 0) {
    v = std::ldexp(static_cast<float>(mantissa), -24);  // zero and subnormals
  } else if (exponent == 31) {
    v = mantissa ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return (x.bits & 0x8000) ? -v : v;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define SVEB_DYNAMIC_SHARED(name) unsigned char* name = ::emu::g_block->shared_base()

inline void __syncthreads() { emu::block_barrier(); }

inline int syncthreads_reduce(int v, bool all) {
  auto& slots = emu::g_block->slots;
  slots[threadIdx.x][0] = v != 0;
  emu::block_barrier();
  int r = all ? 1 : 0;
  for (unsigned t = 0; t < emu::g_block->threads; ++t) {
    const int x = static_cast<int>(slots[t][0]);
    r = all ? (r & x) : (r | x);
  }
  emu::sync();
  return r;
}
inline int __syncthreads_and(int v) { return syncthreads_reduce(v, true); }
inline int __syncthreads_or(int v) { return syncthreads_reduce(v, false); }

template <class T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  static_assert(sizeof(T) <= 8, "one slot per value");
  if (mask != 0xffffffffu) emu::fail("only full-warp shuffles are emulated");
  auto& slots = emu::g_block->slots;
  const unsigned tid = threadIdx.x, lane = tid & 31;
  std::memcpy(&slots[tid][0], &v, sizeof(T));
  emu::sync();
  T r = v;  // lanes past the warp's end get their own value, as on the GPU
  if (lane + delta < 32) std::memcpy(&r, &slots[tid + delta][0], sizeof(T));
  emu::sync();
  return r;
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, int delta) {
  static_assert(sizeof(T) <= 8, "one slot per value");
  if (mask != 0xffffffffu) emu::fail("only full-warp shuffles are emulated");
  auto& slots = emu::g_block->slots;
  const unsigned tid = threadIdx.x, lane = tid & 31;
  std::memcpy(&slots[tid][0], &v, sizeof(T));
  emu::sync();
  T r = v;  // lanes below delta get their own value, as on the GPU
  if (lane >= static_cast<unsigned>(delta)) std::memcpy(&r, &slots[tid - delta][0], sizeof(T));
  emu::sync();
  return r;
}

namespace sveb {
namespace sm80 {

inline void land(const emu::PendingCopy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  emu::check_shared_range(dst, 16, "cp.async writes outside the dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) emu::fail("cp.async destination not 16-byte aligned");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async source not 16-byte aligned");
  const emu::PendingCopy c{dst, src, valid};
  if (emu::g_copy_mode == emu::CopyMode::kEarly) {
    land(c);
  } else {
    emu::pending_copies.push_back(c);
  }
}

inline void cp_async_commit() { emu::group_ends.push_back(emu::pending_copies.size()); }

template <int kPending>
inline void cp_async_wait() {
  auto& ends = emu::group_ends;
  if (ends.size() <= static_cast<size_t>(kPending)) return;
  const size_t retire = ends.size() - kPending;  // the oldest groups land now
  const size_t upto = ends[retire - 1];
  for (size_t i = 0; i < upto; ++i) land(emu::pending_copies[i]);
  emu::pending_copies.erase(emu::pending_copies.begin(), emu::pending_copies.begin() + upto);
  ends.erase(ends.begin(), ends.begin() + retire);
  for (auto& e : ends) e -= upto;
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  emu::check_shared_range(row_address, 16, "ldmatrix reads outside the dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  auto& slots = emu::g_block->slots;
  const unsigned tid = threadIdx.x, lane = tid & 31, warp0 = tid - lane;
  slots[tid][0] = reinterpret_cast<uintptr_t>(row_address);
  emu::sync();
  for (int q = 0; q < 4; ++q) {
    // matrix q, row lane/4 (addressed by lane 8q + lane/4), elements 2*(lane%4) and +1
    const auto* row = reinterpret_cast<const uint16_t*>(slots[warp0 + 8 * q + lane / 4][0]);
    const int c = 2 * (lane % 4);
    r[q] = static_cast<uint32_t>(row[c]) | (static_cast<uint32_t>(row[c + 1]) << 16);
  }
  emu::sync();
}

// d += A(16x16) B(16x8) with the fragment layouts of the PTX ISA for mma.m16n8k16 (.bf16/.f16):
// A: reg 0 = (row g, k 2t..2t+1), 1 = (g+8, 2t..), 2 = (g, 2t+8..), 3 = (g+8, 2t+8..);
// B: reg 0 = (k 2t..2t+1, n g), 1 = (k 2t+8.., n g); C/D: 0,1 = (g, 2t..2t+1), 2,3 = (g+8, ..),
// with g = lane/4, t = lane%4, the lower column/k in the lower half of a register.
template <typename T>
inline void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& slots = emu::g_block->slots;
  const unsigned tid = threadIdx.x, lane = tid & 31, warp0 = tid - lane;
  for (int i = 0; i < 4; ++i) slots[tid][i] = a[i];
  slots[tid][4] = b0;
  slots[tid][5] = b1;
  emu::sync();
  auto element = [&](unsigned owner, int reg, int half) {
    const auto bits = static_cast<uint16_t>(slots[warp0 + owner][reg] >> (16 * half));
    return emu::to_float(T{bits});
  };
  auto a_at = [&](int row, int k) { return element((row % 8) * 4 + (k % 8) / 2, (row >= 8) + 2 * (k >= 8), k % 2); };
  auto b_at = [&](int k, int n) { return element(n * 4 + (k % 8) / 2, 4 + (k >= 8), k % 2); };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >= 2), col = 2 * t + (e & 1);
    double acc = d[e];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(a_at(row, k)) * b_at(k, col);
    out[e] = static_cast<float>(acc);
  }
  emu::sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

}  // namespace sm80
}  // namespace sveb
