"""Hista in plain PyTorch: exact, any device, O(N*D) memory.

Flash-attention structure without a kernel: the packed tokens are cut into query tiles; each tile
meets only the key range of the groups it touches, in key tiles, with an online softmax. A tile of
queries from many small groups is processed at once (the group mask does the separation), so small
groups do not cost one Python iteration each, and one huge group never needs an [N, N] buffer.

The block computation (`token_scales`, `key_terms`, `block_scores`, `attend`) is the one home of
Hista's rules in Python: the cosine norms with eps, the non-finite rule, masked keys, the online
softmax and empty rows (docs/CONTRACT.md §1, docs/DESIGN.md "One rule, one home"). The reference
backend below and the distributed block path (`sveb_kernels.distributed.hista`) both call `attend`;
neither carries a copy.
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch
from torch import Tensor

EPS = 1e-6
# Elements in one [query tile, key tile] score block: ~4 MiB of float32, the bounded working set.
TILE_ELEMENTS = 1 << 20


def token_scales(hidden: Tensor, temperature: float, similarity: str) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token fp32 factors folded into the GEMM operands: (query_scale, key_scale). Cosine:
    query_scale = 1 / (max(|h|, eps) * temperature), key_scale = 1 / max(|h|, eps) (norms in fp32);
    dot: query_scale = 1 / temperature, key_scale None. Folding into the operands (not the products)
    keeps every operand entry within 1/temperature, so a cosine logit cannot overflow fp32 for any
    temperature the public op admits (`sveb_kernels.hista.check_arguments`)."""
    n = hidden.shape[0]
    query_scale = torch.full((n,), 1.0 / temperature, dtype=torch.float32, device=hidden.device)
    if similarity != "cosine":
        return query_scale, None
    if hidden.dtype == torch.float64:   # fp64 is accepted and computed in fp32, as in the kernels
        hidden = hidden.to(torch.float32)
    inv_norm = 1.0 / torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32).clamp_min(EPS)
    return query_scale * inv_norm, inv_norm


def key_terms(n: int, key_bias: Optional[Tensor], key_mask: Optional[Tensor], device) -> Tensor:
    """The additive fp32 key term: key_bias for usable keys, -inf for masked ones. A key whose term is
    -inf (masked, or key_bias -inf: a zero weight) is no key at all: it leaves K(i)."""
    key_add = torch.zeros(n, dtype=torch.float32, device=device)
    if key_bias is not None:
        key_add = key_add + key_bias.to(device, torch.float32)
    if key_mask is not None:
        key_add = key_add.masked_fill(~key_mask.to(device, torch.bool), float("-inf"))
    return key_add


def _products(queries: Tensor, keys: Tensor) -> Tensor:
    """queries @ keys.T with fp32 accumulation and output: bf16/fp16 on tensor cores where torch has the
    fp32-output matmul (CUDA), else in fp32 (TF32 stays as the user set it, off by default)."""
    if queries.is_cuda and queries.dtype in (torch.bfloat16, torch.float16) and _HALF_MM["ok"]:
        try:
            return torch.mm(queries, keys.T, out_dtype=torch.float32)
        except (NotImplementedError, RuntimeError, TypeError):
            _HALF_MM["ok"] = False
    return queries.to(torch.float32) @ keys.to(torch.float32).T


_HALF_MM = {"ok": True}


def block_scores(q_hidden: Tensor, q_scale: Tensor, q_rollout: Tensor, q_group: Optional[Tensor],
                 k_hidden: Tensor, k_scale: Optional[Tensor], k_rollout: Tensor, k_group: Optional[Tensor],
                 k_add: Tensor) -> tuple[Tensor, Tensor]:
    """Logits s(i, j) of one [queries, keys] block and `usable` (j in K(i)); entries outside K(i) are -inf.

    Groups: q_group/k_group None means every query and key is of one group. Rules:
    - a -inf logit before the key term can only come from a non-finite hidden state (cosine logits are
      bounded by 1/temperature, dot logits overflow to +inf, not -inf): it becomes NaN, never a silent
      zero weight;
    - keys outside K(i) (other group, the query's own rollout, key term -inf) are -inf whatever their
      hidden state holds, so a NaN there never leaks in.
    """
    if q_hidden.is_cuda and q_hidden.dtype in (torch.bfloat16, torch.float16):
        # Tensor-core GEMM on the 16-bit operands; the fp32 scales multiply the fp32 products.
        scores = _products(q_hidden, k_hidden) * q_scale[:, None]
        if k_scale is not None:
            scores = scores * k_scale[None, :]
    else:
        queries = q_hidden.to(torch.float32) * q_scale[:, None]
        keys = k_hidden.to(torch.float32)
        if k_scale is not None:
            keys = keys * k_scale[:, None]
        scores = queries @ keys.T
    scores = scores.masked_fill_(scores == float("-inf"), float("nan")) + k_add
    usable = (q_rollout[:, None] != k_rollout[None, :]) & (k_add != float("-inf"))[None, :]
    if q_group is not None and k_group is not None:
        usable &= q_group[:, None] == k_group[None, :]
    return scores.masked_fill_(~usable, float("-inf")), usable


