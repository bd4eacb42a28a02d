"""Numca on the compiled extension: `torch.ops.sveb._cuda_numeric_spans` (csrc/numca.cu, kernel in
csrc/numca_kernel.cuh): one CTA per row scans the row's byte-class automata in chunks of 256 tokens
(associative scans, as the Triton kernel does), applies the closed-form regex of reference.py in each
token holding digits, and hashes each number from its start; and `torch.ops.sveb._cuda_numca_values`
(csrc/numca_values.cu, kernel in csrc/numca_values_kernel.cuh): one CTA per row, threads over its
tokens, each number walking the row's peers as the Triton kernel does.

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


def numeric_spans(token_ids: Tensor, table: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.ops.sveb._cuda_numeric_spans(token_ids, table, mask)


def numca_values(end: Tensor, key: Tensor, returns: Tensor, group_index: Tensor, mask: Tensor, match: str,
                 leave_one_out: bool, min_support: int, empty_value: float) -> Tensor:
    return torch.ops.sveb._cuda_numca_values(end, key, returns, group_index, mask, match, leave_one_out,
                                             min_support, empty_value)
