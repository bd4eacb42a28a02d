"""Does a token-level value estimate help RL? GRPO vs Numca / Hista advantages on the embedded task.

    python examples/rl_experiment.py --out rl.json --csv rl.csv --plot rl.png      # the grid (CPU)
    python examples/rl_experiment.py --quick --out /tmp/rl.json                    # plumbing check, ~1 min

The task is the embedded SVEB task (`sveb_kernels.sveb.task`), shrunk for a 2-core CPU: a chain of
`--chain-steps` additions/subtractions of one-digit operands to a start below `--max-start`, one
step per line, then "Answer: N"; reward 1 when N is the true answer, else 0.

1. Warm start (once, seed 0): the tiny local Llama (`sveb_kernels.sveb.tiny`) is trained by
   next-token loss on *correct* chains, checking its success rate (sampled at temperature 1 on
   held-out prompts) every `--warm-check` steps, and stops at the first check where the rate is
   at least `--warm-target` (default 0.2; ~20-60% keeps the rewards informative).
2. RL from that same checkpoint, for every method and every seed, with the same budget:
   `SvebGRPOTrainer` (trl 1.16) with
       grpo       value_estimator="group_mean": exactly GRPO's sequence-level (R - mean) / std
       numca      token-level R - V(s_t), V from Numca (match "last", leave-one-out)
       hista      token-level R - V(s_t), V from Hista (cosine, temperature 0.1, last layer)
       numca_gae  GAE(gamma=1, lam=--gae-lam) over Numca's values
   all with scale_rewards="group", beta=0, one generation per step.
3. Every step, on that step's rollouts of the current policy: mean reward (= success rate of
   the training rollouts: the reward is 0/1), and the SVEB within-group Pearson of every
   estimator (group mean, Numca, Hista, whatever the run trains with) against the closed-form
   reference value of each state (below); the wall time of the step and of the trainer's value
   estimation (`_token_advantages`: values, advantages, and Hista's hidden-state forward);
   the time spent on these diagnostics is excluded from both. After the last step: the success
   rate on held-out prompts (`--eval-prompts` x `--eval-samples`, temperature 1).

Reference values. The task's closed form (`task.prefix_value`) is the exact value of a text
prefix under the task's *slip model* (each result off by +-1 or +-10 with probability p). The RL
policy is a neural net whose mistakes are other ones (off by 2, miscopied running values, an
answer that is not the last result), so its exact values have no closed form. `ErrorModel` keeps
the closed form's structure but replaces the slip model with the policy's own mistakes, measured
on the step's batch: each number it writes (running value, result, answer) deviates from what it
should be by an independent draw from that kind's measured deviations. Completions in the
task's format (ended by EOS, operands copied) get these values at every state; the others are
left out of the Pearson and their share is logged (`coverage`). It is a closed-form proxy of the
policy's values (exact if its mistakes were independent of the numbers), not the exact values.

Outputs: `--out` JSON (config, warm start, every run's steps and final eval, a summary), `--csv`
one row per (method, seed, step), `--plot` reward vs step per method (mean and min-max over
seeds), and the README table printed at the end (`--table` writes it to a file). The JSON is
rewritten after every run, so an interrupted grid keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from sveb_kernels.sveb import metrics, task, tiny

METHODS = ("grpo", "numca", "hista", "numca_gae")
DIAGNOSTIC_ESTIMATORS = ("group_mean", "numca", "hista")
ANSWER = re.compile(r"Answer: (-?\d+)(?!\d)")
_STREAM_WARM, _STREAM_RL, _STREAM_EVAL = 11, 12, 13


@dataclass
class Config:
    methods: tuple = METHODS
    seeds: tuple = (0, 1, 2)
    steps: int = 60                 # RL steps per run
    prompts_per_step: int = 4
    generations: int = 8            # completions per prompt (a group)
    learning_rate: float = 5e-4
    gae_lam: float = 0.9
    hidden_size: int = 48
    layers: int = 2
    chain_steps: tuple = (2, 3)     # min, max lines per chain
    max_start: int = 20
    max_operand: int = 9
    max_completion_length: int = 36
    warm_lr: float = 3e-3
    warm_batch: int = 32
    warm_check: int = 50
    warm_max_steps: int = 1500
    warm_target: float = 0.2
    warm_eval_prompts: int = 32
    eval_prompts: int = 64
    eval_samples: int = 4
    rl_prompts: int = 512
    quick: bool = False


def quick_config() -> Config:
    return Config(methods=METHODS, seeds=(0, 1), steps=2, prompts_per_step=2, generations=4, hidden_size=16,
                  layers=1, warm_check=10, warm_max_steps=10, warm_target=0.0, warm_eval_prompts=4,
                  eval_prompts=4, eval_samples=2, rl_prompts=16, max_completion_length=24, quick=True)


# -- the task ---------------------------------------------------------------------------------------

def sample_problem(rng: np.random.Generator, cfg: Config) -> task.ArithProblem:
    steps = int(rng.integers(cfg.chain_steps[0], cfg.chain_steps[1] + 1))
    operands = tuple(int(rng.integers(1, cfg.max_operand + 1)) * (1 if rng.random() < 0.5 else -1)
                     for _ in range(steps))
    # slip_prob belongs to the task's scripted policy; the RL policy's slip rate is measured instead
    return task.ArithProblem(int(rng.integers(1, cfg.max_start + 1)), operands, 0.0)


def problems(cfg: Config, count: int, stream: int) -> list[task.ArithProblem]:
    rng = np.random.default_rng([0, stream])
    return [sample_problem(rng, cfg) for _ in range(count)]


def reward_of(text: str, answer: int) -> float:
    found = ANSWER.search(text)
    return float(found is not None and int(found.group(1)) == answer)


@dataclass(frozen=True)
class Written:
    """A completion in the task's format, as the numbers it wrote, in order: (kind, start, end,
    expected, written) with kind "copy" (a line's running value, expected: the previous line's
    result, or the start), "result" (expected: the line's running value plus its operand) or
    "answer" (expected: the last result); [start, end) is where the number sits in `text`."""

    text: str
    events: tuple

    @property
    def offset(self) -> int:
        """The final answer minus the true answer: the sum of every number's deviation."""
        return sum(written - expected for _, _, _, expected, written in self.events)


def parse_written(problem: task.ArithProblem, text: str):
    """`Written` if `text` has the task's format for this problem (its operands copied faithfully), else None."""
    lines = "".join(rf"(-?\d+) {re.escape('+' if b >= 0 else '-')} {abs(b)} = (-?\d+)\n" for b in problem.operands)
    match = re.fullmatch(lines + r"Answer: (-?\d+)", text)
    if match is None:
        return None
    events, previous = [], problem.start
    for k, operand in enumerate(problem.operands):
        head, result = int(match.group(2 * k + 1)), int(match.group(2 * k + 2))
        events.append(("copy",) + match.span(2 * k + 1) + (previous, head))
        events.append(("result",) + match.span(2 * k + 2) + (head + operand, result))
        previous = result
    events.append(("answer",) + match.span(len(problem.operands) * 2 + 1) + (previous, int(match.group(2 * k + 3))))
    return Written(text, tuple(events))


class ErrorModel:
    """The embedded task's closed form (`task.prefix_value`) with the slip model replaced by the
    policy's own mistakes: every number the policy writes deviates from what it should be (given
    what it wrote before) by an independent draw from the distribution of that kind of number's
    deviations (copy, result, answer), measured on a batch of the policy's completions. The
    reward is 1 when the deviations sum to 0, so the value of a prefix is: the deviations of the
    numbers it finished are known, the number being written is one of the candidates its digits
    allow (weighted by the distribution), and the numbers still to come add independent draws.
    With copy and answer deviations always 0 and result deviations the slip distribution, this is
    exactly `task.prefix_value`."""

    def __init__(self, distributions: dict):
        self.distributions = distributions
        self._tails: dict = {}

    @classmethod
    def measured(cls, completions) -> "ErrorModel":
        counts = {"copy": {}, "result": {}, "answer": {}}
        for written in completions:
            for kind, _, _, expected, value in written.events:
                counts[kind][value - expected] = counts[kind].get(value - expected, 0) + 1
        return cls({kind: {d: n / sum(c.values()) for d, n in c.items()} if c else {0: 1.0}
                    for kind, c in counts.items()})

    def error_rate(self, kind: str) -> float:
        return 1.0 - self.distributions[kind].get(0, 0.0)

    def tail(self, kinds: tuple) -> dict:
        """Distribution of the summed deviations of numbers of these kinds."""
        if kinds not in self._tails:
            dist = {0: 1.0}
            for kind in kinds:
                nxt: dict = {}
                for total, p in dist.items():
                    for d, q in self.distributions[kind].items():
                        nxt[total + d] = nxt.get(total + d, 0.0) + p * q
                dist = nxt
            self._tails[kinds] = dist
        return self._tails[kinds]

    def value(self, written: Written, length: int) -> float:
        """P(reward 1 | the first `length` characters of the completion) under this model."""
        known = 0
        for k, (kind, start, end, expected, value) in enumerate(written.events):
            if length > end:  # finished: the character after it is written
                known += value - expected
                continue
            so_far = written.text[start:length] if length > start else ""
            tail = self.tail(tuple(e[0] for e in written.events[k + 1:]))
            numer = denom = 0.0
            for d, p in self.distributions[kind].items():
                if str(expected + d).startswith(so_far):
                    denom += p
                    numer += p * tail.get(-(known + d), 0.0)
            return numer / denom if denom > 0 else float("nan")
        return float(known == 0)


# -- sampling and the warm start ----------------------------------------------------------------------

@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], samples: int, max_new_tokens: int, seed: int) -> list[list[str]]:
    """`samples` completions per prompt at temperature 1 (the RL sampling), decoded without EOS."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    enc = tokenizer([p for p in prompts for _ in range(samples)], return_tensors="pt", padding=True)
    model.eval()
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def success_rate(model, tokenizer, probs: list[task.ArithProblem], samples: int, max_new_tokens: int,
                 seed: int) -> tuple[float, int]:
    texts = sample_texts(model, tokenizer, [p.prompt for p in probs], samples, max_new_tokens, seed)
    hits = [reward_of(t, p.answer) for p, ts in zip(probs, texts) for t in ts]
    return float(np.mean(hits)), len(hits)


def warm_start(cfg: Config, tokenizer, log) -> tuple[dict, list[dict]]:
    """Next-token training on correct chains until the sampled success rate reaches the target."""
    model = tiny.build_model(tokenizer, seed=0, hidden_size=cfg.hidden_size, layers=cfg.layers, max_positions=128)
    corpus = [tokenizer(p.prompt + task.write_rollout(p, [0] * len(p.operands)).text)["input_ids"]
              + [tokenizer.eos_token_id] for p in problems(cfg, 4096, _STREAM_WARM)]
    held_out = problems(cfg, cfg.warm_eval_prompts, _STREAM_EVAL + 100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    history, started, step, loss = [], time.perf_counter(), 0, float("nan")
    while True:
        model.train()
        for _ in range(cfg.warm_check):
            loss = tiny._train_step(model, optimizer, corpus, tokenizer.pad_token_id, cfg.warm_batch, generator)
            step += 1
        rate, n = success_rate(model, tokenizer, held_out, 4, cfg.max_completion_length, seed=step)
        history.append({"step": step, "loss": loss, "success": rate, "samples": n,
                        "seconds": time.perf_counter() - started})
        log(f"warm start: step {step} loss {loss:.3f} success {rate:.3f} ({time.perf_counter() - started:.0f}s)")
        if rate >= cfg.warm_target or step >= cfg.warm_max_steps:
            break
    return copy.deepcopy(model.state_dict()), history


# -- the trainer with per-step diagnostics ---------------------------------------------------------

class Diagnostics:
    """Scores every estimator on a step's rollouts against the slip-model reference values."""

    def __init__(self, tokenizer, hidden_layer: int = -1):
        from sveb_kernels.estimators import GroupMean, Hista, Numca

        self.tokenizer = tokenizer
        self.estimators = {"group_mean": GroupMean(), "numca": Numca("last", leave_one_out=True, tokenizer=tokenizer),
                           "hista": Hista("cosine", 0.1)}
        lengths = [len(tokenizer.decode([i])) for i in range(len(tokenizer))]
        lengths[tokenizer.eos_token_id] = 0
        self.lengths = lengths
        self.batch_problems: list = []  # the problem of each completion, set by the reward function

    def reward_function(self):
        def arith_reward(completions, start, operands, **kwargs):
            self.batch_problems = [task.ArithProblem(int(s), tuple(json.loads(o)), 0.0) for s, o in zip(start, operands)]
            return [reward_of(c, p.answer) for c, p in zip(completions, self.batch_problems)]
        return arith_reward

    def reference(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor):
        """[B, C] values of the states before each completion token under the policy's measured
        error model (NaN: a completion not in the task's format, or cut off), the model, and counts."""
        rows, length = completion_ids.shape
        ref = torch.full((rows, length), float("nan"), dtype=torch.float64)
        parsed, terminated = [], 0
        for b in range(rows):
            ids = completion_ids[b][completion_mask[b].bool()].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            ends = np.cumsum([self.lengths[i] for i in ids]).tolist()
            ended = bool(ids) and ids[-1] == self.tokenizer.eos_token_id
            terminated += ended
            written = parse_written(self.batch_problems[b], text) if ended and ends[-1] == len(text) else None
            parsed.append((written, ends))
        model = ErrorModel.measured([w for w, _ in parsed if w is not None])
        for b, (written, ends) in enumerate(parsed):
            if written is not None:
                prefix = [0] + ends[:-1]  # the state before token t is the text of tokens 0..t-1
                ref[b, :len(prefix)] = torch.tensor([model.value(written, n) for n in prefix], dtype=torch.float64)
        counts = {"terminated": terminated / max(rows, 1),
                  "coverage": sum(w is not None for w, _ in parsed) / max(rows, 1)}
        return ref, model, counts

    def score(self, trainer, output) -> dict:
        last = trainer.sveb_last
        batch, mask = last.batch, last.token_mask.cpu()
        ref, model, counts = self.reference(output["completion_ids"].cpu(), output["completion_mask"].cpu())
        length = mask.shape[1]
        covered = mask & ~torch.isnan(ref[:, :length])
        group = last.batch.group_index.cpu()[:, None].expand(-1, length)[covered].numpy()
        truth = ref[:, :length][covered].numpy()
        record = {**counts, **{f"error_rate/{k}": model.error_rate(k) for k in ("copy", "result", "answer")},
                  "scored_states": int(covered.sum()),
                  "reference_within_std": _within_std(truth, group)}
        for name, estimator in self.estimators.items():
            values = estimator.estimate(batch)[:, :length].detach().cpu().double()
            est = values[covered].numpy()
            if truth.size and len(np.unique(group)) > 0:
                s = metrics.score(est, truth, group, bootstrap=0)
                record[f"{name}/within_pearson"] = s["within_pearson"]
                record[f"{name}/mse"] = s["mse"]
                record[f"{name}/collapse_ratio"] = s["collapse_ratio"]
            else:
                for key in ("within_pearson", "mse", "collapse_ratio"):
                    record[f"{name}/{key}"] = float("nan")
        return record


