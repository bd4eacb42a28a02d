"""Autograd through hista_values (docs/CONTRACT.md §1, "Autograd"): the registered backward against
plain-PyTorch autograd through the dense float64 formula, gradcheck, opcheck and torch.compile."""

import math

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels.hista import reference
from test_hista import make_batch, random_groups


def dense_hista_float64(hidden, returns, rollout_ids, offsets, temperature=0.1, similarity="cosine", key_mask=None,
                        key_bias=None, empty_value=0.0):
    """The contract's formula with an explicit [N, N] float64 matrix, differentiable by plain autograd
    (the oracle: shares nothing with the package's code)."""
    h = hidden.to(torch.float64)
    r = returns.to(torch.float64)
    n = h.shape[0]
    counts = offsets.diff()
    group_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    usable = (group_of[:, None] == group_of[None, :]) & (rollout_ids[:, None] != rollout_ids[None, :])
    bias = torch.zeros(n, dtype=torch.float64) if key_bias is None else key_bias.to(torch.float64)
    if key_mask is not None:
        usable &= key_mask[None, :]
    usable &= (bias != -math.inf)[None, :]
    if similarity == "cosine":
        u = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(1e-6)
    else:
        u = h
    s = u @ u.T / temperature + torch.where(usable, bias[None, :], 0.0)
    has = usable.any(dim=1)
    # Rows without keys get a harmless all-zero row (their outputs are replaced below, gradient 0).
    s = torch.where(usable, s, torch.where(has[:, None], -math.inf, 0.0))
    p = torch.softmax(s, dim=1)
    values = torch.where(has, p @ r, torch.full_like(r, empty_value))
    lse = torch.where(has, torch.logsumexp(s, dim=1), torch.full_like(r, -math.inf))
    return values, lse


def grads(fn, hidden, returns, grad_values, grad_lse):
    hidden = hidden.detach().clone().requires_grad_(True)
    returns = returns.detach().clone().requires_grad_(True)
    values, lse = fn(hidden, returns)
    finite = torch.isfinite(lse)
    outputs = (values.sum() * 0 + (values * grad_values.to(values.dtype)).sum()
               + (torch.where(finite, lse, 0.0) * grad_lse.to(lse.dtype)).sum())
    g_hidden, g_returns = torch.autograd.grad(outputs, (hidden, returns))
    return g_hidden, g_returns


