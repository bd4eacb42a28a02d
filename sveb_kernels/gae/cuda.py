"""GAE on the compiled extension: `torch.ops.sveb._cuda_gae` (csrc/gae.cu, kernel in
csrc/gae_kernel.cuh): one CTA per row, fp64 block scans over segments of the row.

Imported only by the backend loader, so that importing the package never loads the extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._build_info import load_extension

_module, _reason = load_extension()
if _module is None:
    raise ImportError(f"the cuda backend is unavailable: CUDA extension {_reason}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    return torch.ops.sveb._cuda_gae(rewards, values, mask, gamma, lam)
