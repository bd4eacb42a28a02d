"""`sveb build --task arith`: the embedded task written to disk as a dataset, with the tiny model
and tokenizer saved beside it (out/model) so that `sveb eval --data out` needs nothing else.

--policy exact  the task's own policy samples the rollouts; every response token is a state with
                its exact value (samples = 0).
--policy model  the tiny transformer, trained on the task's text, is the policy, and the values are
                Monte Carlo like for any model (build.py): a small end-to-end run of the real-model path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from . import embedded, tiny
from .build import BuildConfig, build_dataset
from .data import save_dataset
from .progress import log
from .rewards import numeric_match

MODEL_DIR = "model"


def build_arith(out: Path, *, policy: str, num_prompts: int, train_steps: Optional[int], config: BuildConfig,
                device: torch.device, fmt: str = "jsonl", show_progress: bool = True) -> Path:
    if policy not in ("exact", "model"):
        raise ValueError(f"policy must be 'exact' or 'model', got {policy!r}")
    steps = train_steps if train_steps is not None else (0 if policy == "exact" else 600)
    embedded_config = embedded.EmbeddedConfig(train_prompts=num_prompts, eval_prompts=num_prompts,
                                              group_size=config.group_size, train_steps=steps, seed=config.seed)
    tokenizer = tiny.build_tokenizer()
    model = embedded.embedded_model(tokenizer, embedded_config, log=log)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)
    if policy == "exact":
        dataset = embedded.arith_dataset(tokenizer, embedded_config)
        dataset.meta.update({"model": MODEL_DIR, "tiny_model_train_steps": steps})
        return save_dataset(dataset, out, fmt=fmt)
    dataset = embedded.arith_dataset(tokenizer, embedded_config)  # only its prompts are used
    # build.py assigns the splits itself, so the ids do not carry the exact dataset's split names.
    prompts = [{"id": f"arith-{i:05d}", "prompt": g.prompt + "\n", "answer": g.answer}
               for i, g in enumerate(dataset.groups)]
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    return build_dataset(model.to(device), tokenizer, prompts, out, config, numeric_match, model_ref=MODEL_DIR,
                         reward_ref="numeric", fmt=fmt, device=device, show_progress=show_progress,
                         extra_meta={"task": "arith", "tiny_model_train_steps": steps})
