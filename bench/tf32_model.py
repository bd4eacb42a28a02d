"""A numerical model of fp32 Hista's similarity GEMM on tensor cores (3xTF32 and plain TF32) against
exact fp32 FMA products, at the settings where it matters most: D = 4096, cosine, temperature 1e-3.
Runs on a CPU (emulation in PyTorch); docs/DESIGN.md "GPU readiness" records the numbers and the decision.

The model (NVIDIA's tensor cores as published/measured for mma.sync/wgmma with tf32 operands):
- tf32 operand: fp32 with the low 13 mantissa bits dropped (cvt.rna.tf32 rounds to nearest; we take
  the worse, truncation).
- 3xTF32 (Triton's input_precision="tf32x3"): a = a_hi + a_lo with a_hi = tf32(a), a_lo = tf32(a - a_hi);
  a.b ~ a_lo.b_hi + a_hi.b_lo + a_hi.b_hi (a_lo.b_lo dropped), three mma passes per k step.
- accumulation: each mma adds the exact sum of its k = 8 products to the fp32 accumulator and rounds
  toward zero (truncation, the pessimistic reading of the hardware), k step after k step over D.
- exact fp32 (the CUDA backend's SIMT kernel, and the interpreter): one fp32 FMA per product, round to
  nearest, in sequence over D.
Everything after the GEMM (scales, softmax, weighted mean) is done in float64 here, so the errors
printed are the GEMM's alone; the oracle is the float64 formula of docs/CONTRACT.md §1.

    python bench/tf32_model.py [--d 4096] [--temperature 1e-3] [--seeds 3]
"""

from __future__ import annotations

import argparse

import torch

K_STEP = 8  # k of one tf32 mma (m16n8k8); wgmma's k is 8 for tf32 as well


def tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> tf32 by truncation (10 explicit mantissa bits kept)."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def to_fp32_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded toward zero."""
    y = x.to(torch.float32)
    too_far = y.double().abs() > x.abs()
    return torch.where(too_far, torch.nextafter(y, torch.zeros_like(y)), y)


def gemm_tf32(a: torch.Tensor, b: torch.Tensor, passes: int, block: int = 0) -> torch.Tensor:
    """a @ b.T in the tensor-core model: passes=3 (3xTF32) or 1 (plain TF32). block > 0: two-level
    summation, each `block` columns into a fresh accumulator that is then added (rounded to nearest)."""
    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
    terms = [(a_hi, b_hi)] if passes == 1 else [(a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)]
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32)
    acc = torch.zeros_like(total)
    for k0 in range(0, a.shape[1], K_STEP):
        for x, y in terms:
            partial = x[:, k0:k0 + K_STEP].double() @ y[:, k0:k0 + K_STEP].double().T  # exact products
            acc = to_fp32_toward_zero(acc.double() + partial)
        if block and (k0 + K_STEP) % block == 0:
            total, acc = total + acc, torch.zeros_like(acc)
    return total + acc


def gemm_fp32_fma(a: torch.Tensor, b: torch.Tensor, block: int = 0) -> torch.Tensor:
    """a @ b.T as sequential fp32 FMAs (round to nearest once per product); block > 0: two-level."""
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32)
    acc = torch.zeros_like(total)
    a64, b64 = a.double(), b.double()
    for k in range(a.shape[1]):
        acc = (acc.double() + a64[:, k, None] * b64[None, :, k]).to(torch.float32)  # fma: one rounding
        if block and (k + 1) % block == 0:
            total, acc = total + acc, torch.zeros_like(acc)
    return total + acc


def hista_from_dots(dots, hidden, returns, rollout, temperature):
    """values, lse in float64 from given dot products (cosine similarity, one group)."""
    norms = torch.linalg.vector_norm(hidden.double(), dim=1).clamp_min(1e-6)
    logits = dots.double() / (norms[:, None] * norms[None, :]) / temperature
    logits = logits.masked_fill(rollout[:, None] == rollout[None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=1)
    values = torch.softmax(logits, dim=1) @ returns.double()
    return values, lse


def batch(d: int, rollouts: int, tokens: int, shared: float, generator: torch.Generator):
    """One group like tests/test_hista.py's make_batch: a shared direction plus noise per token."""
    direction = torch.randn(d, generator=generator)
    hidden = shared * direction + torch.randn(rollouts * tokens, d, generator=generator)
    rollout = torch.arange(rollouts).repeat_interleave(tokens)
    returns = torch.randn(rollouts, generator=generator)[rollout]
    return hidden.to(torch.float32), returns, rollout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=1e-3)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48, help="tokens per rollout")
    p.add_argument("--shared", type=float, default=0.5, help="weight of the group's shared direction")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"D={args.d} temperature={args.temperature} group of {args.rollouts}x{args.tokens} tokens, "
          f"contract bound on values: 1e-4 * max|returns|")
    print(f"{'seed':>4} {'method':>12} {'values err / max|R|':>20} {'x bound':>8} {'lse rel err':>12}")
    worst = {}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        hidden, returns, rollout = batch(args.d, args.rollouts, args.tokens, args.shared, g)
        exact = hista_from_dots(hidden.double() @ hidden.double().T, hidden, returns, rollout, args.temperature)
        methods = (("fp32 FMA", lambda: gemm_fp32_fma(hidden, hidden)),
                   ("fp32 FMA/64", lambda: gemm_fp32_fma(hidden, hidden, block=64)),
                   ("3xTF32", lambda: gemm_tf32(hidden, hidden, 3)),
                   ("3xTF32/64", lambda: gemm_tf32(hidden, hidden, 3, block=64)),
                   ("TF32", lambda: gemm_tf32(hidden, hidden, 1)))
        for name, gemm in methods:
            dots = gemm()
            values, lse = hista_from_dots(dots, hidden, returns, rollout, args.temperature)
            err = float((values - exact[0]).abs().max() / returns.abs().max())
            lse_err = float(((lse - exact[1]).abs() / exact[1].abs().clamp_min(1.0)).max())
            worst[name] = max(worst.get(name, (0, 0)), (err, lse_err))
            print(f"{seed:>4} {name:>12} {err:>20.3e} {err / 1e-4:>8.2f} {lse_err:>12.3e}")
    print("worst:", {k: (f"{v[0]:.3e}", f"{v[1]:.3e}") for k, v in worst.items()})


if __name__ == "__main__":
    main()
