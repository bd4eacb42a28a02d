"""Numca: numbers in the generated text as milestones (SPEC section 2).

A rollout that writes the number another rollout of the same prompt also wrote has probably reached
the same intermediate result; the mean return of the rollouts that reached it estimates the value of
having reached it. Three pieces:

- `NumericVocab.from_tokenizer(tok)`: for every token id, the bytes it adds to the decoded text
  (special tokens: one separator byte), plus the compact table the kernels read (`vocab.py`).
- `numeric_spans(token_ids[B,T], vocab, mask)`: every match of the SPEC regex

      rb"(?<![0-9A-Za-z_.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\\.[0-9]+)?(?![0-9])"

  over a row's bytes (masked tokens are one separator byte), reported at the token holding the
  number's last byte: end=True, key = FNV-1a 64 of the canonical form ("1,000.50" -> "1000.5",
  "-0.0" -> "0"), value = float64, start = token of the first byte; elsewhere False, 0, NaN, -1.
  Numbers may span any number of tokens.
- `numca_values(spans, returns[B], group_index[B], mask[B,T])`: at each token, the mean return of
  the peers (same group, not the rollout itself by default) that share the rollout's latest
  milestone: its last number's key (match="last") or the whole sequence of its numbers so far
  (match="prefix"); held until the next milestone with at least `min_support` peers, and the
  peers' mean before the first.

Files: `vocab.py` (bytes and tables), `reference.py` (vectorized PyTorch, any device), `triton.py`
(scan kernels), `toy_tokenizers.py` (small tokenizers of each Hugging Face family, trained locally).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import _backend, _checks, _ops
from . import reference as _reference
from .vocab import COL_CLASSES, NumericVocab

MATCHES = ("last", "prefix")
_ID_DTYPES = (torch.int32, torch.int64)
_MASK_DTYPES = (torch.bool,) + _checks.INT_DTYPES + _checks.FLOAT_DTYPES


class NumericSpans(NamedTuple):
    """Per token of a [B, T] batch: end (bool, a number's last byte is here), key (int64 FNV-1a of
    its canonical form, 0 elsewhere), value (float64, NaN elsewhere), start (int32 token of its
    first byte, -1 elsewhere)."""

    end: Tensor
    key: Tensor
    value: Tensor
    start: Tensor


def _load_triton(name):
    def load():
        from . import triton as _triton

        return getattr(_triton, name)
    return load


_backend.register("numeric_spans", "reference", lambda: _reference.numeric_spans)
_backend.register("numeric_spans", "triton", _load_triton("numeric_spans"))
_backend.register("numca_values", "reference", lambda: _reference.numca_values)
_backend.register("numca_values", "triton", _load_triton("numca_values"))


def _as_bool_mask(name: str, mask: Tensor, shape, device) -> Tensor:
    _checks.tensor(name, mask, dtypes=_MASK_DTYPES, shape=shape, device=device)
    return mask if mask.dtype == torch.bool else mask != 0


def numeric_spans(
    token_ids: Tensor,
    vocab: Union[NumericVocab, Tensor],
    mask: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    validate: Optional[bool] = None,
) -> NumericSpans:
    """Numbers in each row's text, reported at the token holding their last byte (SPEC 2b).

    Args:
        token_ids: [B, T] int32/int64 token ids of the rows (prompt and/or response).
        vocab: the tokenizer's NumericVocab (or its `.table`), on the same device as token_ids.
        mask: optional [B, T] bool (or 0/1 numeric); False tokens are one separator byte 0x00.
        backend: "auto" (SVEB_BACKEND, else the fastest for the device), "reference", "triton".
        validate: token ids are checked to lie in [0, V) unless validate=False (an eager-mode
            reduction; skipped while compiling, where out-of-range ids read as separators).

    Returns:
        NumericSpans(end [B,T] bool, key [B,T] int64, value [B,T] float64, start [B,T] int32).
    """
    _checks.tensor("token_ids", token_ids, ndim=2, dtypes=_ID_DTYPES)
    shape, device = tuple(token_ids.shape), token_ids.device
    table = vocab.table if isinstance(vocab, NumericVocab) else vocab
    if not isinstance(table, Tensor):
        raise TypeError(f"vocab must be a NumericVocab (or its table tensor), got {type(vocab).__name__}")
    if table.dim() != 2 or table.shape[1] <= COL_CLASSES or table.dtype != torch.int64:
        raise ValueError(f"vocab table must be int64 [V, >{COL_CLASSES}] as NumericVocab builds it, "
                         f"got {table.dtype} {list(table.shape)}")
    if table.device != device:
        raise ValueError(f"vocab is on {table.device} but token_ids on {device}: use vocab.to(token_ids.device)")
    if mask is not None:
        mask = _as_bool_mask("mask", mask, shape, device)
    if validate is not False and not _checks.is_tracing() and token_ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(token_ids))
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(f"token_ids must lie in [0, {table.shape[0]}) (the vocab size), "
                             f"got values in [{lo}, {hi}]")
    backend = _backend.resolve("numeric_spans", backend, device)
    return NumericSpans(*_ops.numeric_spans(token_ids, table, mask, backend))


def numca_values(
    spans: NumericSpans,
    returns: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    match: str = "last",
    leave_one_out: bool = True,
    min_support: int = 1,
    empty_value: float = 0.0,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> Tensor:
    """Milestone values per token (SPEC 2c).

    Args:
        spans: NumericSpans of the batch (only `end` [B,T] bool and `key` [B,T] int64 are read; a
            tuple built by hand is fine). Numbers count only where `mask` is True.
        returns: [B] float, each rollout's return.
        group_index: [B] integer, the prompt (group) of each rollout.
        mask: [B, T] bool (or 0/1 numeric): the tokens to value; the others get 0.
        match: "last" (peers that wrote the rollout's latest number anywhere) or "prefix" (peers
            whose first m numbers are the rollout's first m).
        leave_one_out: leave the rollout itself out of its peers.
        min_support: int >= 1, the peers a milestone needs; with fewer the previous value is kept.
        empty_value: the value when a rollout has no peers at all.
        backend: "auto", "reference" or "triton".
        validate: also check that returns are finite (default: SVEB_VALIDATE=1).

    Returns:
        values [B, T] float32.
    """
    end, key = getattr(spans, "end", None), getattr(spans, "key", None)
    if end is None or key is None:
        raise TypeError(f"spans must be a NumericSpans (end, key, value, start), got {type(spans).__name__}")
    _checks.tensor("spans.end", end, ndim=2, dtypes=(torch.bool,))
    shape, device = tuple(end.shape), end.device
    _checks.tensor("spans.key", key, dtypes=(torch.int64,), shape=shape, device=device)
    _checks.tensor("returns", returns, dtypes=_checks.FLOAT_DTYPES, shape=(shape[0],), device=device)
    _checks.tensor("group_index", group_index, dtypes=_checks.INT_DTYPES, shape=(shape[0],), device=device)
    mask = _as_bool_mask("mask", mask, shape, device)
    _checks.choice("match", match, MATCHES)
    if not isinstance(leave_one_out, bool):
        raise TypeError(f"leave_one_out must be a bool, got {type(leave_one_out).__name__}")
    if isinstance(min_support, bool) or not isinstance(min_support, int):
        raise TypeError(f"min_support must be an int, got {type(min_support).__name__}")
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1, got {min_support}")
    if isinstance(empty_value, bool) or not isinstance(empty_value, (int, float)):
        raise TypeError(f"empty_value must be a float, got {type(empty_value).__name__}")
    if _checks.validate_requested(validate):
        _checks.all_finite("returns", returns)
    backend = _backend.resolve("numca_values", backend, device)
    return _ops.numca_values(end, key, returns, group_index, mask, match, leave_one_out, min_support,
                             float(empty_value), backend)


__all__ = ["NumericSpans", "NumericVocab", "numca_values", "numeric_spans"]
