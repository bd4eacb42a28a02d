"""What users write today without this package: the baselines every backend is measured against."""

from __future__ import annotations

import bisect
import itertools
import re

import torch
from torch import Tensor


def naive_hista(hidden: Tensor, returns: Tensor, rollout_ids: Tensor, group_offsets: Tensor,
                temperature: float, similarity: str) -> Tensor:
    """Per group: the full [n, n] similarity matrix in the input dtype, mask, softmax, matvec."""
    values = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    offsets = group_offsets.tolist()
    for g in range(len(offsets) - 1):
        lo, hi = offsets[g], offsets[g + 1]
        h = hidden[lo:hi]
        if similarity == "cosine":
            h = torch.nn.functional.normalize(h, dim=1, eps=1e-6)
        scores = (h @ h.T) / temperature
        same = rollout_ids[lo:hi, None] == rollout_ids[None, lo:hi]
        scores = scores.masked_fill(same, float("-inf"))
        weights = torch.softmax(scores.float(), dim=1).nan_to_num_(0.0)
        values[lo:hi] = weights @ returns[lo:hi].float()
    return values


def flex_attention_hista(hidden: Tensor, returns: Tensor, rollout_ids: Tensor, group_offsets: Tensor,
                         temperature: float, similarity: str) -> Tensor:
    """Hista through FlexAttention: Q = K = hidden (one head), values = returns padded to 16 columns,
    a block mask for "same group, other rollout". Runs where FlexAttention does (CUDA, D <= 256)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, d = hidden.shape
    h = torch.nn.functional.normalize(hidden.float(), dim=1, eps=1e-6).to(hidden.dtype) if similarity == "cosine" \
        else hidden
    counts = group_offsets.diff()
    group_of = torch.repeat_interleave(torch.arange(counts.numel(), device=hidden.device), counts, output_size=n)
    rollout = rollout_ids.to(torch.int64)

    def usable(b, head, q, k):
        return (group_of[q] == group_of[k]) & (rollout[q] != rollout[k])

    block_mask = create_block_mask(usable, None, None, n, n, device=hidden.device)
    value = torch.zeros(1, 1, n, 16, dtype=hidden.dtype, device=hidden.device)
    value[0, 0, :, 0] = returns.to(hidden.dtype)
    q = h[None, None]
    out = flex_attention(q, q, value, block_mask=block_mask, scale=1.0 / temperature)
    return out[0, 0, :, 0].float()


def gae_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """The per-token loop verl, TRL and OpenRLHF run today (docs/CONTRACT.md §3)."""
    m = mask.to(torch.float32)
    r, v = rewards.float(), values.float()
    advantages = torch.zeros_like(r)
    nextv = torch.zeros(r.shape[0], device=r.device)
    last = torch.zeros(r.shape[0], device=r.device)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nextv - v[:, t]
        cand = delta + gamma * lam * last
        nextv = v[:, t] * m[:, t] + (1 - m[:, t]) * nextv
        last = cand * m[:, t] + (1 - m[:, t]) * last
        advantages[:, t] = last
    return advantages, advantages + v


NUMBER = re.compile(r"(?<![0-9A-Za-z_.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![0-9])")


def canonical(text: str) -> str:
    negative = text.startswith("-")
    text = text.lstrip("-").replace(",", "")
    integer, _, fraction = text.partition(".")
    integer, fraction = integer.lstrip("0") or "0", fraction.rstrip("0")
    out = integer + ("." + fraction if fraction else "")
    return "-" + out if negative and out != "0" else out


def regex_baseline(tok, ids: torch.Tensor, mask: torch.Tensor, specials: set):
    """What a trainer writes today: decode, regex, map character offsets back to tokens."""
    batch, seq_len = ids.shape
    rows, keep = ids.tolist(), mask.tolist()
    pieces = tok.decode_batch([[t] for row in rows for t in row], skip_special_tokens=False)
    end = [[False] * seq_len for _ in range(batch)]
    key = [[0] * seq_len for _ in range(batch)]
    value = [[float("nan")] * seq_len for _ in range(batch)]
    start = [[-1] * seq_len for _ in range(batch)]
    for b in range(batch):
        row_pieces = [p if k and t not in specials else "\x00"
                      for p, k, t in zip(pieces[b * seq_len:(b + 1) * seq_len], keep[b], rows[b])]
        text = "".join(row_pieces)
        ends = list(itertools.accumulate(map(len, row_pieces)))
        for m in NUMBER.finditer(text):
            last = bisect.bisect_right(ends, m.end() - 1)
            canon = canonical(m.group())
            end[b][last], key[b][last], value[b][last] = True, hash(canon), float(canon)
            start[b][last] = bisect.bisect_right(ends, m.start())
    return end, key, value, start
