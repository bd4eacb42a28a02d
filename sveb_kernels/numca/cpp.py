"""Numca on the compiled extension's CPU kernels (csrc/cpu/numca_cpu.cpp): `torch.ops.sveb._cpp_numeric_spans`
walks each row once with the grammar shared by every backend (one table lookup per digit-free token),
and `torch.ops.sveb._cpp_numca_values` finds each number's supporting peers by binary search over the
group's sorted (key, rollout) pairs (match="last") or by common key prefixes (match="prefix").

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


def numeric_spans(token_ids: Tensor, table: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.ops.sveb._cpp_numeric_spans(token_ids, table, mask)


def numca_values(end: Tensor, key: Tensor, returns: Tensor, group_index: Tensor, mask: Tensor, match: str,
                 leave_one_out: bool, min_support: int, empty_value: float) -> Tensor:
    return torch.ops.sveb._cpp_numca_values(end, key, returns, group_index, mask, match, leave_one_out,
                                            min_support, empty_value)
