"""Hista as fused Triton kernels: similarity GEMM + online softmax + return averaging, varlen groups.

Imported only by the backend loader (importing triton is slow, and TRITON_INTERPRET must be set
before the kernels below are defined).

Structure (flash-attention forward with Q = K = hidden, value dimension 1):
  1. `_row_terms_kernel`, one pass over hidden: per-token query scale (inverse norm / temperature, in
     base 2), key scale (inverse norm) and additive key term (key_bias in base 2, -inf for masked
     keys). Cosine is thus never materialised as normalised hidden states: the scales are applied to
     the fp32 GEMM tile in the epilogue, which is also more accurate than normalising in bf16.
  2. `_hista_kernel`, one program per *work item* = (group, query tile, key split). For each key
     tile of its split it computes the [BLOCK_M, BLOCK_N] score tile as a K-loop over D in BLOCK_D
     chunks (`tl.dot`, fp32 accumulation, tensor cores), then an online softmax in base 2 with the
     same-rollout exclusion, key mask and key bias. The value dimension is 1, so the weighted sum
     of returns is a row reduction of p * returns, not a padded second GEMM.
  3. `_combine_kernel`, only when some group was split along its keys: merges the per-split
     (max, sum, weighted sum) triples of every row, flash-decoding style.

Why the D loop re-reads Q chunks for every key tile: a query tile of 128 rows at D = 4096 is 1 MiB
in bf16, several times the shared memory of an SM, so neither operand can stay resident; each score
tile is a full GEMM K-loop, pipelined by Triton (`num_stages`, cp.async on Ampere, async copies
feeding wgmma on Hopper). What decides the speed is then the L2 hit rate of those re-reads, exactly
as in a plain GEMM. Hence the key splits and the raster: the work items of a group are ordered as
blocks of GROUP_Q query tiles x all key splits, so the ~#SM programs running at once touch GROUP_Q
query panels and one key tile per split (about 8 + 16 MiB at D = 4096), which fits the 50 MiB L2
of an H100, instead of one private query panel per program (132 MiB per wave, streamed from HBM).
Splits also give enough programs when a batch has few query tiles. Two loop shapes are offered:
the default skips the GEMM of key tiles that hold only the query tile's own rollout (~1/R of the
work for R rollouts), at the price of refilling the D-loop pipeline for every key tile; `flatten`
lets Triton fuse both loops into one pipelined loop, so the next tile's loads overlap this tile's
softmax, but then every tile is computed. Which wins is measured by `bench/hista_gpu.py`'s sweep.
Not used: TMA tensor descriptors (need 16-byte aligned rows, i.e. D % 8 == 0, and a device-side
allocator) and automatic warp specialization (Blackwell only in this Triton): candidates for a
second tuning round on Hopper once the sweep has numbers.

Precision: bf16/fp16 products accumulate in fp32 on tensor cores; fp32 inputs use 3xTF32 (plain
TF32 would miss the fp32 accuracy bound of docs/CONTRACT.md §1; bench/tf32_model.py models both, see
docs/DESIGN.md "GPU readiness"); fp64 inputs are computed in fp32.

Scheduling across groups of very different sizes: two small device kernels clamp the offsets, sort
the groups longest first and number their work items (`build_schedule`); nothing is read back on the host, so
the launch path never synchronises and CUDA-graph capture works. The host knows only a bound on the
item count (from N and G), so the grid is persistent: min(bound, PROGRAMS_PER_SM * SMs) programs each
take items pid, pid + P, ... up to the true count, which the schedule's sentinel row holds. Items run
roughly in id order, so the largest run first and the short ones fill the tail
(longest-processing-time-first). A program finds an item's group by a binary search over the
per-group first item ids.

Memory: O(N*D) inputs, O(N) per-token terms and outputs, plus 3 * S * N floats of split partials
when splits are possible, S = min(max_splits, ceil(N / min_split_keys)) <= 16 (a bound: the true
split counts live on the device). Never [N, N].

Non-finite inputs (docs/DESIGN.md "GPU readiness"): a NaN/inf reaches exactly the rows whose key set
holds it (or the row itself); such a row's sum of weights is NaN, which `_finish` keeps as NaN, never
empty_value.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_compat import loop_bound
from .._versions import triton_version

EPS = 1e-6
LOG2E = 1.4426950408889634
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))
_NEG_INF = tl.constexpr(float("-inf"))
_NAN = tl.constexpr(float("nan"))
_POS_INF = tl.constexpr(float("inf"))
# Columns of the per-group schedule table (int64 [G', 5]).
_SCHED_COLS = tl.constexpr(5)


@dataclass(frozen=True)
class HistaConfig:
    """Tile shape and schedule knobs of the fused kernel."""

    block_m: int = 128  # query rows per program
    block_n: int = 128  # keys per score tile
    block_d: int = 64  # hidden columns per K-loop step
    num_warps: int = 8
    num_stages: int = 3
    group_q: int = 8  # query tiles per raster block (L2 reuse of query panels across splits)
    min_split_keys: int = 1024  # a group is split along its keys only into parts of at least this many
    max_splits: int = 16  # and into at most this many parts
    skip_empty_tiles: bool = True  # skip the GEMM of a score tile whose keys are all unusable
    flatten: bool = False  # one pipelined loop over (key tile, D chunk); excludes skip_empty_tiles
    row_block: int = 32  # tokens per program of the per-token terms kernel
    combine_block: int = 1024  # tokens per program of the split-merging kernel


# Under the interpreter the blocks only need to be small and few (numpy runs each op); splits are
# made small so that tests exercise them.
INTERPRETER_CONFIG = HistaConfig(block_m=32, block_n=32, block_d=32, num_warps=4, num_stages=1,
                                 group_q=2, min_split_keys=64, max_splits=4, row_block=16, combine_block=256)


def _stages_that_fit(smem_bytes: int, block_m: int, block_n: int, block_d: int, elem: int, most: int) -> int:
    """Pipeline depth that fits the SM's shared memory (leaving room for the epilogue's scratch)."""
    per_stage = (block_m + block_n) * block_d * elem
    return max(2, min(most, int(0.8 * smem_bytes) // per_stage))


def config_for(major: int, smem_bytes: int, dtype: torch.dtype, *,
               triton_release: Optional[tuple[int, int]] = None) -> HistaConfig:
    """The config for a GPU of compute capability `major`.x with `smem_bytes` of shared memory per block,
    compiled by Triton `triton_release` (major, minor; default: the installed one).

    Hopper/Blackwell (sm90+): 128x128 score tiles, 8 warps (two warpgroups of wgmma m64n128),
    BLOCK_D 64 for bf16; fp16 takes 64x128 tiles with one warpgroup (two CTAs per SM), because
    ptxas spills the fp16 build of the 128x128 epilogue. Before Triton 3.8 (3.6, the oldest tested)
    both 16-bit dtypes take 128x64 tiles on two warpgroups: 3.6's ptxas spills bf16's 128x128 (336
    bytes) and, with the persistent schedule loop, 64x128 on one warpgroup too (24-32 bytes).
    Ampere (sm8x): BLOCK_D 32 with deeper cp.async pipelines, as Triton's tuned A100 matmuls.
    fp32 inputs run 3xTF32 (see `_dot_precision`) on 128x64 tiles (128x128 spills).
    Chosen from the GEMM structure and the compiled kernels' register use (no spills, checked by
    tests/test_triton_compile.py), not yet timed: the sweep of `bench/hista_gpu.py` times
    `candidate_configs` on a real GPU to confirm or replace them.
    """
    elem = 4 if dtype == torch.float32 else 2
    if dtype == torch.float32:
        cfg = HistaConfig(block_m=128, block_n=64, block_d=32, num_warps=8)
    elif major >= 9 and (triton_release or triton_version()) < (3, 8):
        cfg = HistaConfig(block_m=128, block_n=64, block_d=64, num_warps=8)
    elif major >= 9 and dtype == torch.bfloat16:
        cfg = HistaConfig(block_m=128, block_n=128, block_d=64, num_warps=8)
    elif major >= 9:
        cfg = HistaConfig(block_m=64, block_n=128, block_d=64, num_warps=4)
    elif major == 8:
        cfg = HistaConfig(block_m=128, block_n=128, block_d=32, num_warps=8)
    else:
        cfg = HistaConfig(block_m=64, block_n=64, block_d=32, num_warps=4)
    return replace(cfg, num_stages=_stages_that_fit(smem_bytes, cfg.block_m, cfg.block_n, cfg.block_d, elem, most=4))


def pick_config(device: torch.device, dtype: torch.dtype) -> HistaConfig:
    """The config for tensors of `dtype` on `device` (the interpreter's one on CPU)."""
    if _INTERPRETED or device.type != "cuda":
        return INTERPRETER_CONFIG
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return config_for(props.major, smem, dtype)


def candidate_configs_for(major: int, smem_bytes: int, dtype: torch.dtype, *,
                          triton_release: Optional[tuple[int, int]] = None) -> list[HistaConfig]:
    """Configs worth timing on a GPU of compute capability `major`.x, the tuned one first, before the
    compiled-resource filter of `fitting_candidates`: tile shapes whose operand pipeline fits shared
    memory with at least 2 stages, and schedule variants of the tuned config."""
    base = config_for(major, smem_bytes, dtype, triton_release=triton_release)
    elem = 4 if dtype == torch.float32 else 2
    shapes = [(128, 128, 64, 8), (128, 128, 32, 8), (128, 64, 64, 8), (128, 64, 32, 4), (64, 128, 64, 4),
              (64, 64, 64, 4), (128, 256, 64, 8)]
    out = [base]
    for bm, bn, bd, warps in shapes:
        if 2 * (bm + bn) * bd * elem > smem_bytes:  # e.g. 128x256x64 fp32: 196,608 B > A100's 166,912
            continue
        for most in (3, 4):
            stages = _stages_that_fit(smem_bytes, bm, bn, bd, elem, most)
            cfg = replace(base, block_m=bm, block_n=bn, block_d=bd, num_warps=warps, num_stages=stages)
            if cfg not in out:
                out.append(cfg)
    for variant in (replace(base, group_q=4), replace(base, group_q=16), replace(base, max_splits=8),
                    replace(base, max_splits=1), replace(base, skip_empty_tiles=False),
                    replace(base, flatten=True), replace(base, flatten=True, num_stages=3)):
        if variant not in out:
            out.append(variant)
    return out


def compile_config(cfg: HistaConfig, dtype: torch.dtype, arch: int, d: int = 4096):
    """`_hista_kernel` as `cfg` launches it for the sweep's case (cosine, key bias, hidden size `d`),
    compiled ahead of time for sm`arch` (no GPU needed)."""
    from .. import _triton_aot

    pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    constexprs = kernel_constexprs(cfg, dtype, d, cosine=True, has_k_add=True, direct=cfg.max_splits == 1)
    pointers = dict(hidden_ptr=pointer, rollout_ptr="*i32", schedule_ptr="*i64")
    return _triton_aot.compile_for(_hista_kernel, arch, pointers, dict(empty_value="fp32"), constexprs,
                                   cfg.num_warps, cfg.num_stages, multiples_of_16=("D",) if d % 16 == 0 else ())


def compiled_fit(cfg: HistaConfig, dtype: torch.dtype, arch: int, smem_bytes: int) -> tuple[bool, str]:
    """(whether `cfg` compiled for sm`arch` fits `smem_bytes` of shared memory without spilling, why not)."""
    from .. import _triton_aot

    try:
        kernel = compile_config(cfg, dtype, arch)
    except Exception as e:  # Triton raises its own resource errors for some shapes at compile time
        return False, f"does not compile: {type(e).__name__}: {e}"
    shared, spilled = _triton_aot.shared_bytes(kernel), _triton_aot.spilled_bytes(kernel)
    if shared > smem_bytes:
        return False, f"needs {shared} B of shared memory, more than the {smem_bytes} B a block may have"
    if spilled:
        return False, f"spills {spilled} B of registers"
    return True, ""


def fitting_candidates(major: int, minor: int, smem_bytes: int, dtype: torch.dtype) -> list[HistaConfig]:
    """`candidate_configs_for`, less the configs whose compiled kernel exceeds shared memory or spills
    (compiled ahead of time with the installed Triton: seconds per config). The tuned config stays first."""
    configs = candidate_configs_for(major, smem_bytes, dtype)
    return configs[:1] + [cfg for cfg in configs[1:] if compiled_fit(cfg, dtype, 10 * major + minor, smem_bytes)[0]]


def candidate_configs(device: torch.device, dtype: torch.dtype) -> list[HistaConfig]:
    """Configs worth timing on this GPU (for the benchmark's --sweep), the picked one first."""
    base = pick_config(device, dtype)
    if _INTERPRETED or device.type != "cuda":
        return [base]
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return fitting_candidates(props.major, props.minor, smem, dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    # (Only read for fp32 operands.) fp32 inputs must meet |err| <= 1e-4 * max|returns|; plain TF32 (10-bit mantissa) gives logit
    # errors of ~1e-2 at temperature 0.1, 3xTF32 is fp32-accurate and still runs on tensor cores.
    return "tf32x3" if dtype == torch.float32 else "ieee"


@triton.jit
def _row_terms_kernel(hidden_ptr, key_mask_ptr, key_bias_ptr, q_scale_ptr, k_scale_ptr, k_add_ptr,
                      N, D, q_factor, eps,
                      COSINE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    if COSINE:
        cols = tl.arange(0, BLOCK_D)
        squares = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, loop_bound(D), BLOCK_D):
            ok = row_ok[:, None] & ((d0 + cols) < D)[None, :]
            x = tl.load(hidden_ptr + rows[:, None] * D + (d0 + cols)[None, :], mask=ok, other=0.0).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        inv_norm = 1.0 / tl.maximum(tl.sqrt_rn(squares), eps)
        tl.store(q_scale_ptr + rows, inv_norm * q_factor, mask=row_ok)
        tl.store(k_scale_ptr + rows, inv_norm, mask=row_ok)
    else:
        tl.store(q_scale_ptr + rows, tl.full((BLOCK_R,), q_factor, tl.float32), mask=row_ok)
    if HAS_MASK or HAS_BIAS:
        add = tl.zeros((BLOCK_R,), tl.float32)
        if HAS_BIAS:
            add = tl.load(key_bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E
        if HAS_MASK:
            usable = tl.load(key_mask_ptr + rows, mask=row_ok, other=0) != 0
            add = tl.where(usable, add, _NEG_INF)
        tl.store(k_add_ptr + rows, add, mask=row_ok)


@triton.jit
def _finish(m, l, a, empty_value):
    """(values, lse) from a row's base-2 max, sum of weights and weighted sum of returns."""
    has_keys = l != 0  # NaN (a non-finite input the row depends on) stays NaN, never empty_value
    safe_l = tl.where(has_keys, l, 1.0)
    values = tl.where(has_keys, a / safe_l, empty_value)
    lse = tl.where(has_keys, (m + tl.log2(safe_l)) * _LN2, _NEG_INF)
    return values, lse


@triton.jit
def _merge(m, l, a, m_other, l_other, a_other):
    """Online-softmax merge of two (max, sum, weighted sum) states; -inf maxima mean empty states."""
    m_new = tl.maximum(m, m_other)
    shift = tl.where(m_new == _NEG_INF, 0.0, m_new)  # keeps exp2(-inf - -inf) from becoming NaN
    w = tl.exp2(m - shift)
    w_other = tl.exp2(m_other - shift)
    return m_new, l * w + l_other * w_other, a * w + a_other * w_other


@triton.jit
def _hista_kernel(hidden_ptr, returns_ptr, rollout_ptr, q_scale_ptr, k_scale_ptr, k_add_ptr,
                  schedule_ptr, num_sched_groups, search_steps,
                  values_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_a_ptr,
                  N, D, empty_value,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_Q: tl.constexpr,
                  HAS_K_SCALE: tl.constexpr, HAS_K_ADD: tl.constexpr, SINGLE_D_CHUNK: tl.constexpr,
                  EVEN_D: tl.constexpr, DIRECT_OUT: tl.constexpr, SKIP_EMPTY_TILES: tl.constexpr,
                  UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, FLATTEN: tl.constexpr,
                  TWO_LEVEL: tl.constexpr = False):
    # Persistent programs: the schedule is built on the device, so the host knows only a bound on the
    # number of work items; each program takes items pid, pid + P, ... up to the true count, which
    # the schedule's sentinel row holds (no host synchronisation, docs/DESIGN.md "GPU readiness").
    total_items = tl.load(schedule_ptr + num_sched_groups * _SCHED_COLS + 2)
    for item in range(loop_bound(tl.program_id(0).to(tl.int64)), loop_bound(total_items),
                      loop_bound(tl.num_programs(0).to(tl.int64))):
        # The scheduled group holding this item: the last g with item_base[g] <= item.
        lo = 0
        hi = num_sched_groups - 1
        for _ in range(loop_bound(search_steps)):
            mid = (lo + hi + 1) // 2
            right = tl.load(schedule_ptr + mid * _SCHED_COLS + 2) <= item
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid - 1)
        entry = schedule_ptr + lo * _SCHED_COLS
        g_start = tl.load(entry)
        g_end = g_start + tl.load(entry + 1)
        local = item - tl.load(entry + 2)
        n_splits = tl.load(entry + 3)
        split_len = tl.load(entry + 4)

        # Raster inside the group: blocks of GROUP_Q query tiles x all splits, split-major in a block.
        q_tiles = tl.cdiv(g_end - g_start, BLOCK_M)
        per_block = GROUP_Q * n_splits
        q_block = local // per_block
        in_block = local % per_block
        tiles_here = tl.minimum(q_tiles - q_block * GROUP_Q, GROUP_Q)
        split = in_block // tiles_here
        q_tile = q_block * GROUP_Q + in_block % tiles_here

        q_start = g_start + q_tile * BLOCK_M
        rows = q_start + tl.arange(0, BLOCK_M)
        row_ok = rows < g_end
        k_lo = g_start + split * split_len
        k_hi = tl.minimum(k_lo + split_len, g_end)

        q_rollout = tl.load(rollout_ptr + rows, mask=row_ok, other=0)
        q_scale = tl.load(q_scale_ptr + rows, mask=row_ok, other=0.0)
        if SKIP_EMPTY_TILES:
            # A query tile inside one rollout skips the key tiles of that same rollout (cheap 1-D test,
            # nothing [BLOCK_M, BLOCK_N] stays live across the GEMM).
            q_first = tl.load(rollout_ptr + q_start)
            q_one_rollout = tl.min(tl.where(row_ok, q_rollout, q_first)) == tl.max(tl.where(row_ok, q_rollout, q_first))
        # 64-bit tile base pointers (N*D may exceed 2^31) plus 32-bit in-tile offsets: 64-bit offset
        # tensors would cost two registers per element for the whole key loop.
        d_offs = tl.arange(0, BLOCK_D)
        q_ptrs = (hidden_ptr + q_start * D) + (tl.arange(0, BLOCK_M)[:, None] * D + d_offs[None, :])
        k_offs = tl.arange(0, BLOCK_N)[:, None] * D + d_offs[None, :]
        if SINGLE_D_CHUNK:  # the whole query row block fits one chunk: load it once
            q_resident = tl.load(q_ptrs, mask=row_ok[:, None] & (d_offs < D)[None, :], other=0.0)
            if UPCAST_DOT:
                q_resident = q_resident.to(tl.float32)

        m_i = tl.full((BLOCK_M,), _NEG_INF, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        a_i = tl.zeros((BLOCK_M,), tl.float32)
        key_idx = tl.arange(0, BLOCK_N)
        # FLATTEN fuses this loop with the D loop into one software-pipelined loop (loads of the next key
        # tile overlap this tile's softmax), which needs a perfect loop nest: no tile skipping then.
        for k0 in tl.range(loop_bound(k_lo), loop_bound(k_hi), BLOCK_N, flatten=FLATTEN):
            # Column vectors live in the accumulator's layout (a quarter of the columns per thread):
            # scalar tile bases + 32-bit offsets keep them from holding 64-bit pointers per element.
            col_ok = key_idx < (k_hi - k0)
            k_rollout_ptrs = (rollout_ptr + k0) + key_idx
            k_add_ptrs = (k_add_ptr + k0) + key_idx
            run_tile = True
            if SKIP_EMPTY_TILES:
                # Loaded again after the GEMM: [BLOCK_N] vectors kept live across the D loop would cost
                # a register per column in the accumulator's layout.
                k_rollout = tl.load(k_rollout_ptrs, mask=col_ok, other=0)
                key_ok = col_ok
                if HAS_K_ADD:
                    key_ok = key_ok & (tl.load(k_add_ptrs, mask=col_ok, other=_NEG_INF) != _NEG_INF)
                k_other = tl.where(key_ok, k_rollout, q_first)
                own_rollout_only = q_one_rollout & (tl.min(k_other) == q_first) & (tl.max(k_other) == q_first)
                run_tile = (tl.max(key_ok.to(tl.int32)) > 0) & (not own_rollout_only)
            if run_tile:
                k_ptrs = (hidden_ptr + k0 * D) + k_offs
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                if SINGLE_D_CHUNK:
                    k = tl.load(k_ptrs, mask=col_ok[:, None] & (d_offs < D)[None, :], other=0.0)
                    if UPCAST_DOT:
                        k = k.to(tl.float32)
                    acc = tl.dot(q_resident, tl.trans(k), acc, input_precision=DOT_PRECISION)
                else:
                    for d0 in range(0, loop_bound(D), BLOCK_D):
                        if EVEN_D:
                            q = tl.load(q_ptrs + d0, mask=row_ok[:, None], other=0.0)
                            k = tl.load(k_ptrs + d0, mask=col_ok[:, None], other=0.0)
                        else:
                            d_ok = (d0 + d_offs) < D
                            q = tl.load(q_ptrs + d0, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                            k = tl.load(k_ptrs + d0, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                        if UPCAST_DOT:
                            q = q.to(tl.float32)
                            k = k.to(tl.float32)
                        if TWO_LEVEL:
                            # Each chunk into a fresh accumulator, then added: error ~ (BLOCK_D + D/BLOCK_D)
                            # roundings instead of D (docs/DESIGN.md "GPU readiness": fp32 at D=4096).
                            acc += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                        else:
                            acc = tl.dot(q, tl.trans(k), acc, input_precision=DOT_PRECISION)

                scores = acc
                if HAS_K_SCALE:  # key scale first: acc / |h_j| stays near |h_i|, so 1/temperature cannot overflow it
                    scores = scores * tl.load((k_scale_ptr + k0) + key_idx, mask=col_ok, other=0.0)[None, :]
                scores = scores * q_scale[:, None]
                # Before the key term, -inf can only come from a non-finite hidden state: NaN, so that it
                # poisons the row instead of being a silent zero weight (docs/DESIGN.md, "GPU readiness").
                scores = tl.where(scores == _NEG_INF, _NAN, scores)
                k_rollout = tl.load(k_rollout_ptrs, mask=col_ok, other=0)
                usable = col_ok[None, :] & (q_rollout[:, None] != k_rollout[None, :])
                if HAS_K_ADD:  # -inf for masked keys: they leave K(i), NaN hidden states included
                    k_add = tl.load(k_add_ptrs, mask=col_ok, other=_NEG_INF)
                    scores = scores + k_add[None, :]
                    usable = usable & (k_add != _NEG_INF)[None, :]
                scores = tl.where(usable, scores, _NEG_INF)
                k_returns = tl.load((returns_ptr + k0) + key_idx, mask=col_ok, other=0.0)
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
                p = tl.exp2(scores - shift[:, None])
                rescale = tl.exp2(m_i - shift)
                l_i = l_i * rescale + tl.sum(p, axis=1)
                # Only keys add: 0 * a NaN return of a non-key (e.g. the row's own rollout) must not poison.
                a_i = a_i * rescale + tl.sum(tl.where(usable, p * k_returns[None, :], 0.0), axis=1)
                m_i = m_new

        if DIRECT_OUT:
            values, lse = _finish(m_i, l_i, a_i, empty_value)
            tl.store(values_ptr + rows, values, mask=row_ok)
            tl.store(lse_ptr + rows, lse, mask=row_ok)
        else:
            slot = split * N + rows
            tl.store(part_m_ptr + slot, m_i, mask=row_ok)
            tl.store(part_l_ptr + slot, l_i, mask=row_ok)
            tl.store(part_a_ptr + slot, a_i, mask=row_ok)


@triton.jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_a_ptr, values_ptr, lse_ptr, N, num_splits, empty_value,
                    BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    m = tl.full((BLOCK,), _NEG_INF, tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    m_ptrs, l_ptrs, a_ptrs = part_m_ptr + rows, part_l_ptr + rows, part_a_ptr + rows
    for _ in range(loop_bound(num_splits)):
        m_s = tl.load(m_ptrs, mask=ok, other=_NEG_INF)
        l_s = tl.load(l_ptrs, mask=ok, other=0.0)
        a_s = tl.load(a_ptrs, mask=ok, other=0.0)
        m, l, a = _merge(m, l, a, m_s, l_s, a_s)
        # pointer steps stay 64-bit where s * N could overflow int32
        m_ptrs += N
        l_ptrs += N
        a_ptrs += N
    values, lse = _finish(m, l, a, empty_value)
    tl.store(values_ptr + rows, values, mask=ok)
    tl.store(lse_ptr + rows, lse, mask=ok)


@triton.jit
def _group_terms(offsets_ptr, g, ok, N):
    """(start, length) of groups g, offsets clamped to [0, N] on the device (the raw op skips the host
    checks); groups of fewer than 2 tokens get length 0 (no keys for anyone: no items)."""
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + g, mask=ok, other=0).to(tl.int64), 0), N)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + g + 1, mask=ok, other=0).to(tl.int64), 0), N)
    length = tl.maximum(end - start, 0)
    return start, tl.where(ok & (length > 1), length, 0)


