"""Argument checks shared by the public functions: cheap metadata checks that raise a
ValueError/TypeError naming the argument, and the opt-in full-tensor scans (validate=True)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
INT64_MAX = torch.iinfo(torch.int64).max


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, x, *, ndim: Optional[int] = None, dtypes=None, shape=None, device=None) -> Tensor:
    """Checks one tensor argument; `shape` entries of None match any size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {x.dtype}")
    if shape is not None and (
        len(shape) != x.dim() or any(s is not None and s != n for s, n in zip(shape, x.shape))
    ):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {x.device}")
    return x


def finite_float(name: str, x, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False) -> float:
    # numbers.Real: trainers pass numpy scalars (np.float32 from configs) as often as Python floats.
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if low is not None and (x <= low if low_open else x < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {x}")
    if high is not None and x > high:
        raise ValueError(f"{name} must be <= {high}, got {x}")
    return x


def real(name: str, x) -> float:
    """Python and NumPy reals (not bools) that fit a float64; inf and NaN are allowed (fill values)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{name} must fit in a float64, got {x}") from None


def integer(name: str, x, *, low: int) -> int:
    """Python and NumPy integers (not bools), in [low, int64 max]: ops pass them as int64."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if not low <= x <= INT64_MAX:
        raise ValueError(f"{name} must be an int in [{low}, {INT64_MAX}], got {x}")
    return x


def flag(name: str, x) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def choice(name: str, x, options: tuple[str, ...]) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a str, got {type(x).__name__}")
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
    return x


def stream_capturing() -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph (reading a tensor on
    the host is then an error, not just a synchronisation)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def is_tracing() -> bool:
    """Data-dependent checks read tensor values on the host: under torch.compile they would break the
    graph, under CUDA-graph capture they are illegal. Both skip them (the eager warm-up run that
    every capture needs has checked the same inputs' shapes and, usually, values)."""
    return torch.compiler.is_compiling() or stream_capturing()


def validate_requested(validate: Optional[bool]) -> bool:
    if validate is None:
        validate = os.environ.get("SVEB_VALIDATE", "0").strip().lower() in ("1", "true", "yes", "on")
    return bool(validate) and not is_tracing()


def all_finite(name: str, x: Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def group_offsets(name: str, offsets: Tensor, n: int, device) -> Tensor:
    """[G+1] integer offsets, 0 = o_0 <= ... <= o_G = n (checked on the host: G+1 numbers are cheap)."""
    tensor(name, offsets, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if offsets.numel() < 1:
        raise ValueError(f"{name} must have G+1 >= 1 entries, got an empty tensor")
    if not is_tracing():
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0 or last != n:
            raise ValueError(f"{name} must start at 0 and end at N={n}, got {first} ... {last}")
        if offsets.numel() > 1 and not bool((offsets[1:] >= offsets[:-1]).all()):
            raise ValueError(f"{name} must be non-decreasing")
    return offsets
