"""GAE as one Triton kernel: the docs/CONTRACT.md §3 recurrence as a blocked reverse linear-recurrence scan.

Imported only by the backend loader (TRITON_INTERPRET must be set before the kernel is defined).

One program per row walks the row backwards in chunks of BLOCK_T positions. A chunk is loaded in
reversed time order, so the backward recurrence becomes a forward scan along the block:
  1. nextv (the value at the first valid position after t) is x_t = a_t x_{t+1} + b_t with
     a = 1 - m_{t+1}, b = m_{t+1} v_{t+1}; it reads the row shifted by one position.
  2. the advantage is x_t = a_t x_{t+1} + b_t with a = gamma*lam if m_t else 1,
     b = m_t (r_t + gamma nextv_t - v_t).
Each is a `tl.associative_scan` of affine maps (a, b); the state entering the chunk (the carry from
the later chunk) is applied afterwards as x = A*carry + B, and the chunk's earliest x is the next
carry. Two levels keep the rounding small: a log-depth tree inside a chunk and one fp32 multiply-add
per chunk across chunks, so a gamma*lam = 1 row of 32k tokens (a pure suffix sum) is never summed
by one long serial fp32 chain nor by one 32k-wide tree that mixes far-apart magnitudes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_compat import loop_bound

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU_MAX_BLOCK_T = 2048  # positions per chunk on a GPU (8 warps)


@triton.jit
def _then(a_first, b_first, a_next, b_next):
    """Apply map (a_first, b_first), then (a_next, b_next): x -> a_next (a_first x + b_first) + b_next."""
    return a_first * a_next, a_next * b_first + b_next


@triton.jit
def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, T, gamma_hi, gamma_lo, gamma_lam,
                BLOCK_T: tl.constexpr, NEXT_DTYPE: tl.constexpr = tl.float32):
    row_start = tl.program_id(0).to(tl.int64) * T
    r_row, v_row, m_row = rewards_ptr + row_start, values_ptr + row_start, mask_ptr + row_start
    back = tl.arange(0, BLOCK_T)
    is_last = back == BLOCK_T - 1
    # nextv entering the chunk from later positions. float64 values keep it float64 (NEXT_DTYPE), so
    # delta = r + gamma*v[t+1] - v[t] takes both values as given and telescopes along the row.
    next_value = tl.zeros((), NEXT_DTYPE)
    carry = tl.zeros((), tl.float32)  # advantage entering the chunk from later positions
    for c in range(0, loop_bound(tl.cdiv(T, BLOCK_T))):
        t = (T - 1 - c * BLOCK_T) - back  # positions of this chunk, latest first
        inside = t >= 0
        r = tl.load(r_row + t, mask=inside, other=0.0).to(tl.float64)
        v = tl.load(v_row + t, mask=inside, other=0.0).to(tl.float64)
        m = tl.load(m_row + t, mask=inside, other=0) != 0
        after = inside & (t + 1 < T)
        v_after = tl.load(v_row + t + 1, mask=after, other=0.0).to(NEXT_DTYPE)
        m_after = tl.load(m_row + t + 1, mask=after, other=0) != 0

        a_nv, b_nv = tl.associative_scan((tl.where(m_after, 0.0, 1.0).to(NEXT_DTYPE),
                                          tl.where(m_after, v_after, 0.0).to(NEXT_DTYPE)), 0, _then)
        nextv = a_nv * next_value + b_nv
        # float64 delta: with |v| >> |adv| a float32 one rounds at ulp(|v|) every step and the
        # errors add up along the row; gamma arrives as two float32 halves for the same reason.
        one = tl.full((), 1.0, tl.float64)  # promotes the float32 scalars (and Python floats under the interpreter)
        gamma = gamma_hi * one + gamma_lo * one
        delta = ((r - v) + gamma * nextv.to(tl.float64)).to(tl.float32)
        a_adv, b_adv = tl.associative_scan((tl.where(m, gamma_lam, 1.0), tl.where(m, delta, 0.0)), 0, _then)
        adv = a_adv * carry + b_adv
        tl.store(adv_ptr + row_start + t, adv, mask=inside)
        tl.store(ret_ptr + row_start + t, (adv.to(tl.float64) + v).to(tl.float32), mask=inside)
        # The chunk's earliest position feeds the next (earlier) chunk.
        next_value = tl.sum(tl.where(is_last, nextv, 0.0), axis=0)
        carry = tl.sum(tl.where(is_last, adv, 0.0), axis=0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, *,
        block_t: Optional[int] = None) -> tuple[Tensor, Tensor]:
    batch, length = rewards.shape
    device = rewards.device
    advantages = torch.empty(batch, length, dtype=torch.float32, device=device)
    returns = torch.empty(batch, length, dtype=torch.float32, device=device)
    if batch == 0 or length == 0:
        return advantages, returns
    rewards, values = rewards.contiguous(), values.contiguous()
    mask = mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if block_t is None:
        # The interpreter scans element by element, padding included: short chunks waste less there.
        block_t = min(triton.next_power_of_2(length), 512 if _INTERPRETED else GPU_MAX_BLOCK_T)
    num_warps = 4 if block_t <= 1024 else 8
    gamma_hi = float(torch.tensor(gamma, dtype=torch.float32))  # gamma = gamma_hi + (gamma - gamma_hi)
    # Triton launches on the current CUDA device: make it the tensors' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _gae_kernel[(batch,)](rewards, values, mask, advantages, returns, length, gamma_hi, gamma - gamma_hi, float(gamma * lam),
                              BLOCK_T=block_t, 
                              NEXT_DTYPE=tl.float64 if values.dtype == torch.float64 else tl.float32, num_warps=num_warps)
    return advantages, returns
