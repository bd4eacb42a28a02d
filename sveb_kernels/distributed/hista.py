"""Hista over ranks: regroup tokens by all_to_all so each group (or block of a large group's queries)
is computed on one owner rank by the single-process op, then send (values, lse) back.

Steps (every rank, same order of collectives):
1. local checks -> header all_gather (error code, sizes, D, dtype, options): the same error everywhere;
2. all_gather of the (group, rollout, token count) triples: global checks and the plan (`_plan.plan`);
3. one all_to_all of packed rows [hidden bytes | rollout id | return | key bias | key mask]: each token
   goes to the owner of its group (to every block owner when the group is cut into query blocks);
4. owners compute whole groups with `sveb_kernels.hista_values` and query blocks against their group's
   keys with `_attend`, then agree that nothing failed (one small all_reduce);
5. one all_to_all of (values, lse) back, in the order the rows were sent.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _checks
from ..hista import SIMILARITIES, HistaOutput
from ..hista import hista_values as _hista_values
from . import _comm, _plan

OP = "sveb_kernels.distributed.hista_values"
_DTYPES = _checks.FLOAT_DTYPES
_ID_DTYPES = _checks.INT_DTYPES
# Per-token fields after the hidden bytes: rollout id (int64), return, key bias, key mask (float32), pad.
_TRAILER_BYTES = 24
_EPS = 1e-6
_TILE_ELEMENTS = 1 << 22


def _check_local(hidden, returns, rollout_ids, group_ids, temperature, similarity, key_mask, key_bias,
                 empty_value, backend, validate):
    _checks.tensor("hidden", hidden, ndim=2, dtypes=_DTYPES)
    n, d = hidden.shape
    device = hidden.device
    if d < 1:
        raise ValueError(f"hidden must have D >= 1 columns, got shape {tuple(hidden.shape)}")
    _checks.tensor("returns", returns, dtypes=_DTYPES, shape=(n,), device=device)
    _checks.tensor("rollout_ids", rollout_ids, dtypes=_ID_DTYPES, shape=(n,), device=device)
    _checks.tensor("group_ids", group_ids, dtypes=_ID_DTYPES, shape=(n,), device=device)
    temperature = _checks.finite_float("temperature", temperature, low=0.0, low_open=True)
    if 1.0 / temperature > torch.finfo(torch.float32).max:
        raise ValueError(f"temperature must be at least {1 / torch.finfo(torch.float32).max:.3g}, got {temperature}")
    _checks.choice("similarity", similarity, SIMILARITIES)
    if key_mask is not None:
        _checks.tensor("key_mask", key_mask, dtypes=(torch.bool,), shape=(n,), device=device)
    if key_bias is not None:
        _checks.tensor("key_bias", key_bias, dtypes=_DTYPES, shape=(n,), device=device)
    empty_value = _checks.real("empty_value", empty_value)
    if _checks.validate_requested(validate):
        _checks.all_finite("hidden", hidden)
        _checks.all_finite("returns", returns)
        if key_bias is not None and bool((torch.isnan(key_bias) | (key_bias == float("inf"))).any()):
            raise ValueError("key_bias contains NaN or +inf")
    _backend.resolve("hista_values", backend, device)
    return temperature, empty_value


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_begin = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - seg_begin, lengths)


_half_mm = {"ok": True}


def _products(queries: Tensor, keys: Tensor) -> Tensor:
    """queries @ keys.T with fp32 accumulation and output: bf16/fp16 on tensor cores where torch has the
    fp32-output matmul (CUDA), else through fp32 copies (TF32 stays as the user set it, off by default)."""
    if queries.is_cuda and queries.dtype in (torch.bfloat16, torch.float16) and _half_mm["ok"]:
        try:
            return torch.mm(queries, keys.T, out_dtype=torch.float32)
        except (NotImplementedError, RuntimeError, TypeError):
            _half_mm["ok"] = False
    return queries.to(torch.float32) @ keys.to(torch.float32).T


def _attend(q_hidden, q_rollout, k_hidden, k_rollout, k_returns, k_add, temperature, similarity, empty_value):
    """Hista of the queries q against the keys k of one group (the block path): tiled online softmax,
    products accumulated in fp32, O(tile) extra memory. Returns (values, lse) of the queries."""
    device = q_hidden.device
    nq, nk = q_hidden.shape[0], k_hidden.shape[0]
    values = torch.full((nq,), float(empty_value), dtype=torch.float32, device=device)
    lse = torch.full((nq,), float("-inf"), dtype=torch.float32, device=device)
    if nq == 0 or nk == 0:
        return values, lse
    if q_hidden.dtype == torch.float64:
        q_hidden, k_hidden = q_hidden.to(torch.float32), k_hidden.to(torch.float32)
    # Scales (cosine norms, 1/temperature) multiply the fp32 products, as in the kernels.
    q_scale = torch.full((nq,), 1.0 / temperature, dtype=torch.float32, device=device)
    k_scale = None
    if similarity == "cosine":
        q_scale = q_scale / torch.linalg.vector_norm(q_hidden, dim=1, dtype=torch.float32).clamp_min(_EPS)
        k_scale = 1.0 / torch.linalg.vector_norm(k_hidden, dim=1, dtype=torch.float32).clamp_min(_EPS)
    q_tile = max(1, min(nq, int(_TILE_ELEMENTS ** 0.5)))
    for q0 in range(0, nq, q_tile):
        q1 = min(q0 + q_tile, nq)
        k_tile = max(1, _TILE_ELEMENTS // (q1 - q0))
        row_max = torch.full((q1 - q0,), float("-inf"), dtype=torch.float32, device=device)
        denom = torch.zeros(q1 - q0, dtype=torch.float32, device=device)
        numer = torch.zeros(q1 - q0, dtype=torch.float32, device=device)
        for k0 in range(0, nk, k_tile):
            k1 = min(k0 + k_tile, nk)
            scores = _products(q_hidden[q0:q1], k_hidden[k0:k1]) * q_scale[q0:q1, None]
            if k_scale is not None:
                scores *= k_scale[None, k0:k1]
            scores += k_add[k0:k1]
            scores.masked_fill_(q_rollout[q0:q1, None] == k_rollout[None, k0:k1], float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=1))
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            weights = torch.exp(scores - shift[:, None])
            rescale = torch.exp(row_max - shift)
            denom = denom * rescale + weights.sum(dim=1)
            numer = numer * rescale + weights @ k_returns[k0:k1]
            row_max = new_max
        has = denom > 0
        safe = torch.where(has, denom, torch.ones_like(denom))
        values[q0:q1] = torch.where(has, numer / safe, values[q0:q1])
        lse[q0:q1] = torch.where(has, row_max + torch.log(safe), lse[q0:q1])
    return values, lse


def hista_values(
    hidden: Tensor,
    returns: Tensor,
    rollout_ids: Tensor,
    group_ids: Tensor,
    *,
    group=None,
    temperature: float = 0.1,
    similarity: str = "cosine",
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    empty_value: float = 0.0,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> HistaOutput:
    """Hista values of this rank's tokens, equal to `sveb_kernels.hista_values` on all ranks' tokens
    together (docs/CONTRACT.md §1 and §4). Every rank of `group` must call it.

    Args:
        hidden: [n, D] bf16/fp16/fp32/fp64 hidden states of this rank's tokens (any order; n may be 0).
            D and dtype must agree across the ranks that have tokens.
        returns: [n] float, each token's rollout return.
        rollout_ids: [n] integer, global rollout ids (equal on every rank for the same rollout).
        group_ids: [n] integer, global group (prompt) ids; a rollout belongs to one group.
        group: the torch.distributed process group (default: the world).
        temperature, similarity, key_mask, key_bias, empty_value, backend, validate: as in
            `sveb_kernels.hista_values` (key_mask/key_bias per local token); options must agree across ranks.

    Returns:
        HistaOutput(values [n] float32, lse [n] float32) for this rank's tokens in its order, on hidden's device.
    """
    rank, size = _comm.world(group)
    comm = _comm.device(group)
    error = None
    try:
        temperature, empty_value = _check_local(hidden, returns, rollout_ids, group_ids, temperature, similarity,
                                                key_mask, key_bias, empty_value, backend, validate)
        n, d = hidden.shape
        gids = group_ids.to(comm, torch.int64)
        rids = rollout_ids.to(comm, torch.int64)
        triples = torch.unique(torch.stack([gids, rids], dim=1), dim=0, return_counts=True) if n else None
        triples = (torch.cat([triples[0], triples[1][:, None]], dim=1) if n
                   else torch.zeros((0, 3), dtype=torch.int64, device=comm))
        header = [n, d, _DTYPES.index(hidden.dtype), triples.shape[0], _comm.float_bits(temperature),
                  SIMILARITIES.index(similarity), _comm.float_bits(empty_value)]
    except Exception as exc:   # noqa: BLE001 - re-raised below, on every rank
        error, header = exc, [0] * 7
    table = _comm.all_gather_rows(torch.tensor([_comm.error_code(error)] + header, dtype=torch.int64,
                                               device=comm), group).cpu().numpy()
    codes = table[:, 0]
    if codes.any():
        _comm.raise_agreed(error, codes.tolist(), OP, group, comm)
    counts_n, dims, dtypes = table[:, 1], table[:, 2], table[:, 3]
    busy = np.flatnonzero(counts_n > 0)
    if len(busy) and (len(set(dims[busy])) > 1 or len(set(dtypes[busy])) > 1):
        shapes = ", ".join(f"rank {r}: D={dims[r]} {_DTYPES[dtypes[r]]}" for r in busy)
        raise ValueError(f"{OP}: hidden must have the same D and dtype on every rank with tokens, got {shapes}")
    for column, name in ((5, "temperature"), (6, "similarity"), (7, "empty_value")):
        if len(set(table[:, column])) > 1:
            raise ValueError(f"{OP}: {name} must be the same on every rank")
    if not len(busy):
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return HistaOutput(empty, empty.clone())
    dim, dtype = int(dims[busy[0]]), _DTYPES[int(dtypes[busy[0]])]

    # Global triples: checks and the plan, identical on every rank.
    gathered = _comm.all_gather_ragged(triples, table[:, 4].tolist(), group)
    owners_of_triples = np.concatenate([np.full(len(t), r) for r, t in enumerate(gathered)])
    allt = torch.cat(gathered).cpu().numpy()
    pairs = np.unique(allt[:, :2], axis=0)
    rollout_values, rollout_groups = np.unique(pairs[:, 1], return_counts=True)
    if (rollout_groups > 1).any():
        bad = int(rollout_values[np.argmax(rollout_groups > 1)])
        in_groups = sorted(int(g) for g in pairs[pairs[:, 1] == bad, 0])
        raise ValueError(f"{OP}: rollout_ids must name one rollout of one group, but rollout {bad} has tokens in "
                         f"groups {in_groups} (rollout and group ids are global across ranks)")
    group_values, group_index = np.unique(allt[:, 0], return_inverse=True)
    num_groups = len(group_values)
    counts = np.zeros((num_groups, size), dtype=np.int64)
    np.add.at(counts, (group_index, owners_of_triples), allt[:, 2])
    plan = _plan.plan(counts)
    prefix = np.cumsum(counts, axis=1) - counts          # global position of rank r's first token of g

    # Send side: this rank's tokens of each item's group go to the item's owner, items in order.
    n = hidden.shape[0]
    gidx = torch.searchsorted(torch.as_tensor(group_values, device=comm), group_ids.to(comm, torch.int64))
    order = torch.argsort(gidx, stable=True)             # this rank's tokens, group by group
    local_start = np.cumsum(counts[:, rank]) - counts[:, rank]
    by_owner = np.lexsort((np.arange(len(plan.group)), plan.owner))
    seg_len = counts[plan.group[by_owner], rank]
    positions = _segments(local_start[plan.group[by_owner]], seg_len)
    send_index = order[torch.as_tensor(positions, device=comm)]
    within = positions - np.repeat(local_start[plan.group[by_owner]], seg_len)   # index among rank's tokens of g
    global_pos = within + np.repeat(prefix[plan.group[by_owner], rank], seg_len)
    is_query = ((global_pos >= np.repeat(plan.lo[by_owner], seg_len))
                & (global_pos < np.repeat(plan.hi[by_owner], seg_len)))
    send_counts = np.bincount(plan.owner[by_owner], weights=seg_len, minlength=size).astype(np.int64)

    hidden_bytes = dim * torch.empty(0, dtype=dtype).element_size()
    row_bytes = -(-hidden_bytes // 8) * 8 + _TRAILER_BYTES
    send = torch.zeros((len(positions), row_bytes), dtype=torch.uint8, device=comm)
    if len(positions):
        idx = send_index.to(hidden.device)
        send[:, :hidden_bytes] = hidden.detach()[idx].contiguous().view(torch.uint8).to(comm)
        trailer = send[:, row_bytes - _TRAILER_BYTES:]
        trailer[:, :8] = rids[send_index].view(torch.uint8).view(-1, 8)
        scalars = torch.stack([
            returns.detach()[idx].to(comm, torch.float32),
            (key_bias.detach()[idx].to(comm, torch.float32) if key_bias is not None
             else torch.zeros(len(positions), dtype=torch.float32, device=comm)),
            (key_mask[idx].to(comm, torch.float32) if key_mask is not None
             else torch.ones(len(positions), dtype=torch.float32, device=comm)),
        ], dim=1)
        trailer[:, 8:20] = scalars.view(torch.uint8).view(-1, 12)
        del idx, scalars, trailer

    # Receive side: from each source, its tokens of my items in item order.
    mine = np.flatnonzero(plan.owner == rank)
    recv_len = counts[plan.group[mine]].T.reshape(-1)   # source-major, then my items in order
    recv_counts = counts[plan.group[mine]].sum(axis=0) if len(mine) else np.zeros(size, dtype=np.int64)
    recv = _comm.all_to_all(send, send_counts.tolist(), recv_counts.tolist(), group)
    del send
    item_of_row = np.repeat(np.tile(np.arange(len(mine)), size), recv_len)
    pos_of_row = (_segments(np.zeros_like(recv_len), recv_len)
                  + np.repeat(prefix[plan.group[mine]].T.reshape(-1), recv_len))

    results = torch.zeros((recv.shape[0], 2), dtype=torch.float32, device=hidden.device)
    compute_error = None
    try:
        if recv.shape[0]:
            results = _compute_owned(recv, hidden_bytes, row_bytes, dim, dtype, plan, mine, item_of_row, pos_of_row,
                                     counts, hidden.device, temperature, similarity, empty_value, backend)
    except Exception as exc:   # noqa: BLE001 - agreed below so no rank waits forever in the next collective
        compute_error = exc
    del recv
    failed = _comm.all_reduce_sum(torch.tensor([0 if compute_error is None else 1], dtype=torch.int64,
                                               device=comm), group)
    if int(failed):
        codes = _comm.all_gather_rows(torch.tensor([_comm.error_code(compute_error)], device=comm), group)
        _comm.raise_agreed(compute_error, codes.cpu().reshape(-1).tolist(), OP, group, comm)

    back = _comm.all_to_all(results.to(comm), recv_counts.tolist(), send_counts.tolist(), group)
    values = torch.full((n,), float(empty_value), dtype=torch.float32, device=hidden.device)
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
    if len(positions):
        take = torch.as_tensor(np.flatnonzero(is_query), device=comm)
        dest = send_index[take].to(hidden.device)
        back = back[take].to(hidden.device)
        values[dest] = back[:, 0]
        lse[dest] = back[:, 1]
    return HistaOutput(values, lse)


def _compute_owned(recv, hidden_bytes, row_bytes, dim, dtype, plan, mine, item_of_row, pos_of_row, counts,
                   device, temperature, similarity, empty_value, backend):
    """(values, lse) [rows, 2] for the received rows, in received order: whole groups by the op, one call
    for all of them; query blocks against their group's keys by `_attend`."""
    whole = plan.whole[mine]
    # Whole groups first, then blocks; rows of one item contiguous (a stable sort keeps each rank's order).
    rank_of_item = np.argsort(~whole, kind="stable")
    slot = np.empty_like(rank_of_item)
    slot[rank_of_item] = np.arange(len(mine))
    perm_np = np.argsort(slot[item_of_row], kind="stable")
    perm = torch.as_tensor(perm_np, device=recv.device)
    rows = recv[perm].to(device)
    hidden = rows[:, :hidden_bytes].contiguous().view(dtype)
    trailer = rows[:, row_bytes - _TRAILER_BYTES:].contiguous()
    rollout = trailer[:, :8].contiguous().view(torch.int64).reshape(-1)
    scalars = trailer[:, 8:20].contiguous().view(torch.float32)
    returns, key_bias, key_mask = scalars[:, 0], scalars[:, 1], scalars[:, 2] > 0.5
    del rows, trailer
    sizes = counts[plan.group[mine]].sum(axis=1)[rank_of_item]      # tokens per item, in slot order
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = torch.zeros((hidden.shape[0], 2), dtype=torch.float32, device=device)
    num_whole = int(whole.sum())
    end_whole = int(offsets[num_whole])
    if end_whole:
        res = _hista_values(hidden[:end_whole], returns[:end_whole], rollout[:end_whole],
                            torch.as_tensor(offsets[: num_whole + 1], dtype=torch.int64, device=device),
                            temperature=temperature, similarity=similarity, key_mask=key_mask[:end_whole],
                            key_bias=key_bias[:end_whole], empty_value=empty_value, backend=backend, validate=False)
        out[:end_whole, 0], out[:end_whole, 1] = res.values, res.lse
    pos_sorted = pos_of_row[perm_np]
    key_add = key_bias.masked_fill(~key_mask, float("-inf"))
    for s in range(num_whole, len(mine)):
        a, b = int(offsets[s]), int(offsets[s + 1])
        item = mine[rank_of_item[s]]
        q = torch.as_tensor(np.flatnonzero((pos_sorted[a:b] >= plan.lo[item]) & (pos_sorted[a:b] < plan.hi[item])),
                            device=device) + a
        v, l = _attend(hidden[q], rollout[q], hidden[a:b], rollout[a:b], returns[a:b], key_add[a:b],
                       temperature, similarity, empty_value)
        out[q, 0], out[q, 1] = v, l
    results = torch.empty_like(out)
    results[perm.to(device)] = out
    return results
