import math

import pytest
import torch

import sveb_kernels as sk
from sveb_kernels.hista import reference
from oracles import hista_oracle


def make_batch(rollout_lengths_per_group, d, dtype=torch.float32, scale=1.0, shared_direction=0.5):
    """Packed Hista inputs: one list of rollout lengths per group (an empty list is an empty group).

    Hidden states share a per-group direction so that similarities are not all ~0 (as in a real LLM).
    """
    hidden, rollout_ids, offsets = [], [], [0]
    next_id = 0
    for lengths in rollout_lengths_per_group:
        direction = torch.randn(d)
        for length in lengths:
            hidden.append(scale * (shared_direction * direction + torch.randn(length, d)))
            # ids are arbitrary, non-contiguous ints: only equality inside a group may matter
            rollout_ids += [next_id * 7 + 3] * length
            next_id += 1
        offsets.append(offsets[-1] + sum(lengths))
    hidden = torch.cat(hidden) if hidden else torch.zeros(0, d)
    n = hidden.shape[0]
    returns = torch.randn(n)
    return (hidden.to(dtype), returns, torch.tensor(rollout_ids, dtype=torch.int32).reshape(n),
            torch.tensor(offsets, dtype=torch.int64))


def random_groups(num_groups, max_rollouts, max_len):
    return [[int(torch.randint(1, max_len + 1, ())) for _ in range(int(torch.randint(1, max_rollouts + 1, ())))]
            for _ in range(num_groups)]


def assert_close_fp32(out, hidden, returns, rollout_ids, offsets, **kw):
    want_values, want_lse = hista_oracle(hidden, returns, rollout_ids, offsets, **kw)
    bound = 1e-4 * max(float(returns.abs().max()) if returns.numel() else 0.0, 1e-30)
    err = (out.values.double() - want_values).abs().max() if returns.numel() else 0.0
    assert out.values.dtype == torch.float32 and out.lse.dtype == torch.float32
    assert not torch.isnan(out.values).any()
    assert err <= bound, f"values error {err} > {bound}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(out.lse), finite)
    assert (out.lse[~finite] == -math.inf).all()
    if finite.any():
        # Logits are computed in fp32: each carries ~ulp(|s|) of rounding, with |s| up to 1/temperature
        # (cosine) or max|h|^2/temperature (dot), so the lse error has that term besides the relative one.
        temperature = kw.get("temperature", 0.1)
        if kw.get("similarity", "cosine") == "cosine":
            logit_scale = 1.0 / temperature
        else:
            logit_scale = float(hidden.double().norm(dim=1).max()) ** 2 / temperature
        lse_err = (out.lse.double()[finite] - want_lse[finite]).abs()
        allowed = 1e-5 * want_lse[finite].abs().clamp_min(1.0) + 1e-6 * logit_scale
        assert (lse_err <= allowed).all(), f"lse error {float((lse_err / allowed).max())}x the allowed"


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_random_groups_match_oracle(seed, similarity, backend):
    groups = random_groups(num_groups=5, max_rollouts=6, max_len=17) + [[], [9]]  # plus empty, single-rollout
    d = int(torch.randint(1, 70, ()))
    hidden, returns, rollout_ids, offsets = make_batch(groups, d)
    temperature = 0.1 if similarity == "cosine" else 3.0 * math.sqrt(d)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity,
                          backend=backend)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)


def test_key_mask_bias_and_empty_value(seed, backend):
    groups = random_groups(num_groups=4, max_rollouts=5, max_len=11)
    hidden, returns, rollout_ids, offsets = make_batch(groups, 37)
    n = hidden.shape[0]
    key_mask = torch.rand(n) > 0.4
    # all keys of the first group masked: its rows have no keys at all
    key_mask[offsets[0]:offsets[1]] = False
    key_bias = torch.randn(n) * 2
    kw = dict(temperature=0.3, key_mask=key_mask, key_bias=key_bias, empty_value=-2.5)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, backend=backend, **kw)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, **kw)
    assert (out.values[offsets[0]:offsets[1]] == -2.5).all()
    assert (out.lse[offsets[0]:offsets[1]] == -math.inf).all()


