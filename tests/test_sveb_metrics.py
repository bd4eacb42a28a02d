"""SVEB metrics against plain-Python formulas, and bootstrap replicates against explicit resamples."""

import json
import math
import random

import numpy as np
import pytest

from sveb_kernels.sveb import metrics


def pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def midranks(x):
    ranks = [0.0] * len(x)
    for i, v in enumerate(x):
        below = sum(1 for w in x if w < v)
        ties = sum(1 for w in x if w == v)
        ranks[i] = below + (ties + 1) / 2
    return ranks


def within(x, group):
    means = {g: sum(v for v, h in zip(x, group) if h == g) / group.count(g) for g in set(group)}
    return [v - means[g] for v, g in zip(x, group)]


def oracle_metrics(est, truth, group, decision=None):
    est, truth, group = list(map(float, est)), list(map(float, truth)), list(group)
    decision_pearson = math.nan
    if decision is not None and any(decision):
        keep = [i for i, d in enumerate(decision) if d]
        a = within([est[i] for i in keep], [group[i] for i in keep])
        b = within([truth[i] for i in keep], [group[i] for i in keep])
        sab, saa, sbb = (sum(p * q for p, q in zip(a, b)), sum(p * p for p in a), sum(q * q for q in b))
        decision_pearson = 0.0 if saa < 1e-20 or sbb < 1e-20 else sab / math.sqrt(saa * sbb)
    n = len(est)
    a, b = within(est, group), within(truth, group)
    sab = sum(p * q for p, q in zip(a, b))
    saa = sum(p * p for p in a)
    sbb = sum(q * q for q in b)
    return {
        "mse": sum((e - t) ** 2 for e, t in zip(est, truth)) / n,
        "mae": sum(abs(e - t) for e, t in zip(est, truth)) / n,
        "pearson": pearson(est, truth),
        "spearman": pearson(midranks(est), midranks(truth)),
        "within_pearson": 0.0 if saa < 1e-20 or sbb < 1e-20 else sab / math.sqrt(saa * sbb),
        "collapse_ratio": math.sqrt(saa / sbb) if sbb > 0 else math.nan,
        "decision_pearson": decision_pearson,
    }


def random_decision(rng, n):
    """A decision mask marking about a third of the states."""
    return np.array([rng.random() < 0.35 for _ in range(n)])


def random_states(rng, groups=7, with_ties=True):
    group, est, truth = [], [], []
    for g in range(groups):
        for _ in range(rng.randint(1, 9)):
            group.append(g * 3 + 1)  # arbitrary, non-contiguous labels
            v = rng.choice([0.0, 0.25, 0.5, 1.0]) if with_ties and rng.random() < 0.5 else rng.random()
            truth.append(v)
            est.append(round(v + rng.gauss(0, 0.3), 1 if with_ties else 9))
    return np.array(est), np.array(truth), np.array(group)


def assert_metrics_close(got, want):
    for name in metrics.METRICS:
        if math.isnan(want[name]):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(want[name], abs=1e-10), name


@pytest.mark.parametrize("with_ties", [True, False])
def test_point_metrics_match_oracle(seed, with_ties):
    rng = random.Random(seed)
    est, truth, group = random_states(rng, with_ties=with_ties)
    decision = random_decision(rng, len(est))
    got = metrics.score(est, truth, group, decision=decision, bootstrap=0)
    assert set(got) == set(metrics.METRICS)
    assert_metrics_close(got, oracle_metrics(est, truth, group, decision))
    without = metrics.score(est, truth, group, bootstrap=0)  # no mask: decision_pearson undefined, the rest equal
    assert math.isnan(without["decision_pearson"])
    assert all(without[m] == got[m] or (math.isnan(without[m]) and math.isnan(got[m]))
               for m in metrics.METRICS if m != "decision_pearson")


def test_decision_pearson_is_within_pearson_of_the_decision_states(seed):
    rng = random.Random(seed)
    est, truth, group = random_states(rng, with_ties=False)
    decision = random_decision(rng, len(est))
    got = metrics.score(est, truth, group, decision=decision, bootstrap=0)["decision_pearson"]
    sub = metrics.score(est[decision], truth[decision], group[decision], bootstrap=0)["within_pearson"]
    assert got == pytest.approx(sub, abs=1e-12)
    with pytest.raises(ValueError, match="decision"):
        metrics.score(est, truth, group, decision=decision.astype(int))


