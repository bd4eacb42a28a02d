"""The learned critic: a linear value head on hidden states, fit by ridge regression to returns.

Everything is streamed over row chunks in float64 (feature sums, the D x D Gram matrix), so the
train split's hidden states are never copied whole: memory is O(chunk * D + D^2) whatever N is.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Estimator
from .batch import RolloutBatch

CHUNK_ROWS = 8192


class _Moments:
    """Sums over rows of standardised features z [*, D] and targets y: enough for ridge and its error."""

    def __init__(self, d: int):
        self.n = 0
        self.sz = torch.zeros(d, dtype=torch.float64)
        self.szz = torch.zeros(d, d, dtype=torch.float64)
        self.szy = torch.zeros(d, dtype=torch.float64)
        self.sy = 0.0
        self.syy = 0.0

    def add(self, z: Tensor, y: Tensor) -> None:
        self.n += z.shape[0]
        self.sz += z.sum(dim=0)
        self.szz += z.T @ z
        self.szy += z.T @ y
        self.sy += float(y.sum())
        self.syy += float(y @ y)

    def __add__(self, other: "_Moments") -> "_Moments":
        out = _Moments(self.sz.numel())
        for name in ("n", "sz", "szz", "szy", "sy", "syy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def squared_error(self, w: Tensor, c: float) -> float:
        """sum over the rows of (z . w + c - y)^2."""
        return float(w @ self.szz @ w + 2 * c * (w @ self.sz) - 2 * (w @ self.szy) + self.n * c * c
                     - 2 * c * self.sy + self.syy)


def _ridge_family(m: _Moments):
    """ridge(strength) -> (w, c), all strengths sharing one eigendecomposition of the centred Gram
    matrix; `strength` is in units of its mean eigenvalue, so the grid is scale free."""
    z_mean, y_mean = m.sz / m.n, m.sy / m.n
    gram = m.szz - m.n * torch.outer(z_mean, z_mean)
    cross = m.szy - m.n * z_mean * y_mean
    eigval, eigvec = torch.linalg.eigh(gram)
    eigval = eigval.clamp_min(0)
    proj = eigvec.T @ cross
    unit = float(eigval.mean()) or 1.0

    def ridge(strength: float) -> tuple[Tensor, float]:
        w = eigvec @ (proj / (eigval + strength * unit))
        return w, float(y_mean - z_mean @ w)

    return ridge


class LinearCritic(Estimator):
    """Ridge regression from standardised hidden states to the rollout's return, per token.

    The ridge strength is chosen from `ridge_grid` on a held-out share of the train *groups*, then
    the head is refit on the whole train split. A PPO critic regresses the same target (the
    Monte-Carlo return, gamma = lambda = 1) from the same features with gradient steps.
    """

    name = "critic"
    needs_train = True

    def __init__(self, ridge_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), holdout: float = 0.2,
                 seed: int = 0):
        self.ridge_grid = tuple(ridge_grid)
        self.holdout = holdout
        self.seed = seed
        self.ridge: Optional[float] = None
        self.held_out_mse: dict[float, float] = {}

    def _held_groups(self, num_groups: int) -> Tensor:
        held = torch.from_numpy(np.random.default_rng(self.seed).random(num_groups) < self.holdout)
        if num_groups >= 2 and (held.all() or not held.any()):
            held = torch.zeros(num_groups, dtype=torch.bool)
            held[: max(1, num_groups // 5)] = True
        return held

    def fit(self, train: RolloutBatch) -> None:
        hidden = train.hidden.detach()
        n, d = hidden.shape
        rollout = train.packing.rollout_ids.long()
        y = train.returns.double()[rollout]
        _, group_slot = torch.unique(train.group_index.cpu(), return_inverse=True)
        held = self._held_groups(train.num_groups)[group_slot[rollout.cpu()]]
        total = torch.zeros(d, dtype=torch.float64)
        total_sq = torch.zeros(d, dtype=torch.float64)
        for r0 in range(0, n, CHUNK_ROWS):
            x = hidden[r0:r0 + CHUNK_ROWS].to("cpu", torch.float64)
            total += x.sum(dim=0)
            total_sq += (x * x).sum(dim=0)
        self.mean = total / max(n, 1)
        self.std = (total_sq / max(n, 1) - self.mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
        fit_part, held_part = _Moments(d), _Moments(d)
        for r0 in range(0, n, CHUNK_ROWS):
            z = self._standardise(hidden[r0:r0 + CHUNK_ROWS])
            h, t = held[r0:r0 + CHUNK_ROWS], y[r0:r0 + CHUNK_ROWS]
            fit_part.add(z[~h], t[~h])
            held_part.add(z[h], t[h])
        if fit_part.n and held_part.n:
            ridge = _ridge_family(fit_part)
            self.held_out_mse = {s: held_part.squared_error(*ridge(s)) / held_part.n for s in self.ridge_grid}
            self.ridge = min(self.ridge_grid, key=self.held_out_mse.__getitem__)
        else:
            self.ridge = self.ridge_grid[len(self.ridge_grid) // 2]
        self.weights, self.bias = _ridge_family(fit_part + held_part)(self.ridge)

    def _standardise(self, x: Tensor) -> Tensor:
        return (x.to("cpu", torch.float64) - self.mean) / self.std

    def estimate(self, batch: RolloutBatch) -> Tensor:
        if self.ridge is None:
            raise RuntimeError("the critic must be fit on a train split first")
        hidden = batch.hidden.detach()
        values = torch.cat([self._standardise(hidden[r0:r0 + CHUNK_ROWS]) @ self.weights + self.bias
                            for r0 in range(0, hidden.shape[0], CHUNK_ROWS)] or [torch.zeros(0, dtype=torch.float64)])
        return batch.packing.unpack(values.to(torch.float32))
