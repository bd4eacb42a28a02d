"""sveb_kernels.distributed on real gloo process groups (2 and 3 processes spawned on this CPU), against
the single-process ops on all ranks' data together, and for Hista also against the float64 oracle.

Process start-up costs seconds, so each world runs every case (random splits, options, bad input) in
one spawn; each rank writes what it checked to a file the test reads. A short gloo timeout turns a
hang into a failure.
"""

import datetime
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sveb_kernels as sk
from sveb_kernels import distributed as skd
from sveb_kernels.distributed._plan import plan
from sveb_kernels.numca import NumericSpans

TIMEOUT_S = 90
SPLITS = ("random", "by_rollout", "group_on_one", "empty_rank", "all_on_one")


# ----------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("world", [1, 2, 3, 7, 64])
def test_plan_covers_every_query_once_and_balances(seed, world):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 40))
    counts = rng.integers(0, 50, size=(groups, world)) * (rng.random((groups, world)) < 0.6)
    counts[counts.sum(axis=1) == 0, 0] = 1
    if groups > 2:
        counts[0] *= 20                                   # one group far larger than a fair share
    p = plan(counts)
    sizes = counts.sum(axis=1)
    for g in range(groups):
        blocks = np.flatnonzero(p.group == g)
        lo, hi = p.lo[blocks], p.hi[blocks]
        assert lo[0] == 0 and hi[-1] == sizes[g] and (lo[1:] == hi[:-1]).all()   # queries exactly once
        assert len(set(p.owner[blocks])) == len(blocks)                           # blocks on distinct ranks
        assert p.whole[blocks].all() == (len(blocks) == 1)
    loads = p.loads(sizes, world)
    biggest_item = ((p.hi - p.lo) * sizes[p.group]).max()
    # Greedy placement: no rank exceeds the fair share by more than one item.
    assert loads.max() <= loads.sum() / world * 1.05 + biggest_item
    # A group larger than a fair share is cut so its blocks are no larger than one (up to one query row,
    # as blocks hold whole tokens).
    assert biggest_item <= loads.sum() / world + sizes.max() or world == 1


def test_plan_keeps_a_group_on_the_rank_that_holds_it():
    counts = np.array([[10, 0], [0, 10], [5, 0], [0, 5]])
    p = plan(counts)
    assert p.owner.tolist() == [0, 1, 0, 1]


