"""Distributed Hista against the all-gather baseline, on real torch.distributed process groups.

    python bench/distributed.py --ranks 2 [--rollouts 32 --tokens 256 --dim 512 --group-size 4]
    python bench/distributed.py --ranks 2 --backend nccl ...     (under torchrun-free spawn, one GPU per rank)

Each rank holds the rollouts a trainer's length balancing gives it (longest first, round robin), so a
prompt's rollouts are spread over ranks. Measured side by side in one run, per rank:
- sveb_kernels.distributed.hista_values (all_to_all regrouping to owner ranks, docs/DESIGN.md
  "Distributed groups");
- the all-gather baseline: all_gather every rank's hidden states, returns and ids, run
  sveb_kernels.hista_values on the whole batch, keep this rank's tokens (what one writes without us).
Bytes are what each rank sends to the other ranks (sveb_kernels.distributed.traffic, which both paths go
through); times are medians over --reps runs. Nothing is written unless --json PATH is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sveb_kernels as sk
from sveb_kernels import distributed as skd
from sveb_kernels.distributed import _comm


def make_batch(args, rank, world):
    """Rollouts of random lengths, args.group_size per prompt; this rank's tokens (shuffled)."""
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.tokens // 2, args.tokens * 3 // 2 + 1, (args.rollouts,), generator=gen)
    by_length = torch.argsort(lengths, descending=True)
    owner = torch.empty(args.rollouts, dtype=torch.int64)
    owner[by_length] = torch.arange(args.rollouts) % world            # length balancing, like verl/TRL
    mine = torch.nonzero(owner == rank).reshape(-1).tolist()
    rollout_ids = (torch.cat([torch.full((int(lengths[r]),), r) for r in mine]) if mine
                   else torch.zeros(0, dtype=torch.int64))
    group_ids = rollout_ids // args.group_size
    local_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    n = rollout_ids.numel()
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(n, args.dim, generator=local_gen).to(dtype)
    returns = (torch.randn(args.rollouts, generator=gen) > 0).float()[rollout_ids]
    perm = torch.randperm(n, generator=local_gen)
    return hidden[perm], returns[perm], rollout_ids[perm], group_ids[perm]


def all_gather_baseline(hidden, returns, rollout_ids, group_ids, group=None):
    """Everything to everyone, the single-process op on the whole batch, keep this rank's tokens."""
    rank, world = _comm.world(group)
    counts = _comm.all_gather_rows(torch.tensor([hidden.shape[0]]), group).reshape(-1).tolist()
    gathered_hidden = torch.cat(_comm.all_gather_ragged(hidden.view(torch.int16) if hidden.element_size() == 2
                                                        else hidden, counts, group))
    gathered_hidden = gathered_hidden.view(hidden.dtype)
    scalars = torch.stack([returns.float().view(torch.int32).long(), rollout_ids, group_ids], dim=1)
    gathered = torch.cat(_comm.all_gather_ragged(scalars, counts, group))
    all_returns = gathered[:, 0].int().view(torch.float32)
    order = torch.argsort(gathered[:, 2], stable=True)
    _, per_group = torch.unique(gathered[order, 2], return_counts=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), per_group.cumsum(0)])
    out = sk.hista_values(gathered_hidden[order], all_returns[order], gathered[order, 1], offsets)
    values = torch.empty_like(out.values)
    values[order] = out.values
    start = sum(counts[:rank])
    return values[start: start + hidden.shape[0]]


def worker(rank, world, init_file, args, out_file):
    torch.set_num_threads(args.threads)
    backend = args.backend
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    batch = [t.to(device) for t in make_batch(args, rank, world)]
    results = {}
    for name, fn in (("sveb distributed", lambda: skd.hista_values(*batch).values),
                     ("all-gather baseline", lambda: all_gather_baseline(*batch))):
        times, sent = [], []
        for rep in range(args.reps + 1):
            dist.barrier()
            _comm.reset_traffic()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            values = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            if rep:                                   # the first run warms up
                times.append(time.perf_counter() - t0)
                sent.append(_comm.traffic["bytes_sent"])
        results[name] = {"time_s": statistics.median(times), "bytes_sent": max(sent), "values": values.cpu()}
    diff = float((results["sveb distributed"]["values"] - results["all-gather baseline"]["values"]).abs().max()) \
        if batch[0].shape[0] else 0.0
    summary = {name: {"time_s": r["time_s"], "bytes_sent": r["bytes_sent"]} for name, r in results.items()}
    summary["local_tokens"] = int(batch[0].shape[0])
    summary["max_abs_diff"] = diff
    gathered = [None] * world
    dist.all_gather_object(gathered, summary)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256, help="mean tokens per rollout")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the per-rank results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(args.ranks, os.path.join(tmp, "init"), args, out_file), nprocs=args.ranks, join=True)
        with open(out_file) as f:
            per_rank = json.load(f)
    print(f"Hista over {args.ranks} {args.backend} ranks: {args.rollouts} rollouts x ~{args.tokens} tokens, "
          f"D={args.dim} {args.dtype}, {args.group_size} rollouts per prompt, {args.threads} thread(s) per rank")
    print(f"{'rank':>4} {'tokens':>7} {'sveb ms':>9} {'sveb MiB sent':>14} {'all-gather ms':>14} "
          f"{'all-gather MiB sent':>20} {'bytes ratio':>12} {'time ratio':>11} {'max |diff|':>11}")
    for rank, r in enumerate(per_rank):
        ours, base = r["sveb distributed"], r["all-gather baseline"]
        print(f"{rank:>4} {r['local_tokens']:>7} {ours['time_s'] * 1e3:>9.1f} {ours['bytes_sent'] / 2**20:>14.2f} "
              f"{base['time_s'] * 1e3:>14.1f} {base['bytes_sent'] / 2**20:>20.2f} "
              f"{base['bytes_sent'] / max(ours['bytes_sent'], 1):>11.2f}x {base['time_s'] / ours['time_s']:>10.2f}x "
              f"{r['max_abs_diff']:>11.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "per_rank": per_rank}, f, indent=1)
    return per_rank


if __name__ == "__main__":
    main()
