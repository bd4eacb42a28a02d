"""Numca as Triton kernels: numeric spans by two automaton scans per row, milestone values per row.

Imported only by the backend loader (TRITON_INTERPRET must be set before the kernels are defined).

numeric_spans: one program per row, chunks of BLOCK_T tokens. Each token brings from the vocab
table (vocab.py) its transition vectors for the two small automata; `tl.associative_scan` composes
them, so every token learns the forward state at its start (what the text before means for a digit)
and the backward state at its end (what the text after means). A token without digits is then done
(it can only hold the '-' of a number, which the two states tell). A token with digits walks its own
class string: backwards once to get the backward state at each class, forwards once applying the
closed-form regex (reference.py) to find the last number ending in it and the numbers starting in
it. A third scan carries the latest number start (token, class) along the row, and each token where
a number ends re-reads that number's classes from its start to hash the canonical form (FNV-1a) and
build the value M * 10^E from at most 18 significant digits. State entering a chunk comes from the
previous chunk (forward) or from a first backwards pass over the chunks (backward).

numca_values: one program per row with the row's numbers; for each number it looks at the rows of
its group: "last" by binary search in each peer's sorted keys, "prefix" by comparing the peers'
prefix hashes at the same ordinal; then a forward fill along the row (a max-scan of the index of
the last supported number).
"""

from __future__ import annotations

import contextlib

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_compat import loop_bound
from . import vocab as _vocab
from .vocab import BWD_DELTA, FWD_DELTA

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU_MAX_BLOCK_T = 1024  # tokens per chunk on a GPU (8 warps)

# Automaton states and classes (vocab.py), as compile-time constants.
F_O = tl.constexpr(0)
F_OC = tl.constexpr(1)
F_MS = tl.constexpr(4)
F_A1 = tl.constexpr(5)
F_A3 = tl.constexpr(7)
F_A4 = tl.constexpr(8)
F_F = tl.constexpr(9)
B_D1 = tl.constexpr(1)
B_D3 = tl.constexpr(3)
B_D4 = tl.constexpr(4)
B_G = tl.constexpr(5)
B_FR = tl.constexpr(6)
C_COMMA = tl.constexpr(10)
C_DOT = tl.constexpr(11)
C_MINUS = tl.constexpr(12)
NF = tl.constexpr(_vocab.FWD_STATES)
NB = tl.constexpr(_vocab.BWD_STATES)
LEN_SHIFT = tl.constexpr(_vocab.META_LEN_SHIFT)
LEN_MASK = tl.constexpr(_vocab.META_LEN_MASK)
DIGIT_SHIFT = tl.constexpr(_vocab.META_DIGIT_SHIFT)
COL_CLASSES = tl.constexpr(_vocab.COL_CLASSES)
SEPARATOR_FWD = tl.constexpr(_vocab.SEPARATOR_FWD)
SEPARATOR_META = tl.constexpr(_vocab.SEPARATOR_META)
SEPARATOR_WORD = tl.constexpr(_vocab.SEPARATOR_WORD)
FNV_OFFSET = tl.constexpr(0xCBF29CE484222325 - (1 << 64))
FNV_PRIME = tl.constexpr(0x100000001B3)
FNV_ZERO = tl.constexpr(-5808608550200435537)  # FNV-1a of "0"
MAX_DIGITS = tl.constexpr(18)
POW_UP = tl.constexpr(308)    # 10^309 overflows
POW_DOWN = tl.constexpr(343)  # m * 10^-344 < 10^-326 rounds to 0


@triton.jit
def _then_fwd(first, then):
    """Forward maps packed 4 bits a state: apply `first`, then `then`."""
    out = tl.zeros_like(first)
    for s in tl.static_range(NF):
        mid = (first >> (4 * s)) & 15
        out |= ((then >> (4 * mid)) & 15) << (4 * s)
    return out


@triton.jit
def _then_bwd(first, then):
    """Backward maps packed 3 bits a state: apply `first` (the later token), then `then`."""
    out = tl.zeros_like(first)
    for s in tl.static_range(NB):
        mid = (first >> (3 * s)) & 7
        out |= ((then >> (3 * mid)) & 7) << (3 * s)
    return out


