"""`sveb-kernels --help` answers at once: no torch import for help text, and the help says what to do."""

import subprocess
import sys

import pytest


def _imports(*args):
    """Help text of `python -m sveb_kernels.cli ARGS`, and the modules it imported (-X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sveb_kernels.cli", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.stdout, modules


@pytest.mark.parametrize("args", [("--help",), ("bench", "--help"), ("info", "--help")])
def test_help_does_not_import_torch(args):
    text, modules = _imports(*args)
    assert "usage: sveb-kernels" in text
    assert "sveb_kernels" in modules  # the measurement sees the package's own imports
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, "help imported torch"


def test_top_level_help_explains_the_commands():
    text, _ = _imports("--help")
    for command in ("info", "bench", "sveb"):
        assert command in text
    assert "sveb-kernels bench --quick" in text and "docs/CONTRACT.md" in text


def test_bench_help_documents_every_option():
    text, _ = _imports("bench", "--help")
    assert "timed calls per implementation" in text  # --repeats
    assert "load average" in text  # how --threads is chosen by default
    assert ".cache/sveb_kernels" in text  # where --csv goes by default


def test_subcommands_still_run_after_deferred_imports():
    proc = subprocess.run([sys.executable, "-m", "sveb_kernels.cli", "info"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hista_values" in proc.stdout and "gae" in proc.stdout
