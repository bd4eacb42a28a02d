"""Numca on the compiled extension: `torch.ops.sveb._cuda_numeric_spans` (csrc/numca.cu, kernel in
csrc/numca_kernel.cuh): one thread per row walks the row's byte classes once, applying the closed-form
regex of reference.py and hashing each number as it goes. numca_values has no CUDA kernel yet.

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
