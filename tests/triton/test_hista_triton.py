"""The Triton Hista kernels against the float64 oracle.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py
starts that process); on a GPU machine the same small odd-size cases run compiled on CUDA tensors,
and the tests marked `gpu` add real sizes (`pytest -m gpu tests/triton`).
"""

import math
import os
import pathlib
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: oracles and shared helpers

import sveb_kernels as sk  # noqa: E402
from oracles import hista_oracle  # noqa: E402
from test_hista import (assert_close_fp32, assert_within_twice_plain_error, make_batch,  # noqa: E402
                        plain_pytorch_in_dtype, random_groups)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def kernels():
    from sveb_kernels.hista import triton as hista_triton  # imported late: after TRITON_INTERPRET is read
    return hista_triton


def run(hidden, returns, rollout_ids, offsets, config=None, **kw):
    """The triton backend on DEVICE; results back on the CPU as a HistaOutput."""
    args = [t.to(DEVICE) for t in (hidden, returns, rollout_ids, offsets)]
    if config is None:
        out = sk.hista_values(*args, backend="triton", **{k: v.to(DEVICE) if torch.is_tensor(v) else v
                                                          for k, v in kw.items()})
    else:
        full = dict(temperature=0.1, similarity="cosine", key_mask=None, key_bias=None, empty_value=0.0)
        full.update({k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kw.items()})
        out = sk.HistaOutput(*kernels().hista_values(*args, full["temperature"], full["similarity"],
                                                     full["key_mask"], full["key_bias"], full["empty_value"],
                                                     config=config))
    assert out.values.device.type == DEVICE and out.lse.device.type == DEVICE
    return sk.HistaOutput(out.values.cpu(), out.lse.cpu())


# D values around the interpreter's BLOCK_D = 32: one chunk, one partial chunk, two even chunks, uneven.
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("d", [1, 20, 64, 77])
def test_random_groups_match_oracle(seed, similarity, d):
    groups = random_groups(num_groups=4, max_rollouts=5, max_len=23) + [[], [9], [1]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, d)
    temperature = 0.1 if similarity == "cosine" else 3.0 * math.sqrt(d)
    out = run(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)


def test_key_mask_bias_and_empty_value(seed):
    groups = random_groups(num_groups=4, max_rollouts=5, max_len=19)
    hidden, returns, rollout_ids, offsets = make_batch(groups, 37)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.4
    key_mask[offsets[0]:offsets[1]] = False  # every key of group 0 masked: its rows have none
    key_bias = torch.randn(n) * 2
    key_bias[torch.rand(n) < 0.1] = -math.inf  # a -inf bias is a zero weight, like a mask
    kw = dict(temperature=0.3, key_mask=key_mask, key_bias=key_bias, empty_value=-2.5)
    out = run(hidden, returns, rollout_ids, offsets, **kw)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, **kw)
    assert (out.values[offsets[0]:offsets[1]] == -2.5).all()
    assert (out.lse[offsets[0]:offsets[1]] == -math.inf).all()


def test_groups_of_very_different_sizes_with_key_splits(seed):
    """A long group (split along its keys, partial raster blocks) beside tiny ones, through every
    output path: split partials + combine, direct output, and no tile skipping."""
    groups = [[97, 60, 88, 41], [2, 1], [5, 7, 3], [33, 30], [1, 1, 1, 1, 1, 1]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 40)
    key_bias = torch.randn(hidden.shape[0])
    base = kernels().INTERPRETER_CONFIG if INTERPRETED else kernels().pick_config(torch.device(DEVICE),
                                                                                  torch.float32)
    small = replace(base, block_m=32, block_n=32, block_d=32, num_warps=4, num_stages=2, group_q=2,
                    min_split_keys=64, max_splits=4)
    for cfg in (small, replace(small, max_splits=1), replace(small, skip_empty_tiles=False),
                replace(small, flatten=True), replace(small, group_q=1, min_split_keys=32, max_splits=16)):
        table, items, most = kernels().build_schedule(offsets, cfg, hidden.shape[0])
        assert (most > 1) == (cfg.max_splits > 1)
        out = run(hidden, returns, rollout_ids, offsets, config=cfg, temperature=0.2, key_bias=key_bias)
        assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=0.2, key_bias=key_bias)


