"""The embedded SVEB task: arithmetic chains whose state values are known exactly.

A prompt asks for a chain of additions and subtractions; the policy writes one step per line and
then the answer:

    Compute: 12 + 7 - 3 + 5
    12 + 7 = 19
    19 - 3 = 16
    16 + 5 = 21
    Answer: 21

The policy copies the running value and the operands faithfully, but each step's result slips with
the prompt's probability `slip_prob`: instead of the correct sum of what it wrote, it writes that
sum plus a slip drawn uniformly from SLIPS (an off-by-one or a carry error). Every later step builds
on the number it wrote, so a slip is visible in the numbers and persists unless later slips cancel
it. The reward is 1 when the final answer is the true one, else 0.

Because all randomness sits in the digits of the results, the value of any text prefix (the
probability of reward 1 given that prefix) has a closed form: the offset of the written running
value from the true one is known from the finished lines, the result being written is known to be
one of the few candidates its digits so far allow (weighted by the policy's probabilities), and the
slips still to come add independent steps to the offset, whose distribution is a small convolution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SLIPS = (-10, -1, 1, 10)


@dataclass(frozen=True)
class ArithProblem:
    """start, then signed operands (+7, -3, ...); each written result slips with `slip_prob`."""

    start: int
    operands: tuple[int, ...]
    slip_prob: float

    @property
    def answer(self) -> int:
        return self.start + sum(self.operands)

    @property
    def prompt(self) -> str:
        terms = "".join(f" {'+' if b >= 0 else '-'} {abs(b)}" for b in self.operands)
        return f"Compute: {self.start}{terms}\n"


@dataclass(frozen=True)
class ArithRollout:
    """One sampled response: the slip of every step (0 = none), its text, and where each result sits."""

    problem: ArithProblem
    slips: tuple[int, ...]
    text: str
    result_spans: tuple[tuple[int, int], ...]  # [start, end) of each step's result in `text`
    written: tuple[int, ...]  # the number written as each step's result

    @property
    def reward(self) -> float:
        return float(self.written[-1] == self.problem.answer)


def sample_problem(rng: np.random.Generator, min_steps: int = 3, max_steps: int = 6) -> ArithProblem:
    steps = int(rng.integers(min_steps, max_steps + 1))
    operands = tuple(int(rng.integers(1, 100)) * (1 if rng.random() < 0.5 else -1) for _ in range(steps))
    return ArithProblem(int(rng.integers(1, 100)), operands, float(rng.uniform(0.05, 0.35)))


def sample_slips(problem: ArithProblem, rng: np.random.Generator) -> tuple[int, ...]:
    slipped = rng.random(len(problem.operands)) < problem.slip_prob
    which = rng.integers(0, len(SLIPS), len(problem.operands))
    return tuple(SLIPS[w] if s else 0 for s, w in zip(slipped, which))


def write_rollout(problem: ArithProblem, slips: Sequence[int]) -> ArithRollout:
    """The text the policy writes for the given slips."""
    lines, spans, written = [], [], []
    offset, value = 0, problem.start
    for operand, slip in zip(problem.operands, slips):
        result = value + operand + slip
        head = f"{value} {'+' if operand >= 0 else '-'} {abs(operand)} = "
        start = offset + len(head)
        spans.append((start, start + len(str(result))))
        line = f"{head}{result}\n"
        lines.append(line)
        offset += len(line)
        written.append(result)
        value = result
    text = "".join(lines) + f"Answer: {value}"
    return ArithRollout(problem, tuple(slips), text, tuple(spans), tuple(written))


def sample_rollout(problem: ArithProblem, rng: np.random.Generator) -> ArithRollout:
    return write_rollout(problem, sample_slips(problem, rng))


def _step_distribution(slip_prob: float) -> dict[int, float]:
    dist = {0: 1.0 - slip_prob}
    for s in SLIPS:
        dist[s] = dist.get(s, 0.0) + slip_prob / len(SLIPS)
    return dist


@functools.lru_cache(maxsize=4096)
def _offset_distribution(steps: int, slip_prob: float) -> dict[int, float]:
    """Distribution of the sum of `steps` independent slips."""
    dist = {0: 1.0}
    step = _step_distribution(slip_prob)
    for _ in range(steps):
        nxt: dict[int, float] = {}
        for total, p in dist.items():
            for s, q in step.items():
                nxt[total + s] = nxt.get(total + s, 0.0) + p * q
        dist = nxt
    return dist


def prefix_value(rollout: ArithRollout, length: int) -> float:
    """Exact P(reward = 1 | the first `length` characters of the response text)."""
    problem = rollout.problem
    steps = len(problem.operands)
    known_offset = 0
    for k, (start, end) in enumerate(rollout.result_spans):
        # A result is settled once the character after it (its newline) is in the prefix.
        if length > end:
            known_offset += rollout.slips[k]
            continue
        previous = problem.start if k == 0 else rollout.written[k - 1]
        correct = previous + problem.operands[k]
        written_so_far = rollout.text[start:length] if length > start else ""
        tail = _offset_distribution(steps - k - 1, problem.slip_prob)
        numer = denom = 0.0
        for slip, p in _step_distribution(problem.slip_prob).items():
            if str(correct + slip).startswith(written_so_far):
                denom += p
                numer += p * tail.get(-(known_offset + slip), 0.0)
        return numer / denom
    return float(known_offset == 0)


def prefix_values(rollout: ArithRollout, lengths: Sequence[int]) -> list[float]:
    return [prefix_value(rollout, n) for n in lengths]
