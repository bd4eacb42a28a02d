"""The token-advantage scaling rule (sveb_kernels.estimators.advantages, docs/DESIGN.md): constant
rewards give exactly 0 in every estimator x advantage mode x scaling (x whitening, x lone-rollout
convention), groups with signal match a plain float64 loop oracle of the rule, and nothing is
amplified by a degenerate std."""

import random

import pytest
import torch

from sveb_kernels.estimators import RolloutBatch, make_estimator
from sveb_kernels.estimators.advantages import advantages_from_values, group_scale
from sveb_kernels.sveb import tiny

MODES = [("r_minus_v", 1.0, 1.0), ("gae", 1.0, 1.0), ("gae", 0.99, 0.95), ("gae", 0.9, 1.0), ("gae", 0.7, 0.3)]
SCALINGS = ["group", "batch", "none"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def batch_of(rng, tokenizer, returns_of_group, *, per_group=4, groups=3):
    """Rollouts of different lengths (prompt lengths differ: the state cells start at different
    columns), each [last prompt token | response]; numbers that peers share."""
    rows = []
    for g in range(groups):
        for _ in range(per_group):
            text = " ".join(rng.choice(["7", "12", "x", "3 + 4 = 7", "-5", "y"]) for _ in range(rng.randint(1, 6)))
            pad = rng.randint(0, 3)  # left padding: prompts of different lengths
            ids = [tokenizer.pad_token_id] * pad + [tokenizer("7\n")["input_ids"][-1]] + tokenizer(text)["input_ids"]
            rows.append((g, pad, ids, returns_of_group(g)))
    width = max(len(ids) for *_, ids, _ in rows) + 1
    token_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    response = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (_, pad, ids, _) in enumerate(rows):
        token_ids[b, :len(ids)] = torch.tensor(ids)
        response[b, pad + 1:len(ids)] = True
    state = torch.zeros_like(response)
    state[:, :-1] = response[:, 1:]
    group_index = torch.tensor([g for g, *_ in rows])
    returns = torch.tensor([r for *_, r in rows], dtype=torch.float32)
    return token_ids, response, state, group_index, returns


def values_of(name, token_ids, response, state, group_index, returns, tokenizer):
    """The estimator's V(s_t) aligned with the response tokens (value t = cell t - 1)."""
    def ramp(batch):  # an arbitrary callable: values unrelated to the returns' level
        return 0.3 * torch.arange(batch.shape[1], dtype=torch.float32).expand(batch.shape) - 1.0

    spec = ramp if name == "callable" else name
    options = {"backend": "reference"} if name in ("numca", "hista") else {}
    estimator = make_estimator(spec, **options)
    hidden = torch.randn(int(state.sum()), 8)
    batch = RolloutBatch(token_ids, response, group_index, returns, state_mask=state, tokenizer=tokenizer,
                         hidden=hidden)
    cells = estimator.estimate(batch)
    values = torch.zeros_like(cells)
    values[:, 1:] = cells[:, :-1]
    return values.masked_fill(~response, 0.0)


@pytest.mark.parametrize("estimator", ["group_mean", "rloo", "numca", "hista", "callable"])
@pytest.mark.parametrize("mode,gamma,lam", MODES)
@pytest.mark.parametrize("scale", SCALINGS)
@pytest.mark.parametrize("whiten", [False, True])
def test_constant_rewards_give_zero_advantages(seed, tokenizer, estimator, mode, gamma, lam, scale, whiten):
    rng = random.Random(seed)
    level = rng.choice([0.0, 1.0, -3.5, 1e4 / 3])  # a level that is not exact in float32 too
    token_ids, response, state, group_index, returns = batch_of(rng, tokenizer, lambda g: level)
    values = values_of(estimator, token_ids, response, state, group_index, returns, tokenizer)
    for lone in ("no_signal", "unscaled"):
        adv = advantages_from_values(values, returns, response, mode=mode, gamma=gamma, lam=lam, whiten=whiten,
                                     group_index=group_index, scale=scale, lone_rollout=lone, backend="reference")
        assert torch.equal(adv, torch.zeros_like(adv)), (lone, adv.abs().max())


@pytest.mark.parametrize("scale", SCALINGS)
def test_lone_rollouts(seed, tokenizer, scale):
    """Eval with one generation: TRL's GRPO gives 0 (no signal); verl's gives mean 0, std 1."""
    rng = random.Random(seed)
    token_ids, response, state, group_index, returns = batch_of(rng, tokenizer, lambda g: rng.random(), per_group=1)
    values = torch.rand(response.shape).masked_fill(~response, 0.0)
    for mode, gamma, lam in MODES:
        trl_like = advantages_from_values(values, returns, response, mode=mode, gamma=gamma, lam=lam,
                                          group_index=group_index, scale=scale, backend="reference")
        assert torch.equal(trl_like, torch.zeros_like(trl_like))
        verl_like = advantages_from_values(values, returns, response, mode=mode, gamma=gamma, lam=lam,
                                           group_index=group_index, scale=scale, lone_rollout="unscaled",
                                           backend="reference")
        if scale != "batch":  # a lone rollout keeps its plain advantage
            plain = advantages_from_values(values, returns, response, mode=mode, gamma=gamma, lam=lam,
                                           backend="reference")
            torch.testing.assert_close(verl_like, plain, rtol=0, atol=1e-6)


def rule_oracle(values, returns, mask, group_index, *, gamma, lam, scale, eps):
    """The rule as a plain float64 loop: centre and scale returns and values per group, GAE loop."""
    values, returns, mask = values.double().tolist(), returns.double().tolist(), mask.tolist()
    groups = group_index.tolist()
    rows = len(returns)
    scored = [r == r for r in returns]
    members = {g: [b for b in range(rows) if groups[b] == g and scored[b]] for g in set(groups)}

    def std(xs):
        m = sum(xs) / len(xs)
        return (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5

    every = [returns[b] for b in range(rows) if scored[b]]
    out = [[0.0] * len(mask[0]) for _ in range(rows)]
    for b in range(rows):
        peers = [returns[p] for p in members[groups[b]]]
        if not scored[b] or max(peers) == min(peers):
            continue
        c = sum(peers) / len(peers)
        d = {"group": std(peers) + eps, "batch": std(every) + eps, "none": 1.0}[scale]
        cols = [t for t in range(len(mask[b])) if mask[b][t]]
        last, nextv = 0.0, 0.0
        for k in reversed(range(len(cols))):
            t = cols[k]
            v = (values[b][t] - c) / d
            r = (returns[b] - c) / d if k == len(cols) - 1 else 0.0
            delta = r + gamma * nextv - v
            last = delta + gamma * lam * last
            nextv = v
            out[b][t] = last
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", SCALINGS)
def test_rule_against_a_loop_oracle(seed, tokenizer, scale):
    rng = random.Random(seed)
    token_ids, response, state, group_index, returns = batch_of(
        rng, tokenizer, lambda g: 1.0, per_group=5)
    returns = torch.where(group_index == 0, returns, torch.randint(0, 4, returns.shape).float())
    returns[rng.randrange(5, len(returns))] = float("nan")  # an unscorable rollout
    for estimator in ("numca", "callable"):
        filled = torch.nan_to_num(returns, nan=0.0)
        values = values_of(estimator, token_ids, response, state, group_index, filled, tokenizer)
        for mode, gamma, lam in MODES:
            got = advantages_from_values(values, returns, response, mode=mode, gamma=gamma, lam=lam,
                                         group_index=group_index, scale=scale, backend="reference")
            want = rule_oracle(values, returns, response, group_index, gamma=gamma, lam=lam, scale=scale, eps=1e-4)
            assert torch.allclose(got.double(), want, atol=1e-4 * (1 + float(want.abs().max())))
            assert torch.equal(got[group_index == 0], torch.zeros_like(got[group_index == 0]))
            assert torch.equal(got[returns.isnan()], torch.zeros_like(got[returns.isnan()]))


def test_nearly_equal_rewards_are_not_amplified(seed, tokenizer):
    """A group with a tiny spread: with values that are averages of the group's returns (all
    built-in estimators), centred GAE stays in units of the spread; uncentred it was ~1/std."""
    rng = random.Random(seed)
    token_ids, response, state, group_index, returns = batch_of(rng, tokenizer, lambda g: 1.0, groups=2)
    returns = returns + 1e-3 * (torch.arange(len(returns)) % 2)
    values = values_of("rloo", token_ids, response, state, group_index, returns, tokenizer)
    for gamma in (0.9, 0.99):
        adv = advantages_from_values(values, returns, response, mode="gae", gamma=gamma, lam=1.0,
                                     group_index=group_index, scale="group", backend="reference")
        plain = advantages_from_values(values, returns, response, mode="gae", gamma=gamma, lam=1.0)
        stats = group_scale(returns, group_index)
        # lam = 1: A = discounted centred return - centred value, each within the group's range / std
        bound = 2 * float(((returns.max() - returns.min()) / stats.divisor).max()) + 1e-4
        assert float(adv.abs().max()) <= bound
        assert float((plain / stats.divisor[:, None]).abs().max()) > 10 * bound  # what the old rule gave


def test_whitening_keeps_silent_groups_at_zero(seed, tokenizer):
    rng = random.Random(seed)
    token_ids, response, state, group_index, returns = batch_of(rng, tokenizer, lambda g: 2.0)
    returns = torch.where(group_index == 0, returns, torch.randn(returns.shape))
    values = values_of("numca", token_ids, response, state, group_index, returns, tokenizer)
    adv = advantages_from_values(values, returns, response, mode="gae", gamma=0.9, whiten=True,
                                 group_index=group_index, backend="reference")
    assert torch.equal(adv[group_index == 0], torch.zeros_like(adv[group_index == 0]))
    live = response & (group_index != 0)[:, None]
    assert abs(float(adv[live].mean())) < 1e-5 and float(adv[live].std()) == pytest.approx(1.0, abs=1e-4)


def test_group_scale_bad_input():
    with pytest.raises(ValueError, match="scale"):
        group_scale(torch.zeros(2), torch.zeros(2, dtype=torch.int64), scale="rows")
    with pytest.raises(ValueError, match="lone_rollout"):
        group_scale(torch.zeros(2), torch.zeros(2, dtype=torch.int64), lone_rollout="keep")
    with pytest.raises(ValueError, match="group_index"):
        group_scale(torch.zeros(2), torch.zeros(3, dtype=torch.int64))