def _within_std(x: np.ndarray, group: np.ndarray) -> float:
    if x.size == 0:
        return float("nan")
    _, inv = np.unique(group, return_inverse=True)
    means = np.bincount(inv, weights=x) / np.bincount(inv)
    return float(np.sqrt(np.mean((x - means[inv]) ** 2)))


def trainer_class():
    from sveb_kernels.integrations.trl import SvebGRPOTrainer

    class RecordingTrainer(SvebGRPOTrainer):
        """SvebGRPOTrainer that records, per step, reward, estimator scores and timings."""

        def __init__(self, *args, diagnostics: Diagnostics, **kwargs):
            super().__init__(*args, **kwargs)
            self.diagnostics = diagnostics
            self.records: list[dict] = []
            self._diagnostic_seconds = 0.0

        def training_step(self, model, inputs, num_items_in_batch):
            self._diagnostic_seconds = 0.0
            started = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            self.records[-1]["step_seconds"] = time.perf_counter() - started - self._diagnostic_seconds
            return out

        def _token_advantages(self, output, captured, mode):
            started = time.perf_counter()
            advantages = super()._token_advantages(output, captured, mode)
            estimator_seconds = time.perf_counter() - started
            if mode == "train":
                started = time.perf_counter()
                rewards = self.sveb_last.rewards.detach().cpu().double()
                record = {"step": len(self.records) + 1, "mean_reward": float(rewards.mean()),
                          "success_rate": float((rewards == 1.0).double().mean()),
                          "estimator_seconds": estimator_seconds}
                record.update(self.diagnostics.score(self, output))
                record["diagnostic_seconds"] = time.perf_counter() - started
                self.records.append(record)
                self._diagnostic_seconds += record["diagnostic_seconds"]
            return advantages

    return RecordingTrainer


