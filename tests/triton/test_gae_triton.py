"""The Triton GAE kernel against the float64 trainer loop (tests/oracles.py), docs/CONTRACT.md §3 accuracy bound.

Without a GPU: CPU tensors under TRITON_INTERPRET=1; on a GPU machine the same cases run compiled,
and the tests marked `gpu` add the real sizes (T = 32k rows, B = 64).
"""

import math
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: oracles and shared helpers

import sveb_kernels as sk  # noqa: E402
from oracles import gae_oracle  # noqa: E402
from test_gae import float64_critic_case, right_padded_mask  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def check(rewards, values, mask, gamma, lam, block_t=None):
    """Runs the triton backend on DEVICE and compares with the loop within the §3 bound."""
    args = [t.to(DEVICE) for t in (rewards, values, mask)]
    if block_t is None:
        adv, ret = sk.gae(*args, gamma=gamma, lam=lam, backend="triton")
    else:
        from sveb_kernels.gae import triton as gae_triton
        adv, ret = gae_triton.gae(*args, gamma, lam, block_t=block_t)
    assert adv.device.type == DEVICE and adv.dtype == ret.dtype == torch.float32
    assert adv.shape == ret.shape == rewards.shape
    if rewards.numel() == 0:
        return
    want_adv, want_ret = gae_oracle(rewards, values, mask, gamma, lam)
    bound = 1e-5 * (1 + float(want_adv.abs().max())) * math.log2(rewards.shape[1] + 1)
    err = (adv.cpu().double() - want_adv).abs().max()
    assert err <= bound, (err, bound)
    assert (ret.cpu().double() - want_ret).abs().max() <= bound + 1e-7 * float(want_ret.abs().max())


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0), (1.0, 0.0)])
def test_random_masks_match_loop(seed, gamma, lam):
    batch, length = int(torch.randint(1, 5, ())), int(torch.randint(2, 200, ()))
    mask = right_padded_mask(batch, length)
    check(torch.randn(batch, length), torch.randn(batch, length), mask, gamma, lam)


@pytest.mark.parametrize("block_t", [16, 64])
def test_many_chunks_carry_state_across(seed, block_t):
    """Small chunks: nextv and the advantage must cross many chunk borders, also over masked runs."""
    batch, length = 3, int(torch.randint(150, 260, ()))
    mask = right_padded_mask(batch, length)
    mask[0, 40:140] = False  # a masked run longer than a chunk
    check(torch.randn(batch, length), torch.randn(batch, length) * 3, mask, 0.97, 0.9, block_t=block_t)
    check(torch.randn(batch, length), torch.randn(batch, length), mask, 1.0, 1.0, block_t=block_t)


def test_outcome_reward_on_last_token(seed):
    batch, length = 4, 257
    mask = right_padded_mask(batch, length, holes=False)
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), (mask.sum(1) - 1).clamp_min(0)] = torch.randn(batch)
    check(rewards, torch.randn(batch, length), mask, 1.0, 0.95)


def test_long_telescoping_row(seed):
    """gamma*lam = 1 over thousands of positions (a pure suffix sum) with large values."""
    length = 3001
    mask = right_padded_mask(2, length)
    check(torch.randn(2, length), 100 * torch.randn(2, length), mask, 1.0, 1.0)


def test_one_step_all_masked_and_empty(seed):
    check(torch.randn(4, 1), torch.randn(4, 1), torch.tensor([[True], [False], [True], [False]]), 0.9, 0.9)
    check(torch.randn(3, 17), torch.randn(3, 17), torch.zeros(3, 17, dtype=torch.bool), 1.0, 1.0)
    check(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 1.0, 1.0)
    check(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), 1.0, 1.0)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_numeric_masks_and_low_precision_inputs(seed, mask_dtype):
    mask = right_padded_mask(3, 45).to(mask_dtype)
    check(torch.randn(3, 45).bfloat16(), torch.randn(3, 45).half(), mask, 0.95, 0.9)
    check(torch.randn(3, 45).double(), torch.randn(3, 45).double(), mask, 0.95, 0.9)


