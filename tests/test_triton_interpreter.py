"""Runs tests/triton/ in a process of its own under TRITON_INTERPRET=1 (on a machine without a GPU).

The interpreter must be selected before any Triton kernel is defined, which a shared pytest process
cannot guarantee; on a GPU machine tests/triton/ is collected directly instead.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

TRITON_TESTS = pathlib.Path(__file__).parent / "triton"


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="tests/triton/ is collected directly here")
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    if not any(TRITON_TESTS.glob("test_*.py")):
        pytest.skip("no Triton tests yet")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(TRITON_TESTS)],
                          env=env, capture_output=True, text=True, cwd=TRITON_TESTS.parent.parent)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
