// SharedArray<T, N>: a __shared__ T[N] for kernels whose shared memory the CPU emulator checks.
// On the GPU a plain array. Under SVEB_CPU_EMULATION (tests/cuda_emulation/) every access is checked:
// two threads of a CTA touching one element between the same two barriers, one of them writing, and
// reads of elements the CTA never wrote, fail the run whatever the threads' interleaving.
#pragma once

namespace sveb {

#ifdef SVEB_CPU_EMULATION
template <class T, int N>
using SharedArray = emu::CheckedShared<T, N>;
#else
template <class T, int N>
struct SharedArray {
  T data[N];
  __device__ __forceinline__ T& operator[](int i) { return data[i]; }
};
#endif

}  // namespace sveb
