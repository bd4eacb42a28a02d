"""The SVEB data format (JSONL / Parquet round trips, checks) and the batch layout estimators see."""

import json
import random

import pytest
import torch

from sveb_kernels.sveb import data
from sveb_kernels.sveb.batch import MissingInputError, SvebBatch


def random_dataset(rng, groups=4):
    out = []
    for g in range(groups):
        rollouts = []
        for _ in range(rng.randint(1, 4)):
            response = [rng.randint(0, 50) for _ in range(rng.randint(1, 9))]
            positions = sorted(rng.sample(range(len(response)), rng.randint(0, len(response))))
            states = data.States(positions, [rng.random() for _ in positions], [rng.choice([0, 4]) for _ in positions])
            rollouts.append(data.Rollout(response, float(rng.randint(0, 1)), states, text=rng.choice([None, "t x"])))
        prompt = [rng.randint(0, 50) for _ in range(rng.randint(1, 5))]
        out.append(data.Group(f"p{g}", prompt, rollouts, rng.choice(data.SPLITS), rng.choice([None, "Q?"]),
                              rng.choice([None, "42"])))
    return data.Dataset(out, {"model": "somewhere", "G": 3})


def test_jsonl_round_trip(tmp_path, seed):
    dataset = random_dataset(random.Random(seed))
    data.save_dataset(dataset, tmp_path / "d")
    back = data.load_dataset(tmp_path / "d")
    assert back.groups == dataset.groups
    assert back.meta == {"format": data.FORMAT, **dataset.meta}
    # A single groups file is a dataset too.
    assert data.load_dataset(tmp_path / "d" / data.GROUPS_JSONL).groups == dataset.groups


def test_parquet_round_trip(tmp_path, seed):
    pytest.importorskip("pyarrow")
    dataset = random_dataset(random.Random(seed))
    data.save_dataset(dataset, tmp_path / "d", fmt="parquet")
    assert (tmp_path / "d" / data.GROUPS_PARQUET).exists()
    assert data.load_dataset(tmp_path / "d").groups == dataset.groups


def test_meta_paths_resolve_relative_to_the_dataset(tmp_path):
    dataset = data.Dataset([], {"model": "model", "other": "/abs/path"})
    data.save_dataset(dataset, tmp_path)
    (tmp_path / "model").mkdir()
    back = data.load_dataset(tmp_path)
    assert back.resolve("model") == str(tmp_path / "model")
    assert back.resolve("other") == "/abs/path"


def record(**override):
    base = {"prompt_id": "a", "prompt_ids": [1, 2], "split": "eval",
            "rollouts": [{"response_ids": [3, 4, 5], "reward": 1.0,
                          "states": {"position": [0, 2], "value": [0.5, 1.0], "samples": [8, 8]}}]}
    base.update(override)
    return base


def rollout_with(**states):
    s = {"position": [0, 2], "value": [0.5, 1.0], "samples": [8, 8]}
    s.update(states)
    return [{"response_ids": [3, 4, 5], "reward": 1.0, "states": s}]


@pytest.mark.parametrize("override, words", [
    (dict(split="test"), "split"),
    (dict(rollouts=rollout_with(position=[0, 3])), "outside the response"),
    (dict(rollouts=rollout_with(position=[1, 1])), "repeat"),
    (dict(rollouts=rollout_with(value=[0.5])), "equal lengths"),
    (dict(rollouts=rollout_with(value=[0.5, float("nan")])), "finite"),
    (dict(rollouts=rollout_with(samples=[8, -1])), "samples"),
    (dict(rollouts=[{"response_ids": [1], "reward": float("inf")}]), "reward"),
])
def test_bad_records_name_the_problem(override, words):
    with pytest.raises(ValueError, match=words):
        data.record_to_group(record(**override))


def test_missing_field_and_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="prompt_ids"):
        data.record_to_group({"prompt_id": "a", "rollouts": []})
    path = tmp_path / data.GROUPS_JSONL
    path.write_text(json.dumps(record()) + "\n" + json.dumps(record()) + "\n")
    with pytest.raises(ValueError, match="twice"):
        data.load_dataset(tmp_path)


def test_torn_last_line_only_tolerated_on_request(tmp_path):
    path = tmp_path / data.GROUPS_JSONL
    path.write_text(json.dumps(record()) + "\n" + json.dumps(record(prompt_id="b"))[:20])
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_dataset(tmp_path)
    assert [r["prompt_id"] for r in data.iter_jsonl(path, tolerate_torn_tail=True)] == ["a"]


def test_batch_layout(seed):
    dataset = random_dataset(random.Random(seed), groups=5)
    batch = SvebBatch(dataset.groups, pad_id=99)
    row = 0
    for gi, group in enumerate(dataset.groups):
        for r in group.rollouts:
            p, n = len(group.prompt_ids), len(r.response_ids)
            assert batch.input_ids[row, :p].tolist() == group.prompt_ids
            assert batch.input_ids[row, p:p + n].tolist() == r.response_ids
            assert (batch.input_ids[row, p + n:] == 99).all()
            assert batch.attention_mask[row].tolist() == [True] * (p + n) + [False] * (batch.input_ids.shape[1] - p - n)
            assert batch.response_mask[row].nonzero().flatten().tolist() == list(range(p, p + n))
            assert int(batch.group_index[row]) == gi and float(batch.returns[row]) == r.reward
            row += 1
    # Reading a [B, L] tensor at the states gives the states' own cells.
    probe = torch.arange(batch.input_ids.numel(), dtype=torch.float32).view_as(batch.input_ids)
    got = batch.at_states(probe).tolist()
    want, row = [], 0
    for group in dataset.groups:
        for r in group.rollouts:
            want += [row * batch.input_ids.shape[1] + len(group.prompt_ids) + t for t in r.states.position]
            row += 1
    assert got == want
    assert batch.state_value.tolist() == [v for g in dataset.groups for r in g.rollouts for v in r.states.value]
    with pytest.raises(ValueError, match="shape"):
        batch.at_states(probe[:, :-1])
    with pytest.raises(MissingInputError, match="hidden states"):
        batch.hidden