def test_without_process_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(RuntimeError, match="init_process_group"):
        skd.masked_whiten(torch.zeros(3), torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------------------- spawned worlds
def _split(kind, n_items, world, gen):
    """Rank of each item (token or rollout)."""
    if kind == "all_on_one":
        return torch.full((n_items,), world - 1, dtype=torch.int64)
    ranks = torch.randint(0, world, (n_items,), generator=gen)
    if kind == "empty_rank":
        ranks = torch.randint(0, world - 1, (n_items,), generator=gen)
    return ranks


def _hista_case(case, rank, world, seed, log):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    groups = rng.randint(1, 5)
    d = rng.choice([1, 3, 17, 40])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    similarity = rng.choice(["cosine", "dot"])
    temperature = rng.choice([0.1, 0.5, 2.0]) if similarity == "cosine" else rng.choice([5.0, 20.0])
    group_of, rollout_of = [], []
    next_rollout = rng.randint(0, 1000)
    for g in range(groups):
        gid = rng.randint(-5, 10 ** 12) if rng.random() < 0.5 else g
        for _ in range(rng.choice([1, 2, 3, 5])):
            length = rng.randint(1, 25)
            group_of += [gid] * length
            rollout_of += [next_rollout] * length
            next_rollout += rng.randint(1, 3)
    n = len(group_of)
    group_ids = torch.tensor(group_of)
    rollout_ids = torch.tensor(rollout_of)
    if rng.random() < 0.3:
        rollout_ids = rollout_ids.to(torch.int32)
    hidden = (torch.randn(n, d, generator=gen) + 0.5 * torch.randn(1, d, generator=gen)).to(dtype)
    returns = torch.randn(n, generator=gen, dtype=torch.float64)[torch.unique(rollout_ids, return_inverse=True)[1]]
    key_mask = torch.rand(n, generator=gen) < 0.8 if rng.random() < 0.5 else None
    key_bias = torch.randn(n, generator=gen) if rng.random() < 0.5 else None
    kind = SPLITS[case % len(SPLITS)]
    if kind == "by_rollout":
        _, inverse = torch.unique(rollout_ids, return_inverse=True)
        token_rank = torch.randint(0, world, (int(inverse.max()) + 1,), generator=gen)[inverse]
    elif kind == "group_on_one":
        token_rank = torch.randint(0, world, (n,), generator=gen)
        token_rank[group_ids == group_ids[0]] = world - 1
    else:
        token_rank = _split(kind, n, world, gen)
    mine = torch.nonzero(token_rank == rank).reshape(-1)
    mine = mine[torch.randperm(len(mine), generator=gen)]        # unsorted, not contiguous
    options = dict(temperature=temperature, similarity=similarity, empty_value=rng.choice([0.0, -1.5]))
    out = skd.hista_values(
        hidden[mine], returns[mine], rollout_ids[mine], group_ids[mine],
        key_mask=None if key_mask is None else key_mask[mine], key_bias=None if key_bias is None else key_bias[mine],
        **options)
    # Single process, all tokens: pack by group.
    order = torch.argsort(group_ids, stable=True)
    _, per_group = torch.unique(group_ids[order], return_counts=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_group, 0)])
    full = sk.hista_values(hidden[order], returns[order], rollout_ids[order], offsets,
                           key_mask=None if key_mask is None else key_mask[order],
                           key_bias=None if key_bias is None else key_bias[order], **options)
    want_values = torch.empty(n)
    want_lse = torch.empty(n)
    want_values[order], want_lse[order] = full.values, full.lse
    scale = float(returns.abs().max())
    assert out.values.shape == (len(mine),) and out.values.dtype == torch.float32
    torch.testing.assert_close(out.values, want_values[mine], atol=2e-5 * scale, rtol=0)
    torch.testing.assert_close(out.lse, want_lse[mine], atol=1e-4, rtol=1e-5)
    if dtype == torch.float32:
        from oracles import hista_oracle
        oracle_values, _ = hista_oracle(hidden[order].double(), returns[order], rollout_ids[order], offsets,
                                        key_mask=None if key_mask is None else key_mask[order],
                                        key_bias=None if key_bias is None else key_bias[order], **options)
        oracle = torch.empty(n, dtype=torch.float64)
        oracle[order] = oracle_values.double()
        torch.testing.assert_close(out.values.double(), oracle[mine], atol=1e-4 * scale, rtol=0)
    log.append(f"hista {kind} n={n} local={len(mine)} groups={groups} d={d} {dtype} {similarity}")


def _numca_case(case, rank, world, seed, log):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, t = rng.randint(1, 14), rng.randint(1, 12)
    end = torch.rand(b, t, generator=gen) < rng.choice([0.1, 0.3, 0.6])
    pool = torch.randint(-(2 ** 62), 2 ** 62, (rng.randint(1, 4),), generator=gen)
    key = torch.where(end, pool[torch.randint(0, len(pool), (b, t), generator=gen)], 0)
    mask = torch.rand(b, t, generator=gen) < 0.85
    returns = torch.randn(b, generator=gen, dtype=torch.float64)
    group_ids = torch.randint(0, rng.randint(1, 4), (b,), generator=gen) * 7919
    kind = SPLITS[case % len(SPLITS)]
    row_rank = _split("random" if kind in ("by_rollout", "group_on_one") else kind, b, world, gen)
    if kind == "group_on_one":
        row_rank[group_ids == group_ids[0]] = 0
    mine = torch.nonzero(row_rank == rank).reshape(-1)
    mine = mine[torch.randperm(len(mine), generator=gen)]
    options = dict(match=rng.choice(["last", "prefix"]), leave_one_out=rng.random() < 0.7,
                   min_support=rng.choice([1, 1, 2]), empty_value=rng.choice([0.0, 3.5]))
    spans = NumericSpans(end[mine], key[mine], None, None)
    out = skd.numca_values(spans, returns[mine], group_ids[mine], mask[mine], **options)
    want = sk.numca_values(NumericSpans(end, key, None, None), returns, group_ids, mask, **options)
    assert out.shape == (len(mine), t) and out.dtype == torch.float32
    torch.testing.assert_close(out, want[mine], atol=1e-6, rtol=1e-6)
    log.append(f"numca {kind} b={b} local={len(mine)} {options['match']}")