def assert_grads_match_dense(hidden, returns, rollout_ids, offsets, *, backend="reference", with_lse=True,
                             rel=2e-4, **kw):
    n = hidden.shape[0]
    grad_values = torch.randn(n)
    grad_lse = torch.randn(n) if with_lse else torch.zeros(n)
    got_h, got_r = grads(lambda h, r: sk.hista_values(h, r, rollout_ids, offsets, backend=backend, **kw),
                         hidden, returns, grad_values, grad_lse)
    want_h, want_r = grads(lambda h, r: dense_hista_float64(h, r, rollout_ids, offsets, **kw),
                           hidden.double(), returns.double(), grad_values.double(), grad_lse.double())
    assert got_h.dtype == hidden.dtype and got_r.dtype == returns.dtype
    assert got_h.shape == hidden.shape and got_r.shape == returns.shape
    # fp32 computation against float64: the error is relative to the gradients' scale (the forward's
    # bound is relative to max|returns| in the same way). For cosine, d/dh projects the gradient with
    # respect to the unit vector u = h/|h| off h and divides by |h|: the fp32 terms that cancel there
    # have the size |d/du| / |h|, which can be far above the result (with D = 1 the exact gradient is 0
    # and only the cancellation's rounding is left), so that is the scale of the hidden bound.
    err_h = float((got_h.double() - want_h).abs().max()) if n else 0.0
    err_r = float((got_r.double() - want_r).abs().max()) if n else 0.0
    scale_h = float(want_h.abs().max()) if n else 0.0
    if n and kw.get("similarity", "cosine") == "cosine":
        h64 = hidden.double()
        norms = torch.linalg.vector_norm(h64, dim=1, keepdim=True).clamp_min(1e-6)
        g_unit, _ = grads(lambda u, r: dense_hista_float64(u, r, rollout_ids, offsets, **{**kw, "similarity": "dot"}),
                          h64 / norms, returns.double(), grad_values.double(), grad_lse.double())
        scale_h = max(scale_h, float((g_unit.abs() / norms).max()))
    bound_h = rel * max(scale_h, 1e-12)
    bound_r = rel * max(float(want_r.abs().max()) if n else 0.0, 1e-12)
    print(f"grad hidden err {err_h:.3g} (bound {bound_h:.3g}), grad returns err {err_r:.3g} (bound {bound_r:.3g})")
    assert err_h <= bound_h and err_r <= bound_r
    return got_h, got_r


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_random_groups_match_dense_autograd(seed, similarity):
    groups = random_groups(num_groups=5, max_rollouts=5, max_len=13) + [[], [9], [1, 1]]  # empty, one rollout
    d = int(torch.randint(1, 40, ()))
    hidden, returns, rollout_ids, offsets = make_batch(groups, d)
    temperature = 0.2 if similarity == "cosine" else 3.0 * d
    got_h, got_r = assert_grads_match_dense(hidden, returns, rollout_ids, offsets, temperature=temperature,
                                            similarity=similarity)
    # Rows of the empty / single-rollout groups have no keys and are no key of anyone: gradient 0.
    single = slice(int(offsets[-4]), int(offsets[-2]))
    assert (got_h[single] == 0).all() and (got_r[single] == 0).all()


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_key_mask_key_bias_and_empty_rows(seed, similarity):
    groups = random_groups(num_groups=4, max_rollouts=5, max_len=11)
    hidden, returns, rollout_ids, offsets = make_batch(groups, 17)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.3
    key_mask[offsets[0]:offsets[1]] = False  # every key of group 0 masked: its rows have none
    key_bias = torch.randn(n)
    key_bias[torch.rand(n) < 0.1] = -math.inf
    temperature = 0.3 if similarity == "cosine" else 20.0
    kw = dict(temperature=temperature, similarity=similarity, key_mask=key_mask, key_bias=key_bias,
              empty_value=-1.5)
    got_h, got_r = assert_grads_match_dense(hidden, returns, rollout_ids, offsets, **kw)
    # A masked key's return reaches no value: its gradient is exactly 0.
    assert (got_r[~key_mask] == 0).all()


@pytest.mark.parametrize("tile_elements", [1, 7 * 13, 4096])
def test_tiles_cross_groups_and_rollouts(seed, tile_elements):
    """Tiny tiles: many query and key tiles per group, tiles spanning several groups."""
    groups = random_groups(5, 4, 9) + [[30, 21, 26]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 11)
    n = hidden.shape[0]
    values, lse = reference.hista_values(hidden, returns, rollout_ids, offsets, 0.25, "cosine", None, None, 0.0)
    g_values, g_lse = torch.randn(n), torch.randn(n)
    tiled = reference.hista_values_backward(g_values, g_lse, hidden, returns, rollout_ids, offsets, values, lse, 0.25,
                                            "cosine", None, None, tile_elements=tile_elements)
    whole = reference.hista_values_backward(g_values, g_lse, hidden, returns, rollout_ids, offsets, values, lse, 0.25,
                                            "cosine", None, None, tile_elements=n * n)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5 * float(whole[0].abs().max()))


