"""Shared Numca test cases: texts full of numbers, tokenized batches of every tokenizer family, and the
comparison with the regex oracle (tests/oracles.py). Used by test_numca_*.py and tests/triton/."""

from __future__ import annotations

import functools
import math
import random
import re

import torch

from oracles import numeric_spans_oracle
from sveb_kernels.numca import NumericVocab, toy_tokenizers

FAMILIES = toy_tokenizers.FAMILIES

# Forms the grammar covers and forms it must not match (or only partly: "1e5" is the number 1).
_FIXED_FORMS = [
    "1,23,456", "1234,567", "1,2345", "1,234,5678", "12,34", ",123", "1,,234", "1,234,", "1.234,56", "1,234.5,6",
    "-0.0", "-0", "000", "0.000", "-000.000", "00.100", "1000.00", "1,000", "1000", "007", "0.50", ".5", "5.", "5..",
    "1.2.3", "v1.2.3", "x1", "item_3", "abc123def", "_9", "9_", "a1b2", "0x1F", "h2o", "var_12.5", "1e5", "2.5E-3",
    "3/4", "12:30:45", "2024-01-05", "$1,234.50", "45%", "(-3)", "+7", "--5", "5-3", "x-5", "a -5", "_-5", ".-5",
    "−3", "é12", "12€", "中3", "½5", "３", "1,000,000.000", "-1,234.50", "0,001", "9,999,999", "1.", "-.5",
]
_SEPARATORS = [" ", " ", " ", ", ", "; ", "\n", "", "-", ".", " = ", "é", "(", ")", ",", "_", "a"]
_WORDS = ["the", "total", "is", "x", "step", "answer", "so", "km", "apples", "Therefore", "we", "get"]


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return str(rng.randint(0, 10 ** rng.randint(1, 12)))
    if kind < 0.25:
        return "0" * rng.randint(1, 3) + str(rng.randint(0, 999))
    if kind < 0.4:
        return f"{rng.uniform(-1e4, 1e4):.{rng.randint(1, 6)}f}"
    if kind < 0.5:
        return f"{rng.randint(0, 10 ** rng.randint(4, 12)):,}"
    if kind < 0.55:
        return f"{rng.randint(0, 10 ** 9):,}.{rng.randint(0, 999):0{rng.randint(3, 5)}d}"
    if kind < 0.6:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(19, 80)))
        return digits + ("." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30)))
                         if rng.random() < 0.4 else "")
    if kind < 0.62:
        return "1" + ",000" * rng.randint(5, 30)
    return rng.choice(_FIXED_FORMS)


def random_text(rng: random.Random, pieces: int) -> str:
    out = []
    for _ in range(pieces):
        out.append(_number(rng) if rng.random() < 0.6 else rng.choice(_WORDS))
        out.append(rng.choice(_SEPARATORS))
    return "".join(out)


@functools.lru_cache(maxsize=None)
def tokenizer_and_vocab(family: str):
    tok = toy_tokenizers.build(family)
    return tok, NumericVocab.from_tokenizer(tok)


def special_ids(vocab: NumericVocab) -> set[int]:
    return set(torch.nonzero(vocab.special).flatten().tolist())


def _byte_token_values(tok) -> dict[int, int]:
    out = {}
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        if m:
            out[i] = int(m.group(1), 16)
    return out


def make_batch(family: str, rng: random.Random, rows: int = 3, pieces: int = 12, hole_rate: float = 0.05,
               special_rate: float = 0.03):
    """Tokenized random texts as [B, T] ids with special tokens spliced in, padding and masked holes.

    Holes and special tokens are never put inside a multi-byte byte-fallback character: tokenizers'
    ByteFallback decoder turns a whole invalid byte run into U+FFFD, ASCII bytes included, while the
    NumericVocab keeps each byte (vocab.py explains why); real encodings never have such runs.
    """
    tok, vocab = tokenizer_and_vocab(family)
    specials = sorted(special_ids(vocab))
    byte_value = _byte_token_values(tok)
    rows_ids, rows_keep = [], []
    for _ in range(rows):
        ids = tok.encode(random_text(rng, pieces), add_special_tokens=False).ids
        out, keep = [], []
        for i, t in enumerate(ids):
            inside_char = byte_value.get(t, 0) >= 0x80 or (i > 0 and byte_value.get(ids[i - 1], 0) >= 0x80)
            if not inside_char and specials and rng.random() < special_rate:
                out.append(rng.choice(specials))
                keep.append(True)
            out.append(t)
            keep.append(inside_char or rng.random() >= hole_rate)
        rows_ids.append(out)
        rows_keep.append(keep)
    length = max(len(r) for r in rows_ids)
    pad = specials[0] if specials else 0
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows_ids], dtype=torch.int64)
    mask = torch.tensor([k + [False] * (length - len(k)) for k in rows_keep], dtype=torch.bool)
    return ids, mask


def oracle_for(family: str, ids: torch.Tensor, mask=None):
    tok, vocab = tokenizer_and_vocab(family)
    return numeric_spans_oracle(lambda run: tok.decode(run, skip_special_tokens=False), ids, special_ids(vocab), mask)


def assert_spans_equal(out, want, ids=None, *, value_ulps: int = 0):
    """Exact end/key/start; values bitwise equal (or within value_ulps ulp for kernels)."""
    end, key, value, start = want
    got_end = out.end.cpu().tolist()
    if got_end != end:
        rows = [b for b in range(len(end)) if got_end[b] != end[b]]
        b = rows[0]
        diff = [t for t in range(len(end[b])) if got_end[b][t] != end[b][t]]
        raise AssertionError(f"end differs in row {b} at tokens {diff[:10]}"
                             + (f" ids {ids[b, max(0, diff[0] - 5):diff[0] + 5].tolist()}" if ids is not None else ""))
    assert out.start.cpu().tolist() == start, "start differs"
    assert out.key.cpu().tolist() == key, "key differs"
    got_value = out.value.cpu().to(torch.float64)
    want_value = torch.tensor(value, dtype=torch.float64).reshape(got_value.shape)
    nan = torch.isnan(want_value)
    assert torch.equal(torch.isnan(got_value), nan), "NaN pattern of value differs"
    a, b = got_value[~nan], want_value[~nan]
    if value_ulps == 0:
        assert torch.equal(a, b), f"value differs: {a[a != b][:5].tolist()} vs {b[a != b][:5].tolist()}"
    else:
        both_inf = torch.isinf(a) & (a == b)
        ulp = torch.tensor([math.ulp(x) if math.isfinite(x) else 0.0 for x in b.tolist()], dtype=torch.float64)
        ok = both_inf | ((a - b).abs() <= value_ulps * ulp)
        assert bool(ok.all()), f"value off by > {value_ulps} ulp: {a[~ok][:5].tolist()} vs {b[~ok][:5].tolist()}"
