"""The backward of Hista in the bench: autograd through `hista_values` (the op's fused backward,
docs/DESIGN.md "Hista backward") against autograd through the dense formula users write
(`dense_hista`: `baselines.naive_hista` without in-place ops, an [n, n] matrix per group), side by side on one case.

Both variants time one forward + backward (what a training step that learns through Hista pays) and
record its peak memory; the dense one is the baseline of the speedup column, so the rows carry the
time and memory ratios. Gradients are checked against the reference backend's.
"""

from __future__ import annotations

import torch

from .. import hista_values


def dense_hista(hidden, returns, rollout_ids, group_offsets, temperature: float, similarity: str):
    """`baselines.naive_hista` written so that plain autograd can differentiate it (no in-place ops):
    per group the full [n, n] similarity matrix, mask, softmax, matvec."""
    pieces = []
    offsets = group_offsets.tolist()
    for g in range(len(offsets) - 1):
        lo, hi = offsets[g], offsets[g + 1]
        h = hidden[lo:hi]
        if similarity == "cosine":
            h = torch.nn.functional.normalize(h, dim=1, eps=1e-6)
        scores = (h @ h.T) / temperature
        same = rollout_ids[lo:hi, None] == rollout_ids[None, lo:hi]
        weights = torch.softmax(scores.float().masked_fill(same, float("-inf")), dim=1).nan_to_num(0.0)
        pieces.append(weights @ returns[lo:hi].float())
    return torch.cat(pieces) if pieces else returns.new_zeros(0, dtype=torch.float32)


def variants(case, temperature: float, similarity: str, device: torch.device, backends: list[str]):
    """(expected grad of hidden, compare, [(impl, fn, checked)]), the dense-autograd baseline first;
    `backends`: the backward backends to time (the runner looks them up once per run)."""
    hidden = case.hidden.detach().clone().requires_grad_(True)
    returns = case.returns.detach().float().clone().requires_grad_(True)
    weights = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    args = (case.rollout_ids, case.group_offsets)

    def through(values_fn):
        def run():
            values = values_fn()
            grad_hidden, _ = torch.autograd.grad((values * weights).sum(), (hidden, returns))
            return grad_hidden
        return run

    dense = through(lambda: dense_hista(hidden, returns, *args, temperature, similarity))
    expected = through(lambda: hista_values(hidden, returns, *args, temperature=temperature, similarity=similarity,
                                            backend="reference").values)().float()
    scale = float(expected.abs().max().clamp_min(1e-30))
    tol = (1e-3 if case.hidden.dtype == torch.float32 else 5e-2) * scale

    def compare(result, reference):
        diff = float((result.float() - reference).abs().max()) if result.numel() else 0.0
        return diff, diff <= tol

    out = [("dense autograd", dense, True)]
    for backend in backends:
        fn = through(lambda b=backend: hista_values(hidden, returns, *args, temperature=temperature,
                                                    similarity=similarity, backend=b).values)
        out.append((f"{backend} fused bwd", fn, True))
    return expected, compare, out
