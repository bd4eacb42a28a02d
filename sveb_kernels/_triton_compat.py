"""What the Triton kernels need to run alike under every Triton in the tested range
(`sveb_kernels._versions`), compiled and interpreted.

Imported only by the backends' triton.py modules (TRITON_INTERPRET must be set before kernels are
defined, and importing triton is slow).

`loop_bound`: wrap every loop bound that is a runtime scalar (`range(0, D, BLOCK_D)`,
`tl.range(k_lo, k_hi, ...)`). Triton 3.6's interpreter turns a scalar into a Python int with
`int(array of shape (1,))`, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted
to Python scalars"); Triton 3.8's interpreter squeezes first. Compiled, `loop_bound` is an identity
`@triton.jit` function that the compiler inlines: the kernels' machine code is unchanged
(tests/test_triton_compile.py compares a loop with and without it).
"""

from __future__ import annotations

import os

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETED:
    def loop_bound(x):
        """The interpreter runs kernels as Python: hand `range` a plain int."""
        handle = getattr(x, "handle", None)
        if handle is None:  # a Python int or a constexpr
            return x
        return int(handle.data.reshape(-1)[0])
else:
    @triton.jit
    def loop_bound(x):
        return x
