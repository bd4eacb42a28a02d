"""LearnedHista on SVEB's embedded task, next to fixed Hista, Numca and the group mean (issue 23 item 3).

Per seed: the embedded task's train and eval splits and its tiny model's last-layer hidden states;
fixed Hista's temperature is the best of a sweep scored on the *train* split (by decision-state
within-group Pearson); LearnedHista is fit on the train split; all are scored on the held-out eval
split: MSE, within-group Pearson (pooled, and at decision states: a state before a token that changes
the true value) with the leave-one-out mean as the null row, collapse ratio. Also the cost of one
LearnedHista update (forward + backward + AdamW step on a batch of groups) against one training step
of the policy (the tiny model's forward + backward of the LM loss on the same rollouts), side by side
on this machine (a ratio only).

    python bench/sveb_learned_hista.py --seeds 0 1 2 --out bench/results/sveb_learned_hista.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from sveb_kernels.estimators import GroupMean, Hista, LearnedHista, LeaveOneOutMean, Numca
from sveb_kernels.sveb import embedded, tiny
from sveb_kernels.sveb.batch import SvebBatch
from sveb_kernels.sveb.features import hidden_states_fn
from sveb_kernels.sveb.metrics import score

TEMPERATURES = (1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def decision_states(batch: SvebBatch, tol: float = 1e-9) -> np.ndarray:
    """States whose next state in the same rollout has a different true value (computed here until
    sveb's metrics carry it)."""
    row, pos, value = batch.state_row.numpy(), batch.state_position.numpy(), batch.state_value.numpy()
    order = np.lexsort((pos, row))
    here, nxt = order[:-1], order[1:]
    adjacent = (row[nxt] == row[here]) & (pos[nxt] == pos[here] + 1)
    decision = np.zeros(len(value), dtype=bool)
    decision[here[adjacent & (np.abs(value[nxt] - value[here]) > tol)]] = True
    return decision


def metrics(values: np.ndarray, batch: SvebBatch, decision: np.ndarray, bootstrap: int, seed: int) -> dict:
    truth, group = batch.state_value.numpy(), batch.state_group.numpy()
    out = score(values, truth, group, bootstrap=0)
    dec = score(values[decision], truth[decision], group[decision], bootstrap=bootstrap, seed=seed)
    row = {k: out[k] for k in ("mse", "within_pearson", "collapse_ratio")}
    row["decision_pearson"] = dec["within_pearson"]
    if bootstrap:
        row["decision_pearson_lo"], row["decision_pearson_hi"] = dec["within_pearson_lo"], dec["within_pearson_hi"]
    return row


def policy_step_seconds(model, batch: SvebBatch, repeats: int = 3) -> float:
    """One training step of the policy on `batch`'s rollouts: forward + backward of the LM loss + AdamW."""
    model = model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids, attn = batch.token_ids, batch.attention_mask if hasattr(batch, "attention_mask") else None
    if attn is None:
        attn = torch.ones_like(ids, dtype=torch.bool)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.zero_grad()
        out = model(input_ids=ids, attention_mask=attn.long(), labels=ids)
        out.loss.backward()
        optimizer.step()
        best = min(best, time.perf_counter() - started)
    model.eval()
    return best


def run_seed(seed: int, prompts: int, group_size: int, epochs: int, bootstrap: int, log, train_steps: int = 0) -> dict:
    config = embedded.EmbeddedConfig(train_prompts=prompts, eval_prompts=prompts, group_size=group_size, seed=seed,
                                     train_steps=train_steps)
    tokenizer = tiny.build_tokenizer()
    dataset = embedded.arith_dataset(tokenizer, config)
    model = embedded.embedded_model(tokenizer, config)
    hidden_fn = hidden_states_fn(model, layer=-1, batch_size=32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    make = lambda split: SvebBatch(dataset.split(split), pad_id=pad, tokenizer=tokenizer, hidden_fn=hidden_fn)
    train, held = make("train"), make("eval")
    dec_train, dec_held = decision_states(train), decision_states(held)
    rows: dict[str, dict] = {}

    def record(name, est, fit=False):
        started = time.perf_counter()
        if fit:
            est.fit(train)
        values = held.at_states(est.estimate(held)).numpy()
        rows[name] = metrics(values, held, dec_held, bootstrap, seed)
        rows[name]["seconds"] = round(time.perf_counter() - started, 2)
        log(f"seed {seed} {name}: {rows[name]}")

    record("group_mean", GroupMean())
    record("rloo (null row)", LeaveOneOutMean())
    record("numca_last", Numca("last"))
    record("numca_prefix", Numca("prefix"))
    sweep = {}
    for t in TEMPERATURES:
        values = train.at_states(Hista("cosine", t).estimate(train)).numpy()
        sweep[t] = metrics(values, train, dec_train, 0, seed)["decision_pearson"]
    best_t = max(sweep, key=lambda t: sweep[t])
    record(f"hista_cos (T={best_t:g}, best on train)", Hista("cosine", best_t))
    # Ablation: the same estimator untrained (standardised features, random projection, initial
    # temperature): how much of the gain is the learning, not the standardisation.
    record("learned_hista_d64 untrained", LearnedHista(dim=64, temperature=best_t, epochs=0, seed=seed,
                                                       steps_per_batch=0), fit=True)
    learned = LearnedHista(dim=64, temperature=best_t, temperature_lr=3e-3, epochs=epochs, groups_per_step=16,
                           seed=seed,
                           steps_per_batch=0)  # scored as fit on train, frozen on held-out
    record("learned_hista_d64", learned, fit=True)
    rows["learned_hista_d64"]["final_temperature"] = learned.temperature
    rows["learned_hista_d64"]["updates"] = learned.updates

    # Cost: one LearnedHista update on 16 groups vs one policy training step on the same rollouts.
    groups16 = dataset.split("train")[:16]
    small = SvebBatch(groups16, pad_id=pad, tokenizer=tokenizer, hidden_fn=hidden_fn)
    probe = LearnedHista(dim=64, temperature=best_t, seed=seed, steps_per_batch=1)
    probe.estimate(small)  # builds the parameters, one update (warm-up)
    update = math.inf
    for _ in range(3):
        before = probe.update_seconds
        probe.estimate(small)
        update = min(update, probe.update_seconds - before)
    step = policy_step_seconds(model, small)
    cost = {"learned_update_s": update, "policy_step_s": step, "ratio": update / step,
            "tokens": small.packing.num_tokens, "hidden_size": int(small.hidden.shape[1])}
    log(f"seed {seed} cost: {cost}")
    return {"rows": rows, "train_sweep_decision_pearson": sweep, "best_temperature": best_t, "cost": cost,
            "eval_states": int(held.state_value.numel()), "decision_states": int(dec_held.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per split")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=0, help="steps the tiny model is trained (0: random init)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = lambda m: print(m, flush=True)
    results = {"config": vars(args), "seeds": {s: run_seed(s, args.prompts, args.group_size, args.epochs,
                                                           args.bootstrap, log, args.train_steps) for s in args.seeds}}
    names = list(next(iter(results["seeds"].values()))["rows"])
    summary = {}
    for name in names:
        cells = {}
        for metric in ("mse", "within_pearson", "decision_pearson", "collapse_ratio"):
            xs = np.array([results["seeds"][s]["rows"][name][metric] for s in args.seeds], dtype=float)
            cells[metric] = (float(xs.mean()), float(xs.std()))
        summary[name] = cells
    results["summary_mean_std"] = summary
    print("\n| estimator | MSE | within Pearson (pooled) | decision-state Pearson | collapse ratio |")
    print("|---|---|---|---|---|")
    for name, cells in summary.items():
        print(f"| {name} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells.values()) + " |")
    ratios = [results["seeds"][s]["cost"]["ratio"] for s in args.seeds]
    print(f"\nLearnedHista update / policy training step: {np.mean(ratios):.3f} (seeds: {ratios})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
