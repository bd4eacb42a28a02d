"""Numca: numbers in the generated text as milestones (docs/CONTRACT.md §2).

A rollout that writes the number another rollout of the same prompt also wrote has probably reached
the same intermediate result; the mean return of the rollouts that reached it estimates the value of
having reached it. Three pieces:

- `NumericVocab.from_tokenizer(tok)`: for every token id, the bytes it adds to the decoded text
  (special tokens: one separator byte), plus the compact table the kernels read (`vocab.py`).
- `numeric_spans(token_ids[B,T], vocab, mask)`: every match of the regex of docs/CONTRACT.md §2b

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

Checks: shapes, dtypes and devices always. Data scans: the token-id range of numeric_spans runs by
default (a clear ValueError for ids outside the vocab; the kernels themselves read such ids as
separators), the finiteness of numca_values' returns only on request; validate=True/False decides,
validate=None follows SVEB_VALIDATE when it is set (1: every scan, 0: none). The decisions a user
should know are listed in docs/DESIGN.md (Numca).

Files: `vocab.py` (bytes and tables), `reference.py` (vectorized PyTorch, any device), `triton.py`
(scan kernels), `cuda.py` (numeric_spans on the compiled extension, csrc/numca*),
`toy_tokenizers.py` (small tokenizers of each Hugging Face family, trained locally).
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
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
_backend.register("numeric_spans", "cuda", lambda: importlib.import_module(".cuda", __name__).numeric_spans)
_backend.register("numca_values", "reference", lambda: _reference.numca_values)
_backend.register("numca_values", "triton", _load_triton("numca_values"))
_backend.register("numca_values", "cuda", lambda: importlib.import_module(".cuda", __name__).numca_values)
_backend.register("numeric_spans", "cpp", lambda: importlib.import_module(".cpp", __name__).numeric_spans)
_backend.register("numca_values", "cpp", lambda: importlib.import_module(".cpp", __name__).numca_values)


def _as_bool_mask(name: str, mask: Tensor, shape, device) -> Tensor:
    _checks.tensor(name, mask, dtypes=_MASK_DTYPES, shape=shape, device=device)
    return mask if mask.dtype == torch.bool else mask != 0


_TRUE_WORDS = ("1", "true", "yes", "on")


def _scans(validate: Optional[bool]) -> Optional[bool]:
    """Which data scans to run: True (all), False (none) or None (the default: only the token-id range
    check, see numeric_spans). validate=True/False decides; validate=None follows SVEB_VALIDATE when it
    is set (1 enables every scan, 0 disables all), else the default. No scan while compiling."""
    if validate is not None and not isinstance(validate, (bool, np.bool_)):
        raise TypeError(f"validate must be None or a bool, got {type(validate).__name__}")
    if _checks.is_tracing():
        return False
    if validate is None:
        env = os.environ.get("SVEB_VALIDATE", "").strip().lower()
        return None if env == "" else env in _TRUE_WORDS
    return bool(validate)


def _as_spans(spans) -> NumericSpans:
    if isinstance(spans, NumericSpans):
        return spans
    if isinstance(spans, (tuple, list)) and len(spans) == 4:
        return NumericSpans(*spans)
    raise TypeError("spans must be a NumericSpans(end, key, value, start) or a 4-tuple/list in that order, "
                    f"got {type(spans).__name__}" + (f" of length {len(spans)}" if isinstance(spans, (tuple, list))
                                                      else ""))


def numeric_spans(
    token_ids: Tensor,
    vocab: Union[NumericVocab, Tensor],
    mask: Optional[Tensor] = None,
    *,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> NumericSpans:
    """Numbers in each row's text, reported at the token holding their last byte (docs/CONTRACT.md §2b).

    Args:
        token_ids: [B, T] int32/int64 token ids of the rows (prompt and/or response).
        vocab: the tokenizer's NumericVocab (or its `.table`), on the same device as token_ids.
        mask: optional [B, T] bool (or 0/1 numeric); False tokens are one separator byte 0x00.
        backend: "auto" (SVEB_BACKEND, else the fastest for the device), "reference", "triton", "cuda", "cpp".
        validate: token ids are checked to lie in [0, V) (one min/max reduction, for a clear
            ValueError: the kernels never read outside the table, ids outside it read as separators).
            The check runs by default; validate=False, or validate=None with SVEB_VALIDATE=0, skips
            it; it is always skipped while compiling.

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
    if _scans(validate) is not False and token_ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(token_ids))
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(f"token_ids must lie in [0, {table.shape[0]}) (the vocab size), "
                             f"got values in [{lo}, {hi}]")
    backend = _backend.resolve("numeric_spans", backend, device)
    return NumericSpans(*_ops.numeric_spans(token_ids, table, mask, backend))