@pytest.mark.parametrize("lengths", [[0, 1, 2, 31, 32, 33, 300, 64, 1000, 5], [1, 0, 1], [7]])
def test_schedule_covers_every_group_once(lengths):
    cfg = replace(kernels().INTERPRETER_CONFIG, block_m=32, block_n=32, min_split_keys=64, max_splits=4)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    n = int(offsets[-1])
    table, item_bound, split_bound = kernels().build_schedule(offsets.to(DEVICE), cfg, n)
    assert table.device.type == DEVICE and table.shape == (len(lengths) + 1, 5)
    starts, lens, first, splits, split_len = table[:-1].cpu().T.tolist()
    total = int(table[-1, 2])
    # groups of < 2 tokens have no items and sort last; the rest once each, longest first
    kept = [(s, n_) for s, n_, k in zip(starts, lens, splits) if k > 0]
    assert sorted(kept) == sorted((int(offsets[g]), n_) for g, n_ in enumerate(lengths) if n_ > 1)
    assert lens == sorted(lens, reverse=True)
    expected_first = 0
    for n_, f, s, sl in zip(lens, first, splits, split_len):
        assert f == expected_first
        if n_ == 0:
            assert s == 0
            continue
        assert sl % cfg.block_n == 0 and 1 <= s <= min(cfg.max_splits, split_bound)
        assert (s - 1) * sl < n_ <= s * sl  # the splits cover the keys, none is empty
        expected_first += -(-n_ // cfg.block_m) * s
    assert total == expected_first <= item_bound


def test_schedule_bounds_hold_for_random_groups(seed):
    """The host-side bounds (grid and partial buffers), computed from N and G alone, are never exceeded."""
    for _ in range(200):
        cfg = replace(kernels().INTERPRETER_CONFIG, block_m=int(2 ** torch.randint(4, 8, ())),
                      block_n=int(2 ** torch.randint(4, 8, ())), min_split_keys=int(torch.randint(1, 300, ())),
                      max_splits=int(torch.randint(1, 20, ())))
        lengths = torch.randint(0, int(torch.randint(1, 3000, ())), (int(torch.randint(1, 40, ())),))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        table, item_bound, split_bound = kernels().build_schedule(offsets, cfg, int(offsets[-1]))
        assert int(table[-1, 2]) <= item_bound and int(table[:-1, 3].max()) <= split_bound


def test_single_rollout_and_tiny_groups(seed):
    hidden, returns, rollout_ids, offsets = make_batch([[5], [], [1], [3], [1, 1]], 8)
    out = run(hidden, returns, rollout_ids, offsets, empty_value=0.25)
    want_values, want_lse = hista_oracle(hidden, returns, rollout_ids, offsets, empty_value=0.25)
    assert (out.values[:9] == 0.25).all() and (out.lse[:9] == -math.inf).all()
    torch.testing.assert_close(out.values.double(), want_values, rtol=0, atol=1e-5)


def test_no_tokens():
    out = run(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int64))
    assert out.values.shape == (0,) and out.lse.shape == (0,)


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_extreme_temperatures(seed, temperature):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 9), 19)
    out = run(hidden, returns, rollout_ids, offsets, temperature=temperature)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=temperature)


def test_huge_hidden_norms_cosine(seed):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 5, 9), 45, scale=3000.0)
    out = run(hidden, returns, rollout_ids, offsets, temperature=0.05)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_low_precision_within_twice_plain_pytorch_error(seed, dtype, similarity):
    d = 129
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 5, 15) + [[9, 14]], d, dtype=dtype)  # one group with keys at least
    temperature = 0.1 if similarity == "cosine" else float(d)
    out = run(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)
    want, want_lse = hista_oracle(hidden, returns, rollout_ids, offsets, temperature=temperature,
                                  similarity=similarity)
    plain = plain_pytorch_in_dtype(hidden, returns, rollout_ids, offsets, temperature, similarity)
    assert_within_twice_plain_error(out.values, plain, want, torch.isfinite(want_lse), returns)


def test_fp64_non_contiguous_and_int64_ids(seed):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 11), 31)
    n = hidden.shape[0]
    hidden_t = hidden.double().T.contiguous().T  # column-major fp64 view
    returns_s = torch.stack([returns, torch.zeros(n)], 1)[:, 0]
    before = (hidden_t.clone(), returns_s.clone())
    out = run(hidden_t, returns_s, rollout_ids.long() * 1_000_003, offsets.int())
    assert torch.equal(before[0], hidden_t) and torch.equal(before[1], returns_s)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets)


def test_opcheck_triton_backend(seed):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(2, 3, 7), 21)
    n = hidden.shape[0]
    args = [t.to(DEVICE) for t in (hidden, returns, rollout_ids, offsets)]
    key_mask, key_bias = (torch.rand(n) > 0.2).to(DEVICE), torch.randn(n).to(DEVICE)
    torch.library.opcheck(torch.ops.sveb.hista_values.default,
                          args + [0.2, "cosine", key_mask, key_bias, 0.5, "triton"])


# ---------------------------------------------------------------------------------------------
# GPU: real sizes, against a float64 truth computed densely one group at a time on the GPU.


# Opt-in shared memory per block of the GPUs the configs are tuned for: A100, H100.
PRODUCTION_SMEM = {80: 166912, 90: 232448}


