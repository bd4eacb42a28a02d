"""numeric_spans (docs/CONTRACT.md §2b) against the §2b regex applied to the tokenizer's own decoded text."""

import math
import random

import pytest
import torch

import sveb_kernels as sk
from numca_cases import FAMILIES, assert_spans_equal, make_batch, oracle_for, tokenizer_and_vocab
from oracles import canonical_number, fnv1a64_key, numeric_spans_oracle
from sveb_kernels.numca import NumericSpans, NumericVocab

BYTES = NumericVocab.from_token_bytes([bytes([i]) for i in range(256)])  # one token per byte


def byte_decode(ids):
    return bytes(ids).decode("latin-1")


def spans_of_text(text: bytes, backend="reference"):
    return sk.numeric_spans(torch.tensor([list(text)]), BYTES, backend=backend)


# One token per byte, plus tokens that hold no byte or several (numbers crossing them, a zero-length
# token inside a number).
MIXED_PIECES = [bytes([i]) for i in range(256)] + [b"", b"12,3", b"4.", b"-", b"x9", b"000,000"]
MIXED = NumericVocab.from_token_bytes(MIXED_PIECES)


def mixed_decode(ids):
    return b"".join(MIXED_PIECES[i] for i in ids).decode("latin-1")


def dense_random_ids(rng, rows, length):
    """Ids over an alphabet that makes every rule of the grammar fire often."""
    alphabet = [ord(c) for c in "0123456789,.-a_ \x80"] + list(range(256, 262))
    weights = [3] * 10 + [3, 3, 3, 1, 1, 2, 1] + [1] * 6
    return torch.tensor([[rng.choices(alphabet, weights)[0] for _ in range(length)] for _ in range(rows)])


def test_grammar_on_dense_random_bytes(seed, backend):
    rng = random.Random(seed)
    for _ in range(60):
        ids = dense_random_ids(rng, rng.randint(1, 5), rng.randint(1, 70))
        mask = torch.rand(ids.shape) > 0.05
        out = sk.numeric_spans(ids, MIXED, mask, backend=backend)
        assert_spans_equal(out, numeric_spans_oracle(mixed_decode, ids, set(), mask), ids)
    ids = dense_random_ids(rng, 3, 40).clamp(max=255)  # no zero-length token: the other selection path
    assert_spans_equal(sk.numeric_spans(ids, MIXED, backend=backend), numeric_spans_oracle(mixed_decode, ids, set()),
                       ids)