def test_bootstrap_replicate_is_the_resampled_dataset(seed):
    rng = random.Random(seed)
    est, truth, group = random_states(rng)
    decision = random_decision(rng, len(est))
    prepared = metrics._Prepared(est, truth, group, decision)
    labels = list(prepared.groups)
    counts = metrics.resample_counts(len(labels), 5, np.random.default_rng(seed))
    assert (counts.sum(axis=1) == len(labels)).all()
    replicates = metrics.weighted_metrics(prepared, counts)
    for r in range(5):
        # The resample spelled out: each drawn group's states, copied as often as it was drawn, each
        # copy its own group (a copy is a different prompt that happens to look the same).
        e, t, g, d = [], [], [], []
        for k, label in enumerate(labels):
            for copy in range(counts[r, k]):
                sel = group == label
                e += est[sel].tolist()
                t += truth[sel].tolist()
                d += decision[sel].tolist()
                g += [(label, copy)] * int(sel.sum())
        want = oracle_metrics(e, t, [hash(x) for x in g], d)
        assert_metrics_close({name: float(replicates[name][r]) for name in metrics.METRICS}, want)


def test_intervals_are_seeded_and_bracket_replicates(seed):
    rng = random.Random(seed)
    est, truth, group = random_states(rng, groups=12)
    decision = random_decision(rng, len(est))
    decision[0] = True  # at least one decision state
    a = metrics.score(est, truth, group, decision=decision, bootstrap=300, seed=seed)
    b = metrics.score(est, truth, group, decision=decision, bootstrap=300, seed=seed)
    c = metrics.score(est, truth, group, decision=decision, bootstrap=300, seed=seed + 1)
    assert a == b and a != c
    for name in metrics.METRICS:
        assert a[f"{name}_lo"] <= a[f"{name}_hi"]
    # Chunking the replicates does not change them.
    prepared = metrics._Prepared(est, truth, group, decision)
    one = metrics.bootstrap_replicates(prepared, 50, seed=seed, chunk=7)
    two = metrics.bootstrap_replicates(prepared, 50, seed=seed, chunk=50)
    for name in metrics.METRICS:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-12, equal_nan=True)


def test_constant_per_group_estimator_has_zero_within_metrics(seed):
    rng = random.Random(seed)
    est, truth, group = random_states(rng, with_ties=False)
    per_group = {g: rng.random() / 3 for g in set(group.tolist())}
    # 1/3-like values whose per-group mean does not round back to the value itself
    flat = np.array([per_group[g] for g in group.tolist()])
    got = metrics.score(flat, truth, group, bootstrap=20)
    assert got["within_pearson"] == 0.0 and got["collapse_ratio"] == 0.0
    assert got["within_pearson_lo"] == got["within_pearson_hi"] == 0.0


def test_truth_without_within_group_spread_gives_undefined_collapse_ratio():
    group = np.array([0, 0, 1, 1])
    truth = np.array([0.2, 0.2, 0.7, 0.7])
    got = metrics.score(np.array([0.1, 0.3, 0.6, 0.9]), truth, group, bootstrap=0)
    assert math.isnan(got["collapse_ratio"]) and got["within_pearson"] == 0.0
    from sveb_kernels.sveb.evaluate import _finite_or_none

    assert json.loads(json.dumps(_finite_or_none(got)))["collapse_ratio"] is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        metrics.score(np.array([0.1, math.nan]), np.array([0.0, 1.0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="est and truth"):
        metrics.score(np.array([0.1]), np.array([0.0, 1.0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="no states"):
        metrics.score(np.array([]), np.array([]), np.array([]))


def test_eval_table_says_which_way_is_better_and_explains_identical_rows():
    import torch

    from sveb_kernels.sveb.evaluate import EvalResult
    from sveb_kernels.sveb.metrics import BETTER, METRICS

    assert set(BETTER) == set(METRICS)
    good = {"mse": 0.05, "mae": 0.1, "pearson": 0.8, "spearman": 0.7, "within_pearson": 0.6, "collapse_ratio": 0.9}
    other = {m: v + 0.1 for m, v in good.items()}
    near = {m: v + 0.0004 for m, v in good.items()}

    class Batch:  # the cached hidden states of the eval batch, all of norm 2 as after a final RMSNorm
        _hidden = 2 * torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)

    result = EvalResult(metrics={"hista_cos_t0.1": good, "hista_dot_t0.1": near, "rloo": other},
                        estimates={}, batch=Batch())
    text = result.table()
    header, better = text.splitlines()[:2]
    for metric in METRICS:
        assert metric in header and BETTER[metric] in better
    assert "lower is better" in better and "higher is better" in better
    notes = [line for line in text.splitlines() if "identical rows" in line]
    assert len(notes) == 1 and "hista_cos_t0.1 and hista_dot_t0.1" in notes[0]
    assert "same norm" in notes[0] and "RMSNorm" in notes[0] and "2..2" in notes[0]
    assert "rloo" not in notes[0]

    distinct = EvalResult(metrics={"a": good, "b": other}, estimates={}, batch=Batch())
    assert "identical rows" not in distinct.table()