def production_configs(dtype):
    """`config_for` on A100 and H100 as either end of the tested Triton range picks it (deduplicated)."""
    from sveb_kernels import _versions

    configs = []
    for arch, smem in PRODUCTION_SMEM.items():
        for release in _versions.TRITON_TESTED:
            cfg = kernels().config_for(arch // 10, smem, dtype, triton_release=release)
            if cfg not in configs:
                configs.append(cfg)
    return configs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_production_configs_match_oracle(seed, dtype):
    """Every config a GPU launches, with the per-token and merge kernels at their real block sizes,
    on batches that exercise them: a 1030-token group (two key splits of >= 1024 keys, a partial last
    query tile, own-rollout tiles skipped, partial key tiles) at D = 128 (whole BLOCK_D chunks), and
    small groups (direct output, no split) at D = 80 (a partial last chunk). Under the interpreter
    16-bit operands are upcast before tl.dot (its bf16 dot is wrong); their products are exact in
    fp32 as on tensor cores, so the fp32 bound holds against the oracle of the same rounded inputs."""
    batches = [make_batch([[400, 350, 170, 110]], 128, dtype=dtype),
               make_batch([[50, 30, 47], [9], [2, 1]], 80, dtype=dtype)]
    for cfg in production_configs(dtype):
        assert (cfg.row_block, cfg.combine_block) == (32, 1024) and 1030 % cfg.block_m and 1030 % cfg.block_n
        for (hidden, returns, rollout_ids, offsets), splits in zip(batches, (2, 1)):
            table = kernels().build_schedule(offsets, cfg, hidden.shape[0])[0]
            assert int(table[:-1, 3].max()) == splits  # column 3: key splits per group
            kw = dict(temperature=0.2, key_bias=torch.randn(hidden.shape[0]))
            out = run(hidden, returns, rollout_ids, offsets, config=cfg, **kw)
            assert_close_fp32(out, hidden, returns, rollout_ids, offsets, **kw)


def dense_truth(hidden, returns, rollout_ids, offsets, temperature, similarity="cosine"):
    h = hidden.double()
    if similarity == "cosine":
        h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(1e-6)
    values = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    lse = torch.full((h.shape[0],), -math.inf, dtype=torch.float64, device=h.device)
    for g0, g1 in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        scores = (h[g0:g1] @ h[g0:g1].T) / temperature
        scores.masked_fill_(rollout_ids[g0:g1, None] == rollout_ids[None, g0:g1], -math.inf)
        lse[g0:g1] = torch.logsumexp(scores, dim=1)
        values[g0:g1] = torch.softmax(scores, dim=1).nan_to_num(0.0) @ returns[g0:g1].double()
    return values, lse


def plain_on_device(hidden, returns, rollout_ids, offsets, temperature):
    """tests/test_hista.py's plain PyTorch formula in the input dtype, with device-aware indices."""
    group = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
    h = hidden / torch.linalg.vector_norm(hidden, dim=1, keepdim=True).clamp_min(1e-6)
    scores = (h @ h.T) / temperature
    usable = (group[:, None] == group[None, :]) & (rollout_ids[:, None] != rollout_ids[None, :])
    weights = torch.softmax(scores.masked_fill(~usable, float("-inf")), dim=1)
    return (weights @ returns.to(hidden.dtype)).float()


def gpu_batch(groups, d, dtype):
    hidden, returns, rollout_ids, offsets = make_batch(groups, d, dtype=torch.float32)
    return hidden.to("cuda", dtype), returns.cuda(), rollout_ids.cuda(), offsets.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 4096), (torch.float16, 896), (torch.bfloat16, 8192),
                                     (torch.bfloat16, 100)])
def test_gpu_real_sizes_low_precision(seed, dtype, d):
    groups = [[int(torch.randint(200, 700, ())) for _ in range(8)] for _ in range(3)] + [[3000, 1000], [40]]
    hidden, returns, rollout_ids, offsets = gpu_batch(groups, d, dtype)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=0.1, backend="triton")
    want, want_lse = dense_truth(hidden, returns, rollout_ids, offsets, 0.1)
    plain = plain_on_device(hidden, returns, rollout_ids, offsets, 0.1)
    has = torch.isfinite(want_lse)
    ours = (out.values.double() - want)[has].abs().max()
    assert ours <= 2 * (plain.double() - want)[has].abs().max() + 1e-6
    assert torch.equal(torch.isfinite(out.lse), has) and (out.values[~has] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 257, 4096])
