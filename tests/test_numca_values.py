"""numca_values (docs/CONTRACT.md §2c) against a plain-Python loop over the contract's text (tests/oracles.py)."""

import random

import numpy as np
import pytest
import torch

import sveb_kernels as sk
from numca_cases import tokenizer_and_vocab
from oracles import numca_values_oracle
from sveb_kernels.numca import NumericSpans


def random_spans(batch, length, keys=4, density=0.2, end_dtype=torch.bool):
    """Hand-built spans: numbers at random tokens, keys from a small pool so that rollouts share them."""
    end = torch.rand(batch, length) < density
    pool = torch.randint(-(2 ** 63), 2 ** 63 - 1, (keys,), dtype=torch.int64)
    key = torch.where(end, pool[torch.randint(0, keys, (batch, length))], torch.zeros(batch, length, dtype=torch.int64))
    return NumericSpans(end.to(end_dtype), key, torch.zeros(batch, length, dtype=torch.float64),
                        torch.full((batch, length), -1, dtype=torch.int32))


def prefix_friendly_spans(batch, length):
    """Rollouts that write the same first numbers and then diverge: long shared prefixes."""
    script = torch.randint(0, 3, (length,))
    end = torch.rand(batch, length) < 0.3
    key = torch.where(end, script[None, :].expand(batch, length) + 10 * (torch.rand(batch, length) < 0.15),
                      torch.zeros(batch, length, dtype=torch.int64))
    return NumericSpans(end, key, None, None)


def check(spans, returns, groups, mask, backend="reference", **kw):
    out = sk.numca_values(spans, returns, groups, mask, backend=backend, **kw)
    want = torch.tensor(numca_values_oracle(spans.end, spans.key, returns, groups, mask, **kw), dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == mask.shape
    torch.testing.assert_close(out.double(), want.reshape(out.shape), rtol=1e-6, atol=1e-6)
    return out


@pytest.mark.parametrize("match", ["last", "prefix"])
@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("min_support", [1, 2, 3])
def test_random_spans_match_oracle(seed, match, leave_one_out, min_support, backend):
    batch, length = int(torch.randint(1, 13, ())), int(torch.randint(1, 40, ()))
    make = random_spans if match == "last" else prefix_friendly_spans
    spans = make(batch, length)
    groups = torch.randint(0, 3, (batch,)) * 7 - 5  # arbitrary ids, some groups of one rollout
    mask = torch.rand(batch, length) > 0.2
    check(spans, torch.randn(batch), groups, mask, match=match, leave_one_out=leave_one_out,
          min_support=min_support, empty_value=-0.75, backend=backend)


def test_single_rollout_groups_and_empty_value(seed, backend):
    spans = random_spans(3, 10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    out = check(spans, torch.randn(3), torch.tensor([4, 5, 6]), mask, empty_value=2.5, backend=backend)
    assert (out == 2.5).all()
    # itself only
    out = check(spans, torch.randn(3), torch.tensor([4, 5, 6]), mask, leave_one_out=False, backend=backend)


def test_masked_tokens_get_zero_and_their_numbers_do_not_count(seed, backend):
    spans = random_spans(6, 25, keys=2, density=0.4)
    mask = torch.rand(6, 25) > 0.5
    out = check(spans, torch.rand(6) + 1, torch.zeros(6, dtype=torch.int64), mask, backend=backend)
    assert (out[~mask] == 0).all() and (out[mask] != 0).all()


def test_values_hold_between_milestones(seed, backend):
    """[milestone 7, 9] vs peers: the value changes only at number tokens."""
    end = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    key = torch.tensor([[0, 7, 0, 0, 9, 0], [7, 0, 0, 0, 0, 0], [0, 0, 9, 0, 0, 0]])
    returns = torch.tensor([0.0, 1.0, 3.0])
    spans = NumericSpans(end, key, None, None)
    out = check(spans, returns, torch.zeros(3, dtype=torch.int64), torch.ones(3, 6, dtype=torch.bool), backend=backend)
    assert out[0].tolist() == [2.0, 1.0, 1.0, 1.0, 3.0, 3.0]  # peers' mean, then who wrote 7, then 9
    prefix = check(spans, returns, torch.zeros(3, dtype=torch.int64), torch.ones(3, 6, dtype=torch.bool),
                   match="prefix", backend=backend)
    assert prefix[0].tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # nobody else wrote 7 then 9: held


def test_spans_of_tokenized_rollouts(seed, backend):
    """numeric_spans -> numca_values on texts where rollouts of a prompt reach the same numbers."""
    tok, vocab = tokenizer_and_vocab("llama3")
    rng = random.Random(seed)
    texts = []
    for _ in range(8):
        steps = [rng.choice(["12", "1,200", "12.0"]), rng.choice(["30", "45"]), rng.choice(["7.5", "8"])]
        texts.append(" then ".join(steps[: rng.randint(1, 3)]) + rng.choice([" done", " so 99"]))
    rows = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.bool)
    spans = sk.numeric_spans(ids, vocab, mask, backend=backend)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for match in ("last", "prefix"):
        check(spans, torch.rand(8), groups, mask, match=match, min_support=2, backend=backend)


def test_no_numbers_and_empty_batches(backend):
    spans = random_spans(4, 5, density=0.0)
    out = check(spans, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1]),
                torch.ones(4, 5, dtype=torch.bool), backend=backend)
    assert out[0].tolist() == [2.0] * 5
    empty = sk.numca_values(random_spans(0, 5), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(0, 5, dtype=torch.bool), backend=backend)
    assert empty.shape == (0, 5)
    assert sk.numca_values(random_spans(2, 0), torch.zeros(2), torch.zeros(2, dtype=torch.int64),
                           torch.zeros(2, 0, dtype=torch.bool), backend=backend).shape == (2, 0)


