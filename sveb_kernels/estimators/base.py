"""The Estimator base class, callables as estimators, and `as_estimator`."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .batch import RolloutBatch


class Estimator:
    """A state value estimator.

    `name`; `fit(train_batch)`, called by SVEB with the train split when there is one (most
    estimators need no training); `estimate(batch) -> [B, T]` float32 values, read at the batch's
    `state_mask` cells (anything elsewhere is ignored). `needs_train`: SVEB skips the estimator
    (with a reason) without a train split instead of estimating untrained.
    """

    name = "estimator"
    needs_train = False

    def fit(self, train: RolloutBatch) -> None:
        pass

    def estimate(self, batch: RolloutBatch) -> Tensor:
        raise NotImplementedError

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return self.estimate(batch)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class CallableEstimator(Estimator):
    """A plain function fn(batch) -> values [B, T] (Tensor or ndarray) as an Estimator."""

    def __init__(self, name: str, fn: Callable[[RolloutBatch], object]):
        self.name = name
        self.fn = fn

    def estimate(self, batch: RolloutBatch) -> Tensor:
        return batch.check_values(self.fn(batch), f"estimator {self.name!r}").to(batch.device)


def as_estimator(obj, name: Optional[str] = None) -> Estimator:
    """An Estimator from an Estimator (instance or class), an object with `estimate(batch)` (and
    optionally `fit`, `needs_train`), or a plain function fn(batch) -> [B, T]."""
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
    raise TypeError(f"cannot use {obj!r} as an estimator: need an Estimator or a callable fn(batch) -> [B, T]")
