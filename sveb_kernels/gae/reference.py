"""GAE in plain PyTorch as a parallel scan: no Python loop over tokens.

The trainer loop of docs/CONTRACT.md §3 carries two states backwards in time. With m = mask[t] (0/1):
  nextv_t = m*v_t + (1-m)*nextv_{t+1}                  -> the value at the next valid position
  last_t  = (m*g*l + 1 - m)*last_{t+1} + m*(r_t + g*nextv_{t+1} - v_t)
Both are the linear recurrence x_t = a_t*x_{t+1} + b_t, solved by `reverse_linear_scan` in log depth
(with 0/1 masks the first one is exact: it only copies values).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Positions per block of the blocked scan: a Hillis-Steele scan inside each block (log2(BLOCK)
# passes over the whole tensor), then the same scan, recursively, over the block totals.
BLOCK = 16
_NEGLIGIBLE = 1e-30


def _hillis_steele(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive reverse scan of the maps x -> a*x + b along dim 1 of [blocks, L, R].

    Returns (A, X): A[i] = a_i*...*a_{L-1}, X[i] = x_i when x_L = 0. The time axis is never the
    innermost one, so every step moves contiguous runs of R*(L-step) numbers. The inputs are only
    read; two fresh buffers alternate so that no step copies a whole tensor.
    """
    length = a.shape[1]
    a_buffers = (torch.empty_like(a), torch.empty_like(a))
    b_buffers = (torch.empty_like(b), torch.empty_like(b))
    step, which = 1, 0
    while step < length:
        a_out, b_out = a_buffers[which], b_buffers[which]
        # (a_i, b_i) o (a_{i+s}, b_{i+s}) = (a_i a_{i+s}, b_i + a_i b_{i+s}); the last `step` are final.
        torch.addcmul(b[:, :-step], a[:, :-step], b[:, step:], out=b_out[:, :-step])
        torch.mul(a[:, :-step], a[:, step:], out=a_out[:, :-step])
        # a is in [0, 1]; long products decay into subnormals, which are ~10x slower on CPUs. Below
        # 1e-30 their contribution is far under float32 rounding, so make them exact zeros.
        torch.nn.functional.threshold(a_out[:, :-step], _NEGLIGIBLE, 0.0, inplace=True)
        a_out[:, -step:] = a[:, -step:]
        b_out[:, -step:] = b[:, -step:]
        a, b, which = a_out, b_out, 1 - which
        step *= 2
    return a, b


def reverse_linear_scan_time_major(a: Tensor, b: Tensor) -> Tensor:
    """x_t = a_t * x_{t+1} + b_t along dim 0 of contiguous [T, R] tensors, with x_T = 0."""
    length, rows = a.shape
    if length <= BLOCK:
        return _hillis_steele(a[None], b[None])[1][0]
    blocks = -(-length // BLOCK)
    pad = blocks * BLOCK - length
    if pad:  # identity maps after the end leave x unchanged (x stays 0 there)
        a = torch.cat([a, a.new_ones(pad, rows)])
        b = torch.cat([b, b.new_zeros(pad, rows)])
    prod, local = _hillis_steele(a.view(blocks, BLOCK, rows), b.view(blocks, BLOCK, rows))
    # x at the start of each block, from the block-level recurrence y_c = prod_c * y_{c+1} + local_c.
    starts = reverse_linear_scan_time_major(prod[:, 0].contiguous(), local[:, 0].contiguous())
    carry_in = torch.cat([starts[1:], starts.new_zeros(1, rows)])  # x at the start of block c+1
    x = torch.addcmul(local, prod, carry_in[:, None, :])
    return x.view(blocks * BLOCK, rows)[:length]


def reverse_linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """x_t = a_t * x_{t+1} + b_t along the last dim of [R, T], with x_T = 0 (a, b of one float dtype)."""
    return reverse_linear_scan_time_major(a.T.contiguous(), b.T.contiguous()).T


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    batch, length = rewards.shape
    device = rewards.device
    if length == 0:
        return (torch.empty(batch, 0, dtype=torch.float32, device=device),
                torch.empty(batch, 0, dtype=torch.float32, device=device))
    # Time-major [T, B] throughout, so the scan's steps move contiguous runs (one transposing copy
    # in, one out). The scans run in float32: their partial sums telescope like the loop's, so the
    # error stays ~100x under the docs/CONTRACT.md §3 bound even at T=32k with gamma=lam=1 (measured; float64 scans
    # doubled the time). The per-step delta is formed in float64: with |values| >> |advantages| a
    # float32 delta would round at ulp(|v|) on every step and those errors add up along the row.
    v = values.T.to(torch.float32).contiguous()
    valid = (mask.T != 0).contiguous()
    m = valid.to(torch.float32)
    # `where`, not `m * x`: masked positions are skipped, so a NaN/inf there (padding) must not
    # poison the row through 0 * NaN (docs/DESIGN.md, "GPU readiness"); the kernels do the same.
    # The value at the first valid position at or after t: x_t = (1-m_t)*x_{t+1} + m_t*v_t (exact:
    # every step copies a value or keeps one).
    # float64 values: this copy scan runs in float64 too, so delta = r + gamma*v[t+1] - v[t] uses both
    # values as given; v[t] in float64 with v[t+1] rounded to float32 no longer telescopes along the
    # row (issue 20: magnitude-1e3 values at T=4096 missed the bound 16x).
    values64 = values.T.to(torch.float64)
    copied = values64 if values.dtype == torch.float64 else v
    next_value_from = reverse_linear_scan_time_major((1 - m).to(copied.dtype), torch.where(valid, copied, 0.0))
    next_value = torch.cat([next_value_from[1:], next_value_from.new_zeros(1, batch)])  # strictly after t
    delta = rewards.T.to(torch.float64) + gamma * next_value.to(torch.float64) - values64
    b = torch.where(valid, delta, 0.0).to(torch.float32).contiguous()
    a = 1 - m * (1 - gamma * lam)
    advantages = reverse_linear_scan_time_major(a, b)
    returns = (advantages + values64).to(torch.float32)
    return advantages.T.contiguous(), returns.T.contiguous()
