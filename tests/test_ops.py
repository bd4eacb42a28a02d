"""The ops are real custom ops: opcheck passes and torch.compile(fullgraph=True) captures them."""

import pytest
import torch

import sveb_kernels as sk
from test_hista import make_batch, random_groups


def hista_op_args(seed_groups=None, dtype=torch.float32, backend="reference"):
    hidden, returns, rollout_ids, offsets = make_batch(seed_groups or random_groups(3, 4, 7), 21, dtype=dtype)
    key_mask = torch.rand(hidden.shape[0]) > 0.2
    key_bias = torch.randn(hidden.shape[0])
    args = [hidden, returns, rollout_ids, offsets, 0.2, "cosine", key_mask, key_bias, 0.5, backend]
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_hista(seed, dtype, backend):
    torch.library.opcheck(torch.ops.sveb.hista_values.default, hista_op_args(dtype=dtype, backend=backend))
    args = hista_op_args(backend=backend)
    args[6] = args[7] = None
    args[5] = "dot"
    torch.library.opcheck(torch.ops.sveb.hista_values.default, args)


def test_opcheck_gae(seed, backend):
    mask = torch.rand(4, 23) > 0.3
    torch.library.opcheck(torch.ops.sveb.gae.default, [torch.randn(4, 23), torch.randn(4, 23), mask, 0.9, 0.95,
                                                       backend])


def test_compile_fullgraph_trainer_step(seed, backend):
    """A trainer-like step: Hista values on packed tokens, unpacked, then GAE, in one compiled graph."""
    batch, length, d = 6, 19, 16
    mask = torch.rand(batch, length) > 0.3
    packing = sk.Packing.from_padded(mask, torch.tensor([0, 0, 1, 1, 1, 2]))
    hidden = torch.randn(batch, length, d)
    rewards = torch.zeros(batch, length)
    rewards[:, -1] = torch.randn(batch)
    packed_hidden = packing.pack(hidden)
    packed_returns = packing.pack(rewards.sum(1, keepdim=True).expand(batch, length))

    def step(packed_hidden, packed_returns, rollout_ids, offsets, token_index, rewards, mask):
        out = sk.hista_values(packed_hidden, packed_returns, rollout_ids, offsets, temperature=0.3, backend=backend)
        values = torch.zeros(batch * length).index_put((token_index,), out.values).view(batch, length)
        adv, ret = sk.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=backend)
        return sk.masked_whiten(adv, mask), ret

    args = (packed_hidden, packed_returns, packing.rollout_ids, packing.group_offsets, packing.token_index,
            rewards, mask)
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_inductor(seed, backend):
    rewards, values = torch.randn(3, 40), torch.randn(3, 40)
    mask = torch.rand(3, 40) > 0.5
    fn = torch.compile(lambda r, v, m: sk.gae(r, v, m, gamma=0.99, lam=0.9, backend=backend)[0] * 2, fullgraph=True)
    want = sk.gae(rewards, values, mask, gamma=0.99, lam=0.9, backend=backend)[0] * 2
    torch.testing.assert_close(fn(rewards, values, mask), want)


def test_ops_are_registered_with_fake_impls():
    for name in ("hista_values", "gae"):
        op = getattr(torch.ops.sveb, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or \
            torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd")
    out = torch.ops.sveb.gae(torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta"),
                             torch.empty(2, 3, dtype=torch.bool, device="meta"), 1.0, 1.0, "reference")
    assert out[0].shape == (2, 3) and out[0].device.type == "meta"
