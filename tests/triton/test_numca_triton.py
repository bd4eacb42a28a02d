"""The Numca Triton kernels against the regex oracle and the reference (SPEC 2b, 2c).

Without a GPU: CPU tensors under TRITON_INTERPRET=1 (small cases: the interpreter runs a scan's
combine once per element in Python); on a GPU machine the same cases run compiled, and the tests
marked `gpu` add trainer-sized batches against the reference.
"""

import os
import pathlib
import random
import sys

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
