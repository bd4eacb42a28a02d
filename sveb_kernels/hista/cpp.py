"""Hista on the compiled extension's CPU kernel: `torch.ops.sveb._cpp_hista_values`
(csrc/cpu/hista_cpu.cpp): per group, blocks of queries against the group's keys through the BLAS GEMM
into a bounded buffer, with a fused online-softmax epilogue; O(N*D) memory.

Imported only by the backend loader, so that importing the package never loads the extension.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._build_info import load_extension

_module, _reason = load_extension()
if _module is None:
    raise ImportError(f"the cpp backend is unavailable: compiled extension {_reason}")


def hista_values(hidden: Tensor, returns: Tensor, rollout_ids: Tensor, group_offsets: Tensor, temperature: float,
                 similarity: str, key_mask: Optional[Tensor], key_bias: Optional[Tensor],
                 empty_value: float) -> tuple[Tensor, Tensor]:
    return torch.ops.sveb._cpp_hista_values(hidden, returns, rollout_ids, group_offsets, temperature, similarity,
                                            key_mask, key_bias, empty_value)
