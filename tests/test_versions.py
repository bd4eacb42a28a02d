"""The tested torch/Triton range is declared once (sveb_kernels/_versions.py), pyproject.toml says the
same, CI runs the suite at both ends, and `sveb-kernels info` warns outside it."""

import pathlib
import re

import pytest
import torch

from sveb_kernels import _versions
from sveb_kernels.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _torch_requirement(requirements):
    return next(r.replace(" ", "") for r in requirements if re.match(r"torch\b", r))


def test_pyproject_declares_the_tested_torch_range():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (lo_major, lo_minor), (hi_major, hi_minor) = _versions.TORCH_TESTED
    want = f"torch>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"
    assert _torch_requirement(project["project"]["dependencies"]) == want
    assert _torch_requirement(project["build-system"]["requires"]) == want


def test_ci_runs_the_suite_at_the_oldest_tested_pair():
    ci = (ROOT / ".ci" / "run").read_text()
    (t_major, t_minor), (r_major, r_minor) = _versions.TORCH_TESTED[0], _versions.TRITON_TESTED[0]
    assert re.search(rf"torch=={t_major}\.{t_minor}\.\d+", ci) and re.search(rf"triton=={r_major}\.{r_minor}\.\d+", ci)


@pytest.mark.parametrize("name, version, inside", [
    ("torch", "2.11.0", True), ("torch", "2.14.1+cu130", True), ("torch", "2.12.0a0+git1234", True),
    ("torch", "2.10.2", False), ("torch", "2.15.0", False), ("torch", "3.0.0", False),
    ("triton", "3.6.0", True), ("triton", "3.8.0", True), ("triton", "3.5.1", False), ("triton", "3.9.0", False),
])
def test_untested_versions_are_named(name, version, inside):
    warning = _versions.untested(name, version)
    if inside:
        assert warning is None
    else:
        assert f"{name} {version}" in warning and "tested range" in warning


def test_unreadable_version_is_reported_not_raised():
    assert "cannot tell" in _versions.untested("torch", "nightly")
    with pytest.raises(ValueError, match="version"):
        _versions.version_tuple("nightly")


def test_info_prints_versions_and_warns_outside_the_tested_range(monkeypatch, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch        {torch.__version__} (CUDA " in out
    triton = pytest.importorskip("triton")
    assert f"triton {triton.__version__}" in out
    assert "tested       torch 2.11 to 2.14.x, triton 3.6 to 3.8.x" in out
    in_range = _versions.untested("torch", torch.__version__) is None and \
        _versions.untested("triton", triton.__version__) is None
    assert ("WARNING" not in out) == in_range

    monkeypatch.setattr(torch, "__version__", "2.10.0")
    monkeypatch.setattr(triton, "__version__", "3.9.1")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "WARNING      torch 2.10.0 is outside the tested range 2.11 to 2.14.x" in out
    assert "WARNING      triton 3.9.1 is outside the tested range 3.6 to 3.8.x" in out
