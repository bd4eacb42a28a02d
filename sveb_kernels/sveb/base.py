"""The estimator interface (estimators.py has the built-in ones)."""

from __future__ import annotations

from torch import Tensor

from .batch import SvebBatch


class Estimator:
    """`name`; `fit(train_batch)`, called with the train split when there is one; `estimate(batch)`
    -> values [B, L] aligned with batch.input_ids. `needs_train`: skip (with a reason) without a
    train split instead of estimating untrained."""

    name = "estimator"
    needs_train = False

    def fit(self, train: SvebBatch) -> None:  # most estimators need no training
        pass

    def estimate(self, batch: SvebBatch) -> Tensor:
        raise NotImplementedError