def test_non_contiguous_inputs_untouched(seed):
    rewards = torch.randn(40, 6).T
    values = torch.randn(6, 80)[:, ::2]
    mask = right_padded_mask(40, 6).T
    before = (rewards.clone(), values.clone(), mask.clone())
    check(rewards, values, mask, 0.9, 0.8)
    assert torch.equal(rewards, before[0]) and torch.equal(values, before[1]) and torch.equal(mask, before[2])


def test_opcheck_triton_backend(seed):
    mask = (torch.rand(3, 23) > 0.3).to(DEVICE)
    torch.library.opcheck(torch.ops.sveb.gae.default,
                          [torch.randn(3, 23, device=DEVICE), torch.randn(3, 23, device=DEVICE), mask, 0.9, 0.95,
                           "triton"])


@pytest.mark.gpu
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.999, 0.97), (1.0, 0.95)])
def test_gpu_rows_of_32k(seed, gamma, lam):
    batch, length = 8, 32768
    mask = right_padded_mask(batch, length)
    check(torch.randn(batch, length), torch.randn(batch, length), mask, gamma, lam)


@pytest.mark.gpu
def test_gpu_trainer_batch(seed):
    batch, length = 64, 8192
    mask = right_padded_mask(batch, length, holes=False)
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), (mask.sum(1) - 1).clamp_min(0)] = torch.randn(batch)
    check(rewards.bfloat16(), torch.randn(batch, length), mask, 1.0, 0.95)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_values_small_advantages(seed, offset):
    """|values| >> |advantages|: each step's delta must not round at ulp(|v|) (errors would add up)."""
    batch, length = 2, 700
    values = offset + torch.randn(batch, length)
    rewards = torch.randn(batch, length) * 0.01
    mask = torch.rand(batch, length) > 0.2
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        adv, ret = sk.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="triton")
        want_adv, want_ret = gae_oracle(rewards, values, mask, gamma, lam)
        bound = 1e-5 * (1 + float(want_adv.abs().max())) * math.log2(length + 1)
        assert (adv.double() - want_adv).abs().max() <= bound
        assert (ret.double() - want_ret).abs().max() <= bound + 1e-7 * float(want_ret.abs().max())


def test_gpu_block_size_under_interpreter(seed):
    """The chunk a GPU uses (2048 positions) on rows of 2500: a full chunk and a partial one, state
    carried across their border."""
    from sveb_kernels.gae import triton as gae_triton

    rewards, values = torch.randn(2, 2500), torch.randn(2, 2500)
    mask = torch.rand(2, 2500) > 0.1
    check(rewards, values, mask, 0.99, 0.95, block_t=gae_triton.GPU_MAX_BLOCK_T)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.0, 0.5)])
def test_nonfinite_inputs_poison_exactly_their_dependents(seed, poison, gamma, lam):
    from nonfinite_cases import check_gae_nonfinite, gae_poison_case

    clean, poisoned, bad = gae_poison_case(poison, length=45)
    from sveb_kernels.gae import triton as gae_triton
    out = gae_triton.gae(*[t.to(DEVICE) for t in poisoned], gamma, lam, block_t=16)  # several blocks per row
    check_gae_nonfinite(out, clean, bad, gamma, lam, poison)


def test_float64_values_telescope(seed):
    """Issue 20 item 3: float64 values of magnitude 1e3 at T=4096, gamma=lam=1, from a good critic (small
    advantages, so a tight bound): nextv must stay float64 (v[t] in float64 with v[t+1] rounded to
    float32 no longer telescopes and missed the bound 16x)."""
    rewards, values, mask = float64_critic_case(4096)
    check(rewards, values, mask, 1.0, 1.0)
