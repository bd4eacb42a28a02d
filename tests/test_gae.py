import math

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels.gae.reference import reverse_linear_scan
from oracles import gae_oracle


def right_padded_mask(batch, length, holes=True):
    lengths = torch.randint(0, length + 1, (batch,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if holes:  # multi-turn: observation tokens inside the response are masked out
        mask &= torch.rand(batch, length) > 0.2
    return mask


def check(rewards, values, mask, gamma, lam, **kw):
    adv, ret = sk.gae(rewards, values, mask, gamma=gamma, lam=lam, **kw)
    want_adv, want_ret = gae_oracle(rewards, values, mask, gamma, lam)
    length = rewards.shape[1]
    assert adv.shape == ret.shape == rewards.shape
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    if rewards.numel() == 0:
        return
    bound = 1e-5 * (1 + float(want_adv.abs().max())) * math.log2(length + 1)
    assert (adv.double() - want_adv).abs().max() <= bound
    # returns = adv + values, rounded once more to float32
    assert (ret.double() - want_ret).abs().max() <= bound + 1e-7 * float(want_ret.abs().max())


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0), (1.0, 0.0)])
def test_random_masks_match_loop(seed, gamma, lam, backend):
    batch, length = int(torch.randint(1, 9, ())), int(torch.randint(2, 300, ()))
    mask = right_padded_mask(batch, length)
    check(torch.randn(batch, length), torch.randn(batch, length), mask, gamma, lam, backend=backend)


def test_outcome_reward_on_last_token(seed, backend):
    batch, length = 5, 257
    mask = right_padded_mask(batch, length, holes=False)
    rewards = torch.zeros(batch, length)
    last = (mask.sum(1) - 1).clamp_min(0)
    rewards[torch.arange(batch), last] = torch.randn(batch)
    check(rewards, torch.randn(batch, length), mask, 1.0, 0.95, backend=backend)


def test_one_step_and_all_masked_rows(seed, backend):
    check(torch.randn(4, 1), torch.randn(4, 1), torch.tensor([[True], [False], [True], [False]]), 0.9, 0.9,
          backend=backend)
    check(torch.randn(3, 17), torch.randn(3, 17), torch.zeros(3, 17, dtype=torch.bool), 1.0, 1.0, backend=backend)


@pytest.mark.parametrize("length", [4096, 32768])
def test_long_rows(seed, length, backend):
    mask = right_padded_mask(2, length)
    check(torch.randn(2, length), torch.randn(2, length), mask, 1.0, 1.0, backend=backend)
    check(torch.randn(2, length), torch.randn(2, length), mask, 0.999, 0.97, backend=backend)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_numeric_masks_and_low_precision_inputs(seed, mask_dtype, backend):
    mask = right_padded_mask(3, 45).to(mask_dtype)
    check(torch.randn(3, 45).bfloat16(), torch.randn(3, 45).half(), mask, 0.95, 0.9, backend=backend)


def test_non_contiguous_inputs(seed, backend):
    rewards = torch.randn(40, 6).T
    values = torch.randn(6, 80)[:, ::2]
    mask = right_padded_mask(40, 6).T
    check(rewards, values, mask, 0.9, 0.8, backend=backend)


def test_empty_batch(backend):
    adv, ret = sk.gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), backend=backend)
    assert adv.shape == ret.shape == (0, 5)
    adv, ret = sk.gae(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), backend=backend)
    assert adv.shape == ret.shape == (3, 0)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 257])
def test_linear_scan_matches_loop(seed, length):
    a, b = torch.rand(3, length, dtype=torch.float64), torch.randn(3, length, dtype=torch.float64)
    a[a < 0.1] = 0.0  # exact zeros cut the recurrence
    want = torch.zeros(3, length, dtype=torch.float64)
    carry = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(length)):
        carry = a[:, t] * carry + b[:, t]
        want[:, t] = carry
    torch.testing.assert_close(reverse_linear_scan(a, b), want, rtol=1e-12, atol=1e-12)


def whiten_oracle(x, mask):
    vals = [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return (x.double() - mean) / math.sqrt(var + 1e-8), mean


def test_masked_whiten(seed):
    x = torch.randn(6, 33) * 5 + 3
    mask = right_padded_mask(6, 33)
    mask[0, :2] = True
    want, mean = whiten_oracle(x, mask)
    torch.testing.assert_close(sk.masked_whiten(x, mask).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sk.masked_whiten(x, mask.float(), shift_mean=False).double(), want + mean,
                               rtol=1e-5, atol=1e-5)


def test_masked_whiten_needs_two_elements():
    with pytest.raises(ValueError, match="mask"):
        sk.masked_whiten(torch.randn(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_values_small_advantages(seed, offset, backend):
    """|values| >> |advantages|: each step's delta must not round at ulp(|v|) (errors would add up)."""
    batch, length = 3, 4096
    values = offset + torch.randn(batch, length)
    rewards = torch.randn(batch, length) * 0.01
    mask = right_padded_mask(batch, length)
    check(rewards, values, mask, 1.0, 1.0, backend=backend)
    check(rewards, values, mask, 0.99, 0.95, backend=backend)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.0, 0.5)])
def test_nonfinite_inputs_poison_exactly_their_dependents(seed, poison, gamma, lam, backend):
    """docs/CONTRACT.md "Common rules" (tests/nonfinite_cases.py): a NaN/inf reward or value at t makes
    adv/returns of its row at positions <= t non-finite, as the trainers' loop does; nothing else."""
    from nonfinite_cases import check_gae_nonfinite, gae_poison_case

    clean, poisoned, bad = gae_poison_case(poison)
    out = sk.gae(*poisoned, gamma=gamma, lam=lam, backend=backend)
    check_gae_nonfinite(out, clean, bad, gamma, lam, poison)


def float64_critic_case(length, batch=2):
    """Outcome rewards of magnitude 1e3 and float64 values of a good critic (returns-to-go + 1e-3 noise):
    advantages are small, so the §3 bound is tight while |values| ~ 1e3."""
    mask = right_padded_mask(batch, length)
    mask[:, : length // 2] = True
    rewards = torch.zeros(batch, length)
    last = length - 1 - torch.argmax(mask.flip(1).to(torch.int8), dim=1)
    rewards[torch.arange(batch), last] = 1e3 + torch.rand(batch) * 100
    values = rewards.double().flip(1).cumsum(1).flip(1) + 1e-3 * torch.randn(batch, length, dtype=torch.float64)
    return rewards, values, mask


def test_float64_values_telescope(seed, backend):
    """Issue 20 item 3: float64 values of magnitude 1e3, T=4096, gamma=lam=1. delta must use v[t] and
    v[t+1] at the same precision; v[t] in float64 with v[t+1] rounded to float32 missed the bound 16x."""
    rewards, values, mask = float64_critic_case(4096)
    check(rewards, values, mask, 1.0, 1.0, backend=backend)
