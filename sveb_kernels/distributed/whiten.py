"""masked_whiten over ranks: two all_reduces (count and sum, then the sum of squared deviations from the
global mean, in float64), so the result equals `sveb_kernels.masked_whiten` on all ranks' elements."""

from __future__ import annotations

import torch
from torch import Tensor

from ..gae import check_whiten_arguments
from . import _comm

OP = "sveb_kernels.distributed.masked_whiten"


def masked_whiten(x: Tensor, mask: Tensor, *, group=None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with the masked mean and unbiased masked variance of all ranks'
    elements where mask is nonzero (docs/CONTRACT.md §3 and §4); every position of this rank's x is
    whitened, as `sveb_kernels.masked_whiten` does. Every rank of `group` must call it; a rank may hold
    no valid element. Raises ValueError on every rank when fewer than 2 elements are valid in total."""
    rank, size = _comm.world(group)
    comm = _comm.device(group)
    error = None
    try:
        shift_mean, eps = check_whiten_arguments(x, mask, shift_mean=shift_mean, eps=eps)
        m = mask.to(torch.float64)
        xf = x.detach().to(torch.float64)
        stats = torch.stack([m.sum(), (xf * m).sum()]).to(comm)
    except Exception as exc:   # noqa: BLE001 - re-raised below, on every rank
        error, stats = exc, torch.zeros(2, dtype=torch.float64, device=comm)
    # The error flag rides along with the sums, so the happy path costs no extra collective.
    summed = _comm.all_reduce_sum(torch.cat([torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64,
                                                          device=comm), stats]), group).cpu()
    if summed[0] > 0:
        codes = _comm.all_gather_rows(torch.tensor([_comm.error_code(error)], device=comm), group)
        _comm.raise_agreed(error, codes.cpu().reshape(-1).tolist(), OP, group, comm)
    count, total = float(summed[1]), float(summed[2])
    if count < 2:
        raise ValueError(f"{OP}: mask must select at least 2 elements over all ranks to whiten, got {count:g}")
    mean = total / count
    squares = _comm.all_reduce_sum(((xf - mean) ** 2 * m).sum().reshape(1).to(comm), group)
    var = float(squares.cpu()[0]) / (count - 1)
    whitened = (xf - mean) * (var + eps) ** -0.5
    if not shift_mean:
        whitened = whitened + mean
    return whitened.to(x.dtype)
