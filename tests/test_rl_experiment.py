"""examples/rl_experiment.py: its --quick mode end to end (every method, two seeds, the real trl), the
logging it writes, and the closed-form reference values it scores the estimators against."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from sveb_kernels.sveb import task, tiny  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture
def experiment(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    import rl_experiment

    return rl_experiment


def test_quick_mode_runs_every_method_and_logs_every_step(experiment, tmp_path):
    out, table_csv, png, table = (str(tmp_path / n) for n in ("r.json", "r.csv", "r.png", "table.md"))
    threads = torch.get_num_threads()
    try:
        experiment.main(["--quick", "--out", out, "--csv", table_csv, "--plot", png, "--table", table])
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        result = json.load(f)
    cfg = result["config"]
    assert result["complete"] and cfg["quick"]
    assert result["warm_start"] and all(0.0 <= w["success"] <= 1.0 for w in result["warm_start"])
    runs = result["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in experiment.METHODS for s in cfg["seeds"])
    for run in runs:
        assert [s["step"] for s in run["steps"]] == list(range(1, cfg["steps"] + 1))
        assert 0.0 <= run["final_success"] <= 1.0 and run["final_samples"] == cfg["eval_prompts"] * cfg["eval_samples"]
        for s in run["steps"]:
            assert 0.0 <= s["success_rate"] <= s["mean_reward"] <= 1.0  # 0/1 reward: equal
            assert s["success_rate"] == s["mean_reward"]
            assert 0.0 < s["estimator_seconds"] < s["step_seconds"]
            assert 0.0 <= s["coverage"] <= 1.0 and 0.02 <= s["slip_rate"] <= 0.98
            for name in experiment.DIAGNOSTIC_ESTIMATORS:
                r = s[f"{name}/within_pearson"]
                assert (math.isnan(r) and s["scored_states"] == 0) or -1.0 <= r <= 1.0
            if s["scored_states"]:
                assert s["group_mean/within_pearson"] == 0.0  # constant per prompt: explains nothing within one
    summary = result["summary"]["methods"]
    assert set(summary) == set(experiment.METHODS)
    for m in summary.values():
        assert 0.0 < m["estimator_share"] < 1.0
    with open(table_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) * cfg["steps"]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(table) as f:
        lines = f.read().strip().splitlines()
    assert len(lines) == 2 + len(experiment.METHODS)

    merged = str(tmp_path / "merged.json")  # how a grid spread over processes is put together
    experiment.main(["--merge", out, "--out", merged])
    with open(merged) as f:
        again = json.load(f)
    def same(x, y):  # NaN-aware equality (a Pearson with no scorable state is NaN)
        return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    assert same(again["runs"], sorted(runs, key=lambda r: (r["seed"], r["method"])))
    assert same(again["summary"], result["summary"]) and again["complete"]


def test_slip_model_parse_and_reward(experiment, seed):
    rng = np.random.default_rng(seed)
    cfg = experiment.Config()
    for _ in range(20):
        problem = experiment.sample_problem(rng, cfg)
        slips = [int(rng.choice((0,) + task.SLIPS)) for _ in problem.operands]
        rollout = task.write_rollout(problem, slips)
        parsed = experiment.slip_model_rollout(problem, rollout.text)
        assert parsed is not None and list(parsed.slips) == slips
        assert experiment.reward_of(rollout.text, problem.answer) == rollout.reward
        # a miscopied running value, a mistake the slip model never makes, no answer: not its text
        lines = rollout.text.split("\n")
        value, rest = lines[1].split(" ", 1)
        miscopied = "\n".join(lines[:1] + [f"{int(value) + 1} {rest}"] + lines[2:])
        assert experiment.slip_model_rollout(problem, miscopied) is None
        off_model = task.write_rollout(problem, [2] + slips[1:]).text
        assert experiment.slip_model_rollout(problem, off_model) is None
        assert experiment.slip_model_rollout(problem, rollout.text.rsplit("\n", 1)[0]) is None


def test_reference_values_are_the_closed_form_before_each_token(experiment, seed):
    rng = np.random.default_rng(seed)
    tokenizer = tiny.build_tokenizer()
    diagnostics = experiment.Diagnostics(tokenizer)
    cfg = experiment.Config()
    problems = [experiment.sample_problem(rng, cfg) for _ in range(3)]
    slips = [[int(rng.choice((0, 0) + task.SLIPS)) for _ in p.operands] for p in problems]
    texts = [task.write_rollout(p, s).text for p, s in zip(problems, slips)]
    texts[2] = texts[2].replace("Answer", "Answr")  # off-format: not covered
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    length = max(map(len, ids)) + 2
    completion_ids = torch.full((3, length), tokenizer.pad_token_id)
    completion_mask = torch.zeros(3, length, dtype=torch.long)
    for b, row in enumerate(ids):
        completion_ids[b, :len(row)] = torch.tensor(row)
        completion_mask[b, :len(row)] = 1
    diagnostics.batch_problems = problems
    ref, p, coverage = diagnostics.reference(completion_ids, completion_mask)
    nonzero = sum(s != 0 for row in slips[:2] for s in row)
    assert p == pytest.approx(min(max(nonzero / sum(len(row) for row in slips[:2]), 0.02), 0.98))
    assert coverage == pytest.approx(2 / 3)
    assert torch.isnan(ref[2]).all()
    for b in range(2):
        rollout = task.write_rollout(task.ArithProblem(problems[b].start, problems[b].operands, p), slips[b])
        n = len(ids[b])
        # before token t the text is the decoded first t tokens
        expected = [task.prefix_value(rollout, len(tokenizer.decode(ids[b][:t], skip_special_tokens=True)))
                    for t in range(n)]
        assert ref[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert ref[b, n - 1] == rollout.reward  # before EOS the whole text is written: the outcome
        assert torch.isnan(ref[b, n:]).all()
