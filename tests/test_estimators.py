"""The shared estimator interface (sveb_kernels.estimators) against plain loop oracles."""

import random

import numpy as np
import pytest
import torch

from oracles import hista_oracle, numca_values_oracle, numeric_spans_oracle
from sveb_kernels import estimators, sveb
from sveb_kernels.estimators import RolloutBatch, advantages_from_values, make_estimator
from sveb_kernels.sveb import tiny


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def trainer_batch(rng, tokenizer, *, rollouts_per_group=3, groups=3):
    """A batch laid out like a trainer's: [last prompt token | response, right padded], group ids
    not 0..G-1, state cells one to the left of the response tokens."""
    group_ids = rng.sample(range(5, 50), groups)
    rows = []
    for g in group_ids:
        prompt_last = tokenizer("7\n")["input_ids"][-1]
        for _ in range(rollouts_per_group):
            text = " ".join(rng.choice(["7", "12", "x", "3 + 4 = 7", "-5", "1,000", "y"])
                            for _ in range(rng.randint(1, 5)))
            rows.append((g, [prompt_last] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id],
                         float(rng.choice([0.0, 1.0, 0.5]))))
    width = max(len(ids) for _, ids, _ in rows)
    token_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    response_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (_, ids, _) in enumerate(rows):
        token_ids[b, :len(ids)] = torch.tensor(ids)
        response_mask[b, 1:len(ids)] = True
    state_mask = torch.zeros_like(response_mask)
    state_mask[:, :-1] = response_mask[:, 1:]
    group_index = torch.tensor([g for g, _, _ in rows])
    returns = torch.tensor([r for _, _, r in rows])
    return token_ids, response_mask, state_mask, group_index, returns


def test_sveb_and_trainers_share_one_interface():
    for name in ("Estimator", "GroupMean", "LeaveOneOutMean", "Numca", "Hista", "LinearCritic", "CallableEstimator",
                 "as_estimator"):
        assert getattr(sveb, name) is getattr(estimators, name)
    assert issubclass(sveb.SvebBatch, RolloutBatch)


@pytest.mark.parametrize("match", ["last", "prefix"])
@pytest.mark.parametrize("leave_one_out", [True, False])
def test_numca_on_cells_before_each_response_token(seed, tokenizer, match, leave_one_out):
    token_ids, response_mask, state_mask, group_index, returns = trainer_batch(random.Random(seed), tokenizer)
    batch = RolloutBatch(token_ids, response_mask, group_index, returns, state_mask=state_mask, tokenizer=tokenizer)
    est = make_estimator("numca", match=match, leave_one_out=leave_one_out, backend="reference")
    got = est.estimate(batch).double()
    end, key, _, _ = numeric_spans_oracle(tokenizer.decode, token_ids, {tokenizer.eos_token_id}, response_mask)
    after = torch.tensor(numca_values_oracle(torch.tensor(end), torch.tensor(key), returns, group_index, response_mask,
                                             match=match, leave_one_out=leave_one_out), dtype=torch.float64)
    rets, groups = returns.tolist(), group_index.tolist()
    for b in range(len(rets)):
        peers = [rets[p] for p in range(len(rets)) if groups[p] == groups[b] and not (leave_one_out and p == b)]
        # cell 0 (the last prompt token) is the state before any response number
        assert got[b, 0].item() == pytest.approx(sum(peers) / len(peers), abs=1e-6)
        for t in range(1, token_ids.shape[1]):
            if state_mask[b, t]:
                assert got[b, t].item() == pytest.approx(after[b, t].item(), abs=1e-6)
    # the vocab is built once per tokenizer and kept
    vocab = est.vocab_for(batch)
    assert est.vocab_for(RolloutBatch(token_ids, response_mask, group_index, returns, tokenizer=tokenizer)) is vocab


def test_hista_reads_hidden_at_state_cells(seed, tokenizer):
    token_ids, response_mask, state_mask, group_index, returns = trainer_batch(random.Random(seed), tokenizer)
    table = torch.randn(len(tokenizer), 5)
    seen = []

    def hidden_fn(batch):
        seen.append(1)
        return batch.packing.pack(table[batch.token_ids])

    batch = RolloutBatch(token_ids, response_mask, group_index, returns, state_mask=state_mask, hidden_fn=hidden_fn)
    values = make_estimator("hista", temperature=0.5, backend="reference").estimate(batch)
    packing = batch.packing
    want = hista_oracle(packing.pack(table[token_ids]), returns[packing.rollout_ids.long()], packing.rollout_ids,
                        packing.group_offsets, temperature=0.5)
    want = want[0] if isinstance(want, tuple) else want
    assert torch.allclose(packing.pack(values).double(), torch.as_tensor(want, dtype=torch.float64), atol=1e-4)
    assert (values[~state_mask] == 0).all()
    estimators.Hista("dot", 1.0, backend="reference").estimate(batch)
    assert len(seen) == 1  # hidden states made once per batch


