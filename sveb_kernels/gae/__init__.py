"""GAE: generalised advantage estimation as one fused scan (docs/CONTRACT.md §3), and `masked_whiten`.

Exactly the recurrence LLM RL trainers (verl, TRL, OpenRLHF) run as a Python loop over tokens,
masked positions skipped:

    nextv = 0; last = 0
    for t = T-1 .. 0:
        delta = r[:,t] + gamma*nextv - v[:,t]
        cand  = delta + gamma*lam*last
        nextv = v[:,t]*m[:,t] + (1-m[:,t])*nextv
        last  = cand*m[:,t]  + (1-m[:,t])*last
        adv[:,t] = last
    returns = adv + v

Note that a masked position gets the advantage carried from the next valid one (as in that loop);
multiply by the mask if you want zeros there. Files: `reference.py` (parallel scan in PyTorch),
`triton.py` (blocked scan kernel for CUDA tensors), `cuda.py` (the compiled kernel of csrc/gae.cu).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _ops
from . import reference as _reference

_backend.register("gae", "reference", lambda: _reference.gae)
_backend.register("gae", "triton", lambda: importlib.import_module(".triton", __name__).gae)
_backend.register("gae", "cuda", lambda: importlib.import_module(".cuda", __name__).gae)
_backend.register("gae", "cpp", lambda: importlib.import_module(".cpp", __name__).gae)

_MASK_DTYPES = (torch.bool,) + _checks.INT_DTYPES + _checks.FLOAT_DTYPES


def check_arguments(rewards, values, mask, *, gamma, lam, validate) -> tuple[float, float]:
    """The argument checks of gae, the one home that `gae` and the estimators (through it) call.
    Returns the normalised (gamma, lam)."""
    _checks.tensor("rewards", rewards, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    shape, device = tuple(rewards.shape), rewards.device
    _checks.tensor("values", values, dtypes=_checks.FLOAT_DTYPES, shape=shape, device=device)
    _checks.tensor("mask", mask, dtypes=_MASK_DTYPES, shape=shape, device=device)
    gamma = _checks.finite_float("gamma", gamma, low=0.0, high=1.0)
    lam = _checks.finite_float("lam", lam, low=0.0, high=1.0)
    if _checks.validate_requested(validate):
        _checks.all_finite("rewards", rewards)
        _checks.all_finite("values", values)
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1")
    return gamma, lam


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns by the docs/CONTRACT.md §3 recurrence, computed as a parallel scan.

    Args:
        rewards: [B, T] float, per-token rewards (outcome reward usually on the last valid token).
        values: [B, T] float, the critic's (or Hista's / Numca's) value estimates.
        mask: [B, T] bool, or 0/1 of an integer or float dtype; nonzero = a response token.
        gamma, lam: discount and GAE lambda, each in [0, 1].
        backend: "auto" (SVEB_BACKEND, else the fastest for the device), "reference", "triton", "cuda", "cpp".
        validate: also check that rewards/values are finite and the mask is 0/1 (default: SVEB_VALIDATE=1).

    Returns:
        (advantages [B, T] float32, returns [B, T] float32), returns = advantages + values; no gradient.
    """
    gamma, lam = check_arguments(rewards, values, mask, gamma=gamma, lam=lam, validate=validate)
    device = rewards.device
    backend = _backend.resolve("gae", backend, device)
    # Detached: advantages and value targets are constants of the policy loss; the op has no gradient.
    return _ops.gae(rewards.detach(), values.detach(), mask, gamma, lam, backend)


def check_whiten_arguments(x, mask, *, shift_mean, eps) -> tuple[bool, float]:
    """The argument checks of masked_whiten, the one home of it and `distributed.masked_whiten`."""
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("mask", mask, dtypes=_MASK_DTYPES, shape=tuple(x.shape), device=x.device)
    return _checks.flag("shift_mean", shift_mean), _checks.finite_float("eps", eps, low=0.0)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the positions where mask is nonzero (the usual PPO advantage
    normalisation): masked mean, unbiased masked variance. Like verl/TRL, every position of the
    result is whitened, masked ones included. With shift_mean=False the mean is added back.

    Raises ValueError if fewer than 2 positions are valid (the unbiased variance is undefined).
    """
    shift_mean, eps = check_whiten_arguments(x, mask, shift_mean=shift_mean, eps=eps)
    m = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    xf = x.to(m.dtype)
    count = m.sum()
    if not _checks.is_tracing() and float(count) < 2:
        raise ValueError(f"mask must select at least 2 elements to whiten, got {float(count):g}")
    mean = (xf * m).sum() / count
    var = ((xf - mean) ** 2 * m).sum() / (count - 1)
    whitened = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.to(x.dtype)