@triton.jit
def _max_before(before_a, upto_a, before_b, upto_b):
    """Exclusive and inclusive running max in one scan: elements are (-1, v)."""
    return tl.maximum(upto_a, before_b), tl.maximum(upto_a, upto_b)


@triton.jit
def _column(mat, k, cols):
    """Column k (a scalar) of a [BLOCK, W] tensor."""
    return tl.sum(tl.where(cols[None, :] == k, mat, 0), axis=1)


@triton.jit
def _fnv(h, byte):
    return (h ^ byte) * FNV_PRIME


@triton.jit
def _two_product_error(a, b):
    """a*b - fl(a*b) exactly (Dekker; needs fp fusion off so that no step becomes an fma)."""
    p = a * b
    ta = a * 134217729.0
    a_hi = ta - (ta - a)
    a_lo = a - a_hi
    tb = b * 134217729.0
    b_hi = tb - (tb - b)
    b_lo = b - b_hi
    return ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


@triton.jit
def _decimal_to_double(m, exponent, live, pow_ptr):
    """m * 10^exponent for an int64 m < 10^18. One IEEE operation (correctly rounded) when m <= 2^53
    and |exponent| <= 22; otherwise m and 10^exponent as double-doubles, within 1 ulp. pow_ptr holds
    [hi, lo] of 10^k (k = 0..POW_UP) then of 10^-k (k = 0..POW_DOWN)."""
    mf = m.to(tl.float64)
    small = (m <= 9007199254740992) & (exponent <= 22) & (exponent >= -22)
    k_up = tl.minimum(tl.maximum(exponent, 0), POW_UP)
    k_down = tl.minimum(tl.maximum(-exponent, 0), POW_DOWN)
    up = exponent >= 0
    row = tl.where(up, k_up, POW_UP + 1 + k_down)
    p_hi = tl.load(pow_ptr + 2 * row, mask=live, other=1.0)
    p_lo = tl.load(pow_ptr + 2 * row + 1, mask=live, other=0.0)
    exact = tl.load(pow_ptr + 2 * tl.minimum(k_down, 22), mask=live & ~up, other=1.0)  # 10^k, k <= 22
    simple = tl.where(up, mf * p_hi, mf / exact)
    m_lo = (m - mf.to(tl.int64)).to(tl.float64)  # m = mf + m_lo exactly
    product = mf * p_hi
    correction = _two_product_error(mf, p_hi) + (mf * p_lo + m_lo * p_hi)
    refined = product + correction
    refined = tl.where((refined == refined) & (tl.abs(refined) < float("inf")), refined, product)
    too_big = up & (exponent > POW_UP)
    refined = tl.where(too_big, float("inf"), tl.where(~up & (-exponent > POW_DOWN), 0.0, refined))
    return tl.where(small, simple, refined)


