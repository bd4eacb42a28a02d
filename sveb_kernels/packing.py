"""Padded <-> packed (varlen) layout.

Trainers hold padded batches [B, T] with a response mask and a prompt (group) index per row; the
kernels work on the N valid tokens packed so that each group's tokens are contiguous, delimited by
`group_offsets` like flash-attn's cu_seqlens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks


@dataclass(frozen=True)
class Packing:
    """How the valid tokens of a padded batch are packed.

    Packed order: groups by ascending group id; within a group, rows in batch order; within a row,
    tokens in time order.

    Attributes:
        group_offsets: [G+1] int64, group g holds packed tokens group_offsets[g] .. group_offsets[g+1]-1.
        rollout_ids: [N] int32, the batch row of each packed token (one rollout per row).
        token_index: [N] int64, the flat index b*T + t of each packed token in the padded batch.
        group_ids: [G], the distinct values of `group_index`, ascending (group g is group_ids[g]).
        batch_size, seq_len: B and T of the padded batch.
    """

    group_offsets: Tensor
    rollout_ids: Tensor
    token_index: Tensor
    group_ids: Tensor
    batch_size: int
    seq_len: int

    @classmethod
    def from_padded(cls, mask: Tensor, group_index: Tensor) -> "Packing":
        """mask: [B, T] bool (or 0/1 numeric), True for tokens to pack; group_index: [B] integer prompt id per row."""
        _checks.tensor("mask", mask, ndim=2)
        if mask.dtype != torch.bool and mask.dtype not in _checks.INT_DTYPES + _checks.FLOAT_DTYPES:
            raise TypeError(f"mask must be bool or 0/1 numeric, got {mask.dtype}")
        batch, length = mask.shape
        _checks.tensor("group_index", group_index, dtypes=_checks.INT_DTYPES, shape=(batch,), device=mask.device)
        valid = mask.to(torch.bool)
        group_ids, group_of_row = torch.unique(group_index, sorted=True, return_inverse=True)
        row_order = torch.argsort(group_of_row, stable=True)
        rows, times = torch.nonzero(valid[row_order], as_tuple=True)
        batch_rows = row_order[rows]
        tokens_per_group = torch.zeros(group_ids.numel(), dtype=torch.int64, device=mask.device)
        tokens_per_group.index_add_(0, group_of_row, valid.sum(dim=1))
        group_offsets = torch.nn.functional.pad(tokens_per_group.cumsum(0), (1, 0))
        return cls(
            group_offsets=group_offsets,
            rollout_ids=batch_rows.to(torch.int32),
            token_index=batch_rows * length + times,
            group_ids=group_ids,
            batch_size=batch,
            seq_len=length,
        )

    @property
    def num_tokens(self) -> int:
        return self.token_index.numel()

    @property
    def num_groups(self) -> int:
        return self.group_offsets.numel() - 1

    def pack(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [N, ...]: the valid tokens in packed order."""
        _checks.tensor("x", x)
        if tuple(x.shape[:2]) != (self.batch_size, self.seq_len):
            raise ValueError(f"x must have shape [B={self.batch_size}, T={self.seq_len}, ...], got {list(x.shape)}")
        return x.reshape(self.batch_size * self.seq_len, *x.shape[2:])[self.token_index.to(x.device)]

    def unpack(self, y: Tensor, fill=0) -> Tensor:
        """[N, ...] -> [B, T, ...], with `fill` at the positions that were not packed."""
        _checks.tensor("y", y)
        if y.dim() < 1 or y.shape[0] != self.num_tokens:
            raise ValueError(f"y must have shape [N={self.num_tokens}, ...], got {list(y.shape)}")
        out = y.new_full((self.batch_size * self.seq_len, *y.shape[1:]), fill)
        out[self.token_index.to(y.device)] = y
        return out.view(self.batch_size, self.seq_len, *y.shape[1:])