def test_zero_length_token_inside_a_number(backend):
    ids = torch.tensor([[54, 50, 128, 48, 56, 256, 49, 57, 44, 48]])  # "62\x80" "0" "8" "" "1" "9" "," "0"
    out = sk.numeric_spans(ids, MIXED, backend=backend)
    assert out.end[0].tolist() == [False, True] + [False] * 5 + [True, False, True]
    assert out.start[0, 7] == 3 and out.key[0, 7] == fnv1a64_key("819")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenized_texts_match_regex_on_decoded_text(seed, family, backend):
    rng = random.Random(seed)
    _, vocab = tokenizer_and_vocab(family)
    for _ in range(6):
        ids, mask = make_batch(family, rng, rows=4, pieces=25)
        out = sk.numeric_spans(ids, vocab, mask, backend=backend)
        assert_spans_equal(out, oracle_for(family, ids, mask), ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_token_ids(seed, family, backend):
    """Token sequences no encoder would produce: numbers cut anywhere, digits glued to anything."""
    tok, vocab = tokenizer_and_vocab(family)
    rng = random.Random(seed)
    pieces = tok.get_vocab(with_added_tokens=True)
    byte_tokens = {i for p, i in pieces.items() if p.startswith("<0x")}  # see test_byte_fallback_invalid_run_*
    usable = [i for i in range(len(vocab)) if i not in byte_tokens]
    numeric = [i for i in usable if any(c in vocab.token_bytes(i) for c in b"0123456789,.-")]
    ids = torch.tensor([[rng.choice(numeric if rng.random() < 0.7 else usable) for _ in range(60)] for _ in range(5)])
    mask = torch.rand(ids.shape) > 0.05
    out = sk.numeric_spans(ids, vocab, mask, backend=backend)
    assert_spans_equal(out, oracle_for(family, ids, mask), ids)


def keys_of(text: str, family: str, backend="reference"):
    tok, vocab = tokenizer_and_vocab(family)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    out = sk.numeric_spans(ids, vocab, backend=backend)
    return out.key[out.end].tolist(), out.value[out.end].tolist()


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama2"])
def test_equivalent_forms_share_one_key(family, backend):
    keys, values = keys_of("1,000 1000 1000.00 1,000.0 01000", family, backend=backend)
    assert len(keys) == 5 and len(set(keys)) == 1 and keys[0] == fnv1a64_key("1000") and set(values) == {1000.0}
    keys, values = keys_of("-0.0 0 000 -0 0.000", family, backend=backend)
    assert len(keys) == 5 and len(set(keys)) == 1 and keys[0] == fnv1a64_key("0")
    assert all(v == 0.0 and math.copysign(1, v) == 1 for v in values)  # "-0" is canonical "0": +0.0
    keys, _ = keys_of("1.5 1.50 01.5 -1.5 15 0.15", family, backend=backend)
    assert keys[0] == keys[1] == keys[2] and len(set(keys)) == 4
    # the same on every tokenizer
    assert keys_of("12,345.5", family, backend=backend)[0] == keys_of("12345.50", "llama3", backend=backend)[0]


def test_canonical_forms_and_values(backend):
    cases = {b"-1,234.500": ("-1234.5", -1234.5), b"007": ("7", 7.0), b"-0.000": ("0", 0.0),
             b"0.0012": ("0.0012", 0.0012), b"x -12": ("-12", -12.0), b"--5": ("-5", -5.0), b"a-5": ("5", 5.0),
             b"5-3": ("3", 3.0)}
    for text, (canon, value) in cases.items():
        out = spans_of_text(text, backend=backend)
        t = int(torch.nonzero(out.end[0])[-1])
        assert out.key[0, t] == fnv1a64_key(canon) and out.value[0, t] == value, text
        assert_spans_equal(out, numeric_spans_oracle(byte_decode, torch.tensor([list(text)]), set()))
    assert canonical_number(b"-0,000.000") == "0" and canonical_number(b"0010.0100") == "10.01"


def test_numbers_over_many_tokens_and_very_long_numbers(backend):
    tok, vocab = tokenizer_and_vocab("qwen2")  # one token per digit
    long_int = "9" * 400  # overflows float64
    long_frac = "0." + "0" * 330 + "17"  # underflows
    exact = "123456789012345678901234567890.123456789"
    text = f"a {long_int} b {long_frac} c {exact} d -1{',000' * 40}.5"
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    out = sk.numeric_spans(ids, vocab, backend=backend)
    assert_spans_equal(out, oracle_for("qwen2", ids))
    values = out.value[out.end].tolist()
    assert values[0] == math.inf and values[1] == 0.0 and values[2] == float(exact)
    assert values[3] == -float("1" + "000" * 40 + ".5")
    ends = torch.nonzero(out.end[0]).flatten()
    assert int(ends[0] - out.start[0, ends[0]]) == 399  # 400 digit tokens


def test_mask_and_special_tokens_split_numbers(backend):
    tok, vocab = tokenizer_and_vocab("qwen2")
    ids = tok.encode("x 123456 y", add_special_tokens=False).ids
    digits = [i for i, t in enumerate(ids) if tok.id_to_token(t).isdigit()]
    ids_t = torch.tensor([ids, ids])
    mask = torch.ones_like(ids_t, dtype=torch.bool)
    mask[0, digits[2]] = False  # "12" hole "456"
    ids_t[1, digits[3]] = tok.token_to_id("<|im_end|>")  # "123" special "56"
    out = sk.numeric_spans(ids_t, vocab, mask, backend=backend)
    assert out.key[0][out.end[0]].tolist() == [fnv1a64_key("12"), fnv1a64_key("456")]
    assert out.key[1][out.end[1]].tolist() == [fnv1a64_key("123"), fnv1a64_key("56")]
    assert_spans_equal(out, oracle_for("qwen2", ids_t, mask))


def test_several_numbers_in_one_token_last_wins(backend):
    vocab = NumericVocab.from_token_bytes([b"1 2", b"3", b" ", b"x-4,000.5 7,"])
    out = sk.numeric_spans(torch.tensor([[0, 1, 2, 3]]), vocab, backend=backend)
    assert out.end[0].tolist() == [True, True, False, True]  # "1 23 x-4,000.5 7,"
    assert out.start[0].tolist() == [0, 0, -1, 3]  # "23" starts in token 0; "7" is token 3's last number
    assert out.key[0, 0] == fnv1a64_key("1") and out.key[0, 1] == fnv1a64_key("23")
    assert out.key[0, 3] == fnv1a64_key("7") and out.value[0, 1] == 23.0 and math.isnan(out.value[0, 2])


def test_no_numbers_empty_and_fully_masked(backend):
    for ids in (torch.zeros(0, 5, dtype=torch.int64), torch.zeros(3, 0, dtype=torch.int64),
                torch.tensor([list(b"no digits here")]), torch.tensor([list(b"digits in no number: a1 x22 .5 _7")])):
        out = sk.numeric_spans(ids, BYTES, backend=backend)
        assert out.end.shape == ids.shape and not out.end.any() and (out.start == -1).all()
        assert out.key.dtype == torch.int64 and out.value.dtype == torch.float64 and out.start.dtype == torch.int32
    ids = torch.tensor([list(b"12 34")])
    out = sk.numeric_spans(ids, BYTES, torch.zeros_like(ids, dtype=torch.bool), backend=backend)
    assert not out.end.any() and torch.isnan(out.value).all() and (out.key == 0).all()


def test_int32_non_contiguous_inputs_untouched(seed, backend):
    ids, mask = make_batch("llama3", random.Random(seed), rows=4, pieces=15)
    _, vocab = tokenizer_and_vocab("llama3")
    want = sk.numeric_spans(ids, vocab, mask, backend=backend)
    ids_nc = torch.stack([ids.int(), ids.int()], dim=2)[:, :, 0]
    mask_nc = torch.stack([mask.int(), mask.int()], dim=2)[:, :, 1]  # 0/1 int mask
    before = (ids_nc.clone(), mask_nc.clone())
    out = sk.numeric_spans(ids_nc, vocab.table, mask_nc, backend=backend)  # the table tensor is accepted too
    assert not ids_nc.is_contiguous()
    assert torch.equal(before[0], ids_nc) and torch.equal(before[1], mask_nc)
    for a, b in zip(out, want):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(torch.isnan(a), torch.isnan(b)))


