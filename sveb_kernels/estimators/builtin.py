"""The built-in estimators: group mean, leave-one-out mean, Numca, Hista."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Estimator
from .batch import MissingInputError, RolloutBatch


def _per_row(batch: RolloutBatch, row_values: Tensor) -> Tensor:
    return row_values.to(torch.float32)[:, None].expand(batch.shape).clone()


def _peer_mean(returns: Tensor, group_index: Tensor, leave_one_out: bool, empty_value: float) -> Tensor:
    _, slot = torch.unique(group_index, return_inverse=True)
    slot = slot.to(returns.device)
    groups = int(slot.max()) + 1 if slot.numel() else 0
    returns = returns.to(torch.float64)
    sums = torch.zeros(groups, dtype=torch.float64, device=returns.device).index_add_(0, slot, returns)
    counts = torch.bincount(slot, minlength=groups).to(torch.float64)
    if leave_one_out:
        peers, total = counts[slot] - 1, sums[slot] - returns
    else:
        peers, total = counts[slot], sums[slot]
    return torch.where(peers > 0, total / peers.clamp_min(1), torch.full_like(total, empty_value))


def peer_mean(batch: RolloutBatch, *, leave_one_out: bool, empty_value: float = 0.0) -> Tensor:
    """[B] float64: the mean return of each row's peers (its group, without itself when
    `leave_one_out`), `empty_value` for a row without peers. Over all ranks for a sharded batch."""
    if batch.shard is not None:
        shard = batch.shard
        every = _peer_mean(shard.all_returns, shard.all_group_index, leave_one_out, empty_value)
        return every[shard.row_ids.to(every.device)].to(batch.returns.device)
    return _peer_mean(batch.returns, batch.group_index, leave_one_out, empty_value)


class GroupMean(Estimator):
    """GRPO's baseline: the mean return of the prompt's rollouts, at every token."""

    name = "group_mean"

    def estimate(self, batch: RolloutBatch) -> Tensor:
        return _per_row(batch, peer_mean(batch, leave_one_out=False)).to(batch.device)


class LeaveOneOutMean(Estimator):
    """RLOO's baseline: the mean return of the *other* rollouts of the prompt; `empty_value` for a
    prompt with a single rollout."""

    name = "rloo"

    def __init__(self, empty_value: float = 0.0):
        self.empty_value = empty_value

    def estimate(self, batch: RolloutBatch) -> Tensor:
        return _per_row(batch, peer_mean(batch, leave_one_out=True, empty_value=self.empty_value)).to(batch.device)


class Hista(Estimator):
    """`sveb_kernels.hista_values` over the batch's state cells: the returns of the other rollouts'
    states of the prompt, weighted by hidden-state similarity (docs/CONTRACT.md §1).

    For similarity="dot", `temperature` is in units of the mean squared hidden-state norm of the
    batch (so one setting fits models whose hidden states differ in scale by orders of magnitude);
    the temperature passed to the op is kept in `last_temperature`. `equal_rollout_weight` weights
    every other rollout equally (key bias -log of its length) instead of every token.
    """

    def __init__(self, similarity: str = "cosine", temperature: float = 0.1, *, backend: str = "auto",
                 equal_rollout_weight: bool = False, empty_value: float = 0.0, name: Optional[str] = None):
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        self.similarity = similarity
        self.temperature = temperature
        self.backend = backend
        self.equal_rollout_weight = equal_rollout_weight
        self.empty_value = empty_value
        short = {"cosine": "cos", "dot": "dot"}[similarity]
        self.name = name or f"hista_{short}_t{temperature:g}"
        self.last_temperature: Optional[float] = None

    def op_arguments(self, batch: RolloutBatch) -> dict:
        """The arguments of `hista_values` for this batch (also what the distributed version takes)."""
        # Values are targets (advantages R - V): no gradient may flow back into the policy's states.
        hidden = batch.hidden.detach()
        device = hidden.device
        packing = batch.packing
        rollout_ids = packing.rollout_ids.to(device)
        returns = batch.returns.detach().to(device)[rollout_ids.long()]
        temperature = float(self.temperature)
        if self.similarity == "dot":
            mean_sq = batch.cached(("mean_sq_norm", device), lambda: _mean_sq_norm(hidden, batch.shard))
            temperature *= max(mean_sq, 1e-12)
        self.last_temperature = temperature
        key_bias = None
        if self.equal_rollout_weight:
            lengths = torch.bincount(rollout_ids.long(), minlength=batch.num_rollouts).to(torch.float32)
            key_bias = -torch.log(lengths.clamp_min(1))[rollout_ids.long()]
        return dict(hidden=hidden, returns=returns, rollout_ids=rollout_ids, temperature=temperature,
                    similarity=self.similarity, key_bias=key_bias, empty_value=self.empty_value,
                    backend=self.backend)

    def estimate(self, batch: RolloutBatch) -> Tensor:
        args = self.op_arguments(batch)
        hidden = args.pop("hidden")
        packing = batch.packing
        if batch.shard is None:
            from .. import hista_values

            out = hista_values(hidden, args.pop("returns"), args.pop("rollout_ids"),
                               packing.group_offsets.to(hidden.device), **args)
        else:  # groups may span ranks: regroup tokens, never gather all hidden states
            from ..distributed import hista_values as sharded_hista_values

            rows = args.pop("rollout_ids").long()
            out = sharded_hista_values(hidden, args.pop("returns"), batch.shard.row_ids.to(hidden.device)[rows],
                                       batch.group_index.to(hidden.device)[rows], group=batch.shard.group, **args)
        return packing.unpack(out.values.to(packing.token_index.device)).to(batch.device)


def _mean_sq_norm(hidden: Tensor, shard) -> float:
    sq = torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32).pow(2)
    total = torch.stack([sq.sum().double(), torch.tensor(float(sq.numel()), dtype=torch.float64, device=sq.device)])
    if shard is not None:
        import torch.distributed as dist

        from ..distributed import _comm

        total = total.to(_comm.device(shard.group))
        dist.all_reduce(total, group=shard.group)
    return float(total[0] / total[1]) if float(total[1]) else 1.0


class Numca(Estimator):
    """`sveb_kernels.numca_values` over the response tokens (prompt numbers are masked out):
    the mean return of the peers that wrote the same last number (`match="last"`) or the same
    sequence of numbers (`match="prefix"`) so far (docs/CONTRACT.md §2).

    The vocab is `vocab`, else the batch's, else built once from `tokenizer` (or the batch's
    tokenizer) and kept. A state cell outside the response (a trainer's cell before the first
    response token) gets the value before any number: the peers' mean return.
    """

    def __init__(self, match: str = "last", *, leave_one_out: bool = True, min_support: int = 1,
                 empty_value: float = 0.0, vocab=None, tokenizer=None, backend: str = "auto",
                 name: Optional[str] = None):
        if match not in ("last", "prefix"):
            raise ValueError(f"match must be 'last' or 'prefix', got {match!r}")
        self.match = match
        self.leave_one_out = leave_one_out
        self.min_support = min_support
        self.empty_value = empty_value
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.backend = backend
        self.name = name or f"numca_{match}"
        self._vocabs: dict = {}

    def vocab_for(self, batch: RolloutBatch):
        from ..numca import NumericVocab

        device = batch.device
        source = self.vocab if self.vocab is not None else batch.vocab
        if source is not None:
            return source.to(device)
        tokenizer = self.tokenizer if self.tokenizer is not None else batch.tokenizer
        if tokenizer is None:
            raise MissingInputError("Numca needs the tokenizer (or a NumericVocab): none was given")
        key = (id(tokenizer), str(device))
        if key not in self._vocabs:
            self._vocabs = {key: NumericVocab.from_tokenizer(tokenizer).to(device)}
        return self._vocabs[key]

    def spans(self, batch: RolloutBatch):
        """numeric_spans of the batch's response tokens (memoised on the batch)."""
        from ..numca import numeric_spans

        device = batch.device
        vocab = self.vocab_for(batch)
        return batch.cached(("numeric_spans", device, self.backend, id(vocab)), lambda: numeric_spans(
            batch.token_ids.to(device), vocab, mask=batch.response_mask.to(device), backend=self.backend))

    def estimate(self, batch: RolloutBatch) -> Tensor:
        if batch.shard is None:
            from ..numca import numca_values
        else:  # groups may span ranks: ranks exchange milestone keys and returns
            import functools

            from ..distributed import numca_values as sharded_numca_values

            numca_values = functools.partial(sharded_numca_values, group=batch.shard.group)
        device = batch.device
        mask = batch.response_mask.to(device)
        values = numca_values(self.spans(batch), batch.returns.to(device), batch.group_index.to(device), mask,
                              match=self.match, leave_one_out=self.leave_one_out, min_support=self.min_support,
                              empty_value=self.empty_value, backend=self.backend)
        return self.fill_before_response(batch, values)

    def fill_before_response(self, batch: RolloutBatch, values: Tensor) -> Tensor:
        """Give a state cell outside the response the value at the row's last response token before
        it (a hole in the response, e.g. a tool's output, adds no milestone), or before any: the
        value before any number."""
        response = batch.response_mask.to(values.device)
        outside = batch.state_mask.to(values.device) & ~response
        if not bool(outside.any()):
            return values
        before = peer_mean(batch, leave_one_out=self.leave_one_out, empty_value=self.empty_value)
        columns = torch.arange(values.shape[1], device=values.device).expand(values.shape)
        last = torch.where(response, columns, -1).cummax(dim=1).values
        carried = torch.where(last >= 0, values.gather(1, last.clamp_min(0)),
                              before.to(values.device, torch.float32)[:, None])
        return torch.where(outside, carried, values)
