"""Assertions shared by the CUDA backend tests and the CPU emulation of its kernels: results against
the float64 oracles of tests/oracles.py, with the docs/CONTRACT.md bounds."""

import math

import numpy as np
import torch

from oracles import gae_oracle, hista_oracle


def check_hista_against(values, lse, want_values, want_lse, returns, empty_value=0.0):
    """|values error| <= 1e-4 * max|returns| (the fp32 bound), rows without keys exactly
    (empty_value, -inf), lse within 1e-5 relative, never NaN."""
    values, lse = values.detach().cpu(), lse.detach().cpu()
    want_values, want_lse = want_values.detach().cpu(), want_lse.detach().cpu()
    assert values.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(values).any() and not torch.isnan(lse).any()
    bound = 1e-4 * max(float(returns.abs().max()), 1e-30)
    err = float((values.double() - want_values).abs().max())
    assert err <= bound, f"values error {err} > {bound}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with/without keys differ from the oracle"
    assert (lse[~finite] == -math.inf).all()
    assert (values[~finite] == np.float32(empty_value)).all()
    if finite.any():
        lse_err = (lse.double()[finite] - want_lse[finite]).abs() / want_lse[finite].abs().clamp_min(1.0)
        assert float(lse_err.max()) <= 1e-5, f"lse error {float(lse_err.max())}"


def check_hista(values, lse, hidden, returns, rollout_ids, offsets, **kw):
    """Against the loop oracle. The fp32 bound holds for 16-bit inputs too: their products are exact in
    fp32 and the oracle sees the same rounded hidden states (stricter than §1's 2x-plain-PyTorch)."""
    want_values, want_lse = hista_oracle(hidden, returns, rollout_ids, offsets, **kw)
    check_hista_against(values, lse, want_values, want_lse, returns, kw.get("empty_value", 0.0))


def check_gae(adv, ret, rewards, values, mask, gamma, lam):
    want_adv, want_ret = gae_oracle(rewards, values, mask, gamma, lam)
    adv, ret = adv.detach().cpu(), ret.detach().cpu()
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.shape == ret.shape == tuple(rewards.shape)
    if rewards.numel() == 0:
        return
    bound = 1e-5 * (1 + float(want_adv.abs().max())) * math.log2(rewards.shape[1] + 1)
    assert float((adv.double() - want_adv).abs().max()) <= bound
    assert float((ret.double() - want_ret).abs().max()) <= bound + 1e-7 * float(want_ret.abs().max())
