"""`sveb build`: an SVEB dataset from any Hugging Face causal LM.

For each prompt: sample G rollouts; pick states along each rollout (evenly spaced token positions,
the last token excluded: its value is the reward itself); estimate each state's true value by Monte
Carlo, the mean reward of K continuations sampled from the state's prefix with the same sampling
settings and the same total token budget as the rollouts.

Work is done in chunks of prompts with fixed boundaries, each chunk seeded from (seed, chunk index),
and a chunk's groups are appended to groups.jsonl (flushed and fsynced) only when all of its values
are known. Re-running the same command skips the prompts already written, so an interrupted build
resumes where it stopped and ends with the same records it would have written in one go (on the
same device: GPU sampling kernels need not be bit-deterministic).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .data import GROUPS_JSONL, GROUPS_PARQUET, META_FILE, Group, Rollout, States, append_groups, iter_jsonl
from .data import load_dataset, record_to_group, save_dataset, write_meta
from .progress import log as default_log
from .progress import progress_bar
from .rewards import RewardFn


@dataclass(frozen=True)
class BuildConfig:
    group_size: int = 8
    continuations: int = 16
    states_per_rollout: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64
    train_fraction: float = 0.5
    seed: int = 0
    chat_template: bool = False

    def check(self) -> None:
        for name in ("group_size", "continuations", "states_per_rollout", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in [0, 1], got {self.train_fraction}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1, top_k >= 0")


def read_prompts(path: str | Path) -> list[dict]:
    """JSONL with "prompt" and "answer" per line (and optionally a unique "id")."""
    prompts = []
    for n, record in enumerate(iter_jsonl(path)):
        if "prompt" not in record or "answer" not in record:
            raise ValueError(f"{path}: line {n + 1} needs 'prompt' and 'answer' fields")
        prompts.append({"id": str(record.get("id", f"p{n:06d}")), "prompt": str(record["prompt"]),
                        "answer": str(record["answer"])})
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: prompt ids repeat")
    return prompts


def state_positions(length: int, count: int) -> list[int]:
    """Up to `count` evenly spaced positions in 0 .. length-2 (the last token's value is its reward)."""
    if length < 2:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, length - 2, num=min(count, length - 1))})


def _prompts_digest(prompts: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]


def _encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    if chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(text)["input_ids"])


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return [int(i) for i in ids if i is not None]


