"""Per-token advantages from an estimator's values, and the one scaling rule every trainer
integration uses for them (docs/DESIGN.md, "Token-advantage scaling").

GRPO gives rollout b of group g the advantage (R_b - mean_g) / (std + eps): the group mean is the
baseline, the std (of the group, or of the batch) the unit, and a group whose returns are all
equal gets no signal (R_b - mean_g = 0). Token-level advantages keep all three properties:

1. Centre and scale the *inputs*, not the output: with c_b the mean return of b's group and d_b
   the divisor (std + eps, or 1 without scaling), the advantages are computed over the returns
   (R - c) / d and the values (V - c) / d. For A_t = R - V(s_t), and for GAE with gamma = 1, this is
   exactly (R - V) / d, GRPO's division. For GAE with gamma < 1 it removes the drift
   (gamma - 1) * c that a constant return level leaves in every delta (V_{t+1} and V_t are both
   about c): dividing that drift by a small std amplified it without bound (1e3 in one step of
   an all-equal group); centred, every term is a difference of returns of the group, so the
   scaled advantages are in units of the group's spread.
2. A group whose scorable returns are all equal (max == min; a lone rollout is such a group) has
   no signal: its token advantages are exactly 0, in every mode, scaling and with whitening -
   never a value divided by a zero (plus epsilon) std. A rollout whose return is NaN (TRL's
   unscorable completion) has advantage 0 and is left out of its group's statistics.
3. Whitening (an explicit option, PPO's convention) whitens over the tokens of the rollouts that
   have signal; the others stay 0.

`lone_rollout="unscaled"` follows verl's GRPO instead for a group of one rollout: mean 0, std 1,
so the rollout keeps its plain advantage R - V.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _checks

ADVANTAGE_MODES = ("r_minus_v", "gae")
SCALINGS = ("group", "batch", "none")
LONE_ROLLOUT = ("no_signal", "unscaled")


class GroupScale(NamedTuple):
    """Per rollout [B]: the baseline `center`, the `divisor` and whether the rollout has `signal`."""

    center: Tensor
    divisor: Tensor
    signal: Tensor


def group_scale(returns: Tensor, group_index: Tensor, *, scale: str = "group", eps: float = 1e-4,
                lone_rollout: str = "no_signal") -> GroupScale:
    """GRPO's statistics of each rollout's group (rule 1-2 of the module docstring), float64.

    Args:
        returns: [B] float, each rollout's return; NaN for an unscorable rollout (no signal, left
            out of the means and stds, as TRL's nanmean / nanstd leave it out).
        group_index: [B] int, the group (prompt) of each rollout; groups need not be contiguous.
        scale: "group" (std of the group), "batch" (std of all returns) or "none" (divisor 1).
        eps: added to the std (TRL 1e-4, verl 1e-6).
        lone_rollout: "no_signal" (TRL: a group of one is all-equal) or "unscaled" (verl: mean 0, std 1).
    """
    _checks.tensor("returns", returns, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("group_index", group_index, dtypes=_checks.INT_DTYPES, shape=tuple(returns.shape),
                   device=returns.device)
    if scale not in SCALINGS:
        raise ValueError(f"scale must be one of {SCALINGS}, got {scale!r}")
    if lone_rollout not in LONE_ROLLOUT:
        raise ValueError(f"lone_rollout must be one of {LONE_ROLLOUT}, got {lone_rollout!r}")
    r = returns.detach().to(torch.float64)
    scored = ~torch.isnan(r)
    _, slot = torch.unique(group_index, return_inverse=True)
    groups = int(slot.max()) + 1 if slot.numel() else 0
    x = torch.where(scored, r, 0.0)
    count = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, slot, scored.double())
    mean = torch.zeros_like(count).index_add_(0, slot, x) / count.clamp_min(1)
    sq = torch.where(scored, (r - mean[slot]) ** 2, 0.0)
    var = torch.zeros_like(count).index_add_(0, slot, sq) / (count - 1).clamp_min(1)
    high = torch.full_like(count, -torch.inf).scatter_reduce(0, slot, torch.where(scored, r, -torch.inf), "amax")
    low = torch.full_like(count, torch.inf).scatter_reduce(0, slot, torch.where(scored, r, torch.inf), "amin")
    # All scorable returns equal (this includes a lone rollout and an all-NaN group): no signal.
    flat = ~(high > low)
    center, divisor = mean[slot], torch.ones_like(r)
    if scale == "group":
        divisor = var.sqrt()[slot] + eps
    elif scale == "batch":
        n = int(scored.sum())
        batch_std = (torch.where(scored, r - x.sum() / max(n, 1), 0.0).pow(2).sum() / max(n - 1, 1)).sqrt()
        divisor = (batch_std + eps).expand_as(r)
    signal = scored & ~flat[slot]
    if lone_rollout == "unscaled":
        lone = (count == 1)[slot] & scored
        center, divisor = torch.where(lone, 0.0, center), torch.where(lone, 1.0, divisor)
        signal = signal | lone
    return GroupScale(center, divisor, signal)


def advantages_from_values(values: Tensor, returns: Tensor, mask: Tensor, *, mode: str = "r_minus_v",
                           gamma: float = 1.0, lam: float = 1.0, whiten: bool = False,
                           group_index: Optional[Tensor] = None, scale: str = "none", eps: float = 1e-4,
                           lone_rollout: str = "no_signal", scaling: Optional[GroupScale] = None,
                           backend: str = "auto") -> Tensor:
    """[B, T] float32 advantages of the response tokens; 0 where `mask` is False.

    Args:
        values: [B, T] float, V(s_t) aligned with the tokens: the value of the state *before*
            token t (the state the policy acted in).
        returns: [B] float, each rollout's outcome return (the reward of its last token), or
            [B, T] per-token rewards (the row sum is the rollout's return).
        mask: [B, T] bool or 0/1, the response tokens.
        mode: "r_minus_v": A_t = G_t - V(s_t), with G_t the undiscounted reward-to-go (R for an
            outcome reward); "gae": `sveb_kernels.gae` over the values with `gamma`, `lam`
            (gamma = lam = 1 gives exactly "r_minus_v").
        whiten: `sveb_kernels.masked_whiten` over the valid tokens (of the rollouts with signal
            when `group_index` is given) instead of dividing by the `scale` std.
        group_index: [B] int, each rollout's group. Given, the module's scaling rule applies:
            advantages over returns and values centred on the group mean and divided by the
            `scale` std plus `eps` (not with `whiten`); all-equal groups and NaN returns get 0.
            None: plain advantages, no centring, no scaling (NaN returns are then an error).
        scale, eps, lone_rollout: see `group_scale`.
        scaling: the `group_scale` result to use instead of computing it from `group_index`
            (a trainer that computes GRPO's statistics itself passes its own numbers, so the
            `group_mean` estimator reproduces the trainer's GRPO to the bit).
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
    signal = None
    if group_index is not None or scaling is not None:
        totals = rewards.sum(dim=1) if returns.dim() == 2 else returns.detach()
        if returns.dim() == 2:  # a NaN anywhere in a row's rewards makes its return NaN
            totals = torch.where(torch.isnan(returns.detach()).any(dim=1), torch.nan, totals)
        stats = scaling if scaling is not None else group_scale(
            totals, group_index.to(device), scale="none" if whiten else scale, eps=eps, lone_rollout=lone_rollout)
        signal = stats.signal.to(device)
        if whiten and scaling is not None:  # whitening replaces the division
            stats = stats._replace(divisor=torch.ones_like(stats.divisor))
        center = torch.where(signal, stats.center.to(device), 0.0).to(torch.float32)
        divisor = torch.where(signal, stats.divisor.to(device), 1.0).to(torch.float32)
        rewards = torch.nan_to_num(rewards, nan=0.0)
        rewards = (rewards - center[:, None] * _last_token(valid)) / divisor[:, None]
        values = (values - center[:, None]) / divisor[:, None]
        valid_signal = valid & signal[:, None]
    else:
        valid_signal = valid
    if mode == "gae":
        from ..gae import gae

        advantages, _ = gae(rewards, values.masked_fill(~valid, 0.0), valid, gamma=gamma, lam=lam, backend=backend)
    else:
        reward_to_go = rewards.flip(1).cumsum(1).flip(1)
        advantages = reward_to_go - values
    advantages = advantages.masked_fill(~valid_signal, 0.0)
    if whiten:
        from ..gae import masked_whiten

        if int(valid_signal.sum()) >= 2:
            advantages = masked_whiten(advantages, valid_signal)
        advantages = advantages.masked_fill(~valid_signal, 0.0)
    return advantages


def _last_token(valid: Tensor) -> Tensor:
    """[B, T] float: 1 at each row's last valid token."""
    length = valid.shape[1]
    any_valid = valid.any(dim=1)
    last = length - 1 - valid.flip(1).to(torch.int8).argmax(dim=1)
    onehot = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    onehot.scatter_(1, last[:, None], any_valid.to(torch.float32)[:, None])
    return onehot


def _token_rewards(returns: Tensor, valid: Tensor) -> Tensor:
    """[B] outcome returns -> [B, T] rewards on each row's last valid token."""
    if returns.dim() == 2:
        return returns.masked_fill(~valid, 0.0)
    # where, not a product: a NaN return stays on its row's last token only
    return torch.where(_last_token(valid) > 0, returns[:, None], 0.0)