@triton.jit
def _spans_kernel(ids_ptr, mask_ptr, table_ptr, fdelta_ptr, bdelta_ptr, pow_ptr, carry_ptr,
                  end_ptr, key_ptr, value_ptr, start_ptr, T, V, n_chunks,
                  COLS: tl.constexpr, WIDTH: tl.constexpr, WP: tl.constexpr, HAS_MASK: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ids_row = ids_ptr + row * T
    lane = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, WP)
    fwd_identity = tl.zeros((), tl.int64)
    for s in tl.static_range(NF):
        fwd_identity |= tl.full((), s, tl.int64) << (4 * s)
    bwd_identity = tl.zeros((), tl.int64)
    for s in tl.static_range(NB):
        bwd_identity |= tl.full((), s, tl.int64) << (3 * s)

    # ---- pass 1: the backward state entering each chunk from the right -------------------------------
    carry_b = tl.zeros((), tl.int64)  # BWD_N: the end of the row
    tl.store(carry_ptr + row * n_chunks + n_chunks - 1, carry_b.to(tl.int32))
    for cc in range(1, loop_bound(n_chunks)):
        c = n_chunks - cc
        # The chunk loaded reversed (lane 0 = its last token) and scanned forward: a reverse scan with
        # a non-commutative combine has had GPU-only miscompilations (triton#4362), and the interpreter
        # never runs the multi-warp path. The whole chunk's map is then the last lane.
        t = c * BLOCK_T + (BLOCK_T - 1 - lane)
        inside = t < T
        tid = tl.load(ids_row + t, mask=inside, other=0).to(tl.int64)
        ok = inside & (tid >= 0) & (tid < V)
        if HAS_MASK:
            ok &= tl.load(mask_ptr + row * T + t, mask=inside, other=0) != 0
        meta = tl.load(table_ptr + tl.where(ok, tid, 0) * COLS + 1, mask=ok, other=SEPARATOR_META)
        vec = tl.where(inside, meta & 0x1FFFFF, bwd_identity)
        whole = tl.associative_scan(vec, 0, _then_bwd)
        comp = tl.sum(tl.where(lane == BLOCK_T - 1, whole, 0), axis=0)
        carry_b = (comp >> (3 * carry_b)) & 7
        tl.store(carry_ptr + row * n_chunks + c - 1, carry_b.to(tl.int32))
    # A scalar store is done by one thread and pass 2 reads it back in every thread: without a
    # barrier, nothing orders the store before those loads.
    tl.debug_barrier()

    # ---- pass 2 ---------------------------------------------------------------------------------------
    carry_f = tl.zeros((), tl.int64)  # FWD_O: the start of the row
    carry_start = tl.full((), -1, tl.int64)  # latest number start so far: token * 65536 + class
    for c in range(0, loop_bound(n_chunks)):
        t = c * BLOCK_T + lane
        inside = t < T
        tid = tl.load(ids_row + t, mask=inside, other=0).to(tl.int64)
        ok = inside & (tid >= 0) & (tid < V)
        if HAS_MASK:
            ok &= tl.load(mask_ptr + row * T + t, mask=inside, other=0) != 0
        sid = tl.where(ok, tid, 0)
        fvec = tl.load(table_ptr + sid * COLS, mask=ok, other=SEPARATOR_FWD)
        meta = tl.load(table_ptr + sid * COLS + 1, mask=ok, other=SEPARATOR_META)
        length = ((meta >> LEN_SHIFT) & LEN_MASK).to(tl.int32)
        has_digit = ((meta >> DIGIT_SHIFT) & 1) != 0

        # Exclusive scans read the neighbour's vector again (an L1 hit) instead of shifting lanes.
        tp = t - 1
        okp = (lane > 0) & (tp < T)
        pid = tl.load(ids_row + tp, mask=okp, other=0).to(tl.int64)
        vp = okp & (pid >= 0) & (pid < V)
        if HAS_MASK:
            vp &= tl.load(mask_ptr + row * T + tp, mask=okp, other=0) != 0
        fprev = tl.load(table_ptr + tl.where(vp, pid, 0) * COLS, mask=vp, other=SEPARATOR_FWD)
        fprev = tl.where(okp, fprev, fwd_identity)
        fscan = tl.associative_scan(fprev, 0, _then_fwd)
        fin = (fscan >> (4 * carry_f)) & 15  # forward state at each token's start
        fout = (fvec >> (4 * fin)) & 15  # ... and at its end

        carry_b = tl.load(carry_ptr + row * n_chunks + c).to(tl.int64)
        # The next tokens' backward maps, loaded reversed (lane k holds the map of token c*B + B - k)
        # and scanned forward, then flipped back: no reverse scan (see pass 1).
        tn = c * BLOCK_T + (BLOCK_T - lane)
        okn = (lane > 0) & (tn < T)
        nid = tl.load(ids_row + tn, mask=okn, other=0).to(tl.int64)
        vn = okn & (nid >= 0) & (nid < V)
        if HAS_MASK:
            vn &= tl.load(mask_ptr + row * T + tn, mask=okn, other=0) != 0
        bnext = tl.load(table_ptr + tl.where(vn, nid, 0) * COLS + 1, mask=vn, other=SEPARATOR_META) & 0x1FFFFF
        bnext = tl.where(okn, bnext, bwd_identity)
        bscan = tl.flip(tl.associative_scan(bnext, 0, _then_bwd), 0)
        bout = ((bscan >> (3 * carry_b)) & 7).to(tl.int32)  # backward state at each token's end

        # ---- per class of the tokens holding digits ---------------------------------------------------
        words = tl.load(table_ptr + sid[:, None] * COLS + COL_CLASSES + cols[None, :],
                        mask=ok[:, None] & (cols[None, :] < WIDTH), other=0)
        words = tl.where(ok[:, None] | (cols[None, :] > 0), words, SEPARATOR_WORD)
        busy = has_digit & ok
        steps = tl.max(tl.where(busy, length, 0), axis=0)
        # backwards: the backward state at every class, 3 bits each, 16 to a word like the classes
        bstates = tl.zeros((BLOCK_T, WP), tl.int64)
        state = bout
        for jj in range(0, loop_bound(steps)):
            j = steps - 1 - jj
            live = busy & (j < length)
            cls = ((_column(words, j // 16, cols) >> (4 * (j % 16))) & 15).to(tl.int32)
            nxt = tl.load(bdelta_ptr + state * 16 + cls, mask=live, other=0).to(tl.int32)
            state = tl.where(live, nxt, state)
            bstates |= tl.where((cols[None, :] == j // 16) & live[:, None],
                                state.to(tl.int64)[:, None] << (3 * (j % 16)), 0)
        # forwards: the closed-form regex at each class
        fstate = fin.to(tl.int32)
        last_end = tl.full((BLOCK_T,), -1, tl.int32)
        start_before_end = tl.full((BLOCK_T,), -1, tl.int32)
        last_start = tl.full((BLOCK_T,), -1, tl.int32)
        for j in range(0, loop_bound(steps)):
            live = busy & (j < length)
            cls = ((_column(words, j // 16, cols) >> (4 * (j % 16))) & 15).to(tl.int32)
            after = tl.load(fdelta_ptr + fstate * 16 + cls, mask=live, other=0).to(tl.int32)
            back_here = ((_column(bstates, j // 16, cols) >> (3 * (j % 16))) & 7).to(tl.int32)
            k = j + 1
            back_next = ((_column(bstates, k // 16, cols) >> (3 * (k % 16))) & 7).to(tl.int32)
            back_next = tl.where(k == length, bout, back_next)
            digit = cls < 10
            next_digit = (back_next >= B_D1) & (back_next <= B_D4)
            in_a = (after >= F_A1) & (after <= F_A4)
            goes_on = ((back_next == B_G) & (after <= F_A3)) | (back_next == B_FR)
            ends = live & digit & ~next_digit & ((after == F_F) | (in_a & ~goes_on))
            starts_digit = digit & ((fstate == F_O) | ((fstate == F_OC) & (back_here != B_D3)))
            starts_sign = (cls == C_MINUS) & (after == F_MS) & next_digit
            starts = live & (starts_digit | starts_sign)
            last_start = tl.where(starts, j, last_start)
            last_end = tl.where(ends, j, last_end)
            start_before_end = tl.where(ends, last_start, start_before_end)
            fstate = tl.where(live, after, fstate)
        # a digit-free token can only hold the sign of a number whose digits come later
        sign_only = ok & ~has_digit & (fout == F_MS) & (bout >= B_D1) & (bout <= B_D4)
        last_start = tl.where(sign_only, length - 1, last_start)

        # ---- the start of each number: a max-scan of (token, class) of the latest start --------------
        tagged = tl.where(last_start >= 0, t.to(tl.int64) * 65536 + last_start, -1)
        before, upto = tl.associative_scan((tl.full((BLOCK_T,), -1, tl.int64), tagged), 0, _max_before)
        before = tl.maximum(before, carry_start)
        carry_start = tl.maximum(carry_start, tl.max(upto, axis=0))
        start_at = tl.where(start_before_end >= 0, t.to(tl.int64) * 65536 + start_before_end, before)
        has_end = last_end >= 0
        carry_f = tl.sum(tl.where(lane == BLOCK_T - 1, fout, 0), axis=0)

        # ---- each number, from its first class to its last: canonical hash and value --------------
        cur_t = tl.where(has_end, tl.maximum(start_at, 0) // 65536, 0)
        cur_j = tl.where(has_end, (start_at % 65536).to(tl.int32), 0)
        cur_id = tl.load(ids_row + cur_t, mask=has_end, other=0).to(tl.int64)
        cur_id = tl.where((cur_id >= 0) & (cur_id < V), cur_id, 0)
        cur_len = ((tl.load(table_ptr + cur_id * COLS + 1, mask=has_end, other=0) >> LEN_SHIFT) & LEN_MASK).to(tl.int32)
        cur_word = tl.load(table_ptr + cur_id * COLS + COL_CLASSES + cur_j // 16, mask=has_end, other=0)
        walking = has_end
        h = tl.full((BLOCK_T,), FNV_OFFSET, tl.int64)
        h_frac = h  # hash through the fraction's last non-zero digit ...
        h_try = h  # ... and through its latest digit
        negative = tl.zeros((BLOCK_T,), tl.int1)
        in_frac = tl.zeros((BLOCK_T,), tl.int1)
        int_nz = tl.zeros((BLOCK_T,), tl.int1)
        any_nz = tl.zeros((BLOCK_T,), tl.int1)
        mant = tl.zeros((BLOCK_T,), tl.int64)
        n_sig = tl.zeros((BLOCK_T,), tl.int32)
        dropped = tl.zeros((BLOCK_T,), tl.int32)  # integer digits beyond the 18 kept
        mant_try = mant  # the fraction's mantissa through its latest digit ...
        n_sig_try = n_sig
        frac_try = tl.zeros((BLOCK_T,), tl.int32)
        mant_frac = mant  # ... and through its last non-zero digit
        frac_n = frac_try
        while tl.max(walking.to(tl.int32), axis=0) > 0:
            next_token = walking & (cur_j >= cur_len)
            cur_t = tl.where(next_token, cur_t + 1, cur_t)
            cur_j = tl.where(next_token, 0, cur_j)
            nid = tl.load(ids_row + cur_t, mask=next_token, other=0).to(tl.int64)
            cur_id = tl.where(next_token, tl.where((nid >= 0) & (nid < V), nid, 0), cur_id)
            nmeta = tl.load(table_ptr + cur_id * COLS + 1, mask=next_token, other=0)
            cur_len = tl.where(next_token, ((nmeta >> LEN_SHIFT) & LEN_MASK).to(tl.int32), cur_len)
            cur_word = tl.load(table_ptr + cur_id * COLS + COL_CLASSES, mask=next_token, other=cur_word)
            step = walking & ~next_token
            cls = ((cur_word >> (4 * (cur_j % 16))) & 15).to(tl.int32)
            d = cls.to(tl.int64)
            digit = step & (cls < 10)
            # sign and '.'
            is_minus = step & (cls == C_MINUS)
            negative |= is_minus
            h = tl.where(is_minus, _fnv(h, 45), h)
            is_dot = step & (cls == C_DOT)
            h = tl.where(is_dot & ~int_nz, _fnv(h, 48), h)  # "0." for an all-zero integer part
            h_frac = tl.where(is_dot, h, h_frac)
            h_try = tl.where(is_dot, _fnv(h, 46), h_try)
            in_frac |= is_dot
            # integer digits: leading zeros dropped
            int_digit = digit & ~in_frac & ((cls != 0) | int_nz)
            int_nz |= int_digit
            h = tl.where(int_digit, _fnv(h, 48 + d), h)
            keep = int_digit & (n_sig < MAX_DIGITS)
            mant = tl.where(keep, mant * 10 + d, mant)
            n_sig = tl.where(keep, n_sig + 1, n_sig)
            dropped = tl.where(int_digit & ~keep, dropped + 1, dropped)
            # fraction digits: trailing zeros are only tried, a non-zero digit commits them
            frac_digit = digit & in_frac
            h_try = tl.where(frac_digit, _fnv(h_try, 48 + d), h_try)
            mant_try = tl.where(is_dot, mant, mant_try)  # the fraction goes on from the integer mantissa
            n_sig_try = tl.where(is_dot, n_sig, n_sig_try)
            keep_f = frac_digit & (n_sig_try < MAX_DIGITS)
            mant_try = tl.where(keep_f, mant_try * 10 + d, mant_try)
            frac_try = tl.where(keep_f, frac_try + 1, frac_try)
            n_sig_try = tl.where(keep_f & (mant_try != 0), n_sig_try + 1, n_sig_try)
            commit = frac_digit & (cls != 0)
            h_frac = tl.where(commit, h_try, h_frac)
            mant_frac = tl.where(commit, mant_try, mant_frac)
            frac_n = tl.where(commit, frac_try, frac_n)
            any_nz |= digit & (cls != 0)
            # advance; the number ends at the class where this token's last number ends
            finished = step & (cur_t == t) & (cur_j == last_end)
            walking &= ~finished
            cur_j = tl.where(step, cur_j + 1, cur_j)
            refill = walking & step & (cur_j % 16 == 0) & (cur_j < cur_len)
            cur_word = tl.load(table_ptr + cur_id * COLS + COL_CLASSES + cur_j // 16, mask=refill, other=cur_word)

        has_frac = frac_n > 0
        h = tl.where(in_frac, h_frac, h)
        h = tl.where(~in_frac & ~int_nz, _fnv(h, 48), h)  # an all-zero integer part is "0"
        key = tl.where(any_nz, h, FNV_ZERO)
        key = tl.where(key == 0, 1, key)
        m = tl.where(has_frac, mant_frac, mant)
        exponent = tl.where(has_frac, dropped - frac_n, dropped)
        value = _decimal_to_double(m, exponent, has_end, pow_ptr)
        value = tl.where(any_nz, value, 0.0)
        value = tl.where(negative & any_nz, -value, value)

        out = row * T + t
        tl.store(end_ptr + out, has_end.to(tl.uint8), mask=inside)
        tl.store(key_ptr + out, tl.where(has_end, key, 0), mask=inside)
        tl.store(value_ptr + out, tl.where(has_end, value, float("nan")), mask=inside)
        tl.store(start_ptr + out, tl.where(has_end, (start_at // 65536).to(tl.int32), -1), mask=inside)


_TABLES: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def _powers_of_ten() -> list[float]:
    """[hi, lo] pairs: 10^k = hi + lo (to ~2^-106) for k = 0..POW_UP, then 10^-k for k = 0..POW_DOWN."""
    from fractions import Fraction

    out = []
    for k in range(POW_UP.value + 1):
        hi = float(10 ** k)
        out += [hi, float(10 ** k - int(hi))]
    for k in range(POW_DOWN.value + 1):
        exact = Fraction(1, 10 ** k)
        hi = float(exact)
        out += [hi, float(exact - Fraction(hi))]
    return out


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream): make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if device not in _TABLES:
        _TABLES[device] = (torch.tensor(FWD_DELTA.reshape(-1), dtype=torch.int8, device=device),
                           torch.tensor(BWD_DELTA.reshape(-1), dtype=torch.int8, device=device),
                           torch.tensor(_powers_of_ten(), dtype=torch.float64, device=device))
    return _TABLES[device]


def numeric_spans(token_ids: Tensor, table: Tensor, mask: Optional[Tensor], *, block_t: Optional[int] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, length = token_ids.shape
    device = token_ids.device
    end = torch.empty(batch, length, dtype=torch.uint8, device=device)
    key = torch.empty(batch, length, dtype=torch.int64, device=device)
    value = torch.empty(batch, length, dtype=torch.float64, device=device)
    start = torch.empty(batch, length, dtype=torch.int32, device=device)
    if batch == 0 or length == 0:
        return end.view(torch.bool), key, value, start
    ids = token_ids.contiguous()
    table = table.contiguous()
    has_mask = mask is not None
    mask_arg = mask.contiguous().view(torch.uint8) if has_mask else ids
    if block_t is None:
        block_t = 64 if _INTERPRETED else min(GPU_MAX_BLOCK_T, triton.next_power_of_2(length))
    block_t = max(16, block_t)
    chunks = triton.cdiv(length, block_t)
    carries = torch.empty(batch, chunks, dtype=torch.int32, device=device)
    width = table.shape[1] - _vocab.COL_CLASSES
    fdelta, bdelta, powers = _tables(device)
    with _on_device(device):
        _spans_kernel[(batch,)](
            ids, mask_arg, table, fdelta, bdelta, powers, carries, end, key, value, start,
            length, table.shape[0], chunks,
            COLS=table.shape[1], WIDTH=width, WP=triton.next_power_of_2(width), HAS_MASK=has_mask, BLOCK_T=block_t,
            num_warps=4 if block_t <= 512 else 8,
            enable_fp_fusion=False,  # the double-double value correction needs plain products
        )
    return end.view(torch.bool), key, value, start


@triton.jit
def _last_valid(i_a, v_a, i_b, v_b):
    """Running "value of the latest element with index >= 0"."""
    take_b = i_b >= 0
    return tl.where(take_b, i_b, i_a), tl.where(take_b, v_b, v_a)


@triton.jit
def _values_kernel(valid_ptr, mask_ptr, key_ptr, sorted_ptr, count_ptr, h1_ptr, h2_ptr, returns_ptr, order_ptr, lo_ptr,
                   hi_ptr, baseline_ptr, out_ptr, T, loo, min_support,
                   PREFIX: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK_T)
    base = tl.load(baseline_ptr + row)
    first_peer = tl.load(lo_ptr + row)
    last_peer = tl.load(hi_ptr + row)
    seen = tl.zeros((), tl.int32)  # numbers before this chunk
    carry_i = tl.full((), -1, tl.int32)
    carry_v = tl.zeros((), tl.float64)
    for c in range(0, loop_bound(tl.cdiv(T, BLOCK_T))):
        t = c * BLOCK_T + lane
        inside = t < T
        number = tl.load(valid_ptr + row * T + t, mask=inside, other=0) != 0
        mine = tl.load(key_ptr + row * T + t, mask=number, other=0)
        ordinal = seen + tl.cumsum(number.to(tl.int32), 0)  # m: numbers so far, this one included
        seen += tl.sum(number.to(tl.int32), 0)
        at = row * T + tl.maximum(ordinal - 1, 0)
        if PREFIX:
            mine1 = tl.load(h1_ptr + at, mask=number, other=0)
            mine2 = tl.load(h2_ptr + at, mask=number, other=0)
        support = tl.zeros((BLOCK_T,), tl.int32)
        total = tl.zeros((BLOCK_T,), tl.float64)
        for q in range(loop_bound(first_peer), loop_bound(last_peer)):
            peer = tl.load(order_ptr + q)
            if (loo == 0) | (peer != row):
                n_peer = tl.load(count_ptr + peer)
                if PREFIX:
                    at_peer = peer * T + tl.maximum(ordinal - 1, 0)
                    same = number & (ordinal <= n_peer)
                    same &= tl.load(h1_ptr + at_peer, mask=same, other=0) == mine1
                    same &= tl.load(h2_ptr + at_peer, mask=same, other=0) == mine2
                else:
                    # binary search in the peer's sorted keys (its first n_peer entries); a rolled
                    # loop: each probe waits for the last, so unrolling gains nothing, and the
                    # unrolled search spilled registers under Triton 3.6
                    lo = tl.zeros((BLOCK_T,), tl.int32)
                    hi = tl.zeros((BLOCK_T,), tl.int32) + n_peer
                    for _ in range(SEARCH_STEPS):
                        open_ = number & (lo < hi)
                        mid = (lo + hi) // 2
                        probe = tl.load(sorted_ptr + peer * T + mid, mask=open_, other=0)
                        right = open_ & (probe < mine)
                        lo = tl.where(right, mid + 1, lo)
                        hi = tl.where(open_ & ~right, mid, hi)
                    same = number & (lo < n_peer)
                    same &= tl.load(sorted_ptr + peer * T + lo, mask=same, other=0) == mine
                support += same.to(tl.int32)
                total += tl.where(same, tl.load(returns_ptr + peer), 0.0)
        enough = number & (support >= min_support)
        milestone = total / tl.maximum(support, 1).to(tl.float64)
        idx, val = tl.associative_scan((tl.where(enough, t, -1).to(tl.int32), milestone), 0, _last_valid)
        val = tl.where(idx >= 0, val, carry_v)
        idx = tl.where(idx >= 0, idx, carry_i)
        value = tl.where(idx >= 0, val, base)
        keep = tl.load(mask_ptr + row * T + t, mask=inside, other=0) != 0
        tl.store(out_ptr + row * T + t, tl.where(keep, value, 0.0).to(tl.float32), mask=inside)
        carry_i = tl.max(idx, 0)
        carry_v = tl.sum(tl.where(lane == BLOCK_T - 1, val, 0.0), 0)


def numca_values(end: Tensor, key: Tensor, returns: Tensor, group_index: Tensor, mask: Tensor, match: str,
                 leave_one_out: bool, min_support: int, empty_value: float, *, block_t: Optional[int] = None
                 ) -> Tensor:
    batch, length = mask.shape
    device = mask.device
    out = torch.empty(batch, length, dtype=torch.float32, device=device)
    if batch == 0 or length == 0:
        return out
    # contiguous(): `&` keeps the inputs' strides (column-major in, column-major out), and the kernel
    # reads it row-major (docs/DESIGN.md, "GPU readiness": strided inputs).
    valid = (end.to(torch.bool) & mask.to(torch.bool)).contiguous()
    key = key.to(torch.int64)
    ret = returns.to(torch.float64).contiguous()
    # Groups without host syncs: rows sorted by group; a row's peers are a range of that order.
    order = torch.argsort(group_index, stable=True)
    sorted_group = group_index[order].contiguous()
    lo = torch.searchsorted(sorted_group, group_index.contiguous(), right=False)
    hi = torch.searchsorted(sorted_group, group_index.contiguous(), right=True)
    # Prefix sums as (finite part, NaN/inf counts): a NaN/inf return reaches exactly the means that
    # include it, not every later group through the running sum, nor its own row through NaN - NaN.
    from .reference import _sum_of_parts, _sum_parts

    parts = _sum_parts(ret)
    csum = torch.cat([torch.zeros(1, 4, dtype=torch.float64, device=device), torch.cumsum(parts[order], 0)])
    loo = 1 if leave_one_out else 0
    peer_count = hi - lo - loo
    peer_sum = _sum_of_parts(csum[hi] - csum[lo] - loo * parts)
    baseline = torch.where(peer_count > 0, peer_sum / peer_count.clamp(min=1).double(),
                           torch.full_like(peer_sum, float(empty_value)))
    count = valid.sum(1, dtype=torch.int32)
    prefix = match == "prefix"
    sorted_keys = h1 = h2 = key
    if prefix:
        from .reference import PREFIX_MULTIPLIERS

        ordinal = torch.cumsum(valid, 1) - 1
        slot = torch.where(valid, ordinal, torch.full_like(ordinal, length))
        compact = torch.zeros(batch, length + 1, dtype=torch.int64, device=device)
        compact.scatter_(1, slot, torch.where(valid, key, torch.zeros_like(key)))
        hashes = []
        for multiplier in PREFIX_MULTIPLIERS:
            powers = torch.full((length,), multiplier, dtype=torch.int64, device=device).cumprod(0)
            hashes.append(torch.cumsum(compact[:, :length] * powers, 1))
        h1, h2 = hashes
    else:
        sorted_keys = torch.sort(torch.where(valid, key, torch.full_like(key, torch.iinfo(torch.int64).max)), 1).values
    if block_t is None:
        block_t = 64 if _INTERPRETED else min(GPU_MAX_BLOCK_T, triton.next_power_of_2(length))
    with _on_device(device):
        _values_kernel[(batch,)](
            valid.view(torch.uint8), mask.to(torch.bool).contiguous().view(torch.uint8), key.contiguous(),
            sorted_keys.contiguous(), count, h1.contiguous(), h2.contiguous(), ret, order, lo, hi, baseline, out,
            length, loo, min(min_support, batch + 1),  # support <= batch: the same test, an int32 argument
            PREFIX=prefix, SEARCH_STEPS=max(1, int(length).bit_length()), BLOCK_T=max(16, block_t),
            num_warps=4 if block_t <= 512 else 8,
        )
    return out