class SoftmaxState:
    """Online-softmax state of a tile of query rows: running max, denominator and numerator."""

    def __init__(self, rows: int, device):
        self.row_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
        self.denom = torch.zeros(rows, dtype=torch.float32, device=device)
        self.numer = torch.zeros(rows, dtype=torch.float32, device=device)

    def merge(self, scores: Tensor, usable: Tensor, k_returns: Tensor) -> None:
        new_max = torch.maximum(self.row_max, scores.amax(dim=1))
        # Rows with no usable key so far keep max -inf; shift them by 0 so exp() gives 0, not NaN.
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        weights = torch.exp(scores - shift[:, None])
        rescale = torch.exp(self.row_max - shift)
        self.denom = self.denom * rescale + weights.sum(dim=1)
        # Only keys in K(i) contribute: a NaN return outside it must not leak in through 0 * NaN.
        self.numer = self.numer * rescale + torch.where(usable, weights * k_returns.to(torch.float32), 0.0).sum(dim=1)
        self.row_max = new_max

    def finish(self, empty_value: float) -> tuple[Tensor, Tensor]:
        """(values, lse). denom is 0 exactly when K(i) is empty (or every key has weight 0): the empty
        value and -inf. NaN (a NaN/inf input of a key in K(i) or of the query) stays NaN, never
        becomes empty_value (so the test is `!= 0`, not `> 0`)."""
        has_keys = self.denom != 0
        safe = torch.where(has_keys, self.denom, 1.0)
        values = torch.where(has_keys, self.numer / safe, float(empty_value))
        lse = torch.where(has_keys, self.row_max + torch.log(safe), float("-inf"))
        return values, lse