def test_single_rollout_groups_get_empty_value(seed, backend):
    hidden, returns, rollout_ids, offsets = make_batch([[5], [], [1], [3]], 8)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, empty_value=0.25, backend=backend)
    assert (out.values == 0.25).all() and (out.lse == -math.inf).all()


@pytest.mark.parametrize("scale", [300.0, 3000.0])
def test_huge_hidden_norms_cosine(seed, scale, backend):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 5, 9), 257, scale=scale)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=0.05, backend=backend)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=0.05)


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_extreme_temperatures(seed, temperature, backend):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 7), 19)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=temperature, backend=backend)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=temperature)


def test_one_token_rollouts_and_one_column(seed, backend):
    hidden, returns, rollout_ids, offsets = make_batch([[1] * 5, [1, 1], [1]], 1)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, similarity="dot", temperature=0.7, backend=backend)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, similarity="dot", temperature=0.7)


def test_no_tokens(backend):
    out = sk.hista_values(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int32),
                          torch.zeros(1, dtype=torch.int64), backend=backend)
    assert out.values.shape == (0,) and out.lse.shape == (0,)


@pytest.mark.parametrize("tile_elements", [1, 7 * 13, 4096])
def test_tiling_crosses_groups_and_rollouts(seed, tile_elements):
    """Tiny tiles force many query and key tiles per group and tiles that span several groups."""
    groups = random_groups(6, 4, 13) + [[40, 33, 51]]  # one long group
    hidden, returns, rollout_ids, offsets = make_batch(groups, 23)
    values, lse = reference.hista_values(hidden, returns, rollout_ids, offsets, 0.2, "cosine", None, None, 0.0,
                                         tile_elements=tile_elements)
    assert_close_fp32(sk.HistaOutput(values, lse), hidden, returns, rollout_ids, offsets, temperature=0.2)


def test_long_group(seed, backend):
    hidden, returns, rollout_ids, offsets = make_batch([[700, 900, 650, 810]], 64)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=0.1, backend=backend)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets, temperature=0.1)


def plain_pytorch_in_dtype(hidden, returns, rollout_ids, offsets, temperature, similarity):
    """The formula as a user would write it in the input dtype: full [N, N] scores, mask, softmax."""
    n = hidden.shape[0]
    group = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    h = hidden
    if similarity == "cosine":
        h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(1e-6)
    scores = (h @ h.T) / temperature
    usable = (group[:, None] == group[None, :]) & (rollout_ids[:, None] != rollout_ids[None, :])
    scores = scores.masked_fill(~usable, float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return (weights @ returns.to(hidden.dtype)).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_low_precision_within_twice_plain_pytorch_error(seed, dtype, similarity, backend):
    groups = random_groups(4, 6, 15)
    d = 129
    hidden, returns, rollout_ids, offsets = make_batch(groups, d, dtype=dtype)
    temperature = 0.1 if similarity == "cosine" else float(d)
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity,
                          backend=backend)
    want, _ = hista_oracle(hidden, returns, rollout_ids, offsets, temperature=temperature, similarity=similarity)
    plain = plain_pytorch_in_dtype(hidden, returns, rollout_ids, offsets, temperature, similarity)
    has_keys = torch.isfinite(hista_oracle(hidden, returns, rollout_ids, offsets, temperature=temperature,
                                           similarity=similarity)[1])
    assert_within_twice_plain_error(out.values, plain, want, has_keys, returns)


def assert_within_twice_plain_error(values, plain, want, has_keys, returns):
    """CONTRACT §1 for 16-bit inputs: no worse than twice plain PyTorch's error in that dtype. Where the
    plain formula itself overflows (NaN/inf: a draw once failed CI with `ours 6.05e-07 <= 2*nan`), it
    gives no bound; there the float64 oracle's fp32 bound (1e-4 max|returns|) is the one to meet."""
    ours = (values.double() - want).abs()
    plain_ok = has_keys & torch.isfinite(plain)
    plain_err = float((plain.double() - want)[plain_ok].abs().max()) if plain_ok.any() else 0.0
    if plain_ok.any():
        assert float(ours[plain_ok].max()) <= 2 * plain_err + 1e-6, (float(ours[plain_ok].max()), plain_err)
    overflowed = has_keys & ~torch.isfinite(plain)
    if overflowed.any():
        assert float(ours[overflowed].max()) <= 1e-4 * float(returns.abs().max()), float(ours[overflowed].max())


