"""Float64 oracles written plainly from SPEC, with loops: independent of the package's code."""

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
            keys = [j for j in range(offsets[g], offsets[g + 1]) if rid[j] != rid[i] and mask[j]]
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
    """The trainer loop of SPEC section 3, in float64."""
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
