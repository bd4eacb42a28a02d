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
from ..hista import SIMILARITIES, HistaOutput, check_arguments
from ..hista import hista_values as _hista_values
from ..hista import reference as _hista_reference
from . import _comm, _plan

OP = "sveb_kernels.distributed.hista_values"
_DTYPES = _checks.FLOAT_DTYPES
# Per-token fields after the hidden bytes: rollout id (int64), return, key bias, key mask (float32), pad.
_TRAILER_BYTES = 24
_TILE_ELEMENTS = 1 << 22
_COPY_ROWS = 1 << 14


def _check_local(hidden, returns, rollout_ids, group_ids, temperature, similarity, key_mask, key_bias,
                 empty_value, backend, validate):
    # Hista's own checks live once, in sveb_kernels.hista.check_arguments; only group_ids is ours.
    temperature, empty_value = check_arguments(hidden, returns, rollout_ids, temperature=temperature,
                                               similarity=similarity, key_mask=key_mask, key_bias=key_bias,
                                               empty_value=empty_value, validate=validate)
    _checks.tensor("group_ids", group_ids, dtypes=_checks.INT_DTYPES, shape=(hidden.shape[0],), device=hidden.device)
    _backend.resolve("hista_values", backend, hidden.device)
    return temperature, empty_value


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_begin = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - seg_begin, lengths)


def _attend(q_hidden, q_rollout, k_hidden, k_rollout, k_returns, k_add, temperature, similarity, empty_value):
    """Hista of the queries q against the keys k of one group (the block path): the reference's block
    computation (`sveb_kernels.hista.reference.attend`, the one home of the scores, the non-finite and
    masked-key rules, the online softmax and empty rows). Returns (values, lse) of the queries."""
    q_scale, _ = _hista_reference.token_scales(q_hidden, temperature, similarity)
    k_scale = _hista_reference.token_scales(k_hidden, 1.0, similarity)[1]
    return _hista_reference.attend(q_hidden, q_scale, q_rollout, k_hidden, k_scale, k_rollout, k_returns, k_add,
                                   empty_value, tile_elements=_TILE_ELEMENTS)


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
        # Written in chunks through a strided view of the rows, so no second copy of the hidden states
        # is ever whole in memory.
        idx = send_index.to(hidden.device)
        send_hidden = send[:, :hidden_bytes].view(dtype)
        for c0 in range(0, len(positions), _COPY_ROWS):
            c1 = min(c0 + _COPY_ROWS, len(positions))
            send_hidden[c0:c1] = hidden.detach()[idx[c0:c1]].to(comm)
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
        del idx, scalars, trailer, send_hidden

    # Receive side: from each source, its tokens of my items in item order.
    mine = np.flatnonzero(plan.owner == rank)
    recv_len = counts[plan.group[mine]].T.reshape(-1)   # source-major, then my items in order
    recv_counts = counts[plan.group[mine]].sum(axis=0) if len(mine) else np.zeros(size, dtype=np.int64)
    received = [_comm.all_to_all(send, send_counts.tolist(), recv_counts.tolist(), group)]
    del send
    num_received = received[0].shape[0]
    item_of_row = np.repeat(np.tile(np.arange(len(mine)), size), recv_len)
    pos_of_row = (_segments(np.zeros_like(recv_len), recv_len)
                  + np.repeat(prefix[plan.group[mine]].T.reshape(-1), recv_len))

    results = torch.zeros((num_received, 2), dtype=torch.float32, device=hidden.device)
    compute_error = None
    try:
        if num_received:
            results = _compute_owned(received, hidden_bytes, row_bytes, dim, dtype, plan, mine, item_of_row, pos_of_row,
                                     counts, hidden.device, temperature, similarity, empty_value, backend)
    except Exception as exc:   # noqa: BLE001 - agreed below so no rank waits forever in the next collective
        compute_error = exc
    received.clear()
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


def _compute_owned(received, hidden_bytes, row_bytes, dim, dtype, plan, mine, item_of_row, pos_of_row, counts,
                   device, temperature, similarity, empty_value, backend):
    """(values, lse) [rows, 2] for the received rows, in received order: whole groups by the op, one call
    for all of them; query blocks against their group's keys by `_attend`. `received` holds the
    receive buffer, which is released once the rows are regrouped."""
    recv = received.pop()
    whole = plan.whole[mine]
    # Whole groups first, then blocks; rows of one item contiguous (a stable sort keeps each rank's order).
    rank_of_item = np.argsort(~whole, kind="stable")
    slot = np.empty_like(rank_of_item)
    slot[rank_of_item] = np.arange(len(mine))
    perm_np = np.argsort(slot[item_of_row], kind="stable")
    perm = torch.as_tensor(perm_np, device=recv.device)
    hidden = recv[perm, :hidden_bytes].to(device).view(dtype)
    trailer = recv[perm, row_bytes - _TRAILER_BYTES:].to(device)
    del recv
    rollout = trailer[:, :8].contiguous().view(torch.int64).reshape(-1)
    scalars = trailer[:, 8:20].contiguous().view(torch.float32)
    returns, key_bias, key_mask = scalars[:, 0], scalars[:, 1], scalars[:, 2] > 0.5
    del trailer
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
    key_add = _hista_reference.key_terms(len(key_bias), key_bias, key_mask, device)
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