def _whiten_case(case, rank, world, seed, log):
    gen = torch.Generator().manual_seed(seed)
    rows = [int(torch.randint(0, 5, (1,), generator=gen)) for _ in range(world)]
    if case % 3 == 0:
        rows[-1] = 0                                        # a rank with nothing
    t = 7
    xs = [torch.randn(r, t, generator=gen) * 3 + 1 for r in rows]
    masks = [torch.rand(r, t, generator=gen) < 0.7 for r in rows]
    total = sum(int(m.sum()) for m in masks)
    dtype = torch.float64 if case % 2 else torch.float32
    if total < 2:
        try:
            skd.masked_whiten(xs[rank].to(dtype), masks[rank])
        except ValueError as exc:
            assert "at least 2" in str(exc)
            log.append("whiten too few: ValueError")
            return
        raise AssertionError("no error for fewer than 2 valid elements")
    out = skd.masked_whiten(xs[rank].to(dtype), masks[rank], shift_mean=bool(case % 4))
    want = sk.masked_whiten(torch.cat(xs).to(dtype), torch.cat(masks), shift_mean=bool(case % 4))
    mine = want[sum(rows[:rank]): sum(rows[: rank + 1])]
    assert out.dtype == dtype
    torch.testing.assert_close(out, mine, atol=1e-5, rtol=1e-5)
    log.append(f"whiten rows={rows}")


def _expect_same_error(kind, fn, rank, world, log, match):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = "no error"
    messages = [None] * world
    dist.all_gather_object(messages, message)     # test-only check that every rank saw the same error
    assert len(set(messages)) == 1, messages
    assert message.startswith(kind) and match in message, message
    log.append(f"error {match!r}: {message}")


