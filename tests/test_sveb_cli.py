"""The `sveb-kernels sveb` command: the quick embedded run in a fresh process, and the embedded task
written to disk and scored from there."""

import json
import math
import subprocess
import sys

import pytest
import torch

from sveb_kernels.cli import main
from sveb_kernels.sveb import data


def test_quick_eval_json():
    """The documented smoke run: embedded task, every estimator, JSON on stdout only."""
    done = subprocess.run([sys.executable, "-m", "sveb_kernels.cli", "sveb", "eval", "--quick", "--json",
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    estimators = result["estimators"]
    expected = {"group_mean", "rloo", "critic", "numca_last", "numca_prefix"}
    expected |= {f"hista_{s}_t{t}" for s in ("cos", "dot") for t in ("0.01", "0.03", "0.1", "0.3", "1")}
    assert set(estimators) | set(result["skipped"]) == expected
    try:
        import sveb_kernels.numca  # noqa: F401
        assert result["skipped"] == {}
    except ImportError:  # only an unimportable numca package may be skipped
        assert set(result["skipped"]) == {"numca_last", "numca_prefix"}
    for name, row in estimators.items():
        for metric in ("mse", "mae", "pearson", "spearman", "within_pearson", "collapse_ratio"):
            assert math.isfinite(row[metric]), (name, metric)
            assert row[f"{metric}_lo"] <= row[metric] + 1e-12 or metric == "collapse_ratio"
    # The group mean is constant within a prompt: it cannot order a prompt's states.
    assert estimators["group_mean"]["within_pearson"] == 0.0 == estimators["group_mean"]["collapse_ratio"]
    assert result["meta"]["exact_truth"] is True and result["meta"]["eval_groups"] == 48


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_embedded_eval_is_deterministic(capsys):
    args = ["sveb", "eval", "--prompts", "4", "--group-size", "4", "--bootstrap", "10", "--json", "--no-progress",
            "--temperatures", "0.1", "--seed", "5"]

    def run(argv):
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        del result["meta"]["seconds"]  # wall time is the one thing allowed to differ
        return result

    first = run(args)
    assert run(args) == first
    assert run(args[:-1] + ["6"]) != first


def test_build_embedded_task_then_eval(tmp_path, capsys):
    out = tmp_path / "arith"
    assert main(["sveb", "build", "--task", "arith", "--num-prompts", "3", "-G", "4", "--out", str(out),
                 "--no-progress"]) == 0
    dataset = data.load_dataset(out)
    assert dataset.meta["value_kind"] == "exact" and (out / "model" / "config.json").exists()
    assert [len(g.rollouts) for g in dataset.groups] == [4] * 6
    assert all(set(r.states.samples) == {0} for g in dataset.groups for r in g.rollouts)
    capsys.readouterr()
    assert main(["sveb", "eval", "--data", str(out), "--json", "--bootstrap", "10", "--no-progress",
                 "--estimators", "group_mean,critic,hista_cos,numca", "--temperatures", "0.1,1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["estimators"]) | set(result["skipped"]) == {
        "group_mean", "rloo", "critic", "hista_cos_t0.1", "hista_cos_t1", "numca_last", "numca_prefix"}
    assert result["meta"]["eval_groups"] == 3 and result["meta"]["train_groups"] == 3


def test_unknown_estimator_is_refused():
    with pytest.raises(SystemExit):
        main(["sveb", "eval", "--prompts", "2", "--estimators", "group_mean,telepathy"])
