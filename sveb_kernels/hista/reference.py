"""Hista in plain PyTorch: exact, any device, O(N*D) memory.

Flash-attention structure without a kernel: the packed tokens are cut into query tiles; each tile
meets only the key range of the groups it touches, in key tiles, with an online softmax. A tile of
queries from many small groups is processed at once (the group mask does the separation), so small
groups do not cost one Python iteration each, and one huge group never needs an [N, N] buffer.
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch
from torch import Tensor

EPS = 1e-6
# Elements in one [query tile, key tile] score block: ~4 MiB of float32, the bounded working set.
TILE_ELEMENTS = 1 << 20


def hista_values(
    hidden: Tensor,
    returns: Tensor,
    rollout_ids: Tensor,
    group_offsets: Tensor,
    temperature: float,
    similarity: str,
    key_mask: Optional[Tensor],
    key_bias: Optional[Tensor],
    empty_value: float,
    *,
    tile_elements: int = TILE_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    n = hidden.shape[0]
    device = hidden.device
    values = torch.full((n,), float(empty_value), dtype=torch.float32, device=device)
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    if n == 0:
        return values, lse

    offsets = [int(o) for o in group_offsets.tolist()]
    counts = torch.tensor(offsets, device=device).diff()
    group_of = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=n)
    rollout = rollout_ids.to(device)

    # Per-token scales fold the cosine normalisation and 1/temperature into the GEMM operands.
    query_scale = torch.full((n,), 1.0 / temperature, dtype=torch.float32, device=device)
    key_scale = None
    if similarity == "cosine":
        inv_norm = 1.0 / torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32).clamp_min(EPS)
        query_scale = query_scale * inv_norm
        key_scale = inv_norm
    # Additive key term: the bias for usable keys, -inf for masked ones.
    key_add = torch.zeros(n, dtype=torch.float32, device=device)
    if key_bias is not None:
        key_add = key_add + key_bias.to(torch.float32)
    if key_mask is not None:
        key_add = key_add.masked_fill(~key_mask.to(torch.bool), float("-inf"))
    ret = returns.to(torch.float32)

    tile = max(1, int(tile_elements ** 0.5))
    for q0 in range(0, n, tile):
        q1 = min(q0 + tile, n)
        # Key range: from the start of q0's group to the end of (q1-1)'s group.
        k_lo = offsets[bisect.bisect_right(offsets, q0) - 1]
        k_hi = offsets[bisect.bisect_right(offsets, q1 - 1)]
        queries = hidden[q0:q1].to(torch.float32) * query_scale[q0:q1, None]
        q_group, q_rollout = group_of[q0:q1, None], rollout[q0:q1, None]
        key_tile = max(1, tile_elements // (q1 - q0))
        row_max = torch.full((q1 - q0,), float("-inf"), dtype=torch.float32, device=device)
        denom = torch.zeros(q1 - q0, dtype=torch.float32, device=device)
        numer = torch.zeros(q1 - q0, dtype=torch.float32, device=device)
        for k0 in range(k_lo, k_hi, key_tile):
            k1 = min(k0 + key_tile, k_hi)
            keys = hidden[k0:k1].to(torch.float32)
            if key_scale is not None:
                keys = keys * key_scale[k0:k1, None]
            scores = queries @ keys.T
            # A -inf logit before the key term can only come from a non-finite hidden state (cosine
            # logits are bounded by 1/temperature): make it NaN, so it is never a silent zero weight.
            scores = scores.masked_fill_(scores == float("-inf"), float("nan")) + key_add[k0:k1]
            # Masked keys (key_add -inf) leave K(i), so a NaN in their hidden state must not leak in.
            usable = ((q_group == group_of[k0:k1]) & (q_rollout != rollout[k0:k1])
                      & (key_add[k0:k1] != float("-inf")))
            scores = scores.masked_fill_(~usable, float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=1))
            # Rows with no usable key so far keep max -inf; shift them by 0 so exp() gives 0, not NaN.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            weights = torch.exp(scores - shift[:, None])
            rescale = torch.exp(row_max - shift)
            denom = denom * rescale + weights.sum(dim=1)
            # Only keys in K(i) contribute: a NaN return outside it must not leak in through 0 * NaN.
            numer = numer * rescale + torch.where(usable, weights * ret[k0:k1], 0.0).sum(dim=1)
            row_max = new_max
        # denom is 0 exactly when K(i) is empty (or every key has weight 0); NaN (from a NaN/inf
        # input of a key in K(i) or of the query) must stay NaN, never become empty_value.
        has_keys = denom != 0
        values[q0:q1] = torch.where(has_keys, numer / torch.where(has_keys, denom, 1.0), values[q0:q1])
        lse[q0:q1] = torch.where(has_keys, row_max + torch.log(torch.where(has_keys, denom, 1.0)), lse[q0:q1])
    return values, lse


# ---- backward --------------------------------------------------------------------------------------
# (docs/DESIGN.md "Hista backward".) With u_i = c_i h_i (c_i = 1/max(|h_i|, eps) for cosine, 1 for dot),
# s_ij = <u_i, u_j>/T + b_j and p_ij = exp(s_ij - lse_i), a loss L with gV = dL/dvalues, gL = dL/dlse has
#     w_ij = dL/ds_ij = p_ij (gV_i (r_j - V_i) + gL_i)                    (0 outside K(i))
#     dL/dr_j = sum_i gV_i p_ij
#     X_i = sum_j w_ij c_j h_j + sum_k w_ki c_k h_k   (i as a query, then as a key), dL/du_i = X_i / T
#     dL/dh_i = c_i X_i / T - [|h_i| > eps] c_i^3 h_i <h_i, X_i> / T     (cosine: through the norm)
#     dL/dh_i = X_i / T                                                  (dot)
# The same tiles as the forward; p is recomputed from the saved lse, so the working set is one
# [query tile, key tile] block plus the fp32 [N, D] accumulator X: O(N*D), never [N, N].


def hista_values_backward(
    grad_values: Tensor,
    grad_lse: Tensor,
    hidden: Tensor,
    returns: Tensor,
    rollout_ids: Tensor,
    group_offsets: Tensor,
    values: Tensor,
    lse: Tensor,
    temperature: float,
    similarity: str,
    key_mask: Optional[Tensor],
    key_bias: Optional[Tensor],
    *,
    tile_elements: int = TILE_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    n, d = hidden.shape
    device = hidden.device
    grad_returns = torch.zeros(n, dtype=torch.float32, device=device)
    if n == 0:
        return torch.zeros_like(hidden), grad_returns.to(returns.dtype)
    offsets = [int(o) for o in group_offsets.tolist()]
    counts = torch.tensor(offsets, device=device).diff()
    group_of = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=n)
    rollout = rollout_ids.to(device)

    h = hidden.to(torch.float32)
    inv_temperature = 1.0 / temperature
    if similarity == "cosine":
        norm = torch.linalg.vector_norm(h, dim=1)
        scale = 1.0 / norm.clamp_min(EPS)
        units = h * scale[:, None]
    else:
        units = h
    key_add = torch.zeros(n, dtype=torch.float32, device=device)
    if key_bias is not None:
        key_add = key_add + key_bias.to(torch.float32)
    if key_mask is not None:
        key_add = key_add.masked_fill(~key_mask.to(torch.bool), float("-inf"))
    ret = returns.to(torch.float32)
    g_values = grad_values.to(torch.float32)
    g_lse = grad_lse.to(torch.float32)
    val = values.to(torch.float32)
    # Rows without keys have lse -inf and no usable entry; shift them by 0 so no inf - inf appears.
    lse_shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse.to(torch.float32))

    grad_units = torch.zeros(n, d, dtype=torch.float32, device=device)  # X / T, accumulated per tile
    tile = max(1, int(tile_elements ** 0.5))
    for q0 in range(0, n, tile):
        q1 = min(q0 + tile, n)
        k_lo = offsets[bisect.bisect_right(offsets, q0) - 1]
        k_hi = offsets[bisect.bisect_right(offsets, q1 - 1)]
        queries = units[q0:q1] * inv_temperature
        q_group, q_rollout = group_of[q0:q1, None], rollout[q0:q1, None]
        key_tile = max(1, tile_elements // (q1 - q0))
        for k0 in range(k_lo, k_hi, key_tile):
            k1 = min(k0 + key_tile, k_hi)
            keys = units[k0:k1]
            scores = queries @ keys.T
            # The forward's rules, so p is exactly the forward's: -inf before the key term is a
            # non-finite hidden state (NaN), masked keys and other groups/own rollout leave K(i).
            scores = scores.masked_fill_(scores == float("-inf"), float("nan")) + key_add[k0:k1]
            usable = ((q_group == group_of[k0:k1]) & (q_rollout != rollout[k0:k1])
                      & (key_add[k0:k1] != float("-inf")))
            p = torch.exp(scores - lse_shift[q0:q1, None])
            # torch.where, not a product: a NaN/inf outside K(i) must not leak in through 0 * NaN.
            p = torch.where(usable, p, 0.0)
            grad_returns[k0:k1] += torch.where(usable, p * g_values[q0:q1, None], 0.0).sum(dim=0)
            coef = g_values[q0:q1, None] * (ret[k0:k1] - val[q0:q1, None]) + g_lse[q0:q1, None]
            w = torch.where(usable, p * coef, 0.0) * inv_temperature
            # A tile may span groups: the zero weights across a group boundary must not turn another
            # group's NaN hidden state into NaN here (0 * NaN). Rows that do depend on it already
            # hold NaN in w, through p.
            grad_units[q0:q1] += w @ torch.nan_to_num(keys, nan=0.0, posinf=0.0, neginf=0.0)
            grad_units[k0:k1] += w.T @ torch.nan_to_num(units[q0:q1], nan=0.0, posinf=0.0, neginf=0.0)

    if similarity == "cosine":
        # Through u = h / max(|h|, eps): the projection (I - u u^T) / |h| where |h| > eps, 1/eps below.
        radial = (units * grad_units).sum(dim=1)
        radial = torch.where(norm > EPS, radial, 0.0)
        grad_hidden = (grad_units - units * radial[:, None]) * scale[:, None]
    else:
        grad_hidden = grad_units
    return grad_hidden.to(hidden.dtype), grad_returns.to(returns.dtype)
