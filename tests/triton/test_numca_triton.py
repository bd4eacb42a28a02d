"""The Numca Triton kernels against the regex oracle and the reference (docs/CONTRACT.md §2b, §2c).

Without a GPU: CPU tensors under TRITON_INTERPRET=1 (small cases: the interpreter runs a scan's
combine once per element in Python); on a GPU machine the same cases run compiled, and the tests
marked `gpu` add trainer-sized batches against the reference.
"""

import os
import pathlib
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: oracles and shared helpers

import sveb_kernels as sk  # noqa: E402
from numca_cases import FAMILIES, assert_spans_equal, make_batch, oracle_for, tokenizer_and_vocab  # noqa: E402
from oracles import numca_values_oracle, numeric_spans_oracle  # noqa: E402
from sveb_kernels.numca import NumericSpans, NumericVocab  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [
    pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or a GPU"),
    # the interpreter's numpy reports the overflow that the value code expects and discards
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

BYTES = NumericVocab.from_token_bytes([bytes([i]) for i in range(256)])


def triton_spans(ids, vocab, mask=None, block_t=None):
    from sveb_kernels.numca import triton as numca_triton

    table = vocab.table.to(DEVICE)
    out = numca_triton.numeric_spans(ids.to(DEVICE), table, None if mask is None else mask.to(DEVICE), block_t=block_t)
    return NumericSpans(*out)


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_match_oracle(seed, family):
    _, vocab = tokenizer_and_vocab(family)
    ids, mask = make_batch(family, random.Random(seed), rows=2, pieces=8)
    out = sk.numeric_spans(ids.to(DEVICE), vocab.to(DEVICE), mask.to(DEVICE), backend="triton")
    assert_spans_equal(out, oracle_for(family, ids, mask), ids, value_ulps=1)


def test_spans_dense_bytes_over_many_chunks(seed):
    """Chunks of 16 tokens: numbers, signs and thousands groups cross chunk borders in both scans;
    zero-length and multi-byte tokens inside numbers."""
    from test_numca_spans import MIXED, dense_random_ids, mixed_decode

    ids = dense_random_ids(random.Random(seed), 3, 53)
    mask = torch.rand(ids.shape) > 0.05
    assert_spans_equal(triton_spans(ids, MIXED, mask, block_t=16), numeric_spans_oracle(mixed_decode, ids, set(), mask),
                       ids)
    assert_spans_equal(triton_spans(ids, MIXED, None, block_t=16), numeric_spans_oracle(mixed_decode, ids, set()), ids)


def test_spans_long_tokens_and_hard_values(seed):
    """Tokens of 20-40 digits (several class words each) and values outside the one-operation
    domain (>15 significant digits, |exponent| > 22, overflow, underflow): within 1 ulp."""
    rng = random.Random(seed)
    pieces = [bytes([i]) for i in range(256)] + [b"12345678901234567890", b"0" * 40, b"9" * 33 + b".", b"-7,000"]
    vocab = NumericVocab.from_token_bytes(pieces)
    ids = torch.tensor([[rng.choice([256, 257, 258, 259, 48 + rng.randrange(10), 46, 44, 32]) for _ in range(40)]
                        for _ in range(2)])
    decode = lambda r: b"".join(pieces[i] for i in r).decode("latin-1")  # noqa: E731
    assert_spans_equal(triton_spans(ids, vocab, block_t=32), numeric_spans_oracle(decode, ids, set()), ids,
                       value_ulps=1)


def test_spans_edge_inputs():
    ids = torch.tensor([[49, 300, 50, -7, 51, 52]])
    out = sk.numeric_spans(ids.to(DEVICE), BYTES.to(DEVICE), backend="triton", validate=False)
    assert out.end[0].tolist() == [True, False, True, False, False, True]  # bad ids read as separators
    out = sk.numeric_spans(ids.clamp(0, 255).to(DEVICE), BYTES.to(DEVICE), torch.zeros(1, 6, dtype=torch.bool,
                           device=DEVICE), backend="triton")
    assert not out.end.any() and bool(torch.isnan(out.value).all())
    empty = sk.numeric_spans(torch.zeros(2, 0, dtype=torch.int64, device=DEVICE), BYTES.to(DEVICE), backend="triton")
    assert empty.end.shape == (2, 0)


def random_spans(batch, length, keys=3, density=0.3):
    end = torch.rand(batch, length) < density
    key = torch.where(end, torch.randint(-3, keys, (batch, length)) * 1000003, torch.zeros(batch, length,
                                                                                           dtype=torch.int64))
    return NumericSpans(end, key, None, None)


def test_kernels_at_their_gpu_block_size(seed):
    """Both kernels with the chunk a GPU uses (1024 tokens) on rows of 1100: a full chunk and a
    partial one, numbers and milestones carried across their border."""
    from sveb_kernels.numca import triton as numca_triton
    from test_numca_spans import MIXED, dense_random_ids, mixed_decode

    block, length = numca_triton.GPU_MAX_BLOCK_T, 1100
    ids = dense_random_ids(random.Random(seed), 1, length)
    mask = torch.rand(ids.shape) > 0.05
    assert_spans_equal(triton_spans(ids, MIXED, mask, block_t=block),
                       numeric_spans_oracle(mixed_decode, ids, set(), mask), ids)
    spans = random_spans(4, length, density=0.05)
    groups, returns, mask = torch.tensor([1, 1, 1, 2]), torch.randn(4), torch.rand(4, length) > 0.1
    for match in ("last", "prefix"):
        out = numca_triton.numca_values(spans.end.to(DEVICE), spans.key.to(DEVICE), returns.to(DEVICE),
                                        groups.to(DEVICE), mask.to(DEVICE), match, True, 1, 0.5, block_t=block)
        want = numca_values_oracle(spans.end, spans.key, returns, groups, mask, match=match, leave_one_out=True,
                                   min_support=1, empty_value=0.5)
        want = torch.tensor(want, dtype=torch.float64).reshape(4, length)
        torch.testing.assert_close(out.cpu().double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("match", ["last", "prefix"])
def test_values_match_oracle(seed, match):
    for leave_one_out, min_support, block_t in ((True, 1, None), (False, 2, 16)):
        batch, length = 7, 37
        spans = random_spans(batch, length)
        groups = torch.tensor([3, 3, 3, 9, 9, -1, 3])
        mask = torch.rand(batch, length) > 0.2
        returns = torch.randn(batch)
        kw = dict(match=match, leave_one_out=leave_one_out, min_support=min_support, empty_value=0.5)
        from sveb_kernels.numca import triton as numca_triton

        out = numca_triton.numca_values(spans.end.to(DEVICE), spans.key.to(DEVICE), returns.to(DEVICE),
                                        groups.to(DEVICE), mask.to(DEVICE), match, leave_one_out, min_support, 0.5,
                                        block_t=block_t)
        want = torch.tensor(numca_values_oracle(spans.end, spans.key, returns, groups, mask, **kw), dtype=torch.float64)
        torch.testing.assert_close(out.cpu().double(), want.reshape(batch, length), rtol=1e-6, atol=1e-6)


def test_values_public_api_plain_tuple_numpy_scalars_strided_inputs(seed):
    """The public function on the Triton backend: a plain (end, key, value, start) tuple of strided
    views, numpy scalars, min_support up to the int64 maximum; inputs untouched."""
    batch, length = 6, 21
    spans = random_spans(batch, length)
    groups, returns = torch.tensor([2, 2, 2, 5, 5, 5]), torch.randn(batch)
    mask = torch.rand(batch, length) > 0.2
    strided = [torch.stack([x, x], dim=-1)[..., 1].to(DEVICE) for x in (spans.end, spans.key, returns, groups, mask)]
    before = [x.clone() for x in strided]
    end, key, ret, grp, msk = strided
    for match, min_support in (("last", np.int64(2)), ("prefix", np.int32(1)), ("last", np.int64(2 ** 63 - 1))):
        out = sk.numca_values((end, key, None, None), ret, grp, msk, match=match, min_support=min_support,
                              empty_value=np.float32(0.5), backend="triton")
        want = numca_values_oracle(spans.end, spans.key, returns, groups, mask, match=match,
                                   min_support=int(min_support), empty_value=0.5)
        torch.testing.assert_close(out.cpu().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(x, b) for x, b in zip(strided, before))


def test_spans_public_api_strided_inputs_untouched(seed):
    ids, mask = make_batch("llama3", random.Random(seed), rows=2, pieces=6)
    _, vocab = tokenizer_and_vocab("llama3")
    ids_nc = torch.stack([ids.int(), ids.int()], dim=2)[:, :, 1].to(DEVICE)
    mask_nc = torch.stack([mask, mask], dim=2)[:, :, 0].to(DEVICE)
    before = (ids_nc.clone(), mask_nc.clone())
    out = sk.numeric_spans(ids_nc, vocab.to(DEVICE), mask_nc, backend="triton")
    assert torch.equal(ids_nc, before[0]) and torch.equal(mask_nc, before[1])
    assert_spans_equal(out, oracle_for("llama3", ids, mask), ids, value_ulps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama3", "qwen2", "gpt2"])
def test_trainer_sized_batch_matches_reference(seed, family):
    _, vocab = tokenizer_and_vocab(family)
    rows = [make_batch(family, random.Random(seed + i), rows=1, pieces=600)[0][0] for i in range(64)]
    length = min(len(r) for r in rows)
    ids = torch.stack([r[:length] for r in rows]).cuda()
    mask = torch.rand(ids.shape, device="cuda") > 0.02
    vocab = vocab.to("cuda")
    got = sk.numeric_spans(ids, vocab, mask, backend="triton")
    ref = sk.numeric_spans(ids, vocab, mask, backend="reference")
    assert torch.equal(got.end, ref.end) and torch.equal(got.key, ref.key) and torch.equal(got.start, ref.start)
    torch.testing.assert_close(got.value, ref.value, rtol=2.3e-16, atol=0, equal_nan=True)
    groups = torch.arange(64, device="cuda") // 8
    returns = torch.rand(64, device="cuda")
    for match in ("last", "prefix"):
        a = sk.numca_values(got, returns, groups, mask, match=match, backend="triton")
        b = sk.numca_values(got, returns, groups, mask, match=match, backend="reference")
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("match,min_support", [("last", 1), ("prefix", 1), ("last", 2)])
def test_values_nonfinite_returns_poison_exactly_their_dependents(seed, poison, match, min_support):
    """docs/CONTRACT.md "Common rules" (tests/nonfinite_cases.py)."""
    from nonfinite_cases import check_numca_nonfinite, numca_poison_case

    clean, poisoned, bad = numca_poison_case(poison, match=match, min_support=min_support)
    args = {k: tuple(None if t is None else t.to(DEVICE) for t in v) if k == "spans" else
            v.to(DEVICE) if torch.is_tensor(v) else v for k, v in poisoned.items()}
    out = sk.numca_values(**args, backend="triton")
    check_numca_nonfinite(out, clean, bad, poison)
