"""GAE in plain PyTorch as a parallel scan: no Python loop over tokens.

The trainer loop of SPEC section 3 carries two states backwards in time. With m = mask[t] (0/1):
  nextv_t = m*v_t + (1-m)*nextv_{t+1}                  -> the value at the next valid position
  last_t  = (m*g*l + 1 - m)*last_{t+1} + m*(r_t + g*nextv_{t+1} - v_t)
The first is a gather (index of the next valid position, by a reversed cummin); the second is the
linear recurrence x_t = a_t*x_{t+1} + b_t, solved by `reverse_linear_scan` in log depth.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Positions per block of the blocked scan. Within a block a Hillis-Steele scan (log2 steps over the
# whole tensor); the block totals recurse. 16 keeps the full-size passes few (4) while the recursion
# on T/16 elements is cheap.
BLOCK = 16


def _hillis_steele(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive reverse scan of the maps x -> a*x + b along the last dim.

    Returns (A, X): A[i] = a_i*...*a_{L-1}, X[i] = x_i when x_L = 0.
    """
    length = a.shape[-1]
    step = 1
    while step < length:
        # (a_i, b_i) o (a_{i+s}, b_{i+s}) = (a_i a_{i+s}, b_i + a_i b_{i+s}); the last `step` are done.
        b = torch.cat([torch.addcmul(b[..., :-step], a[..., :-step], b[..., step:]), b[..., -step:]], dim=-1)
        a = torch.cat([a[..., :-step] * a[..., step:], a[..., -step:]], dim=-1)
        step *= 2
    return a, b


def reverse_linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """x_t = a_t * x_{t+1} + b_t along the last dim, with x_T = 0. a, b: [R, T] of one float dtype."""
    rows, length = a.shape
    if length <= BLOCK:
        return _hillis_steele(a, b)[1]
    blocks = -(-length // BLOCK)
    pad = blocks * BLOCK - length
    if pad:  # identity maps at the end leave x unchanged (x stays 0 there)
        a = torch.nn.functional.pad(a, (0, pad), value=1.0)
        b = torch.nn.functional.pad(b, (0, pad), value=0.0)
    prod, local = _hillis_steele(a.view(rows, blocks, BLOCK), b.view(rows, blocks, BLOCK))
    # x at the start of each block, from the block-level recurrence y_c = prod_c * y_{c+1} + local_c.
    starts = reverse_linear_scan(prod[..., 0], local[..., 0])
    carry_in = torch.nn.functional.pad(starts[:, 1:], (0, 1), value=0.0)  # x at the start of block c+1
    x = torch.addcmul(local, prod, carry_in[..., None])
    return x.view(rows, blocks * BLOCK)[:, :length]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    batch, length = rewards.shape
    device = rewards.device
    # float64 internally: the scan reassociates sums, and long rows with gamma*lam = 1 telescope.
    # (MPS has no float64.)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    r, v = rewards.to(dtype), values.to(dtype)
    valid = mask.to(torch.bool)
    if length == 0:
        empty = torch.empty(batch, 0, dtype=torch.float32, device=device)
        return empty, empty.clone()

    # Index of the first valid position strictly after t (length if none), then the value there.
    positions = torch.arange(length, device=device).expand(batch, length)
    valid_pos = torch.where(valid, positions, torch.full_like(positions, length))
    next_pos = valid_pos.flip(-1).cummin(dim=-1).values.flip(-1)  # first valid at or after t
    next_after = torch.nn.functional.pad(next_pos[:, 1:], (0, 1), value=length)
    v_padded = torch.nn.functional.pad(v, (0, 1), value=0.0)
    next_value = torch.gather(v_padded, 1, next_after)

    m = valid.to(dtype)
    a = torch.where(valid, torch.full_like(r, gamma * lam), torch.ones_like(r))
    b = m * (r + gamma * next_value - v)
    advantages = reverse_linear_scan(a, b)
    return advantages.to(torch.float32), (advantages + v).to(torch.float32)