class _Sampler:
    """Batched sampling of continuations of token prefixes with one model and one set of settings."""

    def __init__(self, model, tokenizer, config: BuildConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.eos = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else (self.eos[0] if self.eos else 0))

    @torch.no_grad()
    def sample(self, prefixes: Sequence[Sequence[int]], budgets: Sequence[int]) -> list[list[int]]:
        """One continuation per prefix, at most budgets[i] tokens, cut after the first EOS."""
        if not prefixes:
            return []
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), self.pad, dtype=torch.long)
        attention = torch.zeros(len(prefixes), width, dtype=torch.long)
        for row, p in enumerate(prefixes):  # left padding: every row's next token sits in the last column
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[row, width - len(p):] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attention.to(self.device), do_sample=True,
            temperature=self.config.temperature, top_p=self.config.top_p, top_k=self.config.top_k,
            max_new_tokens=max(budgets), pad_token_id=self.pad, eos_token_id=self.eos or None,
        )
        results = []
        for row, budget in enumerate(budgets):
            new = out[row, width:].tolist()[:budget]
            for i, token in enumerate(new):
                if token in self.eos:
                    new = new[: i + 1]
                    break
            results.append(new)
        return results

    def sample_batched(self, prefixes: Sequence[Sequence[int]], budgets: Sequence[int], bar=None) -> list[list[int]]:
        """Like sample, `batch_size` at a time, similar lengths together (less padding)."""
        order = sorted(range(len(prefixes)), key=lambda i: (len(prefixes[i]), budgets[i]))
        results: list[list[int]] = [[] for _ in prefixes]
        size = self.config.batch_size
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            for i, cont in zip(chunk, self.sample([prefixes[i] for i in chunk], [budgets[i] for i in chunk])):
                results[i] = cont
            if bar is not None:
                bar.update(len(chunk))
        return results


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _build_chunk(sampler: _Sampler, tokenizer, prompts: Sequence[dict], splits: Sequence[str],
                 reward_fn: RewardFn, config: BuildConfig, show_progress: bool) -> list[Group]:
    prompt_ids = [_encode_prompt(tokenizer, p["prompt"], config.chat_template) for p in prompts]
    g = config.group_size
    prefixes = [ids for ids in prompt_ids for _ in range(g)]
    responses = sampler.sample_batched(prefixes, [config.max_new_tokens] * len(prefixes))
    # Every state of every rollout, K times: the Monte-Carlo jobs of this chunk.
    jobs = []  # (rollout index, position)
    for r, response in enumerate(responses):
        jobs += [(r, t) for t in state_positions(len(response), config.states_per_rollout)]
    k = config.continuations
    mc_prefixes = [prefixes[r] + responses[r][: t + 1] for r, t in jobs for _ in range(k)]
    mc_budgets = [config.max_new_tokens - (t + 1) for r, t in jobs for _ in range(k)]
    bar = progress_bar(total=len(mc_prefixes), desc="continuations", disable=not show_progress)
    continuations = sampler.sample_batched(mc_prefixes, mc_budgets, bar)
    bar.close()
    groups = []
    for p, prompt in enumerate(prompts):
        rollouts = []
        for r in range(p * g, (p + 1) * g):
            text = _decode(tokenizer, responses[r])
            rollouts.append(Rollout(responses[r], float(reward_fn(text, prompt["answer"], prompt["prompt"])),
                                    States(), text))
        groups.append(Group(prompt["id"], prompt_ids[p], rollouts, splits[p], prompt["prompt"], prompt["answer"]))
    for j, (r, t) in enumerate(jobs):
        prompt = prompts[r // g]
        head = responses[r][: t + 1]
        rewards = [float(reward_fn(_decode(tokenizer, head + continuations[j * k + i]), prompt["answer"],
                                   prompt["prompt"])) for i in range(k)]
        states = groups[r // g].rollouts[r % g].states
        states.position.append(t)
        states.value.append(float(np.mean(rewards)))
        states.samples.append(k)
    return groups


def _done_ids(out: Path) -> set[str]:
    if (out / GROUPS_JSONL).exists():
        return {record_to_group(r).prompt_id for r in iter_jsonl(out / GROUPS_JSONL, tolerate_torn_tail=True)}
    if (out / GROUPS_PARQUET).exists():
        return {g.prompt_id for g in load_dataset(out).groups}
    return set()


def _drop_torn_tail(path: Path) -> None:
    """Rewrites groups.jsonl without a last line that a crash cut short."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        path.write_text("".join(lines[:-1]), encoding="utf-8")


def build_dataset(model, tokenizer, prompts: Sequence[dict], out: str | Path, config: BuildConfig,
                  reward_fn: RewardFn, *, model_ref: str, reward_ref: str = "numeric", fmt: str = "jsonl",
                  device: Optional[torch.device] = None, show_progress: bool = True,
                  log: Callable[[str], None] = default_log, extra_meta: Optional[dict] = None) -> Path:
    """Builds (or resumes) the dataset in directory `out`; returns its path. See the module docstring."""
    config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    meta = {"model": model_ref, "reward": reward_ref, "value_kind": "monte_carlo",
            "prompts_sha256": _prompts_digest(prompts), "build": asdict(config), **(extra_meta or {})}
    if (out / META_FILE).exists():
        old = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        old.pop("format", None)
        if old != json.loads(json.dumps(meta)):
            raise ValueError(f"{out} holds a build with other settings ({out / META_FILE}); "
                             "use another --out directory, or delete it to start over")
    else:
        write_meta(out, meta)
    _drop_torn_tail(out / GROUPS_JSONL)
    done = _done_ids(out)
    rng = np.random.default_rng([config.seed, 0])
    order = rng.permutation(len(prompts))
    train = set(order[: int(round(config.train_fraction * len(prompts)))].tolist())
    splits = ["train" if i in train else "eval" for i in range(len(prompts))]
    chunk = max(1, config.batch_size // config.group_size)
    chunks = [range(s, min(s + chunk, len(prompts))) for s in range(0, len(prompts), chunk)]
    todo = [(c, idx) for c, idx in enumerate(chunks) if any(prompts[i]["id"] not in done for i in idx)]
    if done:
        log(f"resuming: {len(done)} of {len(prompts)} prompts already in {out}")
    sampler = _Sampler(model, tokenizer, config, device)
    bar = progress_bar(total=len(prompts), desc="prompts", disable=not show_progress)
    bar.update(len(prompts) - sum(len(idx) for _, idx in todo))
    for c, idx in todo:
        torch.manual_seed(int(np.random.default_rng([config.seed, 1, c]).integers(2**62)))
        groups = _build_chunk(sampler, tokenizer, [prompts[i] for i in idx], [splits[i] for i in idx], reward_fn,
                              config, show_progress)
        append_groups(out, [g for g in groups if g.prompt_id not in done])
        bar.update(len(idx))
    bar.close()
    if fmt == "parquet" and (out / GROUPS_JSONL).exists():
        dataset = load_dataset(out)
        save_dataset(dataset, out, fmt="parquet")
        (out / GROUPS_JSONL).unlink()
    return out