def test_opcheck(seed, backend):
    """opcheck's AOT check compares with assert_close, which calls NaN != NaN, and `value` is NaN off
    numbers: that one check runs here with equal_nan instead."""
    ids, mask = make_batch("gpt2", random.Random(seed), rows=3, pieces=10)
    _, vocab = tokenizer_and_vocab("gpt2")
    op = torch.ops.sveb.numeric_spans.default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in ((ids, vocab.table, mask, backend), (ids.int(), vocab.table, None, backend)):
        torch.library.opcheck(op, args, test_utils=utils)
        compiled = torch.compile(lambda *a: op(*a), backend="aot_eager", fullgraph=True, dynamic=True)(*args)
        for a, b in zip(compiled, op(*args)):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_compile_fullgraph_spans_then_values(seed, backend):
    """The vocab is a Python object outside the graph; its table enters the op as a tensor."""
    ids, mask = make_batch("qwen2", random.Random(seed), rows=4, pieces=12)
    _, vocab = tokenizer_and_vocab("qwen2")
    returns, groups = torch.randn(4), torch.tensor([0, 0, 1, 1])

    def step(ids, mask, returns, groups):
        spans = sk.numeric_spans(ids, vocab, mask, backend=backend)
        values = sk.numca_values(spans, returns, groups, mask, match="prefix", backend=backend)
        return spans.value.nan_to_num(0.0).sum(), values

    eager = step(ids, mask, returns, groups)
    compiled = torch.compile(step, fullgraph=True)(ids, mask, returns, groups)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_hand_built_spans_type():
    spans = NumericSpans(torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.int64),
                         torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.int32))
    assert spans._fields == ("end", "key", "value", "start")


BAD = [
    (dict(token_ids=torch.tensor([[0, 256]])), ValueError, "token_ids"),
    (dict(token_ids=torch.tensor([[-1, 3]])), ValueError, "token_ids"),
    (dict(token_ids=torch.tensor([[1.0, 2.0]])), TypeError, "token_ids"),
    (dict(token_ids=torch.tensor([1, 2])), ValueError, "token_ids"),
    (dict(token_ids=[[1, 2]]), TypeError, "token_ids"),
    (dict(vocab="gpt2"), TypeError, "vocab"),
    (dict(vocab=torch.zeros(256, 3)), ValueError, "vocab"),
    (dict(vocab=torch.zeros(256, 2, dtype=torch.int64)), ValueError, "vocab"),
    (dict(vocab=BYTES.to("meta")), ValueError, "vocab"),
    (dict(mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(1, 2, dtype=torch.complex64)), TypeError, "mask"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(validate="no"), TypeError, "validate"),
    (dict(validate=0), TypeError, "validate"),
]


@pytest.mark.parametrize("override,exc,word", BAD)
def test_bad_input(override, exc, word):
    args = dict(token_ids=torch.tensor([[49, 50]]), vocab=BYTES, mask=None)
    args.update(override)
    with pytest.raises(exc, match=word):
        sk.numeric_spans(args.pop("token_ids"), args.pop("vocab"), **args)


def test_out_of_range_ids_read_as_separators_without_validation(backend):
    """validate=False skips the range scan; the kernels still never read outside the table."""
    ids = torch.tensor([[49, 300, 50, -7, 51]])
    out = sk.numeric_spans(ids, BYTES, validate=False, backend=backend)
    assert out.end[0].tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("env,validate,scans", [
    (None, None, True), (None, True, True), (None, False, False),
    ("1", None, True), ("1", False, False), ("0", None, False), ("0", True, True), ("", None, True),
])
def test_id_range_check_follows_validate_and_env(monkeypatch, env, validate, scans, backend):
    """The id-range check runs by default (a clear error for ids outside the vocab); validate=False or
    SVEB_VALIDATE=0 turn it off, and then those ids read as separators."""
    if env is None:
        monkeypatch.delenv("SVEB_VALIDATE", raising=False)
    else:
        monkeypatch.setenv("SVEB_VALIDATE", env)
    ids = torch.tensor([[49, 256, 50, 51]])
    if scans:
        with pytest.raises(ValueError, match="token_ids"):
            sk.numeric_spans(ids, BYTES, validate=validate, backend=backend)
    else:
        out = sk.numeric_spans(ids, BYTES, validate=validate, backend=backend)
        assert out.end[0].tolist() == [True, False, False, True] and out.key[0, 3] == fnv1a64_key("23")
