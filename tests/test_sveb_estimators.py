"""SVEB estimators against loop oracles, on batches built from the embedded task's tokenizer."""

import math
import random

import numpy as np
import pytest
import torch

from oracles import hista_oracle, numca_values_oracle, numeric_spans_oracle
from sveb_kernels.estimators import critic as critic_module
from sveb_kernels.sveb import data, estimators, tiny
from sveb_kernels.sveb.batch import SvebBatch
from sveb_kernels.sveb.evaluate import evaluate


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def number_text(rng):
    return " ".join(rng.choice(["7", "12", "x", "3 + 4 = 7", "-5", "1,000", "12.50", "y"]) for _ in range(rng.randint(1, 6)))


def random_groups(rng, tokenizer, groups=4, split="eval"):
    """Groups whose prompts and responses share numbers, so Numca must tell prompt from response."""
    out = []
    for g in range(groups):
        prompt_ids = tokenizer("Compute: 7 + 12\n")["input_ids"] if rng.random() < 0.5 else tokenizer("Q 5\n")["input_ids"]
        rollouts = []
        for _ in range(rng.randint(1, 5)):
            response = tokenizer(number_text(rng))["input_ids"] + [tokenizer.eos_token_id]
            positions = list(range(len(response)))
            rollouts.append(data.Rollout(response, float(rng.choice([0, 1, 0.5])),
                                         data.States(positions, [rng.random() for _ in positions], [0] * len(positions))))
        out.append(data.Group(f"{split}{g}", prompt_ids, rollouts, split))
    return out


def test_group_mean_and_rloo(seed, tokenizer):
    batch = SvebBatch(random_groups(random.Random(seed), tokenizer), pad_id=tokenizer.pad_token_id)
    mean = estimators.GroupMean().estimate(batch)
    loo = estimators.LeaveOneOutMean(empty_value=-3.0).estimate(batch)
    assert mean.shape == loo.shape == batch.input_ids.shape
    returns, group = batch.returns.tolist(), batch.group_index.tolist()
    for b in range(batch.num_rollouts):
        peers = [returns[p] for p in range(len(returns)) if group[p] == group[b]]
        others = [returns[p] for p in range(len(returns)) if group[p] == group[b] and p != b]
        assert torch.allclose(mean[b], torch.tensor(sum(peers) / len(peers)))
        assert torch.allclose(loo[b], torch.tensor(sum(others) / len(others) if others else -3.0))


@pytest.mark.parametrize("equal_rollout_weight", [False, True])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_hista_estimator_matches_oracle_on_response_tokens(seed, tokenizer, similarity, equal_rollout_weight):
    batch = SvebBatch(random_groups(random.Random(seed), tokenizer), pad_id=tokenizer.pad_token_id,
                      hidden_fn=lambda ids, attn, packing: packed_hidden_of(ids, packing, seed))
    est = estimators.Hista(similarity, 0.3, backend="reference", equal_rollout_weight=equal_rollout_weight)
    values = est.estimate(batch)
    # Oracle input assembled by loops: response tokens only, grouped by prompt, rows in order.
    hidden, returns, rollout_ids, offsets, cells = [], [], [], [0], []
    h = packed_hidden_of(batch.input_ids, batch.packing, seed)
    index = {int(t): i for i, t in enumerate(batch.packing.token_index)}
    length = batch.input_ids.shape[1]
    for g in range(batch.num_groups):
        for b in range(batch.num_rollouts):
            if int(batch.group_index[b]) != g:
                continue
            for t in range(length):
                if batch.response_mask[b, t]:
                    hidden.append(h[index[b * length + t]])
                    returns.append(float(batch.returns[b]))
                    rollout_ids.append(b)
                    cells.append((b, t))
        offsets.append(len(cells))
    rid = torch.tensor(rollout_ids, dtype=torch.int32)
    bias = None
    if est.equal_rollout_weight:
        lengths = {b: rollout_ids.count(b) for b in set(rollout_ids)}
        bias = torch.tensor([-math.log(lengths[b]) for b in rollout_ids])
    want, _ = hista_oracle(torch.stack(hidden), torch.tensor(returns), rid, torch.tensor(offsets),
                           temperature=est.last_temperature, similarity=similarity, key_bias=bias)
    got = torch.tensor([float(values[b, t]) for b, t in cells], dtype=torch.float64)
    assert (got - want).abs().max() <= 1e-4
    if similarity == "dot":  # the dot temperature is relative to the mean squared norm
        assert est.last_temperature == pytest.approx(0.3 * float(torch.stack(hidden).pow(2).sum(1).mean()), rel=1e-5)


