"""Hista on the compiled extension: `torch.ops.sveb._cuda_hista_values` (csrc/hista.cu, kernels in
csrc/hista_kernel.cuh). bf16/fp16 run on tensor cores (mma.sync, fp32 accumulation); fp32 (and fp64,
computed in fp32) on fp32 FMA, because TF32 cannot meet the fp32 accuracy contract.

Imported only by the backend loader, so that importing the package never loads the extension.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._build_info import load_extension

_module, _reason = load_extension()
if _module is None:
    raise ImportError(f"the cuda backend is unavailable: CUDA extension {_reason}")


def hista_values(hidden: Tensor, returns: Tensor, rollout_ids: Tensor, group_offsets: Tensor, temperature: float,
                 similarity: str, key_mask: Optional[Tensor], key_bias: Optional[Tensor],
                 empty_value: float) -> tuple[Tensor, Tensor]:
    return torch.ops.sveb._cuda_hista_values(hidden, returns, rollout_ids, group_offsets, temperature, similarity,
                                             key_mask, key_bias, empty_value)