def test_numeric_masks_dtypes_and_non_contiguous(seed, backend):
    spans = random_spans(5, 12, keys=3, density=0.4)
    returns = torch.randn(5, 2)[:, 1]
    groups = torch.tensor([1, 1, 2, 2, 2], dtype=torch.int32)
    mask = (torch.rand(5, 12) > 0.2).float()
    want = sk.numca_values(spans, returns.contiguous(), groups.long(), mask.bool(), backend=backend)
    before = (returns.clone(), mask.clone())
    out = sk.numca_values(spans, returns, groups, mask, backend=backend)
    assert torch.equal(out, want) and torch.equal(returns, before[0]) and torch.equal(mask, before[1])
    out64 = sk.numca_values(spans, returns.double(), groups, mask.bool(), backend=backend)
    torch.testing.assert_close(out64, want)


@pytest.mark.parametrize("match", ["last", "prefix"])
def test_non_contiguous_inputs_are_accepted_and_never_modified(seed, match, backend):
    """Every tensor argument a strided view (transposed or every other column); all left untouched."""
    spans = random_spans(6, 15, keys=3, density=0.4)
    returns, groups = torch.randn(6), torch.tensor([0, 0, 0, 4, 4, 4])
    mask = torch.rand(6, 15) > 0.2
    end_nc = spans.end.t().contiguous().t()
    key_nc = torch.stack([spans.key, -spans.key], dim=2)[:, :, 0]
    returns_nc = torch.stack([returns, returns + 1], dim=1)[:, 0]
    groups_nc = torch.stack([groups, groups], dim=1)[:, 1]
    mask_nc = torch.stack([~mask, mask], dim=2)[:, :, 1]
    args = (NumericSpans(end_nc, key_nc, None, None), returns_nc, groups_nc, mask_nc)
    assert not any(x.is_contiguous() for x in (end_nc, key_nc, returns_nc, groups_nc, mask_nc))
    before = [x.clone() for x in (end_nc, key_nc, returns_nc, groups_nc, mask_nc)]
    out = sk.numca_values(*args, match=match, min_support=2, backend=backend)
    for x, b in zip((end_nc, key_nc, returns_nc, groups_nc, mask_nc), before):
        assert torch.equal(x, b)
    want = numca_values_oracle(spans.end, spans.key, returns, groups, mask, match=match, min_support=2)
    torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_plain_tuple_and_list_spans(seed, backend):
    """Common rules of docs/CONTRACT.md: any NumericSpans, also built by hand; a plain (end, key, value, start) too."""
    spans = random_spans(5, 9, keys=2, density=0.4)
    returns, groups, mask = torch.randn(5), torch.tensor([0, 0, 1, 1, 1]), torch.rand(5, 9) > 0.1
    want = numca_values_oracle(spans.end, spans.key, returns, groups, mask, match="prefix")
    for given in (tuple(spans), list(spans), (spans.end, spans.key, None, None), spans):
        out = sk.numca_values(given, returns, groups, mask, match="prefix", backend=backend)
        torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_numpy_scalars_are_accepted(seed, backend):
    spans = random_spans(7, 11, keys=2, density=0.4)
    returns, groups, mask = torch.randn(7), torch.tensor([0, 0, 0, 0, 1, 1, 2]), torch.rand(7, 11) > 0.1
    for min_support, empty_value, loo in ((np.int64(2), np.float64(-1.5), np.bool_(True)),
                                          (np.int32(3), np.float32(0.25), np.bool_(False)),
                                          (np.uint8(2), np.int16(4), True)):
        out = sk.numca_values(spans, returns, groups, mask, min_support=min_support, empty_value=empty_value,
                              leave_one_out=loo, backend=backend)
        want = numca_values_oracle(spans.end, spans.key, returns, groups, mask, min_support=int(min_support),
                                   empty_value=float(empty_value), leave_one_out=bool(loo))
        torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_largest_min_support_means_no_milestone(seed, backend):
    """min_support up to the int64 maximum: no milestone ever has that much support, so the peers' mean."""
    spans = random_spans(4, 8, keys=1, density=0.5)
    returns, groups, mask = torch.randn(4), torch.zeros(4, dtype=torch.int64), torch.ones(4, 8, dtype=torch.bool)
    out = sk.numca_values(spans, returns, groups, mask, min_support=np.int64(2 ** 63 - 1), backend=backend)
    want = numca_values_oracle(spans.end, spans.key, returns, groups, mask, min_support=2 ** 63 - 1)
    torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_opcheck(seed, backend):
    spans = random_spans(6, 20, keys=3, density=0.3)
    mask = torch.rand(6, 20) > 0.2
    op = torch.ops.sveb.numca_values.default
    for match in ("last", "prefix"):
        torch.library.opcheck(op, (spans.end, spans.key, torch.randn(6), torch.tensor([0, 0, 0, 1, 1, 2]), mask,
                                   match, True, 1, 0.0, backend))