def packed_hidden_of(ids, packing, seed):
    """Hidden states that depend on the token and its predecessor (like a model's would)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(int(ids.max()) + 1, 6, generator=gen)
    prev = torch.nn.functional.pad(ids, (1, 0))[:, :-1]
    full = table[ids] + 0.5 * table[prev]
    return packing.pack(full)


@pytest.mark.parametrize("match", ["last", "prefix"])
def test_numca_estimator_matches_oracle(seed, tokenizer, match):
    batch = SvebBatch(random_groups(random.Random(seed), tokenizer), pad_id=tokenizer.pad_token_id,
                      tokenizer=tokenizer)
    values = estimators.Numca(match, backend="reference").estimate(batch)
    special = {tokenizer.eos_token_id}
    end, key, value, start = numeric_spans_oracle(tokenizer.decode, batch.input_ids, special, batch.response_mask)
    want = numca_values_oracle(torch.tensor(end), torch.tensor(key), batch.returns, batch.group_index,
                               batch.response_mask, match=match)
    got = values.double()
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # Prompt numbers are masked: "7" and "12" in the prompt alone never make a milestone.
    assert not any(end[b][t] for b in range(len(end)) for t in range(batch.input_ids.shape[1])
                   if not batch.response_mask[b, t])


@pytest.mark.parametrize("chunk_rows", [7, 8192])
def test_linear_critic_is_ridge_on_standardised_features(seed, tokenizer, monkeypatch, chunk_rows):
    monkeypatch.setattr(critic_module, "CHUNK_ROWS", chunk_rows)  # streamed sums = one pass
    rng = random.Random(seed)
    train_groups = random_groups(rng, tokenizer, groups=6, split="train")
    d = 5

    def hidden_fn(ids, attn, packing):
        return packed_hidden_of(ids, packing, seed)[:, :d]

    train = SvebBatch(train_groups, pad_id=tokenizer.pad_token_id, hidden_fn=hidden_fn)
    critic = estimators.LinearCritic(ridge_grid=(0.5,), seed=seed)
    critic.fit(train)
    # Independent closed form: standardise, centre, solve (X^T X + c * mean eigenvalue * I) w = X^T y.
    x = train.hidden.double().numpy()
    y = train.returns.double().numpy()[train.packing.rollout_ids.long().numpy()]
    mu, sd = x.mean(0), np.maximum(x.std(0), 1e-6)
    z = (x - mu) / sd
    zc, yc = z - z.mean(0), y - y.mean()
    gram = zc.T @ zc
    w = np.linalg.solve(gram + 0.5 * np.trace(gram) / d * np.eye(d), zc.T @ yc)
    eval_batch = SvebBatch(random_groups(rng, tokenizer, groups=3), pad_id=tokenizer.pad_token_id, hidden_fn=hidden_fn)
    got = eval_batch.packing.pack(critic.estimate(eval_batch)).double().numpy()
    xe = (eval_batch.hidden.double().numpy() - mu) / sd
    want = (xe - z.mean(0)) @ w + y.mean()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_linear_critic_picks_ridge_on_held_out_groups(seed, tokenizer):
    """With a return that is a linear function of the features, the weakest ridge wins."""
    rng = random.Random(seed)
    groups = random_groups(rng, tokenizer, groups=10, split="train")

    def hidden_fn(ids, attn, packing):
        length = attn.sum(1, keepdim=True).expand_as(ids).float()
        noise = packed_hidden_of(ids, packing, seed)[:, :3]
        return torch.cat([packing.pack(length)[:, None], noise], dim=1)

    for g in groups:  # the return is the sequence length: feature 0 of every token
        for r in g.rollouts:
            r.reward = float(len(g.prompt_ids) + len(r.response_ids))
    train = SvebBatch(groups, pad_id=tokenizer.pad_token_id, hidden_fn=hidden_fn)
    critic = estimators.LinearCritic(ridge_grid=(1e-6, 100.0), seed=seed)
    critic.fit(train)
    assert critic.ridge == 1e-6 and critic.held_out_mse[1e-6] < critic.held_out_mse[100.0]


def test_user_estimators(seed, tokenizer):
    batch = SvebBatch(random_groups(random.Random(seed), tokenizer), pad_id=tokenizer.pad_token_id)

    def zeros(b):
        return np.zeros(tuple(b.input_ids.shape))

    class Fitted(estimators.Estimator):
        name = "fitted"

        def fit(self, train):
            self.level = float(train.returns.mean())

        def estimate(self, b):
            return torch.full(b.input_ids.shape, self.level)

    assert estimators.as_estimator(zeros).name == "zeros"
    assert estimators.as_estimator(zeros, "z").estimate(batch).abs().sum() == 0
    assert estimators.as_estimator(Fitted).name == "fitted"
    with pytest.raises(TypeError, match="Tensor or ndarray"):
        estimators.as_estimator(lambda b: [0.0], "listy").estimate(batch)
    with pytest.raises(TypeError, match="estimator"):
        estimators.as_estimator(42)


def test_evaluate_fits_on_train_and_reports_skips(seed, tokenizer):
    rng = random.Random(seed)
    dataset = data.Dataset(random_groups(rng, tokenizer, 3, "train") + random_groups(rng, tokenizer, 4, "eval"))

    class Level(estimators.Estimator):
        name = "train_level"

        needs_train = True

        def fit(self, train):
            self.level = float(train.returns.mean())

        def estimate(self, b):
            return torch.full(b.input_ids.shape, self.level)

    class Missing(estimators.Estimator):
        name = "missing_dep"

        def estimate(self, b):
            raise ImportError("no module named imaginary")

    class FitAnyway(Level):  # fit is called whenever there is a train split, needed or not
        name = "fit_anyway"
        needs_train = False

    result = evaluate(dataset, [estimators.GroupMean(), Level(), Missing(), FitAnyway()], bootstrap=10, seed=seed)
    train_mean = float(torch.tensor([r.reward for g in dataset.split("train") for r in g.rollouts]).mean())
    assert np.allclose(result.estimates["train_level"], train_mean)
    assert "imaginary" in result.skipped["missing_dep"]
    assert np.allclose(result.estimates["fit_anyway"], train_mean)
    assert set(result.to_json()["estimators"]) == {"group_mean", "train_level", "fit_anyway"}
    # Without a model or tokenizer, the estimators that need them are skipped with the reason.
    result = evaluate(dataset, [estimators.GroupMean(), estimators.Hista(), estimators.LinearCritic(),
                                estimators.Numca()], bootstrap=0)
    assert set(result.metrics) == {"group_mean"}
    assert "hidden states" in result.skipped["hista_cos_t0.1"] and "hidden states" in result.skipped["critic"]
    assert "tokenizer" in result.skipped["numca_last"]
    no_train = data.Dataset(dataset.split("eval"))
    result = evaluate(no_train, [Level()], bootstrap=0)
    assert result.skipped == {"train_level": "needs a train split"}
    with pytest.raises(ValueError, match="named"):
        evaluate(dataset, [estimators.GroupMean(), estimators.GroupMean()], bootstrap=0)
