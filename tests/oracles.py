"""Float64 oracles written plainly from docs/CONTRACT.md, with loops: independent of the package's code."""

import math

import torch


def hista_oracle(hidden, returns, rollout_ids, group_offsets, temperature=0.1, similarity="cosine",
                 key_mask=None, key_bias=None, empty_value=0.0):
    h = hidden.detach().cpu().to(torch.float64)
    r = returns.detach().cpu().to(torch.float64)
    rid = rollout_ids.detach().cpu().tolist()
    offsets = group_offsets.detach().cpu().tolist()
    n = h.shape[0]
    mask = [True] * n if key_mask is None else key_mask.cpu().tolist()
    bias = torch.zeros(n, dtype=torch.float64) if key_bias is None else key_bias.cpu().to(torch.float64)
    norms = [max(float(torch.linalg.vector_norm(h[i])), 1e-6) for i in range(n)]
    values = torch.full((n,), float(empty_value), dtype=torch.float64)
    lse = torch.full((n,), -math.inf, dtype=torch.float64)
    for g in range(len(offsets) - 1):
        for i in range(offsets[g], offsets[g + 1]):
            # a key_bias of -inf is a zero weight, like a masked key: no keys at all -> the empty value
            keys = [j for j in range(offsets[g], offsets[g + 1])
                    if rid[j] != rid[i] and mask[j] and bias[j] != -math.inf]
            if not keys:
                continue
            dots = h[keys] @ h[i]
            if similarity == "cosine":
                dots = dots / (norms[i] * torch.tensor([norms[j] for j in keys], dtype=torch.float64))
            s = dots / temperature + bias[keys]
            top = float(s.max())
            w = torch.exp(s - top)
            values[i] = float((w * r[keys]).sum() / w.sum())
            lse[i] = top + math.log(float(w.sum()))
    return values, lse


def gae_oracle(rewards, values, mask, gamma, lam):
    """The trainer loop of docs/CONTRACT.md §3, in float64."""
    r = rewards.detach().cpu().to(torch.float64)
    v = values.detach().cpu().to(torch.float64)
    m = mask.detach().cpu().to(torch.float64)
    batch, length = r.shape
    adv = torch.zeros(batch, length, dtype=torch.float64)
    nextv = torch.zeros(batch, dtype=torch.float64)
    last = torch.zeros(batch, dtype=torch.float64)
    for t in reversed(range(length)):
        delta = r[:, t] + gamma * nextv - v[:, t]
        cand = delta + gamma * lam * last
        nextv = v[:, t] * m[:, t] + (1 - m[:, t]) * nextv
        last = cand * m[:, t] + (1 - m[:, t]) * last
        adv[:, t] = last
    return adv, adv + v


# ---- Numca ----------------------------------------------------------------------------------------
import re as _re  # noqa: E402

NUMBER_PATTERN = _re.compile(rb"(?<![0-9A-Za-z_.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![0-9])")


def canonical_number(text: bytes) -> str:
    """The canonical form (docs/CONTRACT.md §2b) of one regex match."""
    s = text.decode("ascii")
    negative = s.startswith("-")
    s = s.lstrip("-").replace(",", "")
    integer, _, fraction = s.partition(".")
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    out = integer + ("." + fraction if fraction else "")
    return "-" + out if negative and out != "0" else out


def fnv1a64_key(text: str) -> int:
    """FNV-1a 64 of the ASCII text as a signed int64; 0 becomes 1."""
    h = 0xCBF29CE484222325
    for byte in text.encode("ascii"):
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    if h == 0:
        h = 1
    return h - (1 << 64) if h >= 1 << 63 else h


def numeric_spans_oracle(decode, token_ids, special_ids, mask=None):
    """docs/CONTRACT.md §2b by the regex on the tokenizer's own decoded text.

    decode(list_of_ids) -> str is the tokenizer's decode. Each run of unmasked, non-special tokens is
    decoded as one piece; masked and special tokens are "\\x00". A match is mapped back to tokens by
    its ASCII characters: decoding ever longer prefixes of a run tells how many ASCII characters the
    run has after each token (non-ASCII bytes may differ between a prefix and the whole, ASCII not).
    Returns (end, key, value, start) lists of lists, like the op's outputs.
    """
    ids = token_ids.tolist()
    keep = [[True] * len(r) for r in ids] if mask is None else mask.bool().tolist()
    out_end, out_key, out_value, out_start = [], [], [], []
    for row, row_keep in zip(ids, keep):
        text = b""
        ascii_after = []  # ASCII characters in the row's text through token t
        seen = 0
        t = 0
        while t < len(row):
            if not row_keep[t] or row[t] in special_ids:
                text += b"\x00"
                seen += 1
                ascii_after.append(seen)
                t += 1
                continue
            run_end = t
            while run_end < len(row) and row_keep[run_end] and row[run_end] not in special_ids:
                run_end += 1
            run = row[t:run_end]
            for k in range(1, len(run) + 1):
                ascii_after.append(seen + sum(b < 128 for b in decode(run[:k]).encode("utf-8")))
            piece = decode(run).encode("utf-8")
            text += piece
            seen += sum(b < 128 for b in piece)
            t = run_end
        ascii_before_byte = [0] * (len(text) + 1)
        for i, b in enumerate(text):
            ascii_before_byte[i + 1] = ascii_before_byte[i] + (b < 128)

        def token_of(byte_index):
            a = ascii_before_byte[byte_index]  # the byte is the (a+1)-th ASCII character
            return next(k for k, n in enumerate(ascii_after) if n > a)

        end = [False] * len(row)
        key = [0] * len(row)
        value = [math.nan] * len(row)
        start = [-1] * len(row)
        for m in NUMBER_PATTERN.finditer(text):
            last = token_of(m.end() - 1)
            canon = canonical_number(m.group())
            end[last], key[last], value[last], start[last] = True, fnv1a64_key(canon), float(canon), token_of(m.start())
        out_end.append(end)
        out_key.append(key)
        out_value.append(value)
        out_start.append(start)
    return out_end, out_key, out_value, out_start


def numca_values_oracle(end, key, returns, group_index, mask, match="last", leave_one_out=True, min_support=1,
                        empty_value=0.0):
    """docs/CONTRACT.md §2c with loops, in float64: a list of lists of floats."""
    end, key, mask = end.tolist(), key.tolist(), mask.bool().tolist()
    returns, group_index = returns.double().tolist(), group_index.tolist()
    batch = len(end)
    numbers = [[key[b][t] for t in range(len(end[b])) if end[b][t] and mask[b][t]] for b in range(batch)]
    out = []
    for b in range(batch):
        peers = [p for p in range(batch) if group_index[p] == group_index[b] and not (leave_one_out and p == b)]
        value = sum(returns[p] for p in peers) / len(peers) if peers else empty_value
        mine, row = [], []
        for t in range(len(end[b])):
            if end[b][t] and mask[b][t]:
                mine.append(key[b][t])
                m = len(mine)
                if match == "last":
                    support = [p for p in peers if mine[-1] in numbers[p]]
                else:
                    support = [p for p in peers if len(numbers[p]) >= m and numbers[p][:m] == mine]
                if len(support) >= min_support:
                    value = sum(returns[p] for p in support) / len(support)
            row.append(value if mask[b][t] else 0.0)
        out.append(row)
    return out
