"""The embedded task: exact values against brute-force enumeration of every slip sequence, the
tokenized dataset against that oracle at token boundaries, and the locally built tokenizer."""

import itertools
import random

import numpy as np
import pytest

from sveb_kernels.sveb import embedded, task, tiny

SLIP_CHOICES = (0, -10, -1, 1, 10)


def oracle_text(start, operands, slips):
    """The response the task's policy writes, spelled out independently of task.write_rollout."""
    lines, value = [], start
    for operand, slip in zip(operands, slips):
        sign = "+" if operand >= 0 else "-"
        result = value + operand + slip
        lines.append(f"{value} {sign} {abs(operand)} = {result}\n")
        value = result
    return "".join(lines) + f"Answer: {value}"


def oracle_value(start, operands, slip_prob, prefix):
    """P(final answer correct | response starts with `prefix`), summing over all slip sequences."""
    answer = start + sum(operands)
    numer = denom = 0.0
    for slips in itertools.product(SLIP_CHOICES, repeat=len(operands)):
        p = 1.0
        for s in slips:
            p *= (1 - slip_prob) if s == 0 else slip_prob / 4
        text = oracle_text(start, operands, slips)
        if text.startswith(prefix):
            denom += p
            numer += p * (text.rsplit(" ", 1)[1] == str(answer))
    return numer / denom


def random_problem(rng, max_steps=4):
    steps = rng.randint(1, max_steps)
    operands = tuple(rng.choice([-1, 1]) * rng.randint(1, 99) for _ in range(steps))
    # Small starts make negative results and numbers that are prefixes of others ("1" of "10") common.
    start = rng.choice([rng.randint(0, 12), rng.randint(1, 99)])
    return task.ArithProblem(start, operands, rng.uniform(0.05, 0.6))


def test_prefix_values_match_enumeration(seed):
    rng = random.Random(seed)
    for _ in range(6):
        problem = random_problem(rng)
        slips = tuple(rng.choice(SLIP_CHOICES) for _ in problem.operands)
        rollout = task.write_rollout(problem, slips)
        assert rollout.text == oracle_text(problem.start, problem.operands, slips)
        for length in range(len(rollout.text) + 1):
            want = oracle_value(problem.start, problem.operands, problem.slip_prob, rollout.text[:length])
            got = task.prefix_value(rollout, length)
            assert abs(got - want) < 1e-12, (rollout.text[:length], got, want)


def test_reward_is_the_final_answer_check(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        problem = task.sample_problem(rng)
        rollout = task.sample_rollout(problem, rng)
        correct = sum(rollout.slips) == 0  # slips add up along the chain
        assert rollout.reward == float(correct)
        assert rollout.text.endswith(f"Answer: {rollout.written[-1]}")
        assert task.prefix_value(rollout, len(rollout.text)) == rollout.reward


def test_dataset_values_at_token_boundaries(seed):
    """Each token's value is the oracle's for the text the tokens so far decode to."""
    rng = random.Random(seed)
    tokenizer = tiny.build_tokenizer()
    problem = random_problem(rng)
    rollouts = [task.write_rollout(problem, tuple(rng.choice(SLIP_CHOICES) for _ in problem.operands))
                for _ in range(3)]
    group = embedded.arith_group(tokenizer, problem, rollouts, prompt_id="x", split="eval")
    assert tokenizer.decode(group.prompt_ids) == problem.prompt and group.answer == str(problem.answer)
    for rollout, record in zip(rollouts, group.rollouts):
        ids = record.response_ids
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == rollout.text
        assert record.states.position == list(range(len(ids))) and set(record.states.samples) == {0}
        assert record.reward == record.states.value[-1] == float(rollout.text.endswith(f" {problem.answer}"))
        for t in range(len(ids) - 1):
            want = oracle_value(problem.start, problem.operands, problem.slip_prob, tokenizer.decode(ids[: t + 1]))
            assert abs(record.states.value[t] - want) < 1e-12


def test_sampled_groups_are_seeded(seed):
    tokenizer = tiny.build_tokenizer()
    a = embedded.arith_groups(tokenizer, 2, 3, seed=seed, stream=1, split="eval")
    b = embedded.arith_groups(tokenizer, 2, 3, seed=seed, stream=1, split="eval")
    c = embedded.arith_groups(tokenizer, 2, 3, seed=seed, stream=2, split="eval")
    assert a == b and a != c


def test_tokenizer_round_trips_and_merges_digit_pairs():
    tokenizer = tiny.build_tokenizer()
    text = "Compute: 12 - 345\n12 - 345 = -333\nAnswer: -333"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "12" in tokens and "34" in tokens and "Answer" in tokens and "Compute" in tokens
    # Concatenating each token's own text gives the text (what a NumericVocab relies on).
    assert "".join(tokenizer.decode([i]) for i in ids) == text
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == len(tokenizer) - 1


def test_tiny_model_is_seeded():
    tokenizer = tiny.build_tokenizer()
    a = tiny.build_model(tokenizer, seed=3, hidden_size=16, layers=1)
    b = tiny.build_model(tokenizer, seed=3, hidden_size=16, layers=1)
    c = tiny.build_model(tokenizer, seed=4, hidden_size=16, layers=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all((pa[k] == pb[k]).all() for k in pa)
    assert any((pa[k] != pc[k]).any() for k in pa)


@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_extreme_slip_probabilities(bad):
    problem = task.ArithProblem(5, (3, -2), bad)
    rollout = task.write_rollout(problem, (0, 0))
    assert task.prefix_value(rollout, 0) == pytest.approx(oracle_value(5, (3, -2), bad, ""))


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_other_tokenizer_families_get_exact_values_too(seed, family):
    """SentencePiece-style (tokens decode differently alone) and digit-splitting byte-level BPE."""
    from transformers import PreTrainedTokenizerFast

    from sveb_kernels.numca import toy_tokenizers

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=toy_tokenizers.build(family),
                                        eos_token=toy_tokenizers.SPECIAL_TOKENS[family][-1])
    rng = random.Random(seed)
    problem = random_problem(rng, max_steps=3)
    rollout = task.write_rollout(problem, tuple(rng.choice(SLIP_CHOICES) for _ in problem.operands))
    group = embedded.arith_group(tokenizer, problem, [rollout], prompt_id="x", split="eval")
    ids = group.rollouts[0].response_ids
    assert tokenizer.decode(ids[:-1]) == rollout.text
    for t in range(len(ids) - 1):
        want = oracle_value(problem.start, problem.operands, problem.slip_prob, tokenizer.decode(ids[: t + 1]))
        assert abs(group.rollouts[0].states.value[t] - want) < 1e-12


def test_lossy_tokenizer_is_refused():
    from transformers import PreTrainedTokenizerFast

    from sveb_kernels.numca import toy_tokenizers

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=toy_tokenizers.build("bert"), eos_token="[SEP]")
    problem = task.ArithProblem(12, (7,), 0.2)
    with pytest.raises(ValueError, match="does not decode"):
        embedded.arith_group(tokenizer, problem, [task.write_rollout(problem, (0,))], prompt_id="x", split="eval")
