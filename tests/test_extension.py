"""The optional extension (cpp kernels, and CUDA ones when built with CUDA): never required, refused (not
crashed on) when built for another torch."""

import json
import subprocess
import sys

import pytest
import torch

import sveb_kernels
from sveb_kernels import _build_info


def test_package_serves_without_extension():
    assert "reference" in sveb_kernels.available_backends("cpu")["hista_values"]
    assert "reference" in sveb_kernels.available_backends("cpu")["gae"]


def test_mismatched_torch_is_refused_with_a_clear_reason(tmp_path, monkeypatch):
    record = tmp_path / "_C_build.json"
    record.write_text(json.dumps({"torch": "1.0.0", "torch_cuda": "9.9"}))
    monkeypatch.setattr(_build_info, "_BUILD_INFO_PATH", str(record))
    _build_info.load_extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match="built against torch 1.0.0"):
            module, reason = _build_info.load_extension()
        assert module is None and "1.0.0" in reason and torch.__version__ in reason
    finally:
        _build_info.load_extension.cache_clear()


def test_extension_loads_when_built():
    info = _build_info.built_against()
    if info is None:
        pytest.skip("the CUDA extension was not built in this install")
    module, reason = _build_info.load_extension()
    assert module is not None, reason
    assert info["torch"].split("+")[0] in torch.ops.sveb._cpp_extension_info()  # the cpp kernels are always in it
    if info.get("cuda", True):
        assert info["torch"].split("+")[0] in torch.ops.sveb._cuda_extension_info()
    else:  # a CPU-only build: the cuda backend says why it cannot serve
        assert "without CUDA kernels" in sveb_kernels._backend.why_unavailable("gae", "cuda", "cuda")


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "sveb_kernels.cli", "info", "-v"], capture_output=True, text=True,
                         check=True).stdout
    assert "torch" in out and "hista_values" in out and "gae" in out and "extension" in out


def test_cuda_backend_needs_the_ops_kernel_in_the_loaded_extension(monkeypatch):
    module, _ = _build_info.load_extension()
    if module is None or not _build_info.built_against().get("cuda", True):
        pytest.skip("the CUDA extension was not built in this install")
    from sveb_kernels import _backend

    monkeypatch.setitem(_backend._LOADERS, ("not_compiled_op", "cuda"), lambda: None)
    assert "no kernel for not_compiled_op" in _backend.why_unavailable("not_compiled_op", "cuda", "cuda")
    assert _backend.why_unavailable("hista_values", "cuda", "cuda") is None
