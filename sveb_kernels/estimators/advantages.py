"""Per-token advantages from an estimator's values."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks

ADVANTAGE_MODES = ("r_minus_v", "gae")


def advantages_from_values(values: Tensor, returns: Tensor, mask: Tensor, *, mode: str = "r_minus_v",
                           gamma: float = 1.0, lam: float = 1.0, whiten: bool = False,
                           backend: str = "auto") -> Tensor:
    """[B, T] float32 advantages of the response tokens; 0 where `mask` is False.

    Args:
        values: [B, T] float, V(s_t) aligned with the tokens: the value of the state *before*
            token t (the state the policy acted in).
        returns: [B] float, each rollout's outcome return (the reward of its last token), or
            [B, T] per-token rewards.
        mask: [B, T] bool or 0/1, the response tokens.
        mode: "r_minus_v": A_t = G_t - V(s_t), with G_t the undiscounted reward-to-go (R for an
            outcome reward); "gae": `sveb_kernels.gae` over the values with `gamma`, `lam`
            (gamma = lam = 1 gives exactly "r_minus_v").
        whiten: `sveb_kernels.masked_whiten` over the valid tokens of the batch.
    """
    _checks.tensor("values", values, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    shape, device = tuple(values.shape), values.device
    _checks.tensor("mask", mask, shape=shape, device=device)
    _checks.tensor("returns", returns, dtypes=_checks.FLOAT_DTYPES, device=device)
    if tuple(returns.shape) not in (shape[:1], shape):
        raise ValueError(f"returns must have shape [B={shape[0]}] or [B, T]={list(shape)}, got {list(returns.shape)}")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    valid = mask.to(torch.bool)
    values = values.detach().to(torch.float32)
    rewards = _token_rewards(returns.detach().to(torch.float32), valid)
    if mode == "gae":
        from ..gae import gae

        advantages, _ = gae(rewards, values, valid, gamma=gamma, lam=lam, backend=backend)
    else:
        reward_to_go = rewards.flip(1).cumsum(1).flip(1)
        advantages = reward_to_go - values
    advantages = advantages.masked_fill(~valid, 0.0)
    if whiten:
        from ..gae import masked_whiten

        advantages = masked_whiten(advantages, valid).masked_fill(~valid, 0.0)
    return advantages


def _token_rewards(returns: Tensor, valid: Tensor) -> Tensor:
    """[B] outcome returns -> [B, T] rewards on each row's last valid token."""
    if returns.dim() == 2:
        return returns.masked_fill(~valid, 0.0)
    rewards = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    length = valid.shape[1]
    last = torch.where(valid.any(dim=1), length - 1 - valid.flip(1).to(torch.int8).argmax(dim=1), 0)
    rewards.scatter_(1, last[:, None], torch.where(valid.any(dim=1), returns, 0.0)[:, None])
    return rewards

