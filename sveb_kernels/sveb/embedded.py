"""The embedded task as an SVEB dataset: arithmetic-chain rollouts from the exact policy (task.py),
tokenized by the local tokenizer (tiny.py), every response token a state with its exact value; and
the tiny model that supplies hidden states, trained on separate rollouts of the same policy."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import task, tiny
from .data import Dataset, Group, Rollout, States


@dataclass(frozen=True)
class EmbeddedConfig:
    train_prompts: int = 128
    eval_prompts: int = 128
    group_size: int = 16
    train_steps: int = 0  # 0: the tiny model keeps its random initialisation
    seed: int = 0


QUICK = EmbeddedConfig(train_prompts=48, eval_prompts=48, group_size=16)
# Separate seed streams, so that e.g. more eval prompts do not change the train prompts.
_STREAM_TRAIN, _STREAM_EVAL, _STREAM_CORPUS = 1, 2, 3


def _token_lengths(tokenizer) -> list[int]:
    """Characters each token id contributes to the decoded text (the task's text is ASCII)."""
    return [len(tokenizer.decode([i])) for i in range(len(tokenizer))]


def _char_ends(tokenizer, ids: list[int], text: str, lengths: list[int]) -> list[int]:
    """Length of the text that response tokens 0..t decode to, for every t."""
    ends = list(itertools.accumulate(lengths[i] for i in ids))
    if ends and ends[-1] == len(text) and tokenizer.decode(ids) == text:
        return ends  # byte-level BPE: each token's text is its share of the whole
    ends = []  # tokenizers whose tokens decode differently alone (SentencePiece's "▁"): decode prefixes
    for t in range(len(ids)):
        prefix = tokenizer.decode(ids[: t + 1])
        if not text.startswith(prefix):
            raise ValueError(f"this tokenizer does not decode the task's text back exactly: {prefix!r} "
                             f"is not a prefix of {text!r}")
        ends.append(len(prefix))
    return ends


def arith_group(tokenizer, problem: task.ArithProblem, rollouts: list[task.ArithRollout], *, prompt_id: str,
                split: str, token_lengths: Optional[list[int]] = None) -> Group:
    """One group: the rollouts tokenized (EOS appended), every response token a state with its exact value."""
    lengths = token_lengths or _token_lengths(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    records = []
    for rollout in rollouts:
        text_ids = tokenizer(rollout.text, add_special_tokens=False)["input_ids"]
        values = task.prefix_values(rollout, _char_ends(tokenizer, text_ids, rollout.text, lengths))
        response_ids = text_ids + [eos]
        values.append(rollout.reward)  # at EOS the outcome is settled
        states = States(list(range(len(response_ids))), values, [0] * len(response_ids))
        records.append(Rollout(response_ids, rollout.reward, states, rollout.text))
    return Group(prompt_id, tokenizer(problem.prompt)["input_ids"], records, split, problem.prompt.rstrip("\n"),
                 str(problem.answer))


def arith_groups(tokenizer, num_prompts: int, group_size: int, *, seed: int, stream: int, split: str) -> list[Group]:
    """`num_prompts` groups of `group_size` rollouts sampled from the task's policy."""
    rng = np.random.default_rng([seed, stream])
    lengths = _token_lengths(tokenizer)
    groups = []
    for p in range(num_prompts):
        problem = task.sample_problem(rng)
        rollouts = [task.sample_rollout(problem, rng) for _ in range(group_size)]
        groups.append(arith_group(tokenizer, problem, rollouts, prompt_id=f"arith-{split}-{p:05d}", split=split,
                                  token_lengths=lengths))
    return groups


def arith_dataset(tokenizer, config: EmbeddedConfig) -> Dataset:
    kw = dict(group_size=config.group_size, seed=config.seed)
    groups = (arith_groups(tokenizer, config.train_prompts, split="train", stream=_STREAM_TRAIN, **kw)
              + arith_groups(tokenizer, config.eval_prompts, split="eval", stream=_STREAM_EVAL, **kw))
    meta = {"task": "arith", "value_kind": "exact", "group_size": config.group_size, "seed": config.seed,
            "slips": list(task.SLIPS)}
    return Dataset(groups, meta)


def training_corpus(tokenizer, num_prompts: int, group_size: int, seed: int) -> list[list[int]]:
    """Prompt + response token ids of fresh rollouts (their own seed stream: never the scored ones)."""
    groups = arith_groups(tokenizer, num_prompts, group_size, seed=seed, stream=_STREAM_CORPUS, split="train")
    return [g.prompt_ids + r.response_ids for g in groups for r in g.rollouts]


def embedded_model(tokenizer, config: EmbeddedConfig, log: Optional[Callable[[str], None]] = None):
    """The tiny Llama, trained for `config.train_steps` steps on the task's text (0: random init)."""
    model = tiny.build_model(tokenizer, seed=config.seed)
    if config.train_steps > 0:
        corpus = training_corpus(tokenizer, num_prompts=256, group_size=4, seed=config.seed)
        tiny.train_model(model, corpus, steps=config.train_steps, pad_id=tokenizer.pad_token_id, seed=config.seed,
                         log=log)
    return model