@pytest.mark.parametrize("temperature", [1e-3, 0.1])
def test_gpu_fp32_meets_the_fp32_bound(seed, d, temperature):
    groups = [[int(torch.randint(100, 900, ())) for _ in range(6)] for _ in range(2)]
    hidden, returns, rollout_ids, offsets = gpu_batch(groups, d, torch.float32)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=temperature, backend="triton")
    want, want_lse = dense_truth(hidden, returns, rollout_ids, offsets, temperature)
    assert (out.values.double() - want).abs().max() <= 1e-4 * returns.abs().max()
    assert ((out.lse.double() - want_lse).abs() / want_lse.abs().clamp_min(1.0)).max() <= 1e-5


@pytest.mark.gpu
def test_gpu_every_candidate_config_is_correct(seed):
    hidden, returns, rollout_ids, offsets = gpu_batch([[300] * 8, [700, 500], [90] * 3], 1000, torch.bfloat16)
    want, want_lse = dense_truth(hidden, returns, rollout_ids, offsets, 0.1)
    plain = plain_on_device(hidden, returns, rollout_ids, offsets, 0.1)
    bound = 2 * (plain.double() - want).abs().max() + 1e-6
    for cfg in kernels().candidate_configs(hidden.device, hidden.dtype):
        values, _ = kernels().hista_values(hidden, returns, rollout_ids, offsets, 0.1, "cosine", None, None, 0.0,
                                           config=cfg)
        assert (values.double() - want).abs().max() <= bound, cfg


@pytest.mark.gpu
def test_gpu_64k_group_memory_is_linear(seed):
    n, d = 65536, 1024
    hidden, returns, rollout_ids, offsets = gpu_batch([[n // 8] * 8], d, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 64 * 4 * n, extra  # per-token terms and split partials; [N, N] would be 16 GiB
    assert torch.isfinite(out.values).all() and torch.isfinite(out.lse).all()
    # spot-check some rows against float64
    rows = torch.randint(0, n, (64,), device="cuda")
    h = hidden.double()
    h = h / h.norm(dim=1, keepdim=True)
    scores = (h[rows] @ h.T) / 0.1
    scores.masked_fill_(rollout_ids[rows, None] == rollout_ids[None, :], -math.inf)
    want = torch.softmax(scores, dim=1) @ returns.double()
    # The truth starts from the same bf16 numbers, so only fp32 accumulation separates the two.
    assert (out.values[rows].double() - want).abs().max() <= 1e-3 * returns.abs().max()


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("splits", [False, True], ids=["direct", "split"])
def test_nonfinite_inputs_poison_exactly_their_dependents(seed, poison, similarity, splits):
    """docs/CONTRACT.md "Common rules": NaN/inf inputs give NaN/inf in the outputs that depend on them
    (never empty_value), and leave the other outputs as the oracle says (nonfinite_cases.py)."""
    from nonfinite_cases import check_hista_nonfinite, hista_poison_case

    clean, poisoned, bad_values, bad_lse = hista_poison_case(poison)
    config = replace(kernels().INTERPRETER_CONFIG, min_split_keys=8 if splits else 1 << 20)
    kw = {k: v for k, v in poisoned.items() if k not in ("hidden", "returns", "rollout_ids", "group_offsets")}
    out = run(poisoned["hidden"], poisoned["returns"], poisoned["rollout_ids"], poisoned["group_offsets"],
              config=config, similarity=similarity, **kw)
    clean["similarity"] = similarity
    check_hista_nonfinite(out, clean, bad_values, bad_lse, poison)


def test_schedule_kernels_equal_the_torch_pipeline(seed):
    """The two-kernel schedule (counting sort on the device, issue 20: ~35 small torch ops before) gives
    the torch pipeline's table for valid offsets, and bounded rows for offsets that break the contract."""
    for _ in range(20):
        cfg = replace(kernels().INTERPRETER_CONFIG, block_m=int(2 ** torch.randint(4, 8, ())),
                      block_n=int(2 ** torch.randint(4, 8, ())), min_split_keys=int(torch.randint(1, 300, ())),
                      max_splits=int(torch.randint(1, 20, ())))
        lengths = torch.randint(0, int(torch.randint(1, 600, ())), (int(torch.randint(0, 150, ())),))
        lengths[torch.rand(len(lengths)) < 0.3] = 7                      # ties keep their order
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(DEVICE)
        n = int(offsets[-1])
        fast = kernels().build_schedule(offsets, cfg, n, kernels=True)
        slow = kernels().build_schedule(offsets, cfg, n, kernels=False)
        assert torch.equal(fast[0].cpu(), slow[0].cpu()) and fast[1:] == slow[1:]
    bad = torch.tensor([5, -3, 10 ** 12, 4, 2 ** 40], device=DEVICE)
    table = kernels().build_schedule(bad, cfg, 50, kernels=True)[0].cpu()
    assert ((table[:-1, 0] >= 0) & (table[:-1, 0] <= 50) & (table[:-1, 0] + table[:-1, 1] <= 50)).all()