def _bad_inputs(rank, world, log):
    d = 8
    hidden = torch.randn(6, d)
    returns = torch.randn(6)
    rollouts = torch.arange(6) // 2 + 100 * rank
    groups = torch.zeros(6, dtype=torch.int64)
    hv = skd.hista_values
    _expect_same_error("ValueError", lambda: hv(hidden if rank else torch.randn(6, d + 1), returns, rollouts, groups),
                       rank, world, log, "same D")
    _expect_same_error("ValueError", lambda: hv(hidden.to(torch.bfloat16) if rank == world - 1 else hidden, returns,
                                                rollouts, groups), rank, world, log, "same D and dtype")
    shared = torch.full((6,), 7)                       # rollout 7 in group `rank` on every rank
    _expect_same_error("ValueError", lambda: hv(hidden, returns, shared, groups + rank), rank, world, log,
                       "rollout 7 has tokens in groups")
    _expect_same_error("ValueError", lambda: hv(hidden, returns[:5] if rank == 1 else returns, rollouts, groups),
                       rank, world, log, "returns must have shape")
    _expect_same_error("TypeError", lambda: hv(hidden.numpy() if rank == 0 else hidden, returns, rollouts, groups),
                       rank, world, log, "hidden must be a torch.Tensor")
    _expect_same_error("ValueError", lambda: hv(hidden, returns, rollouts, groups, temperature=0.1 + rank),
                       rank, world, log, "temperature must be the same")
    _expect_same_error("ValueError", lambda: hv(hidden, returns, rollouts, groups,
                                                temperature=-1.0 if rank == world - 1 else 0.1),
                       rank, world, log, "temperature must be > 0")
    end = torch.rand(3, 5) < 0.5
    spans = NumericSpans(end, torch.where(end, 3, 0), None, None)
    nv = skd.numca_values
    _expect_same_error("ValueError", lambda: nv(spans, torch.randn(3), torch.zeros(3, dtype=torch.int64),
                                                torch.ones(3, 4 if rank == 1 else 5, dtype=torch.bool)),
                       rank, world, log, "mask must have shape")
    _expect_same_error("ValueError", lambda: nv(spans, torch.randn(3), torch.zeros(3, dtype=torch.int64),
                                                torch.ones(3, 5, dtype=torch.bool), match="prefix" if rank else "last"),
                       rank, world, log, "match must be the same")
    _expect_same_error("ValueError", lambda: skd.masked_whiten(torch.randn(4), torch.ones(4 if rank else 3)),
                       rank, world, log, "mask must have shape")
    # After every error the process group is still in step: a normal call works.
    out = skd.masked_whiten(torch.arange(4.0) + rank, torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(out).all()
    log.append("in step after errors")


def _worker(rank, world, init_file, out_dir, seed, cases):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/oracles.py
    torch.set_num_threads(1)
    # Small chunks and tiles, so the chunked send copy and the tiled block path loop here.
    from sveb_kernels.distributed import hista as distributed_hista
    distributed_hista._COPY_ROWS, distributed_hista._TILE_ELEMENTS = 5, 150
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    log = []
    try:
        for case in range(cases):
            for fn, salt in ((_hista_case, 1), (_numca_case, 2), (_whiten_case, 3)):
                case_seed = (seed * 1000003 + case * 31 + salt) % (2 ** 31)
                try:
                    fn(case, rank, world, case_seed, log)
                except Exception as exc:
                    raise AssertionError(f"{fn.__name__} case {case} seed {case_seed} on rank {rank}: {exc}") from exc
        # Hista with no tokens anywhere, and one token in all.
        empty = skd.hista_values(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                                 torch.zeros(0, dtype=torch.int64))
        assert empty.values.shape == (0,)
        one = skd.hista_values(torch.randn(1 if rank == 0 else 0, 4), torch.ones(1 if rank == 0 else 0),
                               torch.zeros(1 if rank == 0 else 0, dtype=torch.int64),
                               torch.zeros(1 if rank == 0 else 0, dtype=torch.int64), empty_value=2.5)
        assert one.values.tolist() == ([2.5] if rank == 0 else []) and one.lse.tolist() == ([-np.inf] if rank == 0
                                                                                              else [])
        _bad_inputs(rank, world, log)
    except BaseException:
        import traceback
        log.append("FAILED " + traceback.format_exc())
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(log, f)
        dist.destroy_process_group()


@pytest.mark.parametrize("world,cases", [(2, 12), (3, 10)])
def test_distributed_ops_on_gloo_equal_the_single_process_ops(tmp_path, seed, world, cases):
    try:
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), seed, cases), nprocs=world, join=True)
    except Exception:
        # The first process to die is often a peer of the one that failed: show every rank's own failure.
        failures = [line for rank in range(world) if (tmp_path / f"rank{rank}.json").exists()
                    for line in json.loads((tmp_path / f"rank{rank}.json").read_text()) if line.startswith("FAILED")]
        pytest.fail("\n\n".join(failures) or "a rank died without a log")
    for rank in range(world):
        log = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sum(line.startswith("hista") for line in log) == cases, log
        assert sum(line.startswith("numca") for line in log) == cases, log
        assert "in step after errors" in log