@triton.jit
def _schedule_rows_kernel(offsets_ptr, table_ptr, items_ptr, num_groups, N,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr,
                          MAX_SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # Each group's row goes to its rank in the longest-first order (a stable descending sort by
    # counting: rank = #longer groups + #equal groups before it), O(G^2 / BLOCK) per program; the
    # host uses this kernel only up to SCHEDULE_KERNEL_GROUPS groups.
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = g < num_groups
    start, length = _group_terms(offsets_ptr, g, ok, N)
    rank = tl.zeros((BLOCK,), tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for h0 in range(0, loop_bound(num_groups), BLOCK):
        h = h0 + lanes
        h_ok = h < num_groups
        h_start, h_len = _group_terms(offsets_ptr, h, h_ok, N)
        first = h_ok[None, :] & ((h_len[None, :] > length[:, None])
                                 | ((h_len[None, :] == length[:, None]) & (h[None, :] < g[:, None])))
        rank += tl.sum(first.to(tl.int64), axis=1)
    splits = tl.minimum(tl.maximum((length + MIN_SPLIT_KEYS - 1) // MIN_SPLIT_KEYS, 1), MAX_SPLITS)
    split_len = (length + splits - 1) // splits
    split_len = tl.maximum((split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N, BLOCK_N)  # whole key tiles
    splits = (length + split_len - 1) // split_len  # 0 for the groups without items
    items = (length + BLOCK_M - 1) // BLOCK_M * splits
    row = table_ptr + rank * _SCHED_COLS
    tl.store(row, start, mask=ok)
    tl.store(row + 1, length, mask=ok)
    tl.store(row + 3, splits, mask=ok)
    tl.store(row + 4, split_len, mask=ok)
    tl.store(items_ptr + rank, items, mask=ok)


@triton.jit
def _schedule_first_items_kernel(table_ptr, items_ptr, num_groups, BLOCK: tl.constexpr):
    # One program: first item id of each ranked row (an exclusive prefix sum, chunk by chunk with a
    # carry), then the sentinel row whose first-item column is the total.
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    carry = tl.zeros((), tl.int64)
    for r0 in range(0, loop_bound(num_groups), BLOCK):
        r = r0 + lanes
        ok = r < num_groups
        items = tl.load(items_ptr + r, mask=ok, other=0)
        tl.store(table_ptr + r * _SCHED_COLS + 2, carry + tl.cumsum(items, 0) - items, mask=ok)
        carry += tl.sum(items, 0)
    sentinel = table_ptr + num_groups * _SCHED_COLS + lanes
    tl.store(sentinel, tl.where(lanes == 2, carry, 0), mask=lanes < _SCHED_COLS)


# Up to this many groups the schedule is two Triton kernels (a counting sort, O(G^2) comparisons:
# 1.7e7 at 4096 groups); beyond, the device-side torch pipeline of `build_schedule` (O(G log G),
# ~35 small kernels). Both clamp the offsets and never read them on the host.
SCHEDULE_KERNEL_GROUPS = 4096
_SCHEDULE_BLOCK = 64


def build_schedule(group_offsets: Tensor, cfg: HistaConfig, n: int, *, kernels: Optional[bool] = None
                   ) -> tuple[Tensor, int, int]:
    """Per-group work table on group_offsets' device, built without reading it on the host (CUDA-graph
    capture must work): int64 [G+1, 5] rows of (start, length, first item id, key splits, keys per
    split), longest group first, then a sentinel row whose first-item column is the total number of
    items. Also two host-side bounds from N and G alone: on the items (for the grid) and on the
    splits of any group (for the partial buffers).

    Groups of fewer than 2 tokens have no keys for anyone and get no items (their rows keep the
    empty value); they sort last. Offsets are clamped to [0, N] on the device, so offsets that break
    the contract (the raw op skips the host checks) give wrong-but-bounded results, never wild
    accesses. Cost: two Triton launches up to SCHEDULE_KERNEL_GROUPS groups (`kernels=None`), else
    the torch pipeline below (`kernels=False` forces it; O(G log G), ~35 small kernels).
    """
    num_groups = group_offsets.numel() - 1
    if kernels is None:
        kernels = num_groups <= SCHEDULE_KERNEL_GROUPS
    if kernels:
        most = max(1, cfg.max_splits)
        split_bound = min(most, max(1, -(-n // cfg.min_split_keys)))
        item_bound = -(-split_bound * n // cfg.block_m) + -(-n // cfg.min_split_keys) + max(num_groups, 0)
        device = group_offsets.device
        offsets = group_offsets.detach().contiguous()
        table = torch.empty((max(num_groups, 0) + 1, 5), dtype=torch.int64, device=device)
        items = torch.empty(max(num_groups, 1), dtype=torch.int64, device=device)
        if num_groups > 0:
            _schedule_rows_kernel[(triton.cdiv(num_groups, _SCHEDULE_BLOCK),)](
                offsets, table, items, num_groups, n, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                MIN_SPLIT_KEYS=cfg.min_split_keys, MAX_SPLITS=most, BLOCK=_SCHEDULE_BLOCK, num_warps=4)
        _schedule_first_items_kernel[(1,)](table, items, max(num_groups, 0), BLOCK=1024, num_warps=4)
        return table, item_bound, split_bound
    # The raw op skips the host checks (torch.compile, graph capture, torch.ops.sveb.hista_values):
    # offsets outside [0, N] or out of order are made a valid table on the device, so every index the
    # kernels derive stays inside the buffers (docs/DESIGN.md "Memory safety without checks").
    offsets = torch.cummax(group_offsets.detach().to(torch.int64).clamp(0, n), dim=0).values
    num_groups = offsets.numel() - 1
    starts, lengths = offsets[:-1], offsets.diff()
    lengths = torch.where(lengths > 1, lengths, 0)
    order = torch.argsort(lengths, descending=True, stable=True)
    starts, lengths = starts[order], lengths[order]
    most = max(1, cfg.max_splits)
    splits = (-(-lengths // cfg.min_split_keys)).clamp(1, most)
    split_len = -(-lengths // splits)
    split_len = (-(-split_len // cfg.block_n) * cfg.block_n).clamp_min(cfg.block_n)  # whole key tiles per split
    splits = -(-lengths // split_len)  # 0 for the groups without items
    items = (-(-lengths // cfg.block_m)) * splits
    first_item = torch.cumsum(items, 0) - items
    table = torch.stack([starts, lengths, first_item, splits, split_len], dim=1)
    sentinel = torch.zeros(1, 5, dtype=torch.int64, device=offsets.device)
    sentinel[0, 2] = items.sum()  # a device-side copy, not a host read
    table = torch.cat([table, sentinel]).contiguous()
    # A group of L tokens has ceil(L/BM) * s items with s <= min(S, ceil(L/K)) splits (S = max_splits,
    # K = min_split_keys); summed over groups (L <= N) that is at most s_max*N/BM + N/K + G items.
    split_bound = min(most, max(1, -(-n // cfg.min_split_keys)))
    item_bound = -(-split_bound * n // cfg.block_m) + -(-n // cfg.min_split_keys) + num_groups
    return table, item_bound, split_bound


# Persistent programs per SM when the grid is cut to the GPU's size (several resident CTAs per SM
# hide each other's pipeline fills; more only adds programs that loop once).
PROGRAMS_PER_SM = 4
# Under the interpreter a few programs loop over all items, so the tests exercise the loop.
_INTERPRETER_PROGRAMS = 3


def num_programs(item_bound: int, device: torch.device) -> int:
    """Grid size: the item bound, cut to a few programs per SM (host-side device properties, cached)."""
    if _INTERPRETED or device.type != "cuda":
        return max(1, min(item_bound, _INTERPRETER_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(item_bound, PROGRAMS_PER_SM * sms))


def kernel_constexprs(cfg: HistaConfig, dtype: torch.dtype, d: int, *, cosine: bool, has_k_add: bool,
                      direct: bool) -> dict:
    """The compile-time arguments of `_hista_kernel` for one call (shared with the compile test)."""
    block_d = min(cfg.block_d, max(16, triton.next_power_of_2(d)))  # tl.dot needs K >= 16
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, GROUP_Q=cfg.group_q,
                HAS_K_SCALE=cosine, HAS_K_ADD=has_k_add, SINGLE_D_CHUNK=d <= block_d, EVEN_D=d % block_d == 0,
                DIRECT_OUT=direct, SKIP_EMPTY_TILES=cfg.skip_empty_tiles and not cfg.flatten, FLATTEN=cfg.flatten,
                UPCAST_DOT=_INTERPRETED and dtype != torch.float32, DOT_PRECISION=_dot_precision(dtype),
                TWO_LEVEL=dtype == torch.float32)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def hista_values(hidden: Tensor, returns: Tensor, rollout_ids: Tensor, group_offsets: Tensor, temperature: float,
                 similarity: str, key_mask: Optional[Tensor], key_bias: Optional[Tensor], empty_value: float,
                 *, config: Optional[HistaConfig] = None) -> tuple[Tensor, Tensor]:
    n, d = hidden.shape
    device = hidden.device
    values = torch.full((n,), float(empty_value), dtype=torch.float32, device=device)
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    if n == 0:
        return values, lse
    if hidden.dtype == torch.float64:
        hidden = hidden.to(torch.float32)
    hidden = hidden.contiguous()
    returns = returns.to(torch.float32).contiguous()
    rollout_ids = rollout_ids.contiguous()
    cfg = config or pick_config(device, hidden.dtype)

    with _on_device(device):
        return _launch(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias,
                       empty_value, cfg, values, lse)


def _launch(hidden, returns, rollout_ids, group_offsets, temperature, similarity, key_mask, key_bias, empty_value,
            cfg, values, lse):
    """Per-token terms, the host-side schedule, the fused kernel and (if keys were split) the merge."""
    n, d = hidden.shape
    device = hidden.device
    cosine = similarity == "cosine"
    has_k_add = key_mask is not None or key_bias is not None
    q_scale = torch.empty(n, dtype=torch.float32, device=device)
    k_scale = torch.empty(n, dtype=torch.float32, device=device) if cosine else q_scale
    k_add = torch.empty(n, dtype=torch.float32, device=device) if has_k_add else q_scale
    mask_arg = key_mask.contiguous().view(torch.uint8) if key_mask is not None else q_scale
    bias_arg = key_bias.contiguous() if key_bias is not None else q_scale
    block_r = cfg.row_block
    _row_terms_kernel[(triton.cdiv(n, block_r),)](
        hidden, mask_arg, bias_arg, q_scale, k_scale, k_add, n, d, LOG2E / temperature, EPS,
        COSINE=cosine, HAS_MASK=key_mask is not None, HAS_BIAS=key_bias is not None,
        BLOCK_R=block_r, BLOCK_D=min(256, triton.next_power_of_2(d)), num_warps=4)

    table, item_bound, max_splits = build_schedule(group_offsets, cfg, n)
    if item_bound == 0:
        return values, lse
    num_groups = table.shape[0] - 1
    direct = max_splits == 1
    if direct:
        part_m = part_l = part_a = values
    else:
        part_m = torch.full((max_splits, n), float("-inf"), dtype=torch.float32, device=device)
        part_l = torch.zeros((max_splits, n), dtype=torch.float32, device=device)
        part_a = torch.zeros((max_splits, n), dtype=torch.float32, device=device)
    _hista_kernel[(num_programs(item_bound, device),)](
        hidden, returns, rollout_ids, q_scale, k_scale, k_add,
        table, num_groups, max(1, num_groups.bit_length()),
        values, lse, part_m, part_l, part_a,
        n, d, float(empty_value),
        **kernel_constexprs(cfg, hidden.dtype, d, cosine=cosine, has_k_add=has_k_add, direct=direct),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        block = cfg.combine_block
        _combine_kernel[(triton.cdiv(n, block),)](part_m, part_l, part_a, values, lse, n, max_splits,
                                                  float(empty_value), BLOCK=block, num_warps=4)
    return values, lse


# ---- backward ----------------------------------------------------------------------------------------
# docs/DESIGN.md "Hista backward". With c_i the key scale (1/max(|h_i|, eps) for cosine, 1 for dot),
# s_ij = c_i c_j <h_i, h_j> / T + b_j, p_ij = exp(s_ij - lse_i) and, for a loss L with gV = dL/dvalues,
# gL = dL/dlse:   w_ij = dL/ds_ij = p_ij (gV_i (r_j - V_i) + gL_i) on K(i), 0 elsewhere;
#                 dL/dr_j = sum_i gV_i p_ij;
#                 X_i = sum_j w_ij c_j h_j  +  sum_k w_ki c_k h_k   (i as a query, i as a key);
#                 dL/dh_i = (c_i/T) (X_i - [|h_i| > eps] c_i^2 h_i <h_i, X_i>)   (cosine; dot: X_i / T).
# Two launches of one kernel, flash-attention-backward style: each program owns a tile of rows of one
# group (so it writes its rows of X and dL/dr without atomics: deterministic) and walks the group's
# other tiles; per pair it recomputes the score tile (GEMM, K-loop over D) and p from the saved lse,
# forms w in registers and adds w @ H_other to its rows of the fp32 X, one D chunk at a time (the
# second GEMM). Pass 0 owns query rows (the first sum), pass 1 owns key rows (the second sum and
# dL/dr). Memory: X (N*D fp32) and O(N) row terms; never [N, N].


@dataclass(frozen=True)
class HistaBackwardConfig:
    """Tile shape of the backward kernel: the second GEMM's [BLOCK_M, BLOCK_D] output and the score
    tile are live together, hence smaller tiles than the forward's."""

    block_m: int = 64
    block_n: int = 64
    block_d: int = 32
    num_warps: int = 8
    num_stages: int = 2


# Chosen as the largest tiles whose compiled kernel does not spill on sm80 and sm90 (checked ahead of
# time by tests/test_triton_backward_compile.py): 64x64 score tiles, BLOCK_D 32, 8 warps, 2 stages for
# bf16/fp16 (BLOCK_D 64 spills 8 B for fp16 on sm90 with 2 stages); fp32's 3xTF32 dots need three
# times the operand registers, so 64x32x32. Not yet timed on a GPU.
BACKWARD_CONFIG = HistaBackwardConfig()
BACKWARD_CONFIG_FP32 = HistaBackwardConfig(block_m=64, block_n=32, block_d=32, num_warps=8, num_stages=2)


def backward_config_for(dtype: torch.dtype) -> HistaBackwardConfig:
    return BACKWARD_CONFIG_FP32 if dtype in (torch.float32, torch.float64) else BACKWARD_CONFIG


@triton.jit
def _hista_backward_kernel(hidden_ptr, returns_ptr, rollout_ptr, q_scale_ptr, k_scale_ptr, k_add_ptr,
                           values_ptr, lse_ptr, grad_values_ptr, grad_lse_ptr,
                           schedule_ptr, num_sched_groups, search_steps,
                           x_ptr, grad_returns_ptr, N, D,
                           KEY_SIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, HAS_K_SCALE: tl.constexpr, HAS_K_ADD: tl.constexpr,
                           UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    total_items = tl.load(schedule_ptr + num_sched_groups * _SCHED_COLS + 2)
    for item in range(loop_bound(tl.program_id(0).to(tl.int64)), loop_bound(total_items),
                      loop_bound(tl.num_programs(0).to(tl.int64))):
        lo = 0
        hi = num_sched_groups - 1
        for _ in range(loop_bound(search_steps)):
            mid = (lo + hi + 1) // 2
            right = tl.load(schedule_ptr + mid * _SCHED_COLS + 2) <= item
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid - 1)
        entry = schedule_ptr + lo * _SCHED_COLS
        g_start = tl.load(entry)
        g_end = g_start + tl.load(entry + 1)
        a_start = g_start + (item - tl.load(entry + 2)) * BLOCK_M
        rows_a = a_start + tl.arange(0, BLOCK_M)
        a_ok = rows_a < g_end
        d_offs = tl.arange(0, BLOCK_D)
        rollout_a = tl.load(rollout_ptr + rows_a, mask=a_ok, other=0)
        q_scale_a = tl.load(q_scale_ptr + rows_a, mask=a_ok, other=0.0)
        if HAS_K_SCALE:
            k_scale_a = tl.load(k_scale_ptr + rows_a, mask=a_ok, other=0.0)
        if HAS_K_ADD:
            k_add_a = tl.load(k_add_ptr + rows_a, mask=a_ok, other=_NEG_INF)
        lse_a = tl.load(lse_ptr + rows_a, mask=a_ok, other=0.0)
        lse_a = tl.where(lse_a == _NEG_INF, 0.0, lse_a * _LOG2E)  # rows without keys use no entry
        values_a = tl.load(values_ptr + rows_a, mask=a_ok, other=0.0)
        grad_values_a = tl.load(grad_values_ptr + rows_a, mask=a_ok, other=0.0)
        grad_lse_a = tl.load(grad_lse_ptr + rows_a, mask=a_ok, other=0.0)
        returns_a = tl.load(returns_ptr + rows_a, mask=a_ok, other=0.0)
        grad_returns_a = tl.zeros((BLOCK_M,), tl.float32)
        a_ptrs = (hidden_ptr + a_start * D) + (tl.arange(0, BLOCK_M)[:, None] * D + d_offs[None, :])
        x_ptrs = (x_ptr + a_start * D) + (tl.arange(0, BLOCK_M)[:, None] * D + d_offs[None, :])

        for b0 in range(loop_bound(g_start), loop_bound(g_end), BLOCK_N):
            rows_b = b0 + tl.arange(0, BLOCK_N)
            b_ok = rows_b < g_end
            rollout_b = tl.load(rollout_ptr + rows_b, mask=b_ok, other=0)
            usable = a_ok[:, None] & b_ok[None, :] & (rollout_a[:, None] != rollout_b[None, :])
            if HAS_K_ADD:
                if KEY_SIDE:
                    usable = usable & (k_add_a != _NEG_INF)[:, None]
                else:
                    k_add_b = tl.load(k_add_ptr + rows_b, mask=b_ok, other=_NEG_INF)
                    usable = usable & (k_add_b != _NEG_INF)[None, :]
            # Tiles with no pair in K (the own rollout's tiles, masked keys) cost nothing.
            if tl.max(usable.to(tl.int32)) > 0:
                b_ptrs = (hidden_ptr + b0 * D) + (tl.arange(0, BLOCK_N)[:, None] * D + d_offs[None, :])
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for d0 in range(0, loop_bound(D), BLOCK_D):
                    d_ok = (d0 + d_offs) < D
                    a = tl.load(a_ptrs + d0, mask=a_ok[:, None] & d_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs + d0, mask=b_ok[:, None] & d_ok[None, :], other=0.0)
                    if UPCAST_DOT:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
                # The forward's logits, in base 2 (the row terms of `_row_terms_kernel`).
                if KEY_SIDE:  # a = keys, b = queries
                    q_scale_b = tl.load(q_scale_ptr + rows_b, mask=b_ok, other=0.0)
                    # The forward's order: key scale first, so 1/temperature cannot overflow the product.
                    scores = acc
                    if HAS_K_SCALE:
                        scores = scores * k_scale_a[:, None]
                    scores = scores * q_scale_b[None, :]
                    scores = tl.where(scores == _NEG_INF, _NAN, scores)
                    if HAS_K_ADD:
                        scores = scores + k_add_a[:, None]
                    lse_b = tl.load(lse_ptr + rows_b, mask=b_ok, other=0.0)
                    lse_b = tl.where(lse_b == _NEG_INF, 0.0, lse_b * _LOG2E)
                    p = tl.where(usable, tl.exp2(scores - lse_b[None, :]), 0.0)
                    grad_values_b = tl.load(grad_values_ptr + rows_b, mask=b_ok, other=0.0)
                    values_b = tl.load(values_ptr + rows_b, mask=b_ok, other=0.0)
                    grad_lse_b = tl.load(grad_lse_ptr + rows_b, mask=b_ok, other=0.0)
                    coef = grad_values_b[None, :] * (returns_a[:, None] - values_b[None, :]) + grad_lse_b[None, :]
                    grad_returns_a += tl.sum(tl.where(usable, p * grad_values_b[None, :], 0.0), axis=1)
                else:  # a = queries, b = keys
                    scores = acc
                    if HAS_K_SCALE:
                        scores = scores * tl.load(k_scale_ptr + rows_b, mask=b_ok, other=0.0)[None, :]
                    scores = scores * q_scale_a[:, None]
                    scores = tl.where(scores == _NEG_INF, _NAN, scores)
                    if HAS_K_ADD:
                        scores = scores + k_add_b[None, :]
                    p = tl.where(usable, tl.exp2(scores - lse_a[:, None]), 0.0)
                    returns_b = tl.load(returns_ptr + rows_b, mask=b_ok, other=0.0)
                    coef = grad_values_a[:, None] * (returns_b[None, :] - values_a[:, None]) + grad_lse_a[:, None]
                # Only pairs in K: a NaN return or weight outside it must not leak in through 0 * NaN.
                w = tl.where(usable, p * coef, 0.0)
                if HAS_K_SCALE:  # the other side's c_b of X's sums
                    w = w * tl.load(k_scale_ptr + rows_b, mask=b_ok, other=0.0)[None, :]
                if UPCAST_DOT:
                    w_dot = w
                else:
                    w_dot = w.to(hidden_ptr.dtype.element_ty)
                # Second GEMM, X[a] += w @ H[b], one D chunk at a time into the program's own rows.
                for d0 in range(0, loop_bound(D), BLOCK_D):
                    d_ok = (d0 + d_offs) < D
                    b = tl.load(b_ptrs + d0, mask=b_ok[:, None] & d_ok[None, :], other=0.0)
                    if UPCAST_DOT:
                        b = b.to(tl.float32)
                    # A non-finite hidden state of a row outside K enters with weight 0: not as NaN.
                    b = tl.where((b == b) & (tl.abs(b) != _POS_INF), b, 0.0).to(b.dtype)
                    x_mask = a_ok[:, None] & d_ok[None, :]
                    x = tl.load(x_ptrs + d0, mask=x_mask, other=0.0)
                    x = tl.dot(w_dot, b, x, input_precision=DOT_PRECISION)
                    tl.store(x_ptrs + d0, x, mask=x_mask)
        if KEY_SIDE:
            tl.store(grad_returns_ptr + rows_a, grad_returns_a, mask=a_ok)


def hista_values_backward(grad_values: Tensor, grad_lse: Tensor, hidden: Tensor, returns: Tensor,
                          rollout_ids: Tensor, group_offsets: Tensor, values: Tensor, lse: Tensor,
                          temperature: float, similarity: str, key_mask: Optional[Tensor],
                          key_bias: Optional[Tensor], *,
                          config: Optional[HistaBackwardConfig] = None) -> tuple[Tensor, Tensor]:
    n, d = hidden.shape
    device = hidden.device
    grad_returns = torch.zeros(n, dtype=torch.float32, device=device)
    if n == 0:
        return torch.zeros_like(hidden), grad_returns.to(returns.dtype)
    work = hidden.to(torch.float32) if hidden.dtype == torch.float64 else hidden
    work = work.contiguous()
    cfg = config or backward_config_for(hidden.dtype)
    x = torch.zeros(n, d, dtype=torch.float32, device=device)
    cosine = similarity == "cosine"
    has_k_add = key_mask is not None or key_bias is not None
    with _on_device(device):
        q_scale = torch.empty(n, dtype=torch.float32, device=device)
        k_scale = torch.empty(n, dtype=torch.float32, device=device) if cosine else q_scale
        k_add = torch.empty(n, dtype=torch.float32, device=device) if has_k_add else q_scale
        mask_arg = key_mask.contiguous().view(torch.uint8) if key_mask is not None else q_scale
        bias_arg = key_bias.contiguous() if key_bias is not None else q_scale
        row_block = INTERPRETER_CONFIG.row_block
        _row_terms_kernel[(triton.cdiv(n, row_block),)](
            work, mask_arg, bias_arg, q_scale, k_scale, k_add, n, d, LOG2E / temperature, EPS,
            COSINE=cosine, HAS_MASK=key_mask is not None, HAS_BIAS=key_bias is not None,
            BLOCK_R=row_block, BLOCK_D=min(256, triton.next_power_of_2(d)), num_warps=4)
        # One item per row tile of a group (no key splits): each program owns its rows of X.
        schedule_cfg = HistaConfig(block_m=cfg.block_m, block_n=cfg.block_n, max_splits=1)
        table, item_bound, _ = build_schedule(group_offsets, schedule_cfg, n)
        if item_bound > 0:
            num_groups = table.shape[0] - 1
            args = (work, returns.to(torch.float32).contiguous(), rollout_ids.contiguous(), q_scale, k_scale, k_add,
                    values.to(torch.float32).contiguous(), lse.to(torch.float32).contiguous(),
                    grad_values.to(torch.float32).contiguous(), grad_lse.to(torch.float32).contiguous(),
                    table, num_groups, max(1, num_groups.bit_length()), x, grad_returns, n, d)
            block_d = min(cfg.block_d, max(16, triton.next_power_of_2(d)))
            for key_side in (False, True):
                _hista_backward_kernel[(num_programs(item_bound, device),)](
                    *args, KEY_SIDE=key_side, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                    HAS_K_SCALE=cosine, HAS_K_ADD=has_k_add,
                    UPCAST_DOT=_INTERPRETED and work.dtype != torch.float32,
                    DOT_PRECISION=_dot_precision(work.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # Chain through 1/T and the cosine normalisation (O(N*D) elementwise; see the comment above).
    x = x / temperature
    if cosine:
        h = work.to(torch.float32)
        norm = torch.linalg.vector_norm(h, dim=1)
        inv_norm = 1.0 / norm.clamp_min(EPS)
        radial = torch.where(norm > EPS, (h * x).sum(dim=1) * inv_norm * inv_norm, 0.0)
        x = (x - h * radial[:, None]) * inv_norm[:, None]
    return x.to(hidden.dtype), grad_returns.to(returns.dtype)
