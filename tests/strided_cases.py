"""Strided inputs for all four ops (docs/CONTRACT.md "Common rules": any strided input, transposed,
column-major, offset or expanded views, gives the result of contiguous inputs). Shared by the
reference tests (test_strided_inputs.py) and the Triton ones (tests/triton/test_strided_triton.py)."""

import random

import torch

import sveb_kernels as sk
from numca_cases import make_batch as numca_batch, tokenizer_and_vocab
from test_hista import make_batch as hista_batch, random_groups

LAYOUTS = ("column_major", "offset", "expanded")


def relayout(x, layout):
    """x with the same values in another memory layout ("expanded": the first row/element broadcast,
    so the values change; the expectation is computed from the same values made contiguous)."""
    if layout == "column_major":  # a transposed view of a contiguous tensor (1-D: negative-free reversal)
        return x.T.contiguous().T if x.dim() == 2 else torch.stack([x, x], dim=0)[1]
    if layout == "offset":  # storage offset 1 and stride 3 along the last dim
        base = torch.zeros(*x.shape[:-1], 3 * x.shape[-1] + 1, dtype=x.dtype)
        base[..., 1::3] = x
        return base[..., 1::3]
    if layout == "expanded":
        return x[:1].expand_as(x) if x.dim() == 1 else x[:, :1].expand_as(x)
    raise ValueError(layout)


def _same(got, want):
    got = [g.cpu() for g in (got if isinstance(got, (tuple, list)) else [got])]
    want = [w.cpu() for w in (want if isinstance(want, (tuple, list)) else [want])]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, equal_nan=True)


def check_all_ops(backend, device, layout, seed):
    """Every op on `backend`: inputs in `layout` give what their contiguous copies give."""
    rng = random.Random(seed)
    to = lambda xs: [x.to(device) for x in xs]  # noqa: E731
    move = lambda xs: [relayout(x, layout).to(device) for x in xs]  # noqa: E731

    # Hista: hidden, returns, rollout_ids, key_mask, key_bias strided (group_offsets stays valid).
    hidden, returns, rollout_ids, offsets = hista_batch(random_groups(3, 4, 9), 21)
    n = hidden.shape[0]
    extras = [torch.rand(n) > 0.2, torch.randn(n)]
    strided = move([hidden, returns, rollout_ids] + extras)
    assert layout == "expanded" or not strided[0].is_contiguous()
    contiguous = [x.contiguous() for x in strided]
    before = [x.clone() for x in strided]
    got = sk.hista_values(*strided[:3], offsets.to(device), key_mask=strided[3], key_bias=strided[4],
                          backend=backend)
    want = sk.hista_values(*contiguous[:3], offsets.to(device), key_mask=contiguous[3], key_bias=contiguous[4],
                           backend=backend)
    _same(got, want)
    assert all(torch.equal(a, b) for a, b in zip(strided, before))  # inputs untouched

    # GAE
    b, t = 5, 37
    strided = move([torch.randn(b, t), torch.randn(b, t), torch.rand(b, t) > 0.3])
    contiguous = [x.contiguous() for x in strided]
    _same(sk.gae(*strided, gamma=0.9, lam=0.8, backend=backend),
          sk.gae(*contiguous, gamma=0.9, lam=0.8, backend=backend))

    # numeric_spans: token ids and mask
    ids, mask = numca_batch("llama3", rng, rows=3, pieces=6)
    _, vocab = tokenizer_and_vocab("llama3")
    strided = move([ids, mask])
    contiguous = [x.contiguous() for x in strided]
    got = sk.numeric_spans(strided[0], vocab.to(device), strided[1], backend=backend)
    want = sk.numeric_spans(contiguous[0], vocab.to(device), contiguous[1], backend=backend)
    _same(list(got), list(want))

    # numca_values: spans (end, key), returns, group_index, mask; dense inputs, so the Triton mask
    # bug (a `&` of column-major tensors read as row-major) shows.
    b, t = 7, 29
    end = torch.rand(b, t) < 0.3
    key = torch.where(end, torch.randint(1, 4, (b, t)), torch.zeros(b, t, dtype=torch.int64))
    strided = move([end, key, torch.randn(b), torch.randint(0, 3, (b,)), torch.rand(b, t) > 0.2])
    contiguous = [x.contiguous() for x in strided]
    for match in ("last", "prefix"):
        got = sk.numca_values((strided[0], strided[1], None, None), *strided[2:], match=match, backend=backend)
        want = sk.numca_values((contiguous[0], contiguous[1], None, None), *contiguous[2:], match=match,
                               backend=backend)
        _same(got, want)