def test_gradcheck_float64(seed):
    """torch.autograd.gradcheck on float64 inputs (computed in fp32 as the contract says, hence a
    finite-difference step of 1e-3 and tolerances of the fp32 noise over that step)."""
    groups = random_groups(3, 3, 4) + [[2]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 5, dtype=torch.float64)
    returns = returns.double()
    key_bias = torch.randn(hidden.shape[0])
    finite = torch.isfinite(sk.hista_values(hidden.float(), returns, rollout_ids, offsets).lse)
    for similarity, temperature in (("cosine", 0.5), ("dot", 10.0)):
        def fn(h, r):
            # (The fp32 cast is the op's own for fp64 inputs; done here, it keeps this test independent
            # of the forward's fp64 handling: the gradient checked is the op's, chained through the cast.)
            values, lse = sk.hista_values(h.float(), r, rollout_ids, offsets, temperature=temperature,
                                          similarity=similarity, key_bias=key_bias, backend="reference")
            return values, lse[finite]  # rows without keys have lse -inf: no derivative
        assert torch.autograd.gradcheck(fn, (hidden.clone().requires_grad_(), returns.clone().requires_grad_()),
                                        eps=1e-3, atol=2e-3, rtol=2e-3)


def test_cpp_forward_is_differentiable_too(seed):
    if sk._backend.why_unavailable("hista_values", "cpp", "cpu") is not None:
        pytest.skip("cpp backend unavailable")
    groups = random_groups(4, 4, 9)
    hidden, returns, rollout_ids, offsets = make_batch(groups, 13)
    assert_grads_match_dense(hidden, returns, rollout_ids, offsets, backend="cpp", temperature=0.2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden_gets_a_gradient_in_its_dtype(seed, dtype):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 8), 16, dtype=dtype)
    # The oracle sees the same rounded inputs; the gradient is computed in fp32 and rounded once.
    assert_grads_match_dense(hidden, returns, rollout_ids, offsets, temperature=0.2, rel=1e-2)


def test_values_only_loss_and_no_tokens(seed):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 8), 9)
    assert_grads_match_dense(hidden, returns, rollout_ids, offsets, with_lse=False, temperature=0.2)
    h = torch.zeros(0, 4, requires_grad=True)
    out = sk.hista_values(h, torch.zeros(0, requires_grad=True), torch.zeros(0, dtype=torch.int32),
                          torch.zeros(1, dtype=torch.int64))
    out.values.sum().backward()
    assert h.grad.shape == (0, 4)


def test_nonfinite_hidden_poisons_exactly_its_dependents(seed):
    """A NaN in hidden state k: the forward's NaN rows are the rows whose keys hold k (and k's row);
    the gradient is NaN only where plain autograd through the dense formula is NaN too."""
    groups = [[4, 3, 5], [6, 2]]
    hidden, returns, rollout_ids, offsets = make_batch(groups, 7)
    bad = 2
    hidden[bad, 3] = float("nan")
    n = hidden.shape[0]
    grad_values = torch.randn(n)
    got_h, got_r = grads(lambda h, r: sk.hista_values(h, r, rollout_ids, offsets, temperature=0.3), hidden,
                         returns, grad_values, torch.zeros(n))
    first = slice(0, int(offsets[1]))
    want_h, _ = grads(lambda h, r: dense_hista_float64(h, r, rollout_ids[first], offsets[:2], temperature=0.3),
                      hidden[first].double(), returns[first].double(), grad_values[first].double(),
                      torch.zeros(int(offsets[1])).double())
    # Group 0 depends on it: NaN wherever plain autograd is NaN, never a silent finite value there.
    assert torch.isnan(want_h).any()
    assert (torch.isnan(got_h[first]) >= torch.isnan(want_h)).all()
    # Group 1 does not see the NaN at all (its values do not depend on it): finite and equal to the
    # oracle on group 1 alone, although the reference's tiles span both groups.
    other = slice(int(offsets[1]), n)
    assert torch.isfinite(got_h[other]).all() and torch.isfinite(got_r[other]).all()
    want_h, want_r = grads(lambda h, r: dense_hista_float64(h, r, rollout_ids[other], offsets[1:] - offsets[1],
                                                            temperature=0.3),
                           hidden[other].double(), returns[other].double(), grad_values[other].double(),
                           torch.zeros(n - int(offsets[1])).double())
    torch.testing.assert_close(got_h[other].double(), want_h, rtol=1e-4, atol=1e-4 * float(want_h.abs().max()))
    torch.testing.assert_close(got_r[other].double(), want_r, rtol=1e-4, atol=1e-4 * float(want_r.abs().max()))