def check_values_arguments(spans, returns, group_index, mask, *, match, leave_one_out, min_support, empty_value,
                           validate, group_name: str = "group_index"):
    """The argument checks of numca_values, the one home that `numca_values`, `distributed.numca_values`
    and the estimators (through them) call. `group_name` is the group argument's name in the caller
    (distributed: group_ids). Returns (end, key, bool mask, leave_one_out, min_support, empty_value)."""
    end, key = _as_spans(spans)[:2]
    _checks.tensor("spans.end", end, ndim=2, dtypes=(torch.bool,))
    shape, device = tuple(end.shape), end.device
    _checks.tensor("spans.key", key, dtypes=(torch.int64,), shape=shape, device=device)
    _checks.tensor("returns", returns, dtypes=_checks.FLOAT_DTYPES, shape=(shape[0],), device=device)
    _checks.tensor(group_name, group_index, dtypes=_checks.INT_DTYPES, shape=(shape[0],), device=device)
    mask = _as_bool_mask("mask", mask, shape, device)
    _checks.choice("match", match, MATCHES)
    leave_one_out = _checks.flag("leave_one_out", leave_one_out)
    min_support = _checks.integer("min_support", min_support, low=1)
    empty_value = _checks.real("empty_value", empty_value)
    if _scans(validate):
        _checks.all_finite("returns", returns)
    return end, key, mask, leave_one_out, min_support, empty_value


def numca_values(
    spans: Union[NumericSpans, Sequence[Tensor]],
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
    """Milestone values per token (docs/CONTRACT.md §2c).

    Args:
        spans: NumericSpans of the batch, from numeric_spans or built by hand, or a plain 4-tuple/list
            (end, key, value, start). Only `end` [B,T] bool and `key` [B,T] int64 are read (value and
            start may be None). Numbers count only where `mask` is True.
        returns: [B] float, each rollout's return.
        group_index: [B] integer, the prompt (group) of each rollout.
        mask: [B, T] bool (or 0/1 numeric): the tokens to value; the others get 0.
        match: "last" (peers that wrote the rollout's latest number anywhere) or "prefix" (peers
            whose first m numbers are the rollout's first m).
        leave_one_out: leave the rollout itself out of its peers.
        min_support: int >= 1 (Python or numpy), the peers a milestone needs; with fewer the previous
            value is kept.
        empty_value: float (Python or numpy), the value when a rollout has no peers at all.
        backend: "auto" (SVEB_BACKEND, else the fastest for the device), "reference", "triton", "cuda", "cpp".
        validate: also check that returns are finite (default: only when SVEB_VALIDATE=1).

    Returns:
        values [B, T] float32.
    """
    end, key, mask, leave_one_out, min_support, empty_value = check_values_arguments(
        spans, returns, group_index, mask, match=match, leave_one_out=leave_one_out, min_support=min_support,
        empty_value=empty_value, validate=validate)
    device = end.device
    backend = _backend.resolve("numca_values", backend, device)
    # Detached: values are regression targets (see docs/DESIGN.md, "No gradients").
    return _ops.numca_values(end, key, returns.detach(), group_index, mask, match, leave_one_out, min_support,
                             empty_value, backend)


__all__ = ["NumericSpans", "NumericVocab", "numca_values", "numeric_spans"]
