"""The torch and Triton versions this package is tested with, in one place.

CI (.ci/run) runs the whole test suite at both ends of each range: the newest installable pair and
the oldest (torch 2.11 with Triton 3.6, what the lent GPU machines and many RL trainers run).
pyproject.toml declares the same torch range (tests/test_versions.py checks that they agree);
`sveb-kernels info` warns outside them. Kernel choices that differ between Triton versions (e.g.
Hista's tile shapes, hista/triton.py `config_for`) read `triton_version()`.
"""

from __future__ import annotations

import re
from typing import Optional

# (oldest, newest) major.minor, both ends inclusive; any patch release of them.
TORCH_TESTED = ((2, 11), (2, 14))
TRITON_TESTED = ((3, 6), (3, 8))


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.14.1+cu130" or "3.6.0"."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"version: cannot read major.minor from {version!r}")
    return int(match.group(1)), int(match.group(2))


def _label(tested: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = tested
    return f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}.x"


def tested_ranges() -> str:
    return f"torch {_label(TORCH_TESTED)}, triton {_label(TRITON_TESTED)}"


def untested(name: str, version: Optional[str]) -> Optional[str]:
    """A warning if `version` of `name` ("torch" or "triton") lies outside the tested range, else None."""
    if version is None:
        return None
    tested = {"torch": TORCH_TESTED, "triton": TRITON_TESTED}[name]
    try:
        have = version_tuple(version)
    except ValueError:
        return f"cannot tell whether {name} {version} is in the tested range {_label(tested)}"
    if tested[0] <= have <= tested[1]:
        return None
    return f"{name} {version} is outside the tested range {_label(tested)}; results are not checked for it"


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton (imports it: callers are Triton backends)."""
    import triton

    return version_tuple(triton.__version__)
