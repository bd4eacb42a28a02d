"""Strided inputs on the Triton backend (docs/CONTRACT.md "Common rules"); see tests/strided_cases.py.
Column-major dense inputs used to give numca_values errors of ~2 (a mask read with the wrong strides)."""

import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: shared helpers

from strided_cases import LAYOUTS, check_all_ops  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_ops_accept_strided_inputs(seed, layout):
    check_all_ops("triton", DEVICE, layout, seed)
