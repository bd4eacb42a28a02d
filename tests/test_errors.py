"""Every bad input of the common rules of docs/CONTRACT.md gets a ValueError/TypeError naming the argument."""

import math

import pytest
import torch

import sveb_kernels as sk


def hista_args(n=6, d=4):
    return dict(
        hidden=torch.randn(n, d),
        returns=torch.randn(n),
        rollout_ids=torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int32)[:n],
        group_offsets=torch.tensor([0, 4, n], dtype=torch.int64),
    )


HISTA_BAD = [
    # (override, exception, word that must be in the message)
    (dict(hidden=torch.randn(6)), ValueError, "hidden"),
    (dict(hidden=torch.randn(6, 0)), ValueError, "hidden"),
    (dict(hidden=torch.randint(0, 3, (6, 4))), TypeError, "hidden"),
    (dict(hidden=[[1.0] * 4] * 6), TypeError, "hidden"),
    (dict(returns=torch.randn(5)), ValueError, "returns"),
    (dict(returns=torch.randn(6, 1)), ValueError, "returns"),
    (dict(returns=torch.ones(6, dtype=torch.int64)), TypeError, "returns"),
    (dict(returns=torch.randn(6, device="meta")), ValueError, "returns"),
    (dict(rollout_ids=torch.zeros(6)), TypeError, "rollout_ids"),
    (dict(rollout_ids=torch.zeros(7, dtype=torch.int32)), ValueError, "rollout_ids"),
    (dict(group_offsets=torch.tensor([0, 4, 6], dtype=torch.float32)), TypeError, "group_offsets"),
    (dict(group_offsets=torch.tensor([[0, 6]])), ValueError, "group_offsets"),
    (dict(group_offsets=torch.tensor([], dtype=torch.int64)), ValueError, "group_offsets"),
    (dict(group_offsets=torch.tensor([0, 4, 5])), ValueError, "group_offsets"),
    (dict(group_offsets=torch.tensor([1, 4, 6])), ValueError, "group_offsets"),
    (dict(group_offsets=torch.tensor([0, 5, 3, 6])), ValueError, "group_offsets"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(temperature=1e-300), ValueError, "temperature"),
    (dict(similarity="euclid"), ValueError, "similarity"),
    (dict(key_mask=torch.ones(6)), TypeError, "key_mask"),
    (dict(key_mask=torch.ones(5, dtype=torch.bool)), ValueError, "key_mask"),
    (dict(key_bias=torch.ones(6, dtype=torch.int32)), TypeError, "key_bias"),
    (dict(key_bias=torch.ones(2)), ValueError, "key_bias"),
    (dict(empty_value="zero"), TypeError, "empty_value"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(backend=3), TypeError, "backend"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,exc,word", HISTA_BAD)
def test_hista_bad_input(override, exc, word):
    args = hista_args()
    args.update(override)
    positional = [args.pop(k) for k in ("hidden", "returns", "rollout_ids", "group_offsets")]
    with pytest.raises(exc, match=word):
        sk.hista_values(*positional, **args)


def test_hista_validate_rejects_positive_infinite_bias():
    args = hista_args()
    bias = torch.zeros(6)
    bias[1] = -math.inf  # a zero weight: fine
    sk.hista_values(**args, key_bias=bias, validate=True)
    bias[3] = math.inf
    with pytest.raises(ValueError, match="key_bias"):
        sk.hista_values(**args, key_bias=bias, validate=True)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    args = hista_args()
    a = sk.hista_values(**args, temperature=np.float32(0.25), empty_value=np.float64(1.5))
    b = sk.hista_values(**args, temperature=0.25, empty_value=1.5)
    assert torch.equal(a.values, b.values)
    g = gae_args()
    assert torch.equal(sk.gae(**g, gamma=np.float64(0.9), lam=np.float32(0.5))[0], sk.gae(**g, gamma=0.9, lam=0.5)[0])


def test_gae_outputs_carry_no_gradient_and_hista_outputs_do():
    """GAE's outputs are targets (constants for the policy loss); Hista is differentiable with respect
    to hidden and returns (docs/CONTRACT.md §1), so LearnedHista can train through it."""
    args = hista_args()
    hidden = args.pop("hidden").requires_grad_()
    out = sk.hista_values(hidden, **args)
    assert out.values.requires_grad and out.lse.requires_grad
    assert not sk.hista_values(hidden.detach(), **args).values.requires_grad
    g = gae_args()
    values = g.pop("values").requires_grad_()
    adv, ret = sk.gae(values=values, **g)
    assert not adv.requires_grad and not ret.requires_grad
    (values * adv).sum().backward()  # a policy loss using the advantages as constants
    assert torch.equal(values.grad, adv)


def test_hista_validate_scans_for_nan(monkeypatch):
    args = hista_args()
    args["hidden"][2, 1] = math.nan
    sk.hista_values(**args)  # cheap checks only: no full scan by default
    with pytest.raises(ValueError, match="hidden"):
        sk.hista_values(**args, validate=True)
    monkeypatch.setenv("SVEB_VALIDATE", "1")
    with pytest.raises(ValueError, match="hidden"):
        sk.hista_values(**args)


def gae_args(b=3, t=5):
    return dict(rewards=torch.randn(b, t), values=torch.randn(b, t), mask=torch.ones(b, t, dtype=torch.bool))


GAE_BAD = [
    (dict(rewards=torch.randn(15)), ValueError, "rewards"),
    (dict(rewards=torch.ones(3, 5, dtype=torch.int32)), TypeError, "rewards"),
    (dict(values=torch.randn(3, 4)), ValueError, "values"),
    (dict(values=torch.ones(3, 5, dtype=torch.int64)), TypeError, "values"),
    (dict(values=torch.randn(3, 5, device="meta")), ValueError, "values"),
    (dict(mask=torch.ones(3, 6, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(3, 5, dtype=torch.complex64)), TypeError, "mask"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(gamma=math.nan), ValueError, "gamma"),
    (dict(lam=2.0), ValueError, "lam"),
    (dict(lam=None), TypeError, "lam"),
    (dict(backend="fastest"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,exc,word", GAE_BAD)
def test_gae_bad_input(override, exc, word):
    args = gae_args()
    args.update(override)
    with pytest.raises(exc, match=word):
        sk.gae(**args)


def test_gae_validate_checks_values_and_mask():
    args = gae_args()
    args["mask"] = torch.full((3, 5), 0.5)
    with pytest.raises(ValueError, match="mask"):
        sk.gae(**args, validate=True)
    args = gae_args()
    args["rewards"][0, 0] = math.inf
    with pytest.raises(ValueError, match="rewards"):
        sk.gae(**args, validate=True)


def test_env_backend_must_be_usable(monkeypatch):
    monkeypatch.setenv("SVEB_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SVEB_BACKEND"):
        sk.gae(**gae_args())
    monkeypatch.setenv("SVEB_BACKEND", "reference")
    sk.gae(**gae_args())


def test_packing_bad_input():
    with pytest.raises(ValueError, match="mask"):
        sk.Packing.from_padded(torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="group_index"):
        sk.Packing.from_padded(torch.ones(3, 4, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="group_index"):
        sk.Packing.from_padded(torch.ones(3, 4, dtype=torch.bool), torch.zeros(3))
    packing = sk.Packing.from_padded(torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^x must"):
        packing.pack(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"^y must"):
        packing.unpack(torch.zeros(11))