def method_options(method: str, cfg: Config) -> dict:
    return {
        "grpo": dict(value_estimator="group_mean"),
        "numca": dict(value_estimator="numca", numca_match="last", numca_leave_one_out=True),
        "hista": dict(value_estimator="hista", hista_similarity="cosine", hista_temperature=0.1, hidden_layer=-1),
        "numca_gae": dict(value_estimator="numca", numca_match="last", numca_leave_one_out=True,
                          advantage_mode="gae", gamma=1.0, lam=cfg.gae_lam),
    }[method]


def warm_success(cfg: Config, tokenizer, warm_state: dict) -> dict:
    """The warm-start checkpoint on the held-out set the runs end with (same samples per seed)."""
    model = tiny.build_model(tokenizer, seed=0, hidden_size=cfg.hidden_size, layers=cfg.layers, max_positions=128)
    model.load_state_dict(warm_state)
    held_out = problems(cfg, cfg.eval_prompts, _STREAM_EVAL)
    rates = [success_rate(model, tokenizer, held_out, cfg.eval_samples, cfg.max_completion_length,
                          seed=10_000 + seed)[0] for seed in cfg.seeds]
    return {"per_seed": rates, "mean": float(np.mean(rates))}


def run_one(method: str, seed: int, cfg: Config, tokenizer, warm_state: dict, out_dir: str, log) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig

    model = tiny.build_model(tokenizer, seed=0, hidden_size=cfg.hidden_size, layers=cfg.layers, max_positions=128)
    model.load_state_dict(warm_state)
    probs = problems(cfg, cfg.rl_prompts, _STREAM_RL)
    data = Dataset.from_dict({"prompt": [p.prompt for p in probs], "start": [p.start for p in probs],
                              "operands": [json.dumps(list(p.operands)) for p in probs]})
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, f"{method}-{seed}"), seed=seed, report_to="none", save_strategy="no",
        logging_steps=1, max_steps=cfg.steps, per_device_train_batch_size=cfg.prompts_per_step * cfg.generations,
        num_generations=cfg.generations, max_completion_length=cfg.max_completion_length,
        learning_rate=cfg.learning_rate, use_cpu=True, beta=0.0, scale_rewards="group", temperature=1.0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    diagnostics = Diagnostics(tokenizer)
    trainer = trainer_class()(model=model, reward_funcs=diagnostics.reward_function(), args=args, train_dataset=data,
                              processing_class=tokenizer, diagnostics=diagnostics, **method_options(method, cfg))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-step records are the log
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model = trainer.model
    final, n = success_rate(model, tokenizer, problems(cfg, cfg.eval_prompts, _STREAM_EVAL), cfg.eval_samples,
                            cfg.max_completion_length, seed=10_000 + seed)
    records = trainer.records
    log(f"{method} seed {seed}: {len(records)} steps in {seconds:.0f}s, train reward first/last "
        f"{records[0]['mean_reward']:.3f}/{records[-1]['mean_reward']:.3f}, held-out success {final:.3f} ({n})")
    return {"method": method, "seed": seed, "seconds": seconds, "final_success": final, "final_samples": n,
            "steps": records}


