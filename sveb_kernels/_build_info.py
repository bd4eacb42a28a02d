"""What the compiled extension `sveb_kernels._C` (the cpp kernels, and the cuda ones when built with
CUDA) was built against, and whether it is safe to load.

A torch extension built against one torch release may crash (not merely fail to import) under
another, so setup.py records the torch it compiled against and we refuse to load on a mismatch.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

_BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_C_build.json")


def built_against() -> Optional[dict]:
    """The setup.py record (torch, torch_cuda, cuda: whether CUDA kernels are in it, nvcc, archs), or None
    when no extension was built."""
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _release(version: str) -> str:
    return version.split("+")[0]


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[Optional[ModuleType], str]:
    """Imports `sveb_kernels._C` if it was built for this torch. Returns (module or None, why)."""
    info = built_against()
    if info is None:
        return None, ("not built (pip install builds it with a C++ compiler and torch present, unless "
                      "SVEB_SKIP_EXTENSION=1; its CUDA kernels also need a CUDA toolkit)")
    if _release(info.get("torch", "")) != _release(torch.__version__) or info.get("torch_cuda") != torch.version.cuda:
        reason = (
            f"built against torch {info.get('torch')} (CUDA {info.get('torch_cuda')}) but running torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}); reinstall sveb_kernels to rebuild it"
        )
        warnings.warn(f"sveb_kernels: compiled extension not loaded: {reason}; using the other backends", stacklevel=2)
        return None, reason
    try:
        module = importlib.import_module("sveb_kernels._C")
    except ImportError as e:  # e.g. built but the .so was removed, or a driver library is missing
        return None, f"import failed: {e}"
    return module, "loaded"
