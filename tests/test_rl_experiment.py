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
    assert len(result["warm_held_out"]["per_seed"]) == len(cfg["seeds"])
    assert all(0.0 <= x <= 1.0 for x in result["warm_held_out"]["per_seed"])
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
            assert 0.0 <= s["coverage"] <= s["terminated"] <= 1.0
            assert all(0.0 <= s[f"error_rate/{k}"] <= 1.0 for k in ("copy", "result", "answer"))
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


def _random_written(experiment, rng, cfg):
    problem = experiment.sample_problem(rng, cfg)
    slips = [int(rng.choice((0, 0, 2, -3) + task.SLIPS)) for _ in problem.operands]
    return problem, slips, task.write_rollout(problem, slips)


def test_parse_written_and_reward(experiment, seed):
    rng = np.random.default_rng(seed)
    cfg = experiment.Config()
    for _ in range(20):
        problem, slips, rollout = _random_written(experiment, rng, cfg)
        written = experiment.parse_written(problem, rollout.text)
        assert [e[4] - e[3] for e in written.events if e[0] == "result"] == slips
        assert all(e[4] == e[3] for e in written.events if e[0] != "result")
        assert (written.offset == 0) == bool(rollout.reward) == bool(experiment.reward_of(rollout.text, problem.answer))
        for kind, start, end, _, value in written.events:
            assert rollout.text[start:end] == str(value)
        # a miscopied running value and a wrong answer are the policy's mistakes too: deviations
        lines = rollout.text.split("\n")
        value, rest = lines[1].split(" ", 1)
        miscopied = experiment.parse_written(problem, "\n".join(lines[:1] + [f"{int(value) + 3} {rest}"] + lines[2:]))
        assert [e[4] - e[3] for e in miscopied.events if e[0] == "copy"] == [0, 3] + [0] * (len(slips) - 2)
        # a miscopied operand, a missing answer: not the task's format
        assert experiment.parse_written(problem, rollout.text.replace(f" {abs(problem.operands[0])} =", " 0 =", 1)) is None
        assert experiment.parse_written(problem, rollout.text.rsplit("\n", 1)[0]) is None


def test_error_model_with_the_slip_distribution_is_the_task_closed_form(experiment, seed):
    rng = np.random.default_rng(seed)
    cfg = experiment.Config()
    for _ in range(10):
        problem, _, _ = _random_written(experiment, rng, cfg)
        problem = task.ArithProblem(problem.start, problem.operands, float(rng.uniform(0.05, 0.5)))
        rollout = task.sample_rollout(problem, rng)
        model = experiment.ErrorModel({"copy": {0: 1.0}, "answer": {0: 1.0},
                                       "result": task._step_distribution(problem.slip_prob)})
        written = experiment.parse_written(problem, rollout.text)
        for n in range(len(rollout.text) + 1):
            assert model.value(written, n) == pytest.approx(task.prefix_value(rollout, n), abs=1e-12)


def test_reference_values_are_the_error_model_before_each_token(experiment, seed):
    rng = np.random.default_rng(seed)
    tokenizer = tiny.build_tokenizer()
    diagnostics = experiment.Diagnostics(tokenizer)
    cfg = experiment.Config()
    drawn = [_random_written(experiment, rng, cfg) for _ in range(4)]
    problems = [p for p, _, _ in drawn]
    texts = [r.text for _, _, r in drawn]
    texts[2] = texts[2].replace("Answer", "Answr")  # off-format: not covered
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    ids[3] = ids[3][:-1]  # cut off before EOS: not covered
    length = max(map(len, ids)) + 2
    completion_ids = torch.full((4, length), tokenizer.pad_token_id)
    completion_mask = torch.zeros(4, length, dtype=torch.long)
    for b, row in enumerate(ids):
        completion_ids[b, :len(row)] = torch.tensor(row)
        completion_mask[b, :len(row)] = 1
    diagnostics.batch_problems = problems
    ref, model, counts = diagnostics.reference(completion_ids, completion_mask)
    assert counts == {"terminated": 0.75, "coverage": 0.5}
    written = [experiment.parse_written(p, t) for p, t in zip(problems[:2], texts[:2])]
    # the measured distribution: every deviation of the two covered completions, by kind
    results = [e[4] - e[3] for w in written for e in w.events if e[0] == "result"]
    assert model.distributions["result"] == pytest.approx({d: results.count(d) / len(results) for d in set(results)})
    assert model.distributions["copy"] == {0: 1.0} and model.distributions["answer"] == {0: 1.0}
    assert torch.isnan(ref[2:]).all()
    for b in range(2):
        n = len(ids[b])
        # before token t the text is the decoded first t tokens
        expected = [model.value(written[b], len(tokenizer.decode(ids[b][:t], skip_special_tokens=True)))
                    for t in range(n)]
        assert ref[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert torch.isnan(ref[b, n:]).all()
        assert all(0.0 <= v <= 1.0 for v in expected)
        # before the first token: the chance that all deviations to come cancel
        assert expected[0] == pytest.approx(model.tail(tuple(e[0] for e in written[b].events)).get(0, 0.0))
