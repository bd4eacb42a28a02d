"""What an estimator sees: a batch of rollouts as padded tensors (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .. import _checks
from ..packing import Packing

# batch -> hidden [N, D] of the batch's packed state cells (`batch.packing` order)
HiddenFn = Callable[["RolloutBatch"], Tensor]


class MissingInputError(RuntimeError):
    """An estimator needs something this batch does not have (hidden states, a tokenizer)."""


def _mask(name: str, mask: Tensor, shape: tuple) -> Tensor:
    _checks.tensor(name, mask, shape=shape)
    if mask.dtype != torch.bool and mask.dtype not in _checks.INT_DTYPES + _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be bool or 0/1 numeric, got {mask.dtype}")
    return mask.to(torch.bool)


@dataclass(frozen=True)
class Shard:
    """Marks a batch as one process's rows of a batch sharded over torch.distributed ranks, whose
    groups may span ranks. Estimators that support it (GroupMean, LeaveOneOutMean, Numca, Hista)
    then call `sveb_kernels.distributed` so the values equal those of the whole batch.

    row_ids: [B] int64, each local row's global rollout id, an index into the two below.
    all_returns: [B_all] float, the returns of all ranks' rollouts (small; trainers gather them anyway).
    all_group_index: [B_all] int, their groups.
    group: the process group (None: the world).
    """

    row_ids: Tensor
    all_returns: Tensor
    all_group_index: Tensor
    group: Any = None


class RolloutBatch:
    """Rollouts as padded tensors; row b is one rollout.

    Args:
        token_ids: [B, T] integer token ids (prompt and/or response, any padding).
        response_mask: [B, T] bool, the tokens the policy generated (Numca reads their text only).
        group_index: [B] integer, the prompt (group) each row answers; rows of a group are peers.
        returns: [B] float, each rollout's return (the outcome reward).
        state_mask: [B, T] bool, the cells whose values are wanted; default `response_mask`. The
            cell (b, t) stands for the state "prefix token_ids[b, :t+1]", the state *after* token t.
            A trainer that wants V(s_t) before each response token passes the cells one to the left
            (the last prompt token and the response tokens but the last).
        tokenizer: the Hugging Face tokenizer of the ids (Numca's default source of its vocab).
        vocab: a ready `sveb_kernels.NumericVocab` (saves building one from the tokenizer).
        hidden: [N, D] hidden states of the packed state cells, or `hidden_fn(batch)` that makes
            them on first access (so estimators that need none never pay for a forward pass).
        device: where estimators compute (default: the device of token_ids).
        shard: a `Shard` when the rows are this process's part of a batch sharded over processes
            (group_index and returns then hold global groups and this process's returns).

    `packing` is `Packing.from_padded(state_mask, group_index)`: N state cells, groups contiguous,
    the layout the Hista op takes; `packing.unpack(values[N])` gives [B, T].
    """

    def __init__(self, token_ids: Tensor, response_mask: Tensor, group_index: Tensor, returns: Tensor, *,
                 state_mask: Optional[Tensor] = None, tokenizer=None, vocab=None,
                 hidden: Optional[Tensor] = None, hidden_fn: Optional[HiddenFn] = None,
                 device: Union[torch.device, str, None] = None, shard: Optional[Shard] = None):
        _checks.tensor("token_ids", token_ids, ndim=2, dtypes=_checks.INT_DTYPES)
        shape = tuple(token_ids.shape)
        self.token_ids = token_ids
        self.response_mask = _mask("response_mask", response_mask, shape)
        self.state_mask = self.response_mask if state_mask is None else _mask("state_mask", state_mask, shape)
        _checks.tensor("group_index", group_index, dtypes=_checks.INT_DTYPES, shape=shape[:1])
        _checks.tensor("returns", returns, dtypes=_checks.FLOAT_DTYPES, shape=shape[:1])
        self.group_index = group_index
        self.returns = returns.to(torch.float32)
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.device = torch.device(device) if device is not None else token_ids.device
        self._hidden = hidden
        self._hidden_fn = hidden_fn
        self._cache: dict = {}
        self._packing: Optional[Packing] = None
        self.shard = shard

    @property
    def num_rollouts(self) -> int:
        return self.token_ids.shape[0]

    @property
    def shape(self) -> tuple:
        return tuple(self.token_ids.shape)

    @property
    def num_groups(self) -> int:
        return self.packing.num_groups

    @property
    def packing(self) -> Packing:
        if self._packing is None:
            self._packing = Packing.from_padded(self.state_mask, self.group_index)
        return self._packing

    @property
    def has_hidden(self) -> bool:
        return self._hidden is not None or self._hidden_fn is not None

    @property
    def hidden(self) -> Tensor:
        """[N, D] hidden states of the packed state cells (made on first access)."""
        if self._hidden is None:
            if self._hidden_fn is None:
                raise MissingInputError("needs hidden states: no model was given")
            hidden = self._hidden_fn(self)
            if hidden.dim() != 2 or hidden.shape[0] != self.packing.num_tokens:
                raise ValueError(f"hidden states must have shape [N={self.packing.num_tokens}, D], "
                                 f"got {list(hidden.shape)}")
            self._hidden = hidden
        return self._hidden

    def cached(self, key, make: Callable):
        """Per-batch memo for derived inputs (numeric spans, norms) shared by estimators."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def check_values(self, values, name: str = "estimator") -> Tensor:
        """An estimator's output as a detached float32 [B, T] tensor, or a clear error."""
        if not isinstance(values, Tensor):
            try:
                import numpy as np
                if isinstance(values, np.ndarray):
                    values = torch.from_numpy(values)
            except ImportError:  # pragma: no cover
                pass
        if not isinstance(values, Tensor):
            raise TypeError(f"{name} must return a Tensor or ndarray of shape {list(self.shape)}, "
                            f"got {type(values).__name__}")
        if tuple(values.shape) != self.shape:
            raise ValueError(f"{name} must return values of shape {list(self.shape)}, got {list(values.shape)}")
        return values.detach().to(torch.float32)
