// Thin wrappers over the sm_80+ PTX instructions the Hista tensor-core kernel is built from:
// cp.async (global -> shared copies that bypass registers, so loads of the next K-step overlap the
// MMAs of this one), ldmatrix (shared -> the register fragments mma.sync expects) and mma.sync
// m16n8k16 with fp32 accumulators. Written out in PTX because WMMA hides the accumulator layout,
// and the online-softmax epilogue needs to know which (row, key) every accumulator holds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace sveb {
namespace sm80 {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define SVEB_SM80_UNSUPPORTED 1
#endif

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes, or writes 16 zero bytes when `valid` is false (src-size 0 reads nothing, so
// `src` only has to be some mapped address then).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifndef SVEB_SM80_UNSUPPORTED
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef SVEB_SM80_UNSUPPORTED
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef SVEB_SM80_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Four 8x8 b16 matrices; lanes 8q..8q+7 give the row addresses of matrix q, and register q of
// every lane receives its (row lane/4, columns 2*(lane%4), +1) pair of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#ifndef SVEB_SM80_UNSUPPORTED
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
#else
  __trap();
#endif
}

// d += a * b for one 16x8x16 tile: a row-major 16x16, b "column-major" 16x8 (i.e. stored [n][k]),
// d 16x8 in fp32. T is __nv_bfloat16 or __half.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifndef SVEB_SM80_UNSUPPORTED
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same<T, __half>::value, "mma_16x8x16 takes __nv_bfloat16 or __half");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

}  // namespace sm80
}  // namespace sveb
