"""GRPO with token-level Numca advantages in TRL: `SvebGRPOTrainer(value_estimator="numca")`.

    python examples/trl_grpo_numca.py                                      # CPU, tiny local model, < 2 min
    python examples/trl_grpo_numca.py --model Qwen/Qwen2.5-0.5B-Instruct   # GPU, a real model

The task: arithmetic chains ("Compute: 12 + 7 - 3"), one step per line ("12 + 7 = 19"), ending
with "Answer: 16". The reward counts the correct steps and how close the answer is, so the numbers a
completion writes are milestones: Numca values a token by the mean return of the group's other
completions that wrote the same last number, and a token's advantage is R - V(state before it).

`--model tiny` (the default) is a 2-layer Llama with a hand-written tokenizer, built here and
trained for `--pretrain-steps` on the task's text so its completions have the format; no
download. Any other value is a Hugging Face causal LM (id or path) trained in bf16 on a GPU.

At the end it prints one completion of the last batch, cut into runs of tokens that share one
advantage: with Numca the advantage changes right after a number that other completions of the
prompt also wrote (their mean return becomes the value), and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import numpy as np
import torch

STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)")
ANSWER = re.compile(r"Answer: (-?\d+)")


def arithmetic_reward(completions, answer, **kwargs):
    """Share of correct "a + b = c" lines, plus up to 1 for an "Answer: N" close to the answer."""
    rewards = []
    for text, want in zip(completions, answer):
        steps = STEP.findall(text)
        correct = sum(int(a) + (int(b) if op == "+" else -int(b)) == int(c) for a, op, b, c in steps)
        found = ANSWER.findall(text)
        closeness = 1.0 / (1.0 + abs(int(found[-1]) - int(want)) / 10.0) if found else 0.0
        rewards.append(correct / max(len(steps), 1) + closeness)
    return rewards


def prompts(count: int, seed: int, instruction: str = ""):
    from datasets import Dataset

    from sveb_kernels.sveb import task

    rng = np.random.default_rng(seed)
    problems = [task.sample_problem(rng, min_steps=2, max_steps=4) for _ in range(count)]
    return Dataset.from_dict({"prompt": [p.prompt + instruction for p in problems],
                              "answer": [p.answer for p in problems]})


def model_and_tokenizer(name: str, pretrain_steps: int, seed: int):
    if name == "tiny":
        from sveb_kernels.sveb import embedded, tiny

        tokenizer = tiny.build_tokenizer()
        model = embedded.embedded_model(tokenizer, embedded.EmbeddedConfig(train_steps=pretrain_steps, seed=seed),
                                        log=print)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), tokenizer


def run(value_estimator: str = "numca", *, model: str = "tiny", steps: int = 0, pretrain_steps: int = 100,
        output_dir: str = "trl_grpo_out", seed: int = 0, **estimator_options):
    """Train with SvebGRPOTrainer; returns the trainer. Sizes follow `model`: tiny on CPU, real on GPU."""
    from trl import GRPOConfig

    from sveb_kernels.integrations.trl import SvebGRPOTrainer

    tiny = model == "tiny"
    policy, tokenizer = model_and_tokenizer(model, pretrain_steps, seed)
    instruction = "" if tiny else "Write one step per line as 'a + b = c', then 'Answer: N'.\n"
    args = GRPOConfig(
        output_dir=output_dir, seed=seed, report_to="none", save_strategy="no", logging_steps=1,
        max_steps=steps or (4 if tiny else 200),
        per_device_train_batch_size=8 if tiny else 16, num_generations=4 if tiny else 8,
        max_completion_length=40 if tiny else 256, learning_rate=5e-5 if tiny else 1e-6,
        use_cpu=tiny or not torch.cuda.is_available(), bf16=not tiny and torch.cuda.is_available(),
        beta=0.0, scale_rewards="group",
    )
    trainer = SvebGRPOTrainer(model=policy, reward_funcs=arithmetic_reward, args=args,
                              train_dataset=prompts(256, seed, instruction), processing_class=tokenizer,
                              value_estimator=value_estimator, **estimator_options)
    started = time.perf_counter()
    trainer.train()
    print(f"\n{trainer.state.global_step} steps in {time.perf_counter() - started:.1f}s")
    show_a_rollout(trainer.sveb_last, tokenizer, value_estimator)
    return trainer


def _change_points(advantages: torch.Tensor) -> list[int]:
    """Positions t > 0 where a completion's token advantage differs from token t - 1's."""
    return (torch.nonzero((advantages[1:] - advantages[:-1]).abs() > 1e-6).flatten() + 1).tolist()


def show_a_rollout(last, tokenizer, value_estimator: str) -> None:
    """Prints one completion of the last batch with its token values V and advantages A, cut where A
    changes. With Numca, V (the mean return of the group's other completions that wrote the same
    number) can change only right after a number, so the cuts fall after numbers. The completion
    shown is the best-rewarded one whose advantages change; if none changes, it says why."""
    rows = []
    for row in range(last.token_mask.shape[0]):
        mask = last.token_mask[row]
        if mask.any():
            changes = _change_points(last.advantages[row][mask].float().cpu())
            rows.append((bool(changes), float(last.returns[row]), len(changes), row))
    if not rows:
        print("The last batch has no completion tokens to show.")
        return
    changes, ret, _, row = max(rows)
    mask = last.token_mask[row]
    ids = last.token_ids[row, 1:][mask].tolist()  # token_ids: [last prompt token | completion]
    values = last.values[row][mask].float().cpu()
    advantages = last.advantages[row][mask].float().cpu()
    print(f"One completion of the last batch (return R = {ret:.2f}), its token values and advantages: each line "
          "is a run of tokens with one value V of the state before them and one advantage A (R - V, scaled "
          "as GRPO scales it). The tiny model writes arithmetic-shaped text, mostly wrong after a few steps.")
    if not changes and value_estimator == "numca":
        print("  (no completion of this batch has an advantage that changes within it: Numca found no number "
              "that another completion of the same prompt also wrote, so every token gets the group's mean "
              "return as its value, as in plain GRPO; train longer (--steps 20) for completions that share numbers)")
    cuts = [0, *_change_points(advantages), len(ids)]
    for start, end in zip(cuts[:-1], cuts[1:]):
        print(f"  V={values[start]:5.2f}  A={advantages[start]:+6.2f}  {tokenizer.decode(ids[start:end])!r}")


def parse_args(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="tiny", help="'tiny' (local, CPU) or a Hugging Face causal LM id/path (GPU)")
    p.add_argument("--steps", type=int, default=0, help="GRPO steps (default: 4 tiny, 200 otherwise)")
    p.add_argument("--pretrain-steps", type=int, default=100, help="tiny model: next-token steps on the task first")
    p.add_argument("--output-dir", default="trl_grpo_out")
    return p.parse_args()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    a = parse_args(__doc__.splitlines()[0])
    run("numca", model=a.model, steps=a.steps, pretrain_steps=a.pretrain_steps, output_dir=a.output_dir,
        numca_match="last", numca_leave_one_out=True, numca_min_support=1)
