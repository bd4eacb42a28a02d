"""`sveb build` with a tiny randomly initialised transformers model, end to end: sampling, Monte-Carlo
values, resumption, then `sveb eval` on the result with the same model's hidden states."""

import json
import shutil

import pytest
import torch

from sveb_kernels.cli import main
from sveb_kernels.sveb import build, data, rewards, tiny


@pytest.fixture(autouse=True)
def one_thread():
    """A 16-wide model gains nothing from threads, and spinning OpenMP threads on a shared 2-core
    machine make each tiny matmul milliseconds long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=1, hidden_size=16, layers=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": "Compute: 3 + 4\n", "answer": "7"}, {"id": "second", "prompt": "Compute: 10 - 2\n", "answer": "8"},
            {"prompt": "Compute: 1 + 1\n", "answer": "2"}, {"prompt": "Compute: 9 - 9\n", "answer": "0"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REWARDS = '''
def first_char_is_digit(response, answer, prompt):
    """Decided by the first response token: every state's value must equal the rollout's reward."""
    return float(response[:1].isdigit())

def odd_digit_count(response, answer, prompt):
    return float(sum(c.isdigit() for c in response) % 2)
'''


def run_build(out, model_dir, prompts_file, reward, *extra):
    args = ["sveb", "build", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out),
            "-G", "3", "-K", "4", "--states-per-rollout", "3", "--max-new-tokens", "9", "--batch-size", "6",
            "--reward", reward, "--device", "cpu", "--no-progress", *extra]
    assert main(args) == 0


def test_numeric_reward():
    assert rewards.numeric_match("so 3 + 4 = 7", "7") == 1.0
    assert rewards.numeric_match("Answer: 1,000", "1000.00") == 1.0
    assert rewards.numeric_match("it is -0.0", "0") == 1.0
    assert rewards.numeric_match("7 then 8", "7") == 0.0  # the last number counts
    assert rewards.numeric_match("no number", "7") == 0.0
    assert rewards.numeric_match("-5", "5") == 0.0
    assert rewards.numeric_match("x7", "7") == 0.0  # not a number by the §2b pattern
    assert rewards.numeric_match("anything", "no answer") == 0.0


def test_state_positions():
    assert build.state_positions(1, 8) == []
    assert build.state_positions(2, 8) == [0]
    assert build.state_positions(12, 3) == [0, 5, 10]
    assert build.state_positions(5, 100) == [0, 1, 2, 3]


def test_build_values_resume_and_eval(tmp_path, model_dir, prompts_file):
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(REWARDS)
    # 1. A reward decided by the first token: the Monte-Carlo value of every state is exactly the
    #    rollout's reward, which holds only if continuations are scored with their state's prefix.
    decided = tmp_path / "decided"
    run_build(decided, model_dir, prompts_file, f"{reward_file}:first_char_is_digit")
    dataset = data.load_dataset(decided)
    assert [g.prompt_id for g in dataset.groups] == ["p000000", "second", "p000002", "p000003"]
    assert {g.split for g in dataset.groups} == {"train", "eval"}
    for g in dataset.groups:
        assert len(g.rollouts) == 3
        for r in g.rollouts:
            assert 1 <= len(r.response_ids) <= 9
            assert r.states.position == build.state_positions(len(r.response_ids), 3)
            assert set(r.states.samples) <= {4}
            assert all(v == r.reward for v in r.states.value)

    # 2. A reward that depends on the continuation: values are means of K = 4 rewards.
    full = tmp_path / "full"
    run_build(full, model_dir, prompts_file, f"{reward_file}:odd_digit_count")
    values = [v for g in data.load_dataset(full).groups for r in g.rollouts for v in r.states.value]
    assert all(v * 4 == int(v * 4) and 0 <= v <= 1 for v in values)

    # 3. Resumption: keep the first group and a torn second line, run again: the same file results.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / data.META_FILE, resumed / data.META_FILE)
    lines = (full / data.GROUPS_JSONL).read_text().splitlines(keepends=True)
    (resumed / data.GROUPS_JSONL).write_text(lines[0] + lines[1][:40])
    run_build(resumed, model_dir, prompts_file, f"{reward_file}:odd_digit_count")
    assert (resumed / data.GROUPS_JSONL).read_text() == (full / data.GROUPS_JSONL).read_text()
    # Other settings in the same directory are refused rather than mixed in.
    with pytest.raises(ValueError, match="other settings"):
        run_build(resumed, model_dir, prompts_file, f"{reward_file}:odd_digit_count", "--temperature", "0.5")

    # 4. eval with this model's hidden states, Numca through its tokenizer, a user estimator, a plot.
    estimator_file = tmp_path / "my_estimator.py"
    estimator_file.write_text("import torch\ndef half(batch):\n    return torch.full(batch.input_ids.shape, 0.5)\n")
    out_json = tmp_path / "result.json"
    plot = tmp_path / "curves.png"
    assert main(["sveb", "eval", "--data", str(full), "--bootstrap", "20", "--json", "--no-progress", "--out",
                 str(out_json), "--estimator", f"half={estimator_file}:half", "--plot", str(plot),
                 "--temperatures", "0.1", "--device", "cpu"]) == 0
    result = json.loads(out_json.read_text())
    names = set(result["estimators"])
    assert {"group_mean", "rloo", "critic", "hista_cos_t0.1", "hista_dot_t0.1", "half"} <= names
    if numca_importable():
        assert {"numca_last", "numca_prefix"} <= names and not result["skipped"]
    else:
        assert set(result["skipped"]) == {"numca_last", "numca_prefix"}
    assert result["meta"]["exact_truth"] is False and result["meta"]["eval_states"] > 0
    half = result["estimators"]["half"]
    assert half["mae"] == pytest.approx(sum(abs(v - 0.5) for v in eval_values(full)) / len(eval_values(full)))
    assert plot.stat().st_size > 10_000


def numca_importable():
    try:
        import sveb_kernels.numca  # noqa: F401
    except ImportError:
        return False
    return True


def eval_values(path):
    return [v for g in data.load_dataset(path).split("eval") for r in g.rollouts for v in r.states.value]


def test_parquet_output(tmp_path, model_dir, prompts_file):
    pytest.importorskip("pyarrow")
    run_build(tmp_path / "pq", model_dir, prompts_file, "numeric", "--format", "parquet", "-K", "1")
    assert not (tmp_path / "pq" / data.GROUPS_JSONL).exists()
    dataset = data.load_dataset(tmp_path / "pq")
    assert len(dataset.groups) == 4 and dataset.meta["value_kind"] == "monte_carlo"


def test_bad_build_arguments(tmp_path, model_dir, prompts_file):
    with pytest.raises(SystemExit):
        main(["sveb", "build", "--model", str(model_dir), "--out", str(tmp_path / "x")])  # no --prompts
    with pytest.raises(ValueError, match="continuations"):
        run_build(tmp_path / "y", model_dir, prompts_file, "numeric", "-K", "0")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        build.read_prompts(bad)


def test_embedded_task_scored_with_a_given_model(model_dir, capsys):
    """The embedded task re-tokenized for another model, whose hidden states feed Hista and the critic."""
    assert main(["sveb", "eval", "--model", str(model_dir), "--prompts", "3", "--group-size", "3", "--json",
                 "--bootstrap", "5", "--no-progress", "--estimators", "critic,hista_cos", "--temperatures", "0.1",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["estimators"]) == {"rloo", "critic", "hista_cos_t0.1"} and result["meta"]["model"] == str(model_dir)