def test_group_mean_rloo_and_callables(seed, tokenizer):
    token_ids, response_mask, state_mask, group_index, returns = trainer_batch(random.Random(seed), tokenizer)
    batch = RolloutBatch(token_ids, response_mask, group_index, returns, state_mask=state_mask)
    mean = make_estimator("group_mean").estimate(batch)
    loo = make_estimator("rloo").estimate(batch)
    for b in range(len(returns)):
        same = group_index == group_index[b]
        assert torch.allclose(mean[b], returns[same].double().mean().float())
        others = same.clone()
        others[b] = False
        assert torch.allclose(loo[b], returns[others].double().mean().float())
    fn = make_estimator(lambda batch: np.full(batch.shape, 0.25))
    assert fn.estimate(batch).dtype == torch.float32 and (fn.estimate(batch) == 0.25).all()
    with pytest.raises(ValueError, match="shape"):
        make_estimator(lambda batch: torch.zeros(3)).estimate(batch)
    with pytest.raises(TypeError, match="Tensor or ndarray"):
        make_estimator(lambda batch: [0.0]).estimate(batch)
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("critic_v2")
    with pytest.raises(TypeError, match="options"):
        make_estimator(lambda batch: None, temperature=1.0)
    with pytest.raises(estimators.MissingInputError, match="tokenizer"):
        make_estimator("numca").estimate(batch)
    with pytest.raises(estimators.MissingInputError, match="hidden states"):
        make_estimator("hista").estimate(batch)


def gae_loop(rewards, values, mask, gamma, lam):
    rewards, values, mask = (x.double().tolist() for x in (rewards, values, mask))
    out = []
    for r, v, m in zip(rewards, values, mask):
        nextv = last = 0.0
        row = [0.0] * len(r)
        for t in reversed(range(len(r))):
            delta = r[t] + gamma * nextv - v[t]
            cand = delta + gamma * lam * last
            nextv = v[t] * m[t] + (1 - m[t]) * nextv
            last = cand * m[t] + (1 - m[t]) * last
            row[t] = last * m[t]
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def random_mask(gen, b, t):
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[0] = t
    return torch.arange(t)[None, :] < lengths[:, None]


def test_advantages_r_minus_v_and_gae(seed):
    gen = torch.Generator().manual_seed(seed)
    b, t = 5, 11
    values = torch.randn(b, t, generator=gen)
    returns = torch.randn(b, generator=gen)
    mask = random_mask(gen, b, t)
    got = advantages_from_values(values, returns, mask)
    want = (returns[:, None].double() - values.double()) * mask
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-6)
    # GAE with gamma = lam = 1 telescopes to R - V
    assert torch.allclose(advantages_from_values(values, returns, mask, mode="gae").double(), want, atol=1e-5)
    gamma, lam = 0.5 + 0.5 * torch.rand(1, generator=gen).item(), torch.rand(1, generator=gen).item()
    rewards = torch.zeros(b, t, dtype=torch.float64)
    for row in range(b):
        valid = mask[row].nonzero().flatten()
        if valid.numel():
            rewards[row, valid[-1]] = returns[row].item()
    got = advantages_from_values(values, returns, mask, mode="gae", gamma=gamma, lam=lam)
    assert torch.allclose(got.double(), gae_loop(rewards, values, mask, gamma, lam), atol=1e-5)
    # per-token rewards: reward-to-go minus value
    token_rewards = torch.randn(b, t, generator=gen)
    got = advantages_from_values(values, token_rewards, mask)
    masked = token_rewards.double() * mask
    want = (masked.flip(1).cumsum(1).flip(1) - values.double()) * mask
    assert torch.allclose(got.double(), want, atol=1e-5)
    white = advantages_from_values(values, returns, mask, whiten=True)
    sel = white[mask].double()
    assert abs(sel.mean().item()) < 1e-5 and sel.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (white[~mask] == 0).all()


def test_advantages_bad_input():
    values, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        advantages_from_values(values, torch.zeros(2), mask, mode="td")
    with pytest.raises(ValueError, match="returns"):
        advantages_from_values(values, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask"):
        advantages_from_values(values, torch.zeros(2), mask[:, :2])
    with pytest.raises(ValueError, match="gamma"):
        advantages_from_values(values, torch.zeros(2), mask, mode="gae", gamma=2.0)