def test_readme_multi_gpu_example_runs(tmp_path):
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    section = (root / "README.md").read_text().split("## Multi-GPU use", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    script = tmp_path / "multi_gpu_example.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tile", [None, 37])
def test_query_block_path_matches_the_oracle(seed, similarity, dtype, tile, monkeypatch):
    """The block path (queries of one group against all its keys) without processes: every query
    block of a random group, against the float64 oracle on the whole group."""
    from sveb_kernels.distributed import hista as distributed_hista
    from sveb_kernels.distributed.hista import _attend

    if tile is not None:
        monkeypatch.setattr(distributed_hista, "_TILE_ELEMENTS", tile)
    from oracles import hista_oracle

    gen = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(2, 90, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    rollout = torch.randint(0, 4, (n,), generator=gen)
    returns = torch.randn(n, generator=gen)
    key_mask = torch.rand(n, generator=gen) < 0.8
    key_bias = torch.randn(n, generator=gen)
    temperature = 0.3 if similarity == "cosine" else 7.0
    want_v, want_l = hista_oracle(hidden.double(), returns, rollout, torch.tensor([0, n]), temperature, similarity,
                                  key_mask, key_bias, -2.0)
    key_add = key_bias.masked_fill(~key_mask, float("-inf"))
    cut = int(torch.randint(0, n + 1, (1,), generator=gen))
    for lo, hi in ((0, cut), (cut, n)):
        v, l = _attend(hidden[lo:hi], rollout[lo:hi], hidden, rollout, returns, key_add, temperature, similarity, -2.0)
        torch.testing.assert_close(v.double(), want_v[lo:hi], atol=1e-4 * float(returns.abs().max()), rtol=0)
        torch.testing.assert_close(l.double(), want_l[lo:hi], atol=1e-4, rtol=1e-5)


def _block_path_nonfinite_worker(rank, world, init_file, out_dir):
    """One prompt of 12 rollouts x 50 tokens over 3 ranks (the plan cuts it into query blocks, so the
    block path computes it): a NaN hidden state of a key, then the same NaN in a masked-out key."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    log = []
    try:
        gen = torch.Generator().manual_seed(20)
        rollouts, length, d = 12, 50, 16
        n = rollouts * length
        hidden = torch.randn(n, d, generator=gen)
        returns = torch.randn(rollouts, generator=gen).repeat_interleave(length)
        rollout_ids = torch.arange(rollouts).repeat_interleave(length)
        group_ids = torch.zeros(n, dtype=torch.int64)
        offsets = torch.tensor([0, n])
        mine = torch.arange(rank, n, world)
        for masked in (False, True):
            bad = 7 * length + 3
            poisoned = hidden.clone()
            poisoned[bad, 5] = float("nan")
            key_mask = torch.ones(n, dtype=torch.bool)
            key_mask[bad] = not masked
            want = sk.hista_values(poisoned, returns, rollout_ids, offsets, key_mask=key_mask, backend="reference")
            out = skd.hista_values(poisoned[mine], returns[mine], rollout_ids[mine], group_ids[mine],
                                   key_mask=key_mask[mine], backend="reference")
            assert torch.equal(torch.isnan(out.values), torch.isnan(want.values[mine])), (
                masked, int(torch.isnan(out.values).sum()), int(torch.isnan(want.values[mine]).sum()))
            torch.testing.assert_close(out.values, want.values[mine], atol=1e-5, rtol=0, equal_nan=True)
            torch.testing.assert_close(out.lse, want.lse[mine], atol=1e-4, rtol=1e-5, equal_nan=True)
            log.append(f"masked={masked} nan={int(torch.isnan(out.values).sum())}")
    except BaseException:
        import traceback
        log.append("FAILED " + traceback.format_exc())
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(log, f)
        dist.destroy_process_group()


def test_block_path_keeps_the_nonfinite_and_masked_key_rules(tmp_path):
    """Issue 20 item 1: the distributed block path had its own copy of the block loop, without the
    reference's rules (a NaN key gave finite values; a NaN in a masked key changed every value)."""
    world = 3
    try:
        mp.spawn(_block_path_nonfinite_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                 join=True)
    except Exception:
        failures = [line for rank in range(world) if (tmp_path / f"rank{rank}.json").exists()
                    for line in json.loads((tmp_path / f"rank{rank}.json").read_text()) if line.startswith("FAILED")]
        pytest.fail("\n\n".join(failures) or "a rank died without a log")
    for rank in range(world):
        assert len(json.loads((tmp_path / f"rank{rank}.json").read_text())) == 2
