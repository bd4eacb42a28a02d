"""GAE on the compiled extension's CPU kernel: `torch.ops.sveb._cpp_gae` (csrc/cpu/gae_cpu.cpp): the
trainers' recurrence in one float64 pass per row, rows in parallel.

Imported only by the backend loader, so that importing the package never loads the extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._build_info import load_extension

_module, _reason = load_extension()
if _module is None:
    raise ImportError(f"the cpp backend is unavailable: compiled extension {_reason}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    return torch.ops.sveb._cpp_gae(rewards, values, mask, gamma, lam)
