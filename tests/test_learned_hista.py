"""LearnedHista: learns a similarity through the op's backward, values before updating (no
leakage), state saves and loads with the optimizer."""

import copy

import pytest
import torch

from sveb_kernels.estimators import LearnedHista, LeaveOneOutMean, RolloutBatch, Shard, make_estimator


def synthetic_batch(generator, groups=6, rollouts=4, length=12, d=8):
    """Rollouts whose return is a bit written into hidden dimension 0 from mid-rollout on (random bits
    before), under larger per-rollout nuisance in the other dimensions: raw cosine mostly sees the
    nuisance, a projection can find the bit."""
    b = groups * rollouts
    returns = torch.randint(0, 2, (b,), generator=generator).float()
    group_index = torch.arange(groups).repeat_interleave(rollouts)
    nuisance = 3.0 * torch.randn(b, 1, d, generator=generator)
    nuisance[..., 0] = 0
    hidden = nuisance + 0.5 * torch.randn(b, length, d, generator=generator)
    on_track = torch.where(torch.arange(length) >= length // 2, returns[:, None],
                           torch.randint(0, 2, (b, length), generator=generator).float())
    hidden[:, :, 0] += 2.0 * (on_track - 0.5)
    mask = torch.ones(b, length, dtype=torch.bool)
    batch = RolloutBatch(torch.zeros(b, length, dtype=torch.long), mask, group_index, returns)
    batch._hidden = batch.packing.pack(hidden)
    return batch


def held_out_mse(est, batch):
    values = est.values_now(batch)
    return float((values - batch.returns[:, None]).square().mean())


def test_learns_a_similarity_that_raw_cosine_misses():
    """Fixed seeds (deterministic): trained on 80 groups, better than its untrained self and than
    the leave-one-out mean on 60 held-out groups."""
    g = torch.Generator().manual_seed(0)
    train, test = synthetic_batch(g, groups=80), synthetic_batch(g, groups=60)
    est = LearnedHista(dim=8, temperature=0.3, lr=3e-2, epochs=6, groups_per_step=6, seed=0, backend="reference")
    untrained = LearnedHista(dim=8, temperature=0.3, seed=0, backend="reference", steps_per_batch=0)
    untrained._ensure(train.hidden)  # same initial parameters and feature statistics
    est.fit(train)
    assert est.updates == 6 * 14 and est.update_seconds > 0
    after, before = held_out_mse(est, test), held_out_mse(untrained, test)
    rloo = float((LeaveOneOutMean().estimate(test) - test.returns[:, None]).square().mean())
    assert after < before - 0.05 and after < rloo, (before, after, rloo)


def test_values_come_before_the_update_on_their_batch():
    """No leakage: estimate(batch) equals the values of a frozen copy taken before it; only then do
    the parameters move (on that batch's returns)."""
    g = torch.Generator().manual_seed(1)
    batch = synthetic_batch(g)
    est = LearnedHista(dim=8, lr=1e-1, steps_per_batch=2, backend="reference")
    est.estimate(synthetic_batch(g))  # a first batch: parameters exist and have moved once
    frozen = copy.deepcopy(est)
    before = est.projection.detach().clone()
    values = est.estimate(batch)
    torch.testing.assert_close(values, frozen.values_now(batch), rtol=0, atol=0)
    assert not torch.equal(est.projection.detach(), before)
    # And the returns of the batch itself cannot have entered its values: changing them (all other
    # inputs equal) changes no value of a frozen estimator... except through the other rollouts,
    # so change one rollout's return and check its own tokens' values stay put.
    changed = RolloutBatch(batch.token_ids, batch.response_mask, batch.group_index, batch.returns.clone())
    changed._hidden = batch.hidden
    changed.returns[0] += 10.0
    torch.testing.assert_close(frozen.values_now(changed)[0], frozen.values_now(batch)[0], rtol=0, atol=0)


