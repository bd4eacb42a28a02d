"""The Triton Hista backward against plain-PyTorch autograd through the dense float64 formula.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (tests/test_triton_interpreter.py
starts that process), at the production tile shape (`BACKWARD_CONFIG`) and a small one that makes
groups span many tiles; on a GPU machine the same cases run compiled on CUDA tensors.
"""

import math
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: oracles and shared helpers

import sveb_kernels as sk  # noqa: E402
from test_hista import make_batch, random_groups  # noqa: E402
from test_hista_autograd import dense_hista_float64, grads  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def kernels():
    from sveb_kernels.hista import triton as hista_triton  # imported late: after TRITON_INTERPRET is read
    return hista_triton


def triton_grads(hidden, returns, rollout_ids, offsets, grad_values, grad_lse, config=None, **kw):
    """The Triton backward on DEVICE after the Triton forward; results on the CPU."""
    full = dict(temperature=0.1, similarity="cosine", key_mask=None, key_bias=None)
    full.update(kw)
    dev = [t.to(DEVICE) for t in (hidden, returns, rollout_ids, offsets)]
    opt = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in full.items()}
    values, lse = kernels().hista_values(*dev, opt["temperature"], opt["similarity"], opt["key_mask"],
                                        opt["key_bias"], 0.0)
    g_h, g_r = kernels().hista_values_backward(grad_values.to(DEVICE), grad_lse.to(DEVICE), *dev, values, lse,
                                               opt["temperature"], opt["similarity"], opt["key_mask"],
                                               opt["key_bias"], config=config)
    assert g_h.device.type == DEVICE and g_h.dtype == hidden.dtype and g_r.dtype == returns.dtype
    return g_h.cpu(), g_r.cpu()


def check(hidden, returns, rollout_ids, offsets, config=None, rel=2e-4, **kw):
    n = hidden.shape[0]
    grad_values, grad_lse = torch.randn(n), torch.randn(n)
    got_h, got_r = triton_grads(hidden, returns, rollout_ids, offsets, grad_values, grad_lse, config=config, **kw)
    want_h, want_r = grads(lambda h, r: dense_hista_float64(h, r, rollout_ids, offsets, **kw), hidden.double(),
                           returns.double(), grad_values.double(), grad_lse.double())
    err_h = float((got_h.double() - want_h).abs().max())
    err_r = float((got_r.double() - want_r).abs().max())
    bound_h = rel * max(float(want_h.abs().max()), 1e-12)
    bound_r = rel * max(float(want_r.abs().max()), 1e-12)
    print(f"triton grad hidden err {err_h:.3g} (bound {bound_h:.3g}), grad returns err {err_r:.3g} "
          f"(bound {bound_r:.3g})")
    assert err_h <= bound_h and err_r <= bound_r
    return got_h, got_r


def configs():
    """Both production tile shapes (16-bit and fp32 inputs) and a small one: groups over many tiles."""
    from dataclasses import replace
    production = kernels().BACKWARD_CONFIG
    return [production, kernels().BACKWARD_CONFIG_FP32, replace(production, block_m=16, block_n=32, block_d=16)]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("d", [3, 64, 77])
def test_random_groups_match_dense_autograd(seed, similarity, d):
    groups = random_groups(num_groups=3, max_rollouts=4, max_len=20) + [[], [9], [40, 33]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, d)
    temperature = 0.2 if similarity == "cosine" else 3.0 * d
    for cfg in configs():
        check(hidden, returns, rollout_ids, offsets, config=cfg, temperature=temperature, similarity=similarity)


def test_key_mask_key_bias_and_empty_rows(seed):
    groups = random_groups(num_groups=3, max_rollouts=5, max_len=15) + [[30, 41, 7]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 37)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.3
    key_mask[offsets[0]:offsets[1]] = False
    key_bias = torch.randn(n)
    key_bias[torch.rand(n) < 0.1] = -math.inf
    for cfg in configs():
        _, got_r = check(hidden, returns, rollout_ids, offsets, config=cfg, temperature=0.3, key_mask=key_mask,
                         key_bias=key_bias)
        assert (got_r[~key_mask] == 0).all()


def test_bf16_hidden(seed):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 20), 48, dtype=torch.bfloat16)
    check(hidden, returns, rollout_ids, offsets, rel=2e-2, temperature=0.2)


def test_nonfinite_hidden_stays_in_its_group(seed):
    hidden, returns, rollout_ids, offsets = make_batch([[20, 30, 25], [26, 12]], 24)
    hidden[5, 3] = float("nan")
    n = hidden.shape[0]
    got_h, got_r = triton_grads(hidden, returns, rollout_ids, offsets, torch.randn(n), torch.zeros(n),
                                temperature=0.3)
    first = int(offsets[1])
    assert torch.isnan(got_h[:first]).any()
    assert torch.isfinite(got_h[first:]).all() and torch.isfinite(got_r[first:]).all()


def test_matches_reference_backward_through_the_public_op(seed):
    """sk.hista_values(backend="triton") is differentiable and its gradient is the reference's."""
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 15), 20)
    n = hidden.shape[0]
    gv = torch.randn(n)
    out = []
    for backend, device in (("triton", DEVICE), ("reference", "cpu")):
        h = hidden.to(device).requires_grad_(True)
        r = returns.to(device).requires_grad_(True)
        values, _ = sk.hista_values(h, r, rollout_ids.to(device), offsets.to(device), temperature=0.2,
                                    backend=backend)
        (values * gv.to(device)).sum().backward()
        out.append((h.grad.cpu(), r.grad.cpu()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-4 * float(out[1][0].abs().max()))
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-4 * float(out[1][1].abs().max()))
