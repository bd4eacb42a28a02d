"""Memory safety without the host checks (docs/CONTRACT.md "Common rules", docs/DESIGN.md "Memory
safety without checks"): every raw op (torch.ops.sveb.*) on out-of-range offsets, ids and lengths,
per backend, in a process of its own (tests/memory_safety_cases.py): no crash, bounded outputs or a
clear error. The CUDA kernels' source runs the same Hista offsets on the CPU emulation
(tests/test_cuda_emulation.py::test_hista_kernel_bounds_bad_offsets).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import _CPP_MARKS

CASES = pathlib.Path(__file__).parent / "memory_safety_cases.py"


def run_cases(backend, **env):
    proc = subprocess.run([sys.executable, str(CASES), backend], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env), cwd=CASES.parent.parent)
    assert proc.returncode == 0, f"raw {backend} ops crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    assert proc.stdout.rstrip().endswith("done"), proc.stdout
    return proc.stdout


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=_CPP_MARKS)])
def test_raw_ops_bound_bad_offsets_ids_and_lengths(backend):
    out = run_cases(backend)
    if backend == "reference":   # the reference clamps: results, never errors
        assert "error" not in out, out


def test_triton_raw_ops_bound_bad_offsets_under_the_interpreter():
    """Issue 20 item 2: Triton Hista with group_offsets [0, N + 4096] wrote past its outputs (the
    interpreter aborted with `double free or corruption` / `munmap_chunk(): invalid pointer`)."""
    pytest.importorskip("triton")
    out = run_cases("triton", TRITON_INTERPRET="1")
    assert "error hista" not in out, out   # the device-side clamp gives results, not errors