def test_state_dict_round_trip_includes_the_optimizer(tmp_path):
    g = torch.Generator().manual_seed(2)
    batches = [synthetic_batch(g) for _ in range(3)]
    est = LearnedHista(dim=6, lr=1e-2, backend="reference")
    assert est.state_dict()["updates"] == 0 and "projection" not in est.state_dict()
    est.estimate(batches[0])
    est.estimate(batches[1])
    path = tmp_path / "learned.pt"
    torch.save(est.state_dict(), path)
    restored = LearnedHista(dim=6, lr=1e-2, backend="reference")
    restored.load_state_dict(torch.load(path))
    assert restored.updates == est.updates
    # Same values now, and the same parameters after one more update (Adam's moments came back too).
    torch.testing.assert_close(restored.estimate(batches[2]), est.estimate(batches[2]), rtol=0, atol=0)
    torch.testing.assert_close(restored.projection.detach(), est.projection.detach(), rtol=0, atol=0)
    fresh_optimizer = LearnedHista(dim=6, lr=1e-2, backend="reference")
    state = est.state_dict()
    fresh_optimizer.load_state_dict(state)
    assert fresh_optimizer.optimizer.state_dict()["state"], "optimizer moments not restored"
    with pytest.raises(ValueError, match="d=6"):
        LearnedHista(dim=5).load_state_dict(state)


def test_named_and_guarded():
    est = make_estimator("learned_hista", dim=4)
    assert isinstance(est, LearnedHista) and est.name == "learned_hista_d4"
    with pytest.raises(ValueError, match="dim"):
        LearnedHista(dim=0)
    with pytest.raises(ValueError, match="temperature"):
        LearnedHista(temperature=0.0)
    g = torch.Generator().manual_seed(3)
    batch = synthetic_batch(g)
    est.estimate(batch)
    wrong = synthetic_batch(g, d=5)
    with pytest.raises(ValueError, match="D=5"):
        est.estimate(wrong)
    batch.shard = Shard.__new__(Shard)
    with pytest.raises(NotImplementedError, match="sharded"):
        est.estimate(batch)


def test_frozen_estimator_never_updates():
    g = torch.Generator().manual_seed(4)
    est = LearnedHista(dim=4, steps_per_batch=0, backend="reference")
    est.estimate(synthetic_batch(g))
    before = est.projection.detach().clone()
    est.estimate(synthetic_batch(g))
    assert est.updates == 0 and torch.equal(est.projection.detach(), before)


def test_trains_under_inference_mode():
    """`sveb eval` and trainers value batches under torch.inference_mode(): fitting and updating still work."""
    g = torch.Generator().manual_seed(5)
    est = LearnedHista(dim=4, epochs=1, groups_per_step=3, backend="reference")
    with torch.inference_mode():
        train, batch = synthetic_batch(g), synthetic_batch(g)
        est.fit(train)
        values = est.estimate(batch)
    assert est.updates == 3 and torch.isfinite(values).all()
    assert not est.projection.is_inference() and est.projection.requires_grad


def test_in_the_trl_trainer(tmp_path, seed):
    """SvebGRPOTrainer(value_estimator=LearnedHista(...)): hidden states are handed to it, every
    generation batch is valued then learned from, the advantages are R - V with V from the
    parameters before that batch's update, and the state saves and loads."""
    pytest.importorskip("trl")
    trl_tests = pytest.importorskip("test_integration_trl")
    from sveb_kernels.integrations.trl import SvebGRPOTrainer

    tokenizer = trl_tests.tiny.build_tokenizer()
    est = LearnedHista(dim=8, lr=1e-2, backend="reference")
    snapshots = []
    original = est.values_now

    def values_now(batch):  # the values the trainer gets, and a frozen copy taken just before
        snapshots.append((copy.deepcopy(est), batch))
        return original(batch)

    est.values_now = values_now
    trainer = trl_tests.train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator=est)
    assert trainer.value_estimator is est and est.updates == len(trainer.generated) == len(snapshots) > 0
    for (frozen, batch), gen in zip(snapshots, trainer.generated):
        mask = gen["completion_mask"].bool()
        values = frozen.values_now(batch)
        assert torch.isfinite(gen["advantages"]).all() and values.shape[0] == mask.shape[0]
    restored = LearnedHista(dim=8, lr=1e-2, backend="reference")
    restored.load_state_dict(est.state_dict())
    assert torch.equal(restored.projection, est.projection.detach())
