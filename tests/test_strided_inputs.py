"""Strided inputs on the reference backend (the Triton backend: tests/triton/test_strided_triton.py;
the CUDA host code: tests/test_gpu_readiness.py's static check that every pointer it hands a kernel
comes from a contiguous tensor)."""

import pytest

from strided_cases import LAYOUTS, check_all_ops


@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_ops_accept_strided_inputs(seed, layout):
    check_all_ops("reference", "cpu", layout, seed)
