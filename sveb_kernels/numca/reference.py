"""Numca in plain PyTorch: vectorized over tokens, digit runs and numbers; any device.

numeric_spans works on the *class stream* of a row (one 4-bit class per byte, vocab.py) and uses a
closed form of the §2b regex in terms of maximal digit runs R (first byte S, last byte E, length
|R|), derived from Python's leftmost-greedy matching:

  active(R)    = the byte before R is not in [A-Za-z_.]     (the lookbehind; it is never a digit)
  consumed(R)  = R is ',' + exactly 3 digits right after an active run of at most 3 digits
                 (a thousands group of the number before it)
  fraction(R)  = R is '.' + digits right after an active run (that number's fraction)
  starts(R)    = active and not consumed;   signed(R) = starts, '-' before it, and no [0-9A-Za-z_.]
                 before that '-'
  a number ends at the end of R if R is a fraction, or R is active and the run after it is neither
  consumed nor a fraction.

Every condition looks at most 2 bytes away from a digit, so only the tokens holding digits and the
two non-empty tokens on each side of them are expanded to bytes; everything between is one
separator. The canonical form is a subsequence of a match's bytes (sign, digits from the first
non-zero integer digit, '.' and fraction digits up to the last non-zero one), hashed with FNV-1a in
a loop over the position in the canonical string (its length, not the number of tokens). Values are
M * 10^E with M the first 18 significant digits: one correctly rounded IEEE operation when M <= 2^53,
nothing was cut and |E| <= 22; the rare others are parsed exactly by Python's float() on the host.

numca_values sorts the numbers by (group, key) or (group, ordinal, prefix hash) to count the peers
that share a milestone, then forward-fills along each row with cummax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .vocab import (CLS_COMMA, CLS_DOT, CLS_MINUS, CLS_OTHER, CLS_WORD, COL_CLASSES, COL_META,
                    META_DIGIT_SHIFT, META_LEN_MASK, META_LEN_SHIFT)

FNV_OFFSET = 0xCBF29CE484222325 - (1 << 64)  # as the int64 with the same bits
FNV_PRIME = 0x100000001B3
MAX_EXACT_DIGITS = 18   # significant digits kept in an int64 mantissa
TWO_POW_53 = 1 << 53
# Odd multipliers of the two polynomial prefix hashes (numca_values, match="prefix").
PREFIX_MULTIPLIERS = (0x9E3779B97F4A7C15 - (1 << 64), 0xC2B2AE3D27D4EB4F - (1 << 64))


def _in_word_class(c: Tensor) -> Tensor:
    """Bytes the lookbehind [0-9A-Za-z_.] forbids before a number."""
    return (c < 10) | (c == CLS_WORD) | (c == CLS_DOT)


def _select_tokens(has_digit: Tensor, length: Tensor, batch: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """The tokens that matter: those with digits and the two non-empty tokens on each side of them
    (zero-length tokens add no bytes, so they are skipped, not counted). Returns their flat indices
    and whether each directly follows the previous one in its row (no byte between them)."""
    if not bool((length == 0).any()):  # the usual case: every token has a byte, neighbours are columns
        digit = has_digit.view(batch, seq_len)
        selected = digit.clone()
        for k in (1, 2):
            selected[:, k:] |= digit[:, :-k]
            selected[:, :-k] |= digit[:, k:]
        tokens = torch.nonzero(selected.view(-1)).squeeze(1)
        rank = tokens
    else:
        nonempty = torch.nonzero(length > 0).squeeze(1)
        digit = has_digit.index_select(0, nonempty)
        row = torch.div(nonempty, seq_len, rounding_mode="floor")
        selected = digit.clone()
        for k in (1, 2):
            if nonempty.numel() > k:
                same_row = row[k:] == row[:-k]
                selected[k:] |= digit[:-k] & same_row
                selected[:-k] |= digit[k:] & same_row
        rank = torch.nonzero(selected).squeeze(1)  # position among the non-empty tokens
        tokens = nonempty.index_select(0, rank)
    follows = torch.zeros(tokens.numel(), dtype=torch.bool, device=tokens.device)
    if tokens.numel() > 1:
        same_row = torch.div(tokens[1:], seq_len, rounding_mode="floor") == torch.div(tokens[:-1], seq_len,
                                                                                      rounding_mode="floor")
        follows[1:] = (rank[1:] == rank[:-1] + 1) & same_row
    return tokens, follows


def _class_stream(tokens: Tensor, follows: Tensor, ids: Tensor, valid: Tensor, table: Tensor, length: Tensor,
                  width: int):
    """The class bytes of the selected tokens, one separator wherever tokens were skipped or a row
    starts, 2 separators before and after. Returns (classes uint8 [L], the cumulative end byte of
    each selected token [S])."""
    device = tokens.device
    count = tokens.numel()
    new_segment = ~follows
    n_classes = length.index_select(0, tokens)
    words = table.index_select(0, ids.index_select(0, tokens))[:, COL_CLASSES:COL_CLASSES + width].contiguous()
    packed = words.view(torch.uint8).reshape(count, width * 8)  # two classes a byte, low nibble first
    rows = torch.empty(count, 1 + width * 16, dtype=torch.uint8, device=device)
    rows[:, 0] = CLS_OTHER
    rows[:, 1::2] = packed & 15
    rows[:, 2::2] = packed >> 4
    rows[:, 1].masked_fill_(~valid.index_select(0, tokens), CLS_OTHER)  # masked: one separator
    keep = torch.empty(count, 1 + width * 16, dtype=torch.bool, device=device)
    keep[:, 0] = new_segment
    keep[:, 1:] = torch.arange(width * 16, device=device)[None, :] < n_classes[:, None]
    pad = torch.full((2,), CLS_OTHER, dtype=torch.uint8, device=device)
    classes = torch.cat([pad, torch.masked_select(rows, keep), pad])
    token_end = torch.cumsum(n_classes + new_segment, 0) + 2
    return classes, token_end


def numeric_spans(token_ids: Tensor, table: Tensor, mask) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, seq_len = token_ids.shape
    device = token_ids.device
    n = batch * seq_len
    end = torch.zeros(n, dtype=torch.bool, device=device)
    key = torch.zeros(n, dtype=torch.int64, device=device)
    value = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    start = torch.full((n,), -1, dtype=torch.int32, device=device)

    def result():
        return (end.view(batch, seq_len), key.view(batch, seq_len), value.view(batch, seq_len),
                start.view(batch, seq_len))

    if n == 0 or table.shape[0] == 0:
        return result()
    ids = token_ids.reshape(-1)
    valid = (ids >= 0) & (ids < table.shape[0])  # out-of-range ids never index the table
    if mask is not None:
        valid &= mask.reshape(-1).to(torch.bool)
    ids = torch.where(valid, ids, torch.zeros_like(ids)).long()
    meta = table[:, COL_META].index_select(0, ids)
    length = torch.where(valid, (meta >> META_LEN_SHIFT) & META_LEN_MASK, torch.ones_like(meta))
    has_digit = valid & (((meta >> META_DIGIT_SHIFT) & 1) == 1)
    if not bool(has_digit.any()):
        return result()
    tokens, follows = _select_tokens(has_digit, length, batch, seq_len)
    c, token_end = _class_stream(tokens, follows, ids, valid, table, length, table.shape[1] - COL_CLASSES)

    # ---- digit runs and the regex in closed form -----------------------------------------------
    # the stream starts and ends with separators, so run starts and ends alternate in the changes
    digit = (c < 10).to(torch.int8)
    change = torch.nonzero(digit[1:] != digit[:-1]).squeeze(1)
    first, last = change[0::2] + 1, change[1::2]
    runs = first.numel()
    if runs == 0:
        return result()
    run_len = last - first + 1
    before1, before2 = c.index_select(0, first - 1), c.index_select(0, first - 2)
    active = ~_in_word_class(before1)
    adjacent = torch.zeros(runs, dtype=torch.bool, device=device)
    adjacent[1:] = last[:-1] == first[1:] - 2
    prev_active = torch.zeros_like(active)
    prev_active[1:] = active[:-1]
    prev_short = torch.zeros_like(active)
    prev_short[1:] = run_len[:-1] <= 3
    consumed = adjacent & (before1 == CLS_COMMA) & (run_len == 3) & prev_short & prev_active
    fraction = adjacent & (before1 == CLS_DOT) & prev_active
    starts = active & ~consumed
    continues = torch.zeros_like(active)
    continues[:-1] = consumed[1:] | fraction[1:]
    ends = (active & ~continues) | fraction
    signed = starts & (before1 == CLS_MINUS) & ~_in_word_class(before2)

    start_run = torch.nonzero(starts).squeeze(1)
    end_run = torch.nonzero(ends).squeeze(1)
    numbers = start_run.numel()
    if numbers == 0:  # digits, but all after letters or dots
        return result()
    match_first = first.index_select(0, start_run) - signed.index_select(0, start_run).long()
    match_last = last.index_select(0, end_run)
    negative = signed.index_select(0, start_run)

    # ---- the digits of every number ----------------------------------------------------------------
    member = active | fraction
    member_runs = torch.nonzero(member).squeeze(1)
    member_len = run_len.index_select(0, member_runs)
    run_number = (torch.cumsum(starts.long(), 0) - 1).index_select(0, member_runs)
    total = int(member_len.sum())
    digit_number = torch.repeat_interleave(run_number, member_len, output_size=total)
    run_offset = torch.cumsum(member_len, 0) - member_len
    within_run = torch.arange(total, device=device) - torch.repeat_interleave(run_offset, member_len, output_size=total)
    digit_pos = torch.repeat_interleave(first.index_select(0, member_runs), member_len, output_size=total) + within_run
    digits = c.index_select(0, digit_pos).long()
    is_frac = torch.repeat_interleave(fraction.index_select(0, member_runs), member_len, output_size=total)

    per_number = torch.bincount(digit_number, minlength=numbers)
    n_frac = torch.bincount(digit_number, weights=is_frac.double(), minlength=numbers).long()
    n_int = per_number - n_frac
    digit_base = torch.cumsum(per_number, 0) - per_number
    j = torch.arange(total, device=device) - digit_base.index_select(0, digit_number)
    nonzero_digit = digits != 0
    never = 1 << 62
    big = torch.full((numbers,), never, dtype=torch.int64, device=device)
    int_nz = nonzero_digit & ~is_frac
    first_nz_int = big.scatter_reduce(0, digit_number, torch.where(int_nz, j, never), "amin").minimum(n_int)
    frac_nz = nonzero_digit & is_frac
    last_nz_frac = torch.full((numbers,), -1, dtype=torch.int64, device=device).scatter_reduce(
        0, digit_number, torch.where(frac_nz, j, -1), "amax")
    first_nz = big.scatter_reduce(0, digit_number, torch.where(nonzero_digit, j, never), "amin")
    has_frac = last_nz_frac >= 0
    zero = first_nz >= never
    int_begin = torch.minimum(first_nz_int, n_int - 1)  # "0" stays when the integer part is all zeros
    canon_end = torch.where(has_frac, last_nz_frac + 1, n_int)
    negative = negative & ~zero

    key_out = _fnv_keys(digits, digit_base, int_begin, n_int, canon_end, has_frac, negative)
    value_out = _values(digits, digit_number, j, digit_base, first_nz, canon_end, n_int, int_begin, has_frac,
                        negative, zero)

    # ---- back to tokens: the token holding each byte; the last number ending in a token wins ---------
    end_token = tokens.index_select(0, torch.searchsorted(token_end, match_last, right=True))
    start_token = tokens.index_select(0, torch.searchsorted(token_end, match_first, right=True))
    last_in_token = torch.ones(numbers, dtype=torch.bool, device=device)
    last_in_token[:-1] = end_token[:-1] != end_token[1:]
    where = end_token[last_in_token]
    end[where] = True
    key[where] = key_out[last_in_token]
    value[where] = value_out[last_in_token]
    start[where] = (start_token[last_in_token] % seq_len).to(torch.int32)
    return result()


def _fnv_keys(digits, digit_base, int_begin, n_int, canon_end, has_frac, negative) -> Tensor:
    """FNV-1a 64 of each canonical string, one loop step per character position."""
    device = digits.device
    numbers = n_int.numel()
    sign = negative.long()
    n_int_canon = n_int - int_begin
    length = sign + n_int_canon + torch.where(has_frac, 1 + canon_end - n_int, torch.zeros_like(n_int))
    order = torch.argsort(length, descending=True)
    length, sign, n_int_canon = length[order], sign[order], n_int_canon[order]
    int_at = (digit_base + int_begin)[order]
    frac_at = (digit_base + n_int)[order] - n_int_canon - 1  # + (k - sign) gives the fraction digit
    longest = int(length[0]) if numbers else 0
    # active[k]: how many numbers (a prefix, longest first) have a k-th character
    active = (numbers - torch.searchsorted(length.flip(0), torch.arange(longest, device=device), right=True)).tolist()
    h = torch.full((numbers,), FNV_OFFSET, dtype=torch.int64, device=device)
    top = max(digits.numel() - 1, 0)
    for k in range(longest):
        m = active[k]
        kk = k - sign[:m]
        in_int = kk < n_int_canon[:m]
        at = torch.where(in_int, int_at[:m] + kk, frac_at[:m] + kk).clamp(0, top)
        char = torch.where(in_int, digits[at] + 48, torch.where(kk == n_int_canon[:m], 46, digits[at] + 48))
        char = torch.where(kk < 0, 45, char)
        h[:m] = (h[:m] ^ char) * FNV_PRIME
    h = torch.where(h == 0, torch.ones_like(h), h)
    out = torch.empty_like(h)
    out[order] = h
    return out


_POW10_INT = [10 ** k for k in range(MAX_EXACT_DIGITS)]
_POW10_FLOAT = [float(10 ** k) for k in range(23)]  # exactly representable


def _values(digits, digit_number, j, digit_base, first_nz, canon_end, n_int, int_begin, has_frac, negative, zero):
    device = digits.device
    numbers = n_int.numel()
    n_sig = canon_end - first_nz
    take = n_sig.clamp(max=MAX_EXACT_DIGITS)
    lo, hi = first_nz[digit_number], (first_nz + take)[digit_number]
    in_mantissa = (j >= lo) & (j < hi)
    pow_int = torch.tensor(_POW10_INT, dtype=torch.int64, device=device)
    weight = pow_int[(hi - 1 - j).clamp(0, MAX_EXACT_DIGITS - 1)]
    mantissa = torch.zeros(numbers, dtype=torch.int64, device=device).index_add_(
        0, digit_number[in_mantissa], (digits * weight)[in_mantissa])
    exponent = n_int - (first_nz + take)
    pow_float = torch.tensor(_POW10_FLOAT, dtype=torch.float64, device=device)
    m = mantissa.to(torch.float64)
    value = torch.where(exponent >= 0, m * pow_float[exponent.clamp(0, 22)], m / pow_float[(-exponent).clamp(0, 22)])
    exact = (n_sig <= MAX_EXACT_DIGITS) & (mantissa <= TWO_POW_53) & (exponent.abs() <= 22)
    hard = ~exact & ~zero
    if bool(hard.any()):  # long or extreme numbers: parse the canonical digits exactly on the host
        index = torch.nonzero(hard).squeeze(1)
        host_digits = digits.cpu().tolist()
        base, begin, nint, end_, frac = (t[index].cpu().tolist() for t in (digit_base, int_begin, n_int, canon_end,
                                                                          has_frac))
        parsed = []
        for b, i0, ni, ce, f in zip(base, begin, nint, end_, frac):
            text = "".join(map(str, host_digits[b + i0:b + ni]))
            if f:
                text += "." + "".join(map(str, host_digits[b + ni:b + ce]))
            parsed.append(float(text))
        value[index] = torch.tensor(parsed, dtype=torch.float64, device=device)
    value = torch.where(zero, torch.zeros_like(value), value)
    return torch.where(negative, -value, value)


# ---- numca_values ----------------------------------------------------------------------------------
def _sort_segments(*columns: Tensor) -> tuple[Tensor, Tensor]:
    """Sorts by the int64 columns (first = most significant): (order, segment id of each sorted
    position), a segment being a run of equal tuples."""
    order = torch.arange(columns[0].numel(), device=columns[0].device)
    for col in reversed(columns):
        order = order[torch.argsort(col[order], stable=True)]
    new = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    if order.numel():
        new[0] = True
        for col in columns:
            s = col[order]
            new[1:] |= s[1:] != s[:-1]
    return order, torch.cumsum(new.long(), 0) - 1


def _sum_parts(ret: Tensor) -> Tensor:
    """[n, 4] float64 (finite part, is NaN, is +inf, is -inf): sums of these stay exact under the
    leave-one-out subtraction, where a plain sum would give NaN - NaN = NaN for a rollout's own row."""
    return torch.stack([torch.where(torch.isfinite(ret), ret, 0.0), torch.isnan(ret).double(),
                        (ret == float("inf")).double(), (ret == float("-inf")).double()], dim=1)