# -- summary, table, plot ---------------------------------------------------------------------------

T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _nanmean(x, axis=None):
    """Mean over the finite entries (NaN where there are none), without numpy's empty-slice warning."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    count = finite.sum(axis=axis)
    total = np.where(finite, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t interval over seeds, clipped to [0, 1] (NaN for one seed)."""
    x = np.asarray(xs, dtype=np.float64)
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    half = T_95.get(x.size - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, max(m - half, 0.0), min(m + half, 1.0)  # a success rate lies in [0, 1]


def smoothed_mean_curve(runs: list[dict], window: int) -> np.ndarray:
    length = min(len(r["steps"]) for r in runs)
    curve = np.mean([[s["mean_reward"] for s in r["steps"][:length]] for r in runs], axis=0)
    return np.array([curve[max(0, i - window + 1):i + 1].mean() for i in range(length)])


def summarize(runs: list[dict], methods, window: int = 5) -> dict:
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    by = {m: rs for m, rs in by.items() if rs}
    target = None
    if "grpo" in by:
        target = float(smoothed_mean_curve(by["grpo"], window)[-1])
    summary = {"grpo_final_reward": target, "window": window, "methods": {}}
    for m, rs in by.items():
        mean, lo, hi = mean_ci([r["final_success"] for r in rs])
        curve = smoothed_mean_curve(rs, window)
        reached = next((i + 1 for i, v in enumerate(curve) if target is not None and v >= target), None)
        steps = [s for r in rs for s in r["steps"]]
        est = sum(s["estimator_seconds"] for s in steps)
        total = sum(s["step_seconds"] for s in steps)
        pearson = {e: float(_nanmean([s[f"{e}/within_pearson"] for s in steps])) for e in DIAGNOSTIC_ESTIMATORS}
        summary["methods"][m] = {
            "seeds": len(rs), "steps": min(len(r["steps"]) for r in rs), "final_success": mean,
            "final_success_ci": [lo, hi], "final_train_reward": float(curve[-1]),
            "steps_to_grpo_final_reward": reached, "estimator_share": est / total if total else float("nan"),
            "estimator_seconds_per_step": est / len(steps), "step_seconds": total / len(steps),
            "within_pearson": pearson, "coverage": float(np.mean([s["coverage"] for s in steps])),
        }
    return summary


def table(summary: dict) -> str:
    lines = ["| method | seeds x steps | held-out success (95% CI over seeds) | train reward, last 5 steps | "
             "steps to GRPO's final reward | estimator share of step time | within-group Pearson: Numca / Hista "
             "(on this method's rollouts) |",
             "|---|---|---|---|---|---|---|"]
    for m, s in summary["methods"].items():
        lo, hi = s["final_success_ci"]
        ci = f"[{lo:.2f}, {hi:.2f}]" if not math.isnan(lo) else "(1 seed)"
        reached = s["steps_to_grpo_final_reward"]
        lines.append(f"| {m} | {s['seeds']} x {s['steps']} | {s['final_success']:.3f} {ci} | "
                     f"{s['final_train_reward']:.3f} | {reached if reached is not None else 'not reached'} | "
                     f"{100 * s['estimator_share']:.1f}% ({1000 * s['estimator_seconds_per_step']:.0f} ms of "
                     f"{s['step_seconds']:.2f} s) | {s['within_pearson']['numca']:.2f} / "
                     f"{s['within_pearson']['hista']:.2f} |")
    return "\n".join(lines)


def _moving_nanmean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean along the last axis over the finite entries."""
    finite = np.isfinite(y)
    total = np.cumsum(np.where(finite, y, 0.0), axis=-1)
    count = np.cumsum(finite, axis=-1)
    pad = lambda a: np.concatenate([np.zeros(a.shape[:-1] + (window,)), a], axis=-1)[..., :-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total - pad(total)) / (count - pad(count))


def plot(runs: list[dict], methods, path: str, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        length = min(len(r["steps"]) for r in rs)
        steps = np.arange(1, length + 1)
        for ax, key in ((axes[0], "mean_reward"), (axes[1], f"{'hista' if m == 'hista' else 'numca'}/within_pearson")):
            y = _moving_nanmean(np.array([[s[key] for s in r["steps"][:length]] for r in rs], dtype=np.float64), window)
            line, = ax.plot(steps, _nanmean(y, axis=0), label=f"{m} ({len(rs)} seeds)")
            lo, hi = np.where(np.isnan(y), np.inf, y).min(axis=0), np.where(np.isnan(y), -np.inf, y).max(axis=0)
            ax.fill_between(steps, lo, hi, where=np.isfinite(lo), color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="RL step", ylabel="reward (= success) of the step's rollouts",
                title=f"reward vs step ({window}-step moving mean; band: min-max over seeds)")
    axes[1].set(xlabel="RL step", ylabel="within-group Pearson vs reference value",
                title="value estimate quality on the policy's own rollouts\n(hista run: Hista's; the others: Numca's)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(runs: list[dict], path: str) -> None:
    rows = [{"method": r["method"], "seed": r["seed"], **s} for r in runs for s in r["steps"]]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- main -------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON (rewritten after every run)")
    p.add_argument("--csv", help="per-step CSV")
    p.add_argument("--plot", help="reward-vs-step PNG")
    p.add_argument("--table", help="write the README table (markdown) here")
    p.add_argument("--warm-cache", help="load the warm-start checkpoint from this file if it was made with the same "
                   "settings, else make it and save it there")
    p.add_argument("--quick", action="store_true", help="a few steps at tiny sizes: checks plumbing and logging")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, help="number of seeds (0..n-1)")
    p.add_argument("--seed", type=int, help="run this one seed only (to spread the grid over processes; --merge "
                   "their JSONs afterwards)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no training: combine the runs of these result files "
                   "(same settings) into --out, --csv, --plot, --table")
    p.add_argument("--steps", type=int, help="RL steps per run")
    for name in ("prompts_per_step", "generations", "hidden_size", "layers", "warm_max_steps", "eval_prompts"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("learning_rate", "warm_target"):
        p.add_argument("--" + name.replace("_", "-"), type=float)
    return p.parse_args(argv)


def finish(result: dict, methods, a, log) -> None:
    if a.csv:
        write_csv(result["runs"], a.csv)
    if a.plot:
        plot(result["runs"], methods, a.plot)
    text = table(result["summary"])
    if a.table:
        with open(a.table, "w") as f:
            f.write(text + "\n")
    log(f"{len(result['runs'])} runs, {result['wall_seconds']:.0f}s of wall time\n{text}")


def merge(a, log) -> dict:
    parts = []
    for path in a.merge:
        with open(path) as f:
            parts.append(json.load(f))
    settings = [{k: v for k, v in p["config"].items() if k != "seeds"} for p in parts]
    if any(s != settings[0] for s in settings[1:]):
        raise SystemExit("the result files were made with different settings")
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: (r["seed"], r["method"]))
    methods = tuple(parts[0]["config"]["methods"])
    result = {"config": dict(parts[0]["config"], seeds=sorted({r["seed"] for r in runs})),
              "merged_from": [{"file": os.path.basename(path), "complete": p["complete"], "runs": len(p["runs"]),
                               "wall_seconds": p["wall_seconds"], "load_at_start": p["environment"]["load_at_start"],
                               "load_at_end": p["load_now"]} for path, p in zip(a.merge, parts)],
              "environment": parts[0]["environment"], "warm_start": parts[0]["warm_start"], "runs": runs,
              "warm_held_out": [p.get("warm_held_out") for p in parts],
              "complete": all(p["complete"] for p in parts),
              "wall_seconds": max(p["wall_seconds"] for p in parts)}
    result["summary"] = summarize(runs, methods)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    finish(result, methods, a, log)
    return result


def main(argv=None) -> dict:
    a = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if a.merge:
        return merge(a, log)
    cfg = quick_config() if a.quick else Config()
    if a.methods:
        unknown = set(a.methods.split(",")) - set(METHODS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        cfg.methods = tuple(a.methods.split(","))
    if a.seeds:
        cfg.seeds = tuple(range(a.seeds))
    if a.seed is not None:
        cfg.seeds = (a.seed,)
    for name in ("steps", "prompts_per_step", "generations", "hidden_size", "layers", "warm_max_steps",
                 "eval_prompts", "learning_rate", "warm_target"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    # Matrices this small gain nothing from a second thread, and spinning OpenMP threads slow
    # everything down on a shared CPU.
    torch.set_num_threads(1)
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    tokenizer = tiny.build_tokenizer()
    warm_key = {k: v for k, v in asdict(cfg).items() if k.startswith("warm_") or k in (
        "hidden_size", "layers", "chain_steps", "max_start", "max_operand", "max_completion_length")}
    cached = torch.load(a.warm_cache, weights_only=False) if a.warm_cache and os.path.exists(a.warm_cache) else None
    if cached is not None and cached["key"] == json.loads(json.dumps(warm_key)):
        warm_state, warm_history = cached["state"], cached["history"]
        log(f"warm start: loaded {a.warm_cache} (success {warm_history[-1]['success']:.3f})")
    else:
        warm_state, warm_history = warm_start(cfg, tokenizer, log)
        if a.warm_cache:
            torch.save({"key": json.loads(json.dumps(warm_key)), "state": warm_state, "history": warm_history},
                       a.warm_cache)
    result = {"config": asdict(cfg), "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                                      "cpus": os.cpu_count(), "threads": 1,
                                                      "load_at_start": os.getloadavg()},
              "warm_start": warm_history, "warm_held_out": warm_success(cfg, tokenizer, warm_state), "runs": [],
              "complete": False}

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - started
        result["load_now"] = os.getloadavg()
        result["summary"] = summarize(result["runs"], cfg.methods) if result["runs"] else {}
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=float)
        os.replace(tmp, a.out)

    save()
    scratch = tempfile.mkdtemp(prefix="rl_experiment_")  # TRL's output_dir; nothing is saved there
    for seed in cfg.seeds:  # seeds outermost: an interrupted grid has every method for the seeds it finished
        for method in cfg.methods:
            result["runs"].append(run_one(method, seed, cfg, tokenizer, warm_state, scratch, log))
            save()
    result["complete"] = True
    save()
    finish(result, cfg.methods, a, log)
    return result


if __name__ == "__main__":
    main()