def test_non_contiguous_inputs_and_inputs_untouched(seed, backend):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 9), 31)
    n = hidden.shape[0]
    hidden_t = hidden.T.contiguous().T  # column-major view
    returns_s = torch.stack([returns, torch.zeros(n)], 1)[:, 0]
    before = (hidden_t.clone(), returns_s.clone())
    out = sk.hista_values(hidden_t, returns_s, rollout_ids, offsets, backend=backend)
    assert not hidden_t.is_contiguous() and not returns_s.is_contiguous()
    assert torch.equal(before[0], hidden_t) and torch.equal(before[1], returns_s)
    assert_close_fp32(out, hidden, returns, rollout_ids, offsets)


def test_int64_ids_and_offsets_accepted(seed, backend):
    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 6), 12)
    a = sk.hista_values(hidden, returns, rollout_ids, offsets, backend=backend)
    b = sk.hista_values(hidden, returns, rollout_ids.long(), offsets.int(), backend=backend)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


def test_reference_memory_is_bounded():
    """The reference never builds an [N, N] buffer: its working set does not grow with N^2."""
    n, d = 3000, 16
    hidden, returns, rollout_ids, offsets = make_batch([[n // 4] * 4], d)
    allocated = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        allocated.append(out.numel())
        return out

    torch.Tensor.__matmul__ = spy
    try:
        reference.hista_values(hidden, returns, rollout_ids, offsets, 0.1, "cosine", None, None, 0.0,
                               tile_elements=1 << 16)
    finally:
        torch.Tensor.__matmul__ = real_matmul
    assert allocated and max(allocated) <= 1 << 16 < n * n


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_nonfinite_inputs_poison_exactly_their_dependents(seed, poison, similarity):
    """docs/CONTRACT.md "Common rules": a NaN/inf never becomes a plausible value (it used to turn the
    other rollouts' values into empty_value); outputs that do not depend on it are unchanged."""
    from nonfinite_cases import check_hista_nonfinite, hista_poison_case

    clean, poisoned, bad_values, bad_lse = hista_poison_case(poison)
    clean["similarity"] = poisoned["similarity"] = similarity
    out = sk.hista_values(**poisoned, backend="reference")
    check_hista_nonfinite(out, clean, bad_values, bad_lse, poison)


def test_plain_formula_overflow_falls_back_to_the_oracle_bound():
    """Issue 20 item 5: where the plain 16-bit formula gives NaN, the comparison uses the oracle's bound
    (the old `ours <= 2 * plain_err` read NaN as a failure: seed 649462889 on torch 2.11)."""
    want = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    ours = torch.tensor([0.5 + 6e-7, -0.25, 1.0 - 1e-6])
    plain = torch.tensor([0.5 + 1e-3, float("nan"), 1.0])
    assert_within_twice_plain_error(ours, plain, want, torch.ones(3, dtype=torch.bool), torch.ones(3))
    with pytest.raises(AssertionError):   # a real miss on an overflowed row is still caught
        assert_within_twice_plain_error(torch.tensor([0.5, -0.2, 1.0]), plain, want, torch.ones(3, dtype=torch.bool),
                                        torch.ones(3))


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_smallest_admitted_temperature_gives_no_nan(seed, similarity, backend):
    """Issue 20 item 4: 1/temperature times the cosine factor 1/max(|h|, eps) overflowed float32 for
    temperatures the check admitted (scores NaN). The admitted range now ends at MIN_TEMPERATURE, where
    no logit of finite inputs is NaN (dot logits are bounded here by small hidden states)."""
    from sveb_kernels.hista import MIN_TEMPERATURE

    hidden, returns, rollout_ids, offsets = make_batch(random_groups(3, 4, 7), 5)
    hidden = hidden * (1e-4 if similarity == "cosine" else 1e-16)   # small norms: the largest cosine factor
    hidden[0] = 0.0
    out = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=MIN_TEMPERATURE, similarity=similarity,
                          backend=backend)
    assert not torch.isnan(out.values).any() and not torch.isnan(out.lse).any()
    assert (out.values.abs() <= returns.abs().max() * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="temperature must be at least"):
        sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=1e-38, backend=backend)
