"""SVEB's batch: the rollouts of some groups as a `sveb_kernels.estimators.RolloutBatch` (the
estimator interface trainers use too), plus the states' true values.

Layout: row b of the [B, L] tensors is one rollout, prompt then response then padding (right
padded); `response_mask` marks the response tokens, which are also the state cells (the state at
response position t is the prefix through token t); `group_index` the prompt each row answers.
An estimator returns values [B, L]; only the states' cells are scored. `hidden` is packed like
`sveb_kernels.Packing.from_padded(response_mask, group_index)`: [N, D] for the N response tokens,
groups contiguous, which is the layout the Hista op takes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..estimators.batch import MissingInputError, RolloutBatch
from ..packing import Packing
from .data import Group

# (input_ids [B, L], attention_mask [B, L], packing) -> hidden [N, D] of the packed response tokens
HiddenFn = Callable[[Tensor, Tensor, Packing], Tensor]

__all__ = ["HiddenFn", "MissingInputError", "SvebBatch"]


class SvebBatch(RolloutBatch):
    """Rollouts of `groups` as tensors (on CPU; `device` is where estimators should compute).

    Attributes (all [B, ...] rows are rollouts in group order):
        input_ids [B, L] int64, attention_mask [B, L] bool, response_mask [B, L] bool,
        prompt_lengths [B] int64, group_index [B] int64 (0..G-1), returns [B] float32,
        state_row / state_col [S] int64 (the cell of each state), state_value [S] float64,
        state_samples [S] int64, state_group [S] int64, state_position [S] int64 (t in the response).
        groups: the Group records; tokenizer: the HF tokenizer (or None); packing: response-token packing.
    """

    def __init__(self, groups: Sequence[Group], *, pad_id: int = 0, tokenizer=None,
                 hidden_fn: Optional[HiddenFn] = None, device: torch.device | str = "cpu"):
        self.groups = list(groups)
        rows = [(gi, g, r) for gi, g in enumerate(self.groups) for r in g.rollouts]
        length = max((len(g.prompt_ids) + len(r.response_ids) for _, g, r in rows), default=0)
        b = len(rows)
        input_ids = torch.full((b, length), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros(b, length, dtype=torch.bool)
        response_mask = torch.zeros(b, length, dtype=torch.bool)
        prompt_lengths = torch.zeros(b, dtype=torch.int64)
        group_index = torch.zeros(b, dtype=torch.int64)
        returns = torch.zeros(b, dtype=torch.float32)
        state_row, state_col, state_value, state_samples, state_position = [], [], [], [], []
        for row, (gi, g, r) in enumerate(rows):
            p, n = len(g.prompt_ids), len(r.response_ids)
            input_ids[row, :p] = torch.tensor(g.prompt_ids, dtype=torch.int64)
            input_ids[row, p:p + n] = torch.tensor(r.response_ids, dtype=torch.int64)
            attention_mask[row, :p + n] = True
            response_mask[row, p:p + n] = True
            prompt_lengths[row] = p
            group_index[row] = gi
            returns[row] = r.reward
            state_row += [row] * len(r.states.position)
            state_col += [p + t for t in r.states.position]
            state_position += r.states.position
            state_value += r.states.value
            state_samples += r.states.samples
        self.state_row = torch.tensor(state_row, dtype=torch.int64)
        self.state_col = torch.tensor(state_col, dtype=torch.int64)
        self.state_position = torch.tensor(state_position, dtype=torch.int64)
        self.state_value = torch.tensor(state_value, dtype=torch.float64)
        self.state_samples = torch.tensor(state_samples, dtype=torch.int64)
        wrapped = None
        if hidden_fn is not None:
            wrapped = lambda batch: hidden_fn(batch.input_ids, batch.attention_mask, batch.packing)
        super().__init__(input_ids, response_mask, group_index, returns, tokenizer=tokenizer, hidden_fn=wrapped,
                         device=device)
        self.input_ids = input_ids  # the same tensor as token_ids (SVEB's name)
        self.attention_mask = attention_mask
        self.prompt_lengths = prompt_lengths
        self.state_group = group_index[self.state_row]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def at_states(self, values: Tensor) -> Tensor:
        """values [B, L] -> [S] float64 at the states' cells."""
        if tuple(values.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"an estimator must return values of shape {list(self.input_ids.shape)}, "
                             f"got {list(values.shape)}")
        return values.detach().cpu().to(torch.float64)[self.state_row, self.state_col]
