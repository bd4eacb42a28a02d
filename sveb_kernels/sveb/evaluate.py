"""Scoring estimators on a dataset: fit on the train split, estimate on the eval split, compare the
estimates at the eval states with the true values."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .batch import HiddenFn, MissingInputError, SvebBatch
from .data import Dataset
from .estimators import as_estimator
from .metrics import BETTER, METRICS, score


@dataclass
class EvalResult:
    """metrics[name][metric] (see metrics.py), the per-state estimates behind them, and run facts."""

    metrics: dict[str, dict[str, float]]
    estimates: dict[str, np.ndarray]
    batch: SvebBatch
    meta: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return _finite_or_none({"estimators": self.metrics, "skipped": self.skipped, "meta": self.meta})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def table(self) -> str:
        names = list(self.metrics)
        width = max([len("estimator")] + [len(n) for n in names])
        header = f"{'estimator'.ljust(width)}  " + "  ".join(m.rjust(22) for m in METRICS)
        better = f"{''.ljust(width)}  " + "  ".join(f"({BETTER[m]})".rjust(22) for m in METRICS)
        lines = [header, better, "-" * len(header)]
        for name in names:
            cells = []
            for m in METRICS:
                row = self.metrics[name]
                v, lo, hi = row.get(m, math.nan), row.get(f"{m}_lo"), row.get(f"{m}_hi")
                cell = f"{v:.3f}" + ("" if lo is None else f" [{lo:.3f},{hi:.3f}]")
                cells.append(cell.rjust(22))
            lines.append(f"{name.ljust(width)}  " + "  ".join(cells))
        for name, why in self.skipped.items():
            lines.append(f"{name.ljust(width)}  skipped: {why}")
        facts = ", ".join(f"{k}={self.meta[k]}" for k in ("eval_groups", "eval_rollouts", "eval_states",
                                                          "decision_states", "bootstrap")
                          if k in self.meta)
        notes = ["collapse_ratio: 0 = constant within each prompt (no per-state signal), 1 = spreads within a "
                 "prompt as much as the true values; [lo,hi] = 95% group-bootstrap interval",
                 "decision_pearson: within_pearson at the decision states only (before a token that changes the "
                 "true value)"]
        if "rloo" in self.metrics:
            notes.append("rloo (the leave-one-out mean) is the null row: it knows nothing about states, yet its "
                         "pooled within_pearson is negative by construction; compare leave-one-out estimators "
                         "(Numca, Hista) with it, not with 0 (docs/SVEB.md)")
        notes += self.identical_rows_notes()
        return "\n".join(lines + ["", facts] + notes)

    def identical_rows_notes(self) -> list[str]:
        """Why two rows can show the same numbers (explained for Hista's cosine and dot)."""
        def same(x: dict, y: dict) -> bool:  # equal up to the last digit the table shows
            def close(a: float, b: float) -> bool:  # both undefined (e.g. no decision states) counts as equal
                return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1.5e-3

            return all(close(x.get(m, math.nan), y.get(m, math.nan)) for m in METRICS)

        groups: list[list[str]] = []
        for name, row in self.metrics.items():
            match = next((g for g in groups if same(self.metrics[g[0]], row)), None)
            if match is None:
                groups.append([name])
            else:
                match.append(name)
        notes = []
        for names in (g for g in groups if len(g) > 1):
            note = f"{' and '.join(names)}: identical rows (equal up to the last digit shown)."
            temperatures = {n.split("_t", 1)[-1] for n in names}
            if {n.split("_t", 1)[0] for n in names} == {"hista_cos", "hista_dot"} and len(temperatures) == 1:
                note += (" Hista's dot similarity equals cosine when all hidden states have the same norm (as after"
                         " a final RMSNorm/LayerNorm), because the dot temperature is in units of the mean squared"
                         " norm" + self._norm_fact() + ".")
            notes.append(note)
        return notes

    def _norm_fact(self) -> str:
        hidden = getattr(self.batch, "_hidden", None)  # only if computed: never run the model for a note
        if not isinstance(hidden, torch.Tensor) or hidden.numel() == 0:
            return ""
        norms = torch.linalg.vector_norm(hidden.float(), dim=-1)
        norms = norms[norms > 0]
        if norms.numel() == 0:
            return ""
        return f"; here hidden-state norms span {float(norms.min()):.4g}..{float(norms.max()):.4g}"


def _finite_or_none(obj):
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def decision_states(batch: SvebBatch) -> np.ndarray:
    """[S] bool: the states before a token whose choice changes the true value (the state at
    response position t - 1 when V after token t differs from V after token t - 1), where credit is
    assigned. Exact truths count any change above 1e-9; Monte-Carlo truths a change above three
    standard errors of the two estimates (sqrt(v (1 - v) / samples) each), so sampling noise alone
    does not make every state a decision."""
    row = batch.state_row.numpy()
    pos = batch.state_position.numpy()
    value = batch.state_value.numpy()
    samples = batch.state_samples.numpy()
    order = np.lexsort((pos, row))
    decision = np.zeros(len(value), dtype=bool)
    if len(order) < 2:
        return decision
    here, nxt = order[:-1], order[1:]
    adjacent = (row[here] == row[nxt]) & (pos[nxt] == pos[here] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(samples > 0, value * (1 - value) / np.maximum(samples, 1), 0.0)
    tol = np.where((samples[here] == 0) & (samples[nxt] == 0), 1e-9, 3 * np.sqrt(var[here] + var[nxt]))
    decision[here[adjacent & (np.abs(value[nxt] - value[here]) > tol)]] = True
    return decision


def evaluate(dataset: Dataset, estimators: Sequence, *, tokenizer=None, hidden_fn: Optional[HiddenFn] = None,
             device: str | torch.device = "cpu", bootstrap: int = 1000, seed: int = 0,
             log: Optional[Callable[[str], None]] = None) -> EvalResult:
    """Scores each estimator on the eval split of `dataset`. Every estimator's `fit` is called with
    the train split first when there is one; one that `needs_train` is skipped (with the reason in
    `skipped`) when there is none, as is one whose dependencies do not import."""
    say = log or (lambda _msg: None)
    eval_groups = dataset.split("eval")
    if not eval_groups:
        raise ValueError("the dataset has no eval split to score")
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    make = lambda groups: SvebBatch(groups, pad_id=pad_id, tokenizer=tokenizer, hidden_fn=hidden_fn, device=device)
    batch = make(eval_groups)
    if batch.state_value.numel() == 0:
        raise ValueError("the eval split has no states with true values")
    train_groups = dataset.split("train")
    train = make(train_groups) if train_groups else None
    metrics, estimates, skipped, seconds = {}, {}, {}, {}
    truth = batch.state_value.numpy()
    decision = decision_states(batch)
    for obj in estimators:
        est = as_estimator(obj)
        if est.name in metrics:
            raise ValueError(f"two estimators are named {est.name!r}")
        started = time.perf_counter()
        if est.needs_train and train is None:
            skipped[est.name] = "needs a train split"
            say(f"{est.name}: skipped ({skipped[est.name]})")
            continue
        try:
            if train is not None:
                est.fit(train)
            values = batch.at_states(est.estimate(batch)).numpy()
        except (ImportError, MissingInputError) as e:  # a dependency is not installed / an input not given
            skipped[est.name] = f"unavailable: {e}"
            say(f"{est.name}: skipped ({skipped[est.name]})")
            continue
        seconds[est.name] = round(time.perf_counter() - started, 3)
        estimates[est.name] = values
        metrics[est.name] = score(values, truth, batch.state_group.numpy(), decision=decision, bootstrap=bootstrap,
                                  seed=seed)
        say(f"{est.name}: within_pearson {metrics[est.name]['within_pearson']:.3f} ({seconds[est.name]:.1f}s)")
    meta = {
        "eval_groups": batch.num_groups,
        "eval_rollouts": batch.num_rollouts,
        "eval_states": int(batch.state_value.numel()),
        "decision_states": int(decision.sum()),
        "train_groups": 0 if train is None else train.num_groups,
        "exact_truth": bool((batch.state_samples == 0).all()),
        "bootstrap": bootstrap,
        "seed": seed,
        "seconds": seconds,
        "dataset": {k: v for k, v in dataset.meta.items() if isinstance(v, (str, int, float, bool))},
    }
    return EvalResult(metrics, estimates, batch, meta, skipped)
