"""Ahead-of-time compilation of Triton kernels for a named GPU, with or without one.

Triton compiles for a target given by name (sm80, sm90) with the ptxas it bundles, so shared memory
and register spills of a kernel variant are known without running it: tests/test_triton_compile.py
checks every kernel variant this way on a CPU machine, and the Hista config sweep drops candidates
that would not fit (hista/triton.py `fitting_candidates`). Imported only by Triton backends and tests.
"""

from __future__ import annotations

import pathlib
import subprocess
import tempfile
from typing import Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NVIDIA_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_for(fn, arch: int, pointer_types: dict, scalar_types: dict, constexprs: dict, num_warps: int,
                num_stages: int = 3, multiples_of_16=()):
    """`fn` (a `@triton.jit` kernel) compiled for sm`arch`. Arguments named `*_ptr` are pointers
    (`*fp32` unless in `pointer_types`), others `i32` unless in `scalar_types` or `constexprs`."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = scalar_types.get(name, "i32")
    # what the launcher specialises on: 16-byte aligned pointers, integer arguments divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name.endswith("_ptr") or name in multiples_of_16}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def spilled_bytes(kernel) -> Optional[int]:
    """Bytes of registers a compiled kernel spills to local memory (None: this Triton bundles no cuobjdump)."""
    tool = NVIDIA_BIN / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return int(line.split("STACK:")[1].split()[0])


def shared_bytes(kernel) -> int:
    """Shared memory per block the compiled kernel needs (static + what Triton allocates)."""
    return int(kernel.metadata.shared)
