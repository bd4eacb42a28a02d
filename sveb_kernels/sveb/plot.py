"""Value curves along a few eval rollouts: each estimator's estimate at the states, against the truth."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

DEFAULT_FAMILIES = ("group_mean", "rloo", "critic", "numca_last", "numca_prefix")


def pick_rollouts(result, count: int = 4) -> list[int]:
    """Rows of the eval batch to draw: from the first groups with both outcomes, a rewarded and an
    unrewarded rollout each (the contrast a collapsed estimator cannot show)."""
    batch = result.batch
    states_per_row = np.bincount(batch.state_row.numpy(), minlength=batch.num_rollouts)
    returns = batch.returns.numpy()
    groups = batch.group_index.numpy()
    rows: list[int] = []
    for g in range(batch.num_groups):
        members = [r for r in np.flatnonzero(groups == g) if states_per_row[r] >= 2]
        best = [r for r in members if returns[r] == returns[members].max()] if members else []
        worst = [r for r in members if returns[r] == returns[members].min()] if members else []
        if best and worst and returns[best[0]] != returns[worst[0]]:
            rows += [int(best[0]), int(worst[0])]
        if len(rows) >= count:
            break
    if len(rows) < count:  # no contrast available: any rollouts with states
        rows += [int(r) for r in np.flatnonzero(states_per_row >= 2) if r not in rows][: count - len(rows)]
    return rows[:count]


def default_plot_estimators(result) -> list[str]:
    names = [n for n in DEFAULT_FAMILIES if n in result.metrics]
    for family in ("hista_cos", "hista_dot"):
        sweep = [n for n in result.metrics if n.startswith(family + "_")]
        if sweep:  # one per family: its best temperature by within-group Pearson
            names.append(max(sweep, key=lambda n: result.metrics[n]["within_pearson"]))
    names += [n for n in result.metrics if n not in names and not n.startswith(("hista_cos_", "hista_dot_"))]
    return names


def plot_curves(result, path: str, *, estimators: Optional[Sequence[str]] = None, rollouts: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(estimators) if estimators else default_plot_estimators(result)
    unknown = [n for n in names if n not in result.estimates]
    if unknown:
        raise ValueError(f"no estimates for {unknown}; scored: {sorted(result.estimates)}")
    batch = result.batch
    rows = pick_rollouts(result, rollouts)
    if not rows:
        raise ValueError("no eval rollout has two or more states to draw")
    state_row = batch.state_row.numpy()
    position = batch.state_position.numpy()
    truth = batch.state_value.numpy()
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), sharey=True, squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        sel = np.flatnonzero(state_row == row)
        sel = sel[np.argsort(position[sel])]
        ax.plot(position[sel], truth[sel], color="black", linewidth=2.5, label="truth")
        for name in names:
            ax.plot(position[sel], result.estimates[name][sel], linewidth=1.2, label=name)
        group = batch.groups[int(batch.group_index[row])]
        ax.set_title(f"{group.prompt_id}, rollout {row}, reward {float(batch.returns[row]):g}", fontsize=9)
        ax.set_ylabel("value")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("response token position")
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