def attend(q_hidden: Tensor, q_scale: Tensor, q_rollout: Tensor, k_hidden: Tensor, k_scale: Optional[Tensor],
           k_rollout: Tensor, k_returns: Tensor, k_add: Tensor, empty_value: float, *,
           q_group: Optional[Tensor] = None, k_group: Optional[Tensor] = None,
           tile_elements: int = TILE_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Hista (values, lse) of the queries against the keys: tiled online softmax, products in fp32,
    O(tile_elements) extra memory. Scales from `token_scales`, key terms from `key_terms`; with
    q_group/k_group given, only keys of the query's group count (else all are of one group)."""
    device = q_hidden.device
    nq, nk = q_hidden.shape[0], k_hidden.shape[0]
    values = torch.full((nq,), float(empty_value), dtype=torch.float32, device=device)
    lse = torch.full((nq,), float("-inf"), dtype=torch.float32, device=device)
    if nq == 0 or nk == 0:
        return values, lse
    if q_hidden.dtype == torch.float64:   # fp64 is accepted and computed in fp32, as in the kernels
        q_hidden, k_hidden = q_hidden.to(torch.float32), k_hidden.to(torch.float32)
    q_tile = max(1, min(nq, int(tile_elements ** 0.5)))
    for q0 in range(0, nq, q_tile):
        q1 = min(q0 + q_tile, nq)
        k_tile = max(1, tile_elements // (q1 - q0))
        state = SoftmaxState(q1 - q0, device)
        for k0 in range(0, nk, k_tile):
            k1 = min(k0 + k_tile, nk)
            scores, usable = block_scores(
                q_hidden[q0:q1], q_scale[q0:q1], q_rollout[q0:q1], None if q_group is None else q_group[q0:q1],
                k_hidden[k0:k1], None if k_scale is None else k_scale[k0:k1], k_rollout[k0:k1],
                None if k_group is None else k_group[k0:k1], k_add[k0:k1])
            state.merge(scores, usable, k_returns[k0:k1])
        values[q0:q1], lse[q0:q1] = state.finish(empty_value)
    return values, lse


def group_layout(group_offsets: Tensor, n: int, device) -> tuple[list[int], Tensor]:
    """(offsets as host ints, group index of every token, -1 outside every group), shared by the
    forward and the backward. The raw op (torch.ops.sveb.hista_values) skips the host checks:
    offsets outside [0, n] or out of order are clamped to a valid non-decreasing table, so any input
    the schema admits stays in bounds. Tokens outside [o_0, o_G] then belong to no group (no keys)."""
    offsets: list[int] = []
    for o in group_offsets.tolist():
        offsets.append(min(max(int(o), offsets[-1] if offsets else 0), n))
    if len(offsets) < 2:
        return offsets, torch.full((n,), -1, device=device)
    counts = torch.tensor(offsets, device=device).diff()
    group_of = torch.repeat_interleave(torch.arange(len(counts), device=device), counts,
                                       output_size=offsets[-1] - offsets[0])
    group_of = torch.cat([torch.full((offsets[0],), -1, device=device), group_of,
                          torch.full((n - offsets[-1],), -1, device=device)])
    return offsets, group_of


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

    offsets, group_of = group_layout(group_offsets, n, device)
    if len(offsets) < 2:
        return values, lse
    rollout = rollout_ids.to(device)
    query_scale, key_scale = token_scales(hidden, temperature, similarity)
    key_add = key_terms(n, key_bias, key_mask, device)

    tile = max(1, int(tile_elements ** 0.5))
    for q0 in range(offsets[0], offsets[-1], tile):
        q1 = min(q0 + tile, offsets[-1])
        # Key range: from the start of q0's group to the end of (q1-1)'s group.
        k_lo = offsets[bisect.bisect_right(offsets, q0) - 1]
        k_hi = offsets[bisect.bisect_right(offsets, q1 - 1)]
        values[q0:q1], lse[q0:q1] = attend(
            hidden[q0:q1], query_scale[q0:q1], rollout[q0:q1], hidden[k_lo:k_hi],
            None if key_scale is None else key_scale[k_lo:k_hi], rollout[k_lo:k_hi], returns[k_lo:k_hi],
            key_add[k_lo:k_hi], empty_value, q_group=group_of[q0:q1], k_group=group_of[k_lo:k_hi],
            tile_elements=tile_elements)
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
    offsets, group_of = group_layout(group_offsets, n, device)
    if len(offsets) < 2:
        return torch.zeros_like(hidden), grad_returns.to(returns.dtype)
    rollout = rollout_ids.to(device)
    h = hidden.to(torch.float32)  # fp64 is computed in fp32, as in the forward
    # The forward's scales, key terms and block scores (one home of the rules): p is exactly its p.
    query_scale, key_scale = token_scales(h, temperature, similarity)
    key_add = key_terms(n, key_bias, key_mask, device)
    units = h if key_scale is None else h * key_scale[:, None]
    # A tile may span groups: the zero weights across a group boundary must not turn another group's
    # NaN hidden state into NaN here (0 * NaN). Rows that do depend on it hold NaN in w, through p.
    finite_units = torch.nan_to_num(units, nan=0.0, posinf=0.0, neginf=0.0)
    inv_temperature = 1.0 / temperature
    ret = returns.to(torch.float32)
    g_values = grad_values.to(torch.float32)
    g_lse = grad_lse.to(torch.float32)
    val = values.to(torch.float32)
    # Rows without keys have lse -inf and no usable entry; shift them by 0 so no inf - inf appears.
    lse_shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse.to(torch.float32))

    grad_units = torch.zeros(n, d, dtype=torch.float32, device=device)  # X / T, accumulated per tile
    tile = max(1, int(tile_elements ** 0.5))
    for q0 in range(offsets[0], offsets[-1], tile):
        q1 = min(q0 + tile, offsets[-1])
        k_lo = offsets[bisect.bisect_right(offsets, q0) - 1]
        k_hi = offsets[bisect.bisect_right(offsets, q1 - 1)]
        key_tile = max(1, tile_elements // (q1 - q0))
        for k0 in range(k_lo, k_hi, key_tile):
            k1 = min(k0 + key_tile, k_hi)
            scores, usable = block_scores(
                h[q0:q1], query_scale[q0:q1], rollout[q0:q1], group_of[q0:q1], h[k0:k1],
                None if key_scale is None else key_scale[k0:k1], rollout[k0:k1], group_of[k0:k1], key_add[k0:k1])
            # torch.where, not a product: a NaN/inf outside K(i) must not leak in through 0 * NaN.
            p = torch.where(usable, torch.exp(scores - lse_shift[q0:q1, None]), 0.0)
            grad_returns[k0:k1] += torch.where(usable, p * g_values[q0:q1, None], 0.0).sum(dim=0)
            coef = g_values[q0:q1, None] * (ret[k0:k1] - val[q0:q1, None]) + g_lse[q0:q1, None]
            w = torch.where(usable, p * coef, 0.0) * inv_temperature
            grad_units[q0:q1] += w @ finite_units[k0:k1]
            grad_units[k0:k1] += w.T @ finite_units[q0:q1]

    if key_scale is not None:
        # Through u = h / max(|h|, eps): the projection (I - u u^T) / |h| where |h| > eps, 1/eps below.
        radial = torch.where(key_scale < 1.0 / EPS, (units * grad_units).sum(dim=1), 0.0)
        grad_hidden = (grad_units - units * radial[:, None]) * key_scale[:, None]
    else:
        grad_hidden = grad_units
    return grad_hidden.to(hidden.dtype), grad_returns.to(returns.dtype)
