"""What an estimator sees: the rollouts of some groups as padded tensors, their states, and (on
first use) the model's hidden states of the response tokens.

Layout: row b of the [B, L] tensors is one rollout, prompt then response then padding (right
padded); `response_mask` marks the response tokens, `group_index` the prompt each row answers.
An estimator returns values [B, L]; only the states' cells are read. `hidden` is packed like
`sveb_kernels.Packing.from_padded(response_mask, group_index)`: [N, D] for the N response tokens,
groups contiguous, which is the layout the Hista op takes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..packing import Packing
from .data import Group

# (input_ids [B, L], attention_mask [B, L], packing) -> hidden [N, D] of the packed response tokens
HiddenFn = Callable[[Tensor, Tensor, Packing], Tensor]


class MissingInputError(RuntimeError):
    """An estimator needs something this run does not have (hidden states without a model, a tokenizer)."""


class SvebBatch:
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
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._hidden_fn = hidden_fn
        self._hidden: Optional[Tensor] = None
        self._cache: dict = {}
        rows = [(gi, g, r) for gi, g in enumerate(self.groups) for r in g.rollouts]
        length = max((len(g.prompt_ids) + len(r.response_ids) for _, g, r in rows), default=0)
        b = len(rows)
        self.input_ids = torch.full((b, length), pad_id, dtype=torch.int64)
        self.attention_mask = torch.zeros(b, length, dtype=torch.bool)
        self.response_mask = torch.zeros(b, length, dtype=torch.bool)
        self.prompt_lengths = torch.zeros(b, dtype=torch.int64)
        self.group_index = torch.zeros(b, dtype=torch.int64)
        self.returns = torch.zeros(b, dtype=torch.float32)
        state_row, state_col, state_value, state_samples, state_position = [], [], [], [], []
        for row, (gi, g, r) in enumerate(rows):
            p, n = len(g.prompt_ids), len(r.response_ids)
            self.input_ids[row, :p] = torch.tensor(g.prompt_ids, dtype=torch.int64)
            self.input_ids[row, p:p + n] = torch.tensor(r.response_ids, dtype=torch.int64)
            self.attention_mask[row, :p + n] = True
            self.response_mask[row, p:p + n] = True
            self.prompt_lengths[row] = p
            self.group_index[row] = gi
            self.returns[row] = r.reward
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
        self.state_group = self.group_index[self.state_row]
        self.packing = Packing.from_padded(self.response_mask, self.group_index)

    @property
    def num_rollouts(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def has_hidden(self) -> bool:
        return self._hidden is not None or self._hidden_fn is not None

    @property
    def hidden(self) -> Tensor:
        """[N, D] hidden states of the packed response tokens (computed on first access)."""
        if self._hidden is None:
            if self._hidden_fn is None:
                raise MissingInputError("needs hidden states: no model was given (--model)")
            self._hidden = self._hidden_fn(self.input_ids, self.attention_mask, self.packing)
        return self._hidden

    def cached(self, key, make: Callable):
        """Per-batch memo for derived inputs (a numeric vocab, spans) shared by estimators."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def at_states(self, values: Tensor) -> Tensor:
        """values [B, L] -> [S] float64 at the states' cells."""
        if tuple(values.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"an estimator must return values of shape {list(self.input_ids.shape)}, "
                             f"got {list(values.shape)}")
        return values.detach().cpu().to(torch.float64)[self.state_row, self.state_col]