def test_opcheck_with_autograd(seed):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 7) + [[3]], 21)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.2
    key_bias = torch.randn(n)
    for args in ([hidden, returns, rollout_ids, offsets, 0.2, "cosine", key_mask, key_bias, 0.5, "reference"],
                 [hidden, returns, rollout_ids, offsets, 30.0, "dot", None, None, 0.0, "reference"]):
        args = list(args)
        args[0] = args[0].clone().requires_grad_(True)
        args[1] = args[1].clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.sveb.hista_values.default, args)
    values, lse = torch.ops.sveb.hista_values(hidden, returns, rollout_ids, offsets, 0.2, "cosine", key_mask,
                                              key_bias, 0.5, "reference")
    torch.library.opcheck(torch.ops.sveb.hista_values_backward.default,
                          [torch.randn(n), torch.randn(n), hidden, returns, rollout_ids, offsets, values, lse, 0.2,
                           "cosine", key_mask, key_bias, "reference"])


def test_compile_fullgraph_projection_step(seed):
    """A learned projection trained through Hista, compiled with fullgraph=True: same gradient as eager."""
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 7), 12)
    weight = torch.randn(12, 8, requires_grad=True)

    def loss_fn(w):
        values, _ = sk.hista_values(hidden @ w, returns, rollout_ids, offsets, temperature=5.0, similarity="dot",
                                    backend="reference")
        return (values - returns).square().mean()

    eager = torch.autograd.grad(loss_fn(weight), weight)[0]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(weight), weight)[0]
    torch.testing.assert_close(got, eager)


def test_backward_memory_is_bounded():
    """No [N, N] buffer: a 6000-token group's backward never holds more than O(N*D) + one tile."""
    import tracemalloc  # noqa: F401  (CPU tensors are not traced by tracemalloc; count allocations instead)

    hidden, returns, rollout_ids, offsets = make_batch([[1500] * 4], 8)
    n = hidden.shape[0]
    values, lse = reference.hista_values(hidden, returns, rollout_ids, offsets, 0.1, "cosine", None, None, 0.0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reference.hista_values_backward(torch.randn(n), torch.randn(n), hidden, returns, rollout_ids, offsets, values,
                                        lse, 0.1, "cosine", None, None, tile_elements=1 << 16)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < n * n * 4 // 16, f"an allocation of {largest} bytes (N^2 fp32 = {n * n * 4})"


def test_raw_backward_op_rejects_mismatched_shapes(seed):
    hidden, returns, rollout_ids, offsets = make_batch([[3, 4]], 5)
    n = hidden.shape[0]
    values, lse = torch.ops.sveb.hista_values(hidden, returns, rollout_ids, offsets, 0.2, "cosine", None, None, 0.0,
                                              "reference")
    with pytest.raises(ValueError, match="grad_values"):
        torch.ops.sveb.hista_values_backward(torch.randn(n + 1), torch.randn(n), hidden, returns, rollout_ids, offsets,
                                             values, lse, 0.2, "cosine", None, None, "reference")
    with pytest.raises(ValueError, match="lse"):
        torch.ops.sveb.hista_values_backward(torch.randn(n), torch.randn(n), hidden, returns, rollout_ids, offsets,
                                             values, lse[:-1], 0.2, "cosine", None, None, "reference")
    # Offsets out of range or order are clamped, as in the forward: bounded, no crash.
    bad = torch.tensor([0, 100, 2, -5])
    g_h, g_r = torch.ops.sveb.hista_values_backward(torch.randn(n), torch.randn(n), hidden, returns, rollout_ids,
                                                    bad, values, lse, 0.2, "cosine", None, None, "reference")
    assert g_h.shape == hidden.shape and g_r.shape == returns.shape
