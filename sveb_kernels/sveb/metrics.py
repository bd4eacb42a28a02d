"""How close per-state value estimates come to the truth, with group-bootstrap confidence intervals.

For estimates e and true values v at S states, each belonging to a group (a prompt):

    mse, mae          mean squared / absolute error over the states
    pearson, spearman correlation with the truth over all states (Spearman: Pearson of mid-ranks)
    within_pearson    Pearson after subtracting each group's mean (over its states) from e and from
                      v: how well the estimate orders the states *of one prompt*, the number that a
                      collapse to the group average drives to 0
    collapse_ratio    std(e - group mean of e) / std(v - group mean of v), population stds of the
                      within-group deviations: 0 for an estimator that is constant per prompt, 1 for
                      one that varies within a prompt as much as the truth does
    decision_pearson  within_pearson over the *decision states* only (a `decision` mask: the states
                      before a token whose choice changes the true value, where credit is assigned);
                      NaN when no mask is given or no state is marked

Pooled within_pearson is not a fair scale between estimator families: an estimator that leaves the
rollout's own return out (leave-one-out mean, Numca, Hista) is *lower* exactly when the rollout
succeeded, at every one of its states, while the truth is higher there, so it starts from a negative
floor (the leave-one-out mean, which knows nothing about states, scores about -0.6 on the embedded
task), and an estimator that includes the own return starts from a positive one. Score the
leave-one-out mean as the null row next to them, and read decision_pearson, where the truth varies
within a rollout and not only between rollouts.

A correlation with a side of zero variance (a constant estimator) is reported as 0: it explains
none of the variation. Confidence intervals resample whole groups with replacement (states of one
prompt are not independent) and take percentiles of the replicates; a replicate is the same
weighted computation with weights = how often each group was drawn, so the point estimate and the
replicates share one code path.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

METRICS = ("mse", "mae", "pearson", "spearman", "within_pearson", "collapse_ratio", "decision_pearson")
# Which way is better, for the table's header.
BETTER = {"mse": "lower is better", "mae": "lower is better", "pearson": "higher is better",
          "spearman": "higher is better", "within_pearson": "higher is better", "collapse_ratio": "1 = varies as truth",
          "decision_pearson": "higher is better"}
# Relative size below which a spread counts as zero (float noise of a constant estimator).
_ZERO_SPREAD = 1e-12


class _Prepared:
    """Everything about the states that does not depend on the bootstrap weights."""

    def __init__(self, est: np.ndarray, truth: np.ndarray, group: np.ndarray, decision: Optional[np.ndarray] = None):
        self.est = np.asarray(est, dtype=np.float64)
        self.truth = np.asarray(truth, dtype=np.float64)
        if self.est.shape != self.truth.shape or self.est.ndim != 1:
            raise ValueError(f"est and truth must be 1-D of one length, got {self.est.shape} and {self.truth.shape}")
        if not np.isfinite(self.est).all():
            raise ValueError("the estimates contain NaN or infinite values")
        self.groups, self.group_of = np.unique(np.asarray(group), return_inverse=True)
        self.est_within = _centre_per_group(self.est, self.group_of, len(self.groups))
        self.truth_within = _centre_per_group(self.truth, self.group_of, len(self.groups))
        self.decision_of = None  # indices of the decision states, and their own per-group centring
        if decision is not None:
            decision = np.asarray(decision)
            if decision.shape != self.est.shape or decision.dtype != np.bool_:
                raise ValueError(f"decision must be a bool mask of shape {self.est.shape}, "
                                 f"got {decision.dtype} {decision.shape}")
            self.decision_of = np.flatnonzero(decision)
            groups_d = self.group_of[self.decision_of]
            self.est_within_d = _centre_per_group(self.est[self.decision_of], groups_d, len(self.groups))
            self.truth_within_d = _centre_per_group(self.truth[self.decision_of], groups_d, len(self.groups))
        self.est_rank = _RankOrder(self.est)
        self.truth_rank = _RankOrder(self.truth)
        self.scale_est = float(np.sqrt(np.mean(self.est ** 2))) if self.est.size else 0.0
        self.scale_truth = float(np.sqrt(np.mean(self.truth ** 2))) if self.truth.size else 0.0


def _centre_per_group(x: np.ndarray, group_of: np.ndarray, num_groups: int) -> np.ndarray:
    counts = np.bincount(group_of, minlength=num_groups)
    means = np.bincount(group_of, weights=x, minlength=num_groups) / np.maximum(counts, 1)
    lo = np.full(num_groups, np.inf)
    hi = np.full(num_groups, -np.inf)
    np.minimum.at(lo, group_of, x)
    np.maximum.at(hi, group_of, x)
    centred = x - means[group_of]
    # A group whose values are all equal deviates by exactly 0, not by the rounding of its mean.
    centred[(lo == hi)[group_of]] = 0.0
    return centred


class _RankOrder:
    """Sort order and tie blocks of one vector, so weighted mid-ranks cost a cumsum per replicate."""

    def __init__(self, x: np.ndarray):
        self.order = np.argsort(x, kind="stable")
        sorted_x = x[self.order]
        starts = np.ones(len(x), dtype=bool)
        starts[1:] = sorted_x[1:] != sorted_x[:-1]
        self.block_starts = np.flatnonzero(starts)
        self.block_of_sorted = np.cumsum(starts) - 1

    def ranks(self, weights: np.ndarray) -> np.ndarray:
        """Mid-ranks [R, N] of the sample where state i appears weights[r, i] times."""
        if weights.shape[1] == 0:
            return np.zeros_like(weights)
        w_sorted = weights[:, self.order]
        block_weight = np.add.reduceat(w_sorted, self.block_starts, axis=1)
        before = np.cumsum(block_weight, axis=1) - block_weight
        mid = before + (block_weight + 1.0) / 2.0
        ranks = np.empty_like(weights)
        ranks[:, self.order] = mid[:, self.block_of_sorted]
        return ranks


def _weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray, sw: np.ndarray, scale_x: float, scale_y: float,
                   centred: bool = False) -> np.ndarray:
    """Row-wise weighted Pearson of x, y ([N] or [R, N]) with weights w [R, N]; 0 where a side is constant."""
    if not centred:
        x = x - (w * x).sum(axis=1, keepdims=True) / sw[:, None]
        y = y - (w * y).sum(axis=1, keepdims=True) / sw[:, None]
    sxy = (w * x * y).sum(axis=1)
    sxx = (w * x * x).sum(axis=1)
    syy = (w * y * y).sum(axis=1)
    flat_x = np.sqrt(sxx / sw) <= _ZERO_SPREAD * max(scale_x, 1e-300)
    flat_y = np.sqrt(syy / sw) <= _ZERO_SPREAD * max(scale_y, 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = sxy / np.sqrt(sxx * syy)
    return np.where(flat_x | flat_y, 0.0, np.clip(corr, -1.0, 1.0))


def weighted_metrics(prepared: _Prepared, group_weights: np.ndarray) -> dict[str, np.ndarray]:
    """All METRICS for each row of group_weights [R, num_groups] (how often each group is drawn)."""
    w = np.asarray(group_weights, dtype=np.float64)[:, prepared.group_of]
    sw = w.sum(axis=1)
    err = prepared.est - prepared.truth
    out = {
        "mse": (w * err * err).sum(axis=1) / sw,
        "mae": (w * np.abs(err)).sum(axis=1) / sw,
        "pearson": _weighted_corr(prepared.est[None], prepared.truth[None], w, sw,
                                  prepared.scale_est, prepared.scale_truth),
    }
    n = float(len(prepared.est)) or 1.0
    out["spearman"] = _weighted_corr(prepared.est_rank.ranks(w), prepared.truth_rank.ranks(w), w, sw, n, n)
    a, b = prepared.est_within[None], prepared.truth_within[None]
    out["within_pearson"] = _weighted_corr(a, b, w, sw, prepared.scale_est, prepared.scale_truth, centred=True)
    spread_est = (w * a * a).sum(axis=1)
    spread_truth = (w * b * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sqrt(spread_est / spread_truth)
    out["collapse_ratio"] = np.where(spread_truth > 0, ratio, np.nan)
    out["decision_pearson"] = np.full(w.shape[0], np.nan)
    if prepared.decision_of is not None and prepared.decision_of.size:
        wd = w[:, prepared.decision_of]
        swd = wd.sum(axis=1)
        drawn = swd > 0  # a resample may draw no group with a decision state
        if drawn.any():
            out["decision_pearson"][drawn] = _weighted_corr(
                prepared.est_within_d[None], prepared.truth_within_d[None], wd[drawn], swd[drawn],
                prepared.scale_est, prepared.scale_truth, centred=True)
    return out


def score(est, truth, group, *, decision=None, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
          chunk: Optional[int] = None) -> dict[str, float]:
    """METRICS of `est` against `truth` ([S] each, `group` [S] the prompt of each state, `decision`
    [S] bool the decision states or None), plus `<metric>_lo` / `<metric>_hi`: a `confidence`
    percentile interval from `bootstrap` group resamples (no interval when bootstrap == 0)."""
    prepared = _Prepared(est, truth, group, decision)
    num_groups = len(prepared.groups)
    if num_groups == 0:
        raise ValueError("no states to score")
    point = weighted_metrics(prepared, np.ones((1, num_groups)))
    result = {name: float(point[name][0]) for name in METRICS}
    if bootstrap > 0:
        replicates = bootstrap_replicates(prepared, bootstrap, seed=seed, chunk=chunk)
        tail = (1.0 - confidence) / 2.0 * 100.0
        for name in METRICS:
            values = replicates[name][np.isfinite(replicates[name])]
            lo, hi = np.percentile(values, [tail, 100.0 - tail]) if values.size else (np.nan, np.nan)
            result[f"{name}_lo"], result[f"{name}_hi"] = float(lo), float(hi)
    return result


def resample_counts(num_groups: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[replicates, num_groups]: how often each group is drawn in a resample of num_groups groups."""
    draws = rng.integers(0, num_groups, size=(replicates, num_groups))
    offsets = np.arange(replicates)[:, None] * num_groups
    return np.bincount((draws + offsets).ravel(), minlength=replicates * num_groups).reshape(replicates, num_groups)


def bootstrap_replicates(prepared: _Prepared, replicates: int, *, seed: int = 0,
                         chunk: Optional[int] = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    num_groups = len(prepared.groups)
    counts = resample_counts(num_groups, replicates, rng)
    # Bound the [chunk, S] working arrays to ~32 MiB each.
    chunk = chunk or max(1, (1 << 22) // max(1, len(prepared.est)))
    parts = [weighted_metrics(prepared, counts[r0:r0 + chunk]) for r0 in range(0, replicates, chunk)]
    return {name: np.concatenate([p[name] for p in parts]) for name in METRICS}
