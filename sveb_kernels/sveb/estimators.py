"""State value estimators scored by SVEB.

An estimator has a `name`, an optional `fit(train_batch)` (called once with the train split) and
`estimate(batch) -> values [B, L]` aligned with `batch.input_ids` (see batch.py); only the cells of
the batch's states are scored. Any callable `fn(batch) -> [B, L]` works too (`as_estimator`).

    group_mean      GRPO's baseline: the mean return of the prompt's G rollouts, at every token
    rloo            leave-one-out mean: the mean return of the *other* rollouts of the prompt
    critic          a linear value head (ridge regression) on the model's hidden states, fit to the
                    rollouts' returns on the train split: the PPO critic's stand-in
    numca_last/prefix   Numca (docs/CONTRACT.md §2) through sveb_kernels.numca: peers that wrote the same last
                    number / the same sequence of numbers
    hista_cos/dot   Hista (docs/CONTRACT.md §1) through sveb_kernels.hista_values: returns of the other rollouts'
                    tokens weighted by hidden-state similarity, at a given temperature
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Estimator
from .batch import MissingInputError, SvebBatch
from .critic import LinearCritic

DEFAULT_TEMPERATURES = (0.01, 0.03, 0.1, 0.3, 1.0)


def _per_row(batch: SvebBatch, row_values: Tensor) -> Tensor:
    return row_values.to(torch.float32)[:, None].expand_as(batch.input_ids).clone()


def _group_sums(batch: SvebBatch) -> tuple[Tensor, Tensor]:
    sums = torch.zeros(batch.num_groups, dtype=torch.float64).index_add_(0, batch.group_index, batch.returns.double())
    counts = torch.bincount(batch.group_index, minlength=batch.num_groups).double()
    return sums, counts


class GroupMean(Estimator):
    name = "group_mean"

    def estimate(self, batch: SvebBatch) -> Tensor:
        sums, counts = _group_sums(batch)
        return _per_row(batch, (sums / counts.clamp_min(1))[batch.group_index])


class LeaveOneOutMean(Estimator):
    """Mean return of the other rollouts; `empty_value` for a prompt with a single rollout."""

    name = "rloo"

    def __init__(self, empty_value: float = 0.0):
        self.empty_value = empty_value

    def estimate(self, batch: SvebBatch) -> Tensor:
        sums, counts = _group_sums(batch)
        others = counts[batch.group_index] - 1
        loo = (sums[batch.group_index] - batch.returns.double()) / others.clamp_min(1)
        return _per_row(batch, torch.where(others > 0, loo, torch.full_like(loo, self.empty_value)))


class Hista(Estimator):
    """sveb_kernels.hista_values over the response tokens of each prompt's rollouts.

    For similarity="dot", `temperature` is in units of the mean squared hidden-state norm of the
    batch (so one grid fits models whose hidden states differ in scale by orders of magnitude);
    the temperature passed to the op is reported in `last_temperature`.
    """

    def __init__(self, similarity: str = "cosine", temperature: float = 0.1, *, backend: str = "auto",
                 equal_rollout_weight: bool = False, name: Optional[str] = None):
        self.similarity = similarity
        self.temperature = temperature
        self.backend = backend
        self.equal_rollout_weight = equal_rollout_weight
        short = {"cosine": "cos", "dot": "dot"}.get(similarity, similarity)
        self.name = name or f"hista_{short}_t{temperature:g}"
        self.last_temperature: Optional[float] = None

    def estimate(self, batch: SvebBatch) -> Tensor:
        from .. import hista_values

        hidden = batch.hidden
        device = hidden.device
        packing = batch.packing
        rollout_ids = packing.rollout_ids.to(device)
        returns = batch.returns.to(device)[rollout_ids.long()]
        temperature = self.temperature
        if self.similarity == "dot":
            mean_sq = batch.cached(("mean_sq_norm", device), lambda: float(
                torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32).pow(2).mean()))
            temperature *= max(mean_sq, 1e-12)
        self.last_temperature = temperature
        key_bias = None
        if self.equal_rollout_weight:
            lengths = torch.bincount(rollout_ids.long(), minlength=batch.num_rollouts).to(torch.float32)
            key_bias = -torch.log(lengths.clamp_min(1))[rollout_ids.long()]
        out = hista_values(hidden, returns, rollout_ids, packing.group_offsets.to(device), temperature=temperature,
                           similarity=self.similarity, key_bias=key_bias, backend=self.backend)
        return packing.unpack(out.values.cpu())


class Numca(Estimator):
    """sveb_kernels.numca over the response tokens (prompt numbers are masked out)."""

    def __init__(self, match: str = "last", *, leave_one_out: bool = True, min_support: int = 1,
                 backend: str = "auto", name: Optional[str] = None):
        self.match = match
        self.leave_one_out = leave_one_out
        self.min_support = min_support
        self.backend = backend
        self.name = name or f"numca_{match}"

    def estimate(self, batch: SvebBatch) -> Tensor:
        from ..numca import NumericVocab, numca_values, numeric_spans

        if batch.tokenizer is None:
            raise MissingInputError("needs the tokenizer: none was given (--model or --tokenizer)")
        device = batch.device
        vocab = batch.cached(("numeric_vocab", device),
                             lambda: NumericVocab.from_tokenizer(batch.tokenizer).to(device))
        mask = batch.response_mask.to(device)
        spans = batch.cached(("numeric_spans", device, self.backend), lambda: numeric_spans(
            batch.input_ids.to(device), vocab, mask=mask, backend=self.backend))
        values = numca_values(spans, batch.returns.to(device), batch.group_index.to(device), mask,
                              match=self.match, leave_one_out=self.leave_one_out, min_support=self.min_support,
                              backend=self.backend)
        return values.cpu()


class CallableEstimator(Estimator):
    def __init__(self, name: str, fn: Callable[[SvebBatch], object]):
        self.name = name
        self.fn = fn

    def estimate(self, batch: SvebBatch) -> Tensor:
        values = self.fn(batch)
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values)
        if not isinstance(values, Tensor):
            raise TypeError(f"estimator {self.name!r} must return a Tensor or ndarray [B, L], got {type(values).__name__}")
        return values.detach().cpu().to(torch.float32)


def as_estimator(obj, name: Optional[str] = None) -> Estimator:
    """An Estimator from an Estimator (instance or class) or a plain function fn(batch) -> [B, L]."""
    if isinstance(obj, type) and issubclass(obj, Estimator):
        obj = obj()
    if isinstance(obj, Estimator):
        if name:
            obj.name = name
        return obj
    if hasattr(obj, "estimate"):  # duck-typed estimator objects
        wrapped = CallableEstimator(name or getattr(obj, "name", type(obj).__name__), obj.estimate)
        if hasattr(obj, "fit"):
            wrapped.fit = obj.fit  # type: ignore[method-assign]
        wrapped.needs_train = bool(getattr(obj, "needs_train", False))
        return wrapped
    if callable(obj):
        return CallableEstimator(name or getattr(obj, "__name__", "custom"), obj)
    raise TypeError(f"cannot use {obj!r} as an estimator: need an Estimator or a callable fn(batch) -> [B, L]")


def load_object(spec: str):
    """'package.module:attr' or 'path/to/file.py:attr' -> the attribute."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py") or Path(module_name).exists():
        path = Path(module_name)
        loader_spec = importlib.util.spec_from_file_location(f"sveb_user_{path.stem}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attr!r}") from None


def default_estimators(*, temperatures: Sequence[float] = DEFAULT_TEMPERATURES, backend: str = "auto",
                       seed: int = 0) -> list[Estimator]:
    estimators: list[Estimator] = [GroupMean(), LeaveOneOutMean(), LinearCritic(seed=seed),
                                   Numca("last", backend=backend), Numca("prefix", backend=backend)]
    for similarity in ("cosine", "dot"):
        estimators += [Hista(similarity, t, backend=backend) for t in temperatures]
    return estimators