def _sum_of_parts(parts: Tensor) -> Tensor:
    """The IEEE sum the parts stand for: NaN if any NaN or both infinities, else +-inf, else finite."""
    finite, nan, pos, neg = parts.unbind(-1)
    out = torch.where(neg > 0, float("-inf"), finite)
    out = torch.where(pos > 0, float("inf"), out)
    return torch.where((nan > 0) | ((pos > 0) & (neg > 0)), float("nan"), out)


def numca_values(end: Tensor, key: Tensor, returns: Tensor, group_index: Tensor, mask: Tensor, match: str,
                 leave_one_out: bool, min_support: int, empty_value: float) -> Tensor:
    batch, seq_len = mask.shape
    device = mask.device
    valid = mask.to(torch.bool)
    ret = returns.to(torch.float64)
    loo = 1 if leave_one_out else 0
    _, group = torch.unique(group_index, return_inverse=True)
    groups = int(group.max()) + 1 if batch else 0
    group_count = torch.bincount(group, minlength=groups)
    # Sums as parts (see _sum_parts): a NaN/inf return reaches exactly the means that include it.
    parts = _sum_parts(ret)
    group_sum = torch.zeros(groups, 4, dtype=torch.float64, device=device).index_add_(0, group, parts)
    peer_count = group_count[group] - loo
    peer_sum = _sum_of_parts(group_sum[group] - loo * parts)
    baseline = torch.where(peer_count > 0, peer_sum / peer_count.clamp(min=1).double(),
                           torch.full_like(peer_sum, float(empty_value)))

    number_row, number_col = torch.nonzero(end.to(torch.bool) & valid, as_tuple=True)
    count = number_row.numel()
    if count == 0:
        out = baseline[:, None].expand(batch, seq_len)
        return torch.where(valid, out, torch.zeros_like(out)).to(torch.float32)
    number_key = key[number_row, number_col].to(torch.int64)
    number_group = group[number_row]
    per_row = torch.bincount(number_row, minlength=batch)
    row_first = torch.cumsum(per_row, 0) - per_row
    index = torch.arange(count, device=device)
    if match == "last":
        # The peers holding key k anywhere: distinct (group, key, rollout) triples, counted per (group, key).
        order, triple = _sort_segments(number_group, number_key, number_row)
        _, pair = _sort_segments(number_group[order], number_key[order])  # already sorted: order is identity
        distinct = torch.ones(count, dtype=torch.bool, device=device)
        distinct[1:] = triple[1:] != triple[:-1]
    else:
        # The peers whose first m keys are b's: equal (group, ordinal, two polynomial prefix hashes).
        # A hash pair collides with probability ~2^-128, far below the keys' own 64-bit collisions.
        ordinal = index - row_first[number_row]
        hashes = []
        for multiplier in PREFIX_MULTIPLIERS:
            powers = torch.full((int(per_row.max()),), multiplier, dtype=torch.int64, device=device).cumprod(0)
            running = torch.cumsum(number_key * powers[ordinal], 0)  # wraps mod 2^64, like the hash
            before = torch.where(row_first > 0, running[(row_first - 1).clamp(min=0)], torch.zeros_like(row_first))
            hashes.append(running - before[number_row])
        order, pair = _sort_segments(number_group, ordinal, *hashes)
        distinct = torch.ones(count, dtype=torch.bool, device=device)  # a rollout has one m-th prefix
    pairs = int(pair[-1]) + 1
    sorted_row = number_row[order]
    support = torch.zeros(pairs, dtype=torch.int64, device=device).index_add_(
        0, pair[distinct], torch.ones_like(pair[distinct]))
    support_sum = torch.zeros(pairs, 4, dtype=torch.float64, device=device).index_add_(
        0, pair[distinct], parts[sorted_row[distinct]])
    number_pair = torch.empty_like(pair)
    number_pair[order] = pair
    s_count = support[number_pair] - loo  # b itself always holds its own milestone
    s_sum = _sum_of_parts(support_sum[number_pair] - loo * parts[number_row])
    enough = s_count >= min_support
    milestone = s_sum / s_count.clamp(min=1).double()

    # Forward fill over a row's numbers: the last one with enough support so far, else the baseline.
    last_ok = torch.cummax(torch.where(enough, index, torch.full_like(index, -1)), 0).values
    has_ok = last_ok >= row_first[number_row]
    number_value = torch.where(has_ok, milestone[last_ok.clamp(min=0)], baseline[number_row])
    # ... and over tokens: the value after the last number ending at or before t.
    at = torch.full((batch, seq_len), -1, dtype=torch.int64, device=device)
    at[number_row, number_col] = index
    last_number = torch.cummax(at, 1).values
    out = torch.where(last_number >= 0, number_value[last_number.clamp(min=0)], baseline[:, None])
    return torch.where(valid, out, torch.zeros_like(out)).to(torch.float32)