def test_compile_fullgraph_inductor(seed, backend):
    spans = random_spans(6, 20, keys=3, density=0.3)
    mask = torch.rand(6, 20) > 0.2
    returns, groups = torch.randn(6), torch.tensor([0, 0, 0, 1, 1, 1])
    fn = torch.compile(lambda e, k, r, g, m: sk.numca_values(NumericSpans(e, k, None, None), r, g, m, match="prefix",
                                                             min_support=2, backend=backend) * 2, fullgraph=True)
    want = sk.numca_values(spans, returns, groups, mask, match="prefix", min_support=2, backend=backend) * 2
    torch.testing.assert_close(fn(spans.end, spans.key, returns, groups, mask), want)


def values_args():
    spans = random_spans(3, 4)
    return dict(spans=spans, returns=torch.randn(3), group_index=torch.tensor([0, 0, 1]),
                mask=torch.ones(3, 4, dtype=torch.bool))


BAD = [
    (dict(spans=(torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.int64))), TypeError, "spans"),
    (dict(spans=NumericSpans(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int64), None, None)), TypeError, "end"),
    (dict(spans=NumericSpans(torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 4), None, None)), TypeError, "key"),
    (dict(spans=NumericSpans(torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.int64), None, None)),
     ValueError, "key"),
    (dict(returns=torch.randn(4)), ValueError, "returns"),
    (dict(returns=torch.ones(3, dtype=torch.int64)), TypeError, "returns"),
    (dict(group_index=torch.tensor([0, 1])), ValueError, "group_index"),
    (dict(group_index=torch.tensor([0.0, 1.0, 1.0])), TypeError, "group_index"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask"),
    (dict(match="first"), ValueError, "match"),
    (dict(match=1), TypeError, "match"),
    (dict(spans=object()), TypeError, "spans"),
    (dict(spans=[torch.zeros(3, 4, dtype=torch.bool)] * 5), TypeError, "spans"),
    (dict(spans={"end": torch.zeros(3, 4, dtype=torch.bool), "key": torch.zeros(3, 4, dtype=torch.int64)}),
     TypeError, "spans"),
    (dict(min_support=0), ValueError, "min_support"),
    (dict(min_support=np.int64(-2)), ValueError, "min_support"),
    (dict(min_support=10 ** 30), ValueError, "min_support"),
    (dict(min_support=2 ** 63), ValueError, "min_support"),
    (dict(min_support=1.5), TypeError, "min_support"),
    (dict(min_support=np.float64(2.0)), TypeError, "min_support"),
    (dict(min_support=True), TypeError, "min_support"),
    (dict(min_support=np.bool_(True)), TypeError, "min_support"),
    (dict(leave_one_out=1), TypeError, "leave_one_out"),
    (dict(leave_one_out=np.int64(1)), TypeError, "leave_one_out"),
    (dict(empty_value="none"), TypeError, "empty_value"),
    (dict(empty_value=True), TypeError, "empty_value"),
    (dict(empty_value=10 ** 400), ValueError, "empty_value"),
    (dict(empty_value=torch.tensor(1.0)), TypeError, "empty_value"),
    (dict(validate="yes"), TypeError, "validate"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,exc,word", BAD)
def test_bad_input(override, exc, word):
    args = values_args()
    args.update(override)
    positional = [args.pop(k) for k in ("spans", "returns", "group_index", "mask")]
    with pytest.raises(exc, match=word):
        sk.numca_values(*positional, **args)


@pytest.mark.parametrize("env,validate,scans", [
    (None, None, False), (None, True, True), (None, False, False),
    ("1", None, True), ("1", False, False), ("0", None, False), ("0", True, True), ("", None, False),
])
def test_validate_scans_returns(monkeypatch, env, validate, scans, backend):
    """The NaN scan of returns is opt-in: validate=True, or validate=None with SVEB_VALIDATE=1."""
    if env is None:
        monkeypatch.delenv("SVEB_VALIDATE", raising=False)
    else:
        monkeypatch.setenv("SVEB_VALIDATE", env)
    args = values_args()
    args["returns"][1] = float("nan")
    positional = [args.pop(k) for k in ("spans", "returns", "group_index", "mask")]
    if scans:
        with pytest.raises(ValueError, match="returns"):
            sk.numca_values(*positional, validate=validate, backend=backend)
    else:
        sk.numca_values(*positional, validate=validate, backend=backend)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("match,min_support", [("last", 1), ("prefix", 1), ("last", 2)])
def test_nonfinite_returns_poison_exactly_their_dependents(seed, poison, match, min_support, backend):
    """docs/CONTRACT.md "Common rules" (tests/nonfinite_cases.py): values that average a NaN/inf return
    are non-finite, the others are as the oracle says; validate=True raises instead."""
    from nonfinite_cases import check_numca_nonfinite, numca_poison_case

    clean, poisoned, bad = numca_poison_case(poison, match=match, min_support=min_support)
    out = sk.numca_values(**poisoned, backend=backend)
    check_numca_nonfinite(out, clean, bad, poison)
    with pytest.raises(ValueError, match="returns"):
        sk.numca_values(**poisoned, backend=backend, validate=True)
