"""The few collectives the distributed ops use, all of them ones NCCL and gloo both implement
(all_gather_into_tensor, all_to_all_single, all_reduce) on tensors of the communication device, and
the error agreement that makes every rank raise the same exception instead of leaving the others
waiting in a collective.

`traffic` counts the bytes this process sent to *other* ranks since `reset_traffic()` (the part of an
all_to_all addressed to itself is a local copy, not traffic); the benchmark reads it.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Bytes of an error message that travel (UTF-8, cut at this length); the error path is the only one
# that pays for them.
MESSAGE_BYTES = 480
_ERROR_TYPES = {1: ValueError, 2: TypeError, 3: RuntimeError}

traffic = {"bytes_sent": 0, "collectives": 0}


def reset_traffic() -> None:
    traffic["bytes_sent"] = 0
    traffic["collectives"] = 0


def _count(nbytes: int) -> None:
    traffic["bytes_sent"] += int(nbytes)
    traffic["collectives"] += 1


def world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sveb_kernels.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group); use the sveb_kernels ops for one process")
    return dist.get_rank(group), dist.get_world_size(group)


def device(group) -> torch.device:
    """Where the collectives' tensors live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Collective all_gather_into_tensor is being renamed all_gather_single; use whichever exists without warnings.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(x: Tensor, group) -> Tensor:
    """[k, ...] on every rank -> [W, k, ...] (k equal on all ranks)."""
    rank, size = world(group)
    x = x.contiguous()
    # Flat in and out: the layout every backend accepts (gloo rejects a stacked [W, ...] output).
    out = torch.empty(size * x.numel(), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.reshape(-1), group=group)
    _count(x.numel() * x.element_size() * (size - 1))
    return out.view((size,) + tuple(x.shape))


def all_gather_ragged(x: Tensor, lengths: Sequence[int], group) -> list[Tensor]:
    """x [lengths[rank], ...] on each rank -> the list of every rank's x (padded to the longest in transit)."""
    rank, size = world(group)
    longest = max(lengths) if len(lengths) else 0
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather_rows(padded, group)
    return [gathered[r, : lengths[r]] for r in range(size)]


def all_to_all(send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group) -> Tensor:
    """Rows send[...] in rank order, send_counts[r] of them to rank r; returns the received rows."""
    rank, size = world(group)
    recv = send.new_empty((int(sum(recv_counts)),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), [int(c) for c in recv_counts], [int(c) for c in send_counts],
                           group=group)
    row_bytes = send.element_size() * int(torch.tensor(send.shape[1:]).prod())
    _count((int(sum(send_counts)) - int(send_counts[rank])) * row_bytes)
    return recv


def all_reduce_sum(x: Tensor, group) -> Tensor:
    rank, size = world(group)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    # A ring all-reduce sends about 2 (W-1)/W of the buffer from each rank.
    _count(2 * x.numel() * x.element_size() * (size - 1) // max(size, 1))
    return x


def error_code(error: Optional[BaseException]) -> int:
    if error is None:
        return 0
    for code, kind in _ERROR_TYPES.items():
        if isinstance(error, kind):
            return code
    return 3


def raise_agreed(error: Optional[BaseException], codes: Sequence[int], op: str, group, comm_device) -> None:
    """Every rank calls this once `codes` (each rank's error_code, known to all) has a nonzero entry: the
    failing ranks' messages are exchanged and all ranks raise the same exception, that of the lowest
    failing rank, naming it."""
    rank, size = world(group)
    text = b"" if error is None else str(error).encode("utf-8", "replace")[:MESSAGE_BYTES]
    message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    message[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    messages = all_gather_rows(message.to(comm_device), group).cpu()
    first = next(r for r in range(size) if codes[r])
    received = bytes(messages[first].tolist()).rstrip(b"\0").decode("utf-8", "replace")
    failing = [r for r in range(size) if codes[r]]
    raise _ERROR_TYPES.get(int(codes[first]), RuntimeError)(
        f"{op}: {received} (on rank {first}{'' if len(failing) == 1 else f' and {len(failing) - 1} more'}; "
        f"every rank of the process group raises this error)")


def float_bits(x: float) -> int:
    """A float64's bits as an int64, so options travel exactly (NaN and -0.0 included) in int64 headers."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]
