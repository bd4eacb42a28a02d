"""Numca over ranks: each rollout (row) is summarised by its milestone keys (the keys at `end & mask`,
in order) and its return; ranks all_gather these compact summaries (never token ids or [B, T]
tensors) and each rank runs the single-process op on its own rows plus, for the groups it holds,
every other rank's rows rebuilt as short rows whose tokens are exactly their numbers. Only the keys,
their order, the return and the group of a peer enter a rollout's values, so this equals the op on all
ranks' rows together.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend
from ..numca import MATCHES, NumericSpans, check_values_arguments
from ..numca import numca_values as _numca_values
from . import _comm

OP = "sveb_kernels.distributed.numca_values"


def numca_values(
    spans: Union[NumericSpans, Sequence[Tensor]],
    returns: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    *,
    group=None,
    match: str = "last",
    leave_one_out: bool = True,
    min_support: int = 1,
    empty_value: float = 0.0,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> Tensor:
    """Numca values [b, T] float32 of this rank's rollouts, equal to `sveb_kernels.numca_values` on all
    ranks' rollouts together (docs/CONTRACT.md §2c and §4). Every rank of `group` must call it.

    Args:
        spans: this rank's NumericSpans [b, T] (only `end` and `key` are read); b may be 0.
        returns: [b] float, each rollout's return.
        group_ids: [b] integer, global group (prompt) ids.
        mask: [b, T] bool (or 0/1): the tokens to value; numbers count only where it is True.
        group: the torch.distributed process group (default: the world).
        match, leave_one_out, min_support, empty_value, backend, validate: as in
            `sveb_kernels.numca_values`; they must agree across ranks.
    """
    rank, size = _comm.world(group)
    comm = _comm.device(group)
    error = None
    try:
        end, key, mask, leave_one_out, min_support, empty_value = check_values_arguments(
            spans, returns, group_ids, mask, match=match, leave_one_out=leave_one_out, min_support=min_support,
            empty_value=empty_value, validate=validate, group_name="group_ids")
        shape, device = tuple(end.shape), end.device
        _backend.resolve("numca_values", backend, device)
        counted = end & mask
        numbers = counted.sum(dim=1)
        keys = key[counted]                                 # row-major: each row's keys in token order
        rows = torch.stack([group_ids.to(torch.int64), numbers.to(torch.int64),
                            returns.detach().to(torch.float64).view(torch.int64)], dim=1).to(comm)
        header = [shape[0], keys.numel(), MATCHES.index(match), int(leave_one_out), min_support,
                  _comm.float_bits(empty_value)]
    except Exception as exc:   # noqa: BLE001 - re-raised below, on every rank
        error, header = exc, [0] * 6
    table = _comm.all_gather_rows(torch.tensor([_comm.error_code(error)] + header, dtype=torch.int64,
                                               device=comm), group).cpu().numpy()
    if table[:, 0].any():
        _comm.raise_agreed(error, table[:, 0].tolist(), OP, group, comm)
    for column, name in ((3, "match"), (4, "leave_one_out"), (5, "min_support"), (6, "empty_value")):
        if len(set(table[:, column])) > 1:
            raise ValueError(f"{OP}: {name} must be the same on every rank")

    all_rows = _comm.all_gather_ragged(rows, table[:, 1].tolist(), group)
    all_keys = _comm.all_gather_ragged(keys.to(comm), table[:, 2].tolist(), group)
    local_groups = group_ids.to(comm, torch.int64)
    peers, peer_keys = [], []
    for r in range(size):
        if r == rank or not len(all_rows[r]):
            continue
        wanted = torch.isin(all_rows[r][:, 0], local_groups)
        peers.append(all_rows[r][wanted])
        take = torch.repeat_interleave(wanted, all_rows[r][:, 1], output_size=len(all_keys[r]))
        peer_keys.append(all_keys[r][take])
    b, t = shape
    if not peers or sum(len(p) for p in peers) == 0:
        return _numca_values((end, key, None, None), returns, group_ids, mask, match=match,
                             leave_one_out=leave_one_out, min_support=min_support, empty_value=empty_value,
                             backend=backend, validate=False)
    peers = torch.cat(peers).to(device)
    peer_keys = torch.cat(peer_keys).to(device)
    lengths = peers[:, 1]
    width = max(t, int(lengths.max()) if len(lengths) else 0, 1)
    slots = torch.arange(width, device=device)[None, :] < lengths[:, None]   # [p, width]: the peer's numbers
    p = peers.shape[0]
    all_end = torch.zeros((b + p, width), dtype=torch.bool, device=device)
    all_key = torch.zeros((b + p, width), dtype=torch.int64, device=device)
    all_mask = torch.zeros((b + p, width), dtype=torch.bool, device=device)
    all_end[:b, :t], all_key[:b, :t], all_mask[:b, :t] = end, key, mask
    all_end[b:], all_mask[b:] = slots, slots
    all_key[b:][slots] = peer_keys
    all_returns = torch.cat([returns.detach().to(device, torch.float64), peers[:, 2].view(torch.float64)])
    all_groups = torch.cat([group_ids.to(device, torch.int64), peers[:, 0]])
    values = _numca_values((all_end, all_key, None, None), all_returns, all_groups, all_mask, match=match,
                           leave_one_out=leave_one_out, min_support=min_support, empty_value=empty_value,
                           backend=backend, validate=False)
    return values[:b, :t].contiguous()


__all__ = ["numca_values"]
