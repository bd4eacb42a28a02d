"""Hista and GAE on one GPU: the fused Triton Hista against what users run today (naive PyTorch,
FlexAttention), its share of a same-shape matmul's rate, and the GAE scan against the per-token loop.

Hista, per case (groups of R rollouts, N tokens per group, hidden size D, bf16 by default):
  triton          the fused kernel (backend="triton")
  naive PyTorch   per group: similarity matrix, mask, softmax, matvec (sveb_kernels.benchmark.baselines)
  reference       the chunked PyTorch reference (backend="reference")
  FlexAttention   torch.compile'd flex_attention with a block mask, values padded to 16 columns;
                  only where it runs at all (D <= 256); block-mask construction is timed too, since
                  the group layout changes with every batch
  matmul          a bf16 [N, D] x [D, N] matmul of the same shape, measured in the same run: the
                  "% mm" column is the fused kernel's TFLOP/s over this rate (2*N^2*D flops per group)
GAE (B x T): the per-token trainer loop, the reference scan, the Triton scan.

At the end it prints the targets the kernels were written for (H100): >= 60% of the matmul rate at
N=16k, D=4096; >= 5x the naive time; runs at N=64k; GAE >= 100x the loop at B=64, T=8192. The sweep times every
candidate kernel config on one case (on by default), to confirm or replace the tuned table in
hista/triton.py.
Rows are appended to `--csv` (default hista_gpu.csv in $SVEB_RESULTS_DIR or ~/.cache/sveb_kernels/)
with the GPU name, versions and git commit; curated rows are copied to bench/results/ by hand.

    python bench/hista_gpu.py                      # the full grid and the config sweep
    python bench/hista_gpu.py --quick --no-sweep   # a minute: small grid
    python bench/hista_gpu.py --out DIR            # also copies the CSV and the table to DIR
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import asdict
from typing import Callable, Optional

import torch

import sveb_kernels as sk
from sveb_kernels.benchmark import baselines, cases, timing
from sveb_kernels.benchmark.report import environment, user_results_dir

DEFAULT_CSV = os.path.join(user_results_dir(), "hista_gpu.csv")  # curated results in bench/results/ are copied by hand
FIELDS = ["timestamp", "device_name", "torch", "cuda", "triton", "commit", "section", "impl", "dtype", "groups",
          "rollouts", "tokens_per_group", "hidden", "median_ms", "tflops", "pct_matmul", "matmul_tflops",
          "speedup_vs_baseline", "peak_mib", "max_abs_diff", "note", "config"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEMPERATURE = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="4096,16384,65536", help="tokens per group, comma-separated")
    p.add_argument("--hidden", default="1024,4096,8192", help="hidden sizes D, comma-separated")
    p.add_argument("--flex-hidden", default="128,256", help="extra small D cases where FlexAttention runs")
    p.add_argument("--flex-tokens", default="4096,16384", help="tokens per group of those small-D cases")
    p.add_argument("--groups", type=int, default=4, help="groups (prompts) per batch")
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per group (GRPO runs use 8-16)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--methods", default="triton,naive,reference,flex", help="subset of triton,naive,reference,flex")
    p.add_argument("--gae", default="64x8192,64x32768", help="GAE shapes BxT, comma-separated ('' to skip)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip timing every candidate Triton config on --sweep-case (done by default)")
    p.add_argument("--sweep-case", default="16384x4096", help="NxD of the sweep")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=10.0, help="stop repeating a method after this long")
    p.add_argument("--quick", action="store_true", help="small grid: 4096,16384 tokens x D 1024,4096")
    p.add_argument("--device", default="cuda", help="cuda (cpu only with TRITON_INTERPRET=1, to smoke-test)")
    p.add_argument("--csv", default=DEFAULT_CSV, help=f"CSV to append to (default {DEFAULT_CSV})")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--out", default=None, help="also write hista_gpu.csv and hista_gpu.txt into this folder")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.flex_tokens, args.flex_hidden = "4096,16384", "1024,4096", "4096", "256"
        args.gae, args.repeats, args.max_seconds = "64x8192", min(args.repeats, 3), min(args.max_seconds, 3.0)
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_timed(fn: Callable[[], object], device: torch.device, args) -> tuple[Optional[object], Optional[float],
                                                                             Optional[float], str]:
    """(first result, median ms, peak added MiB, note); out of memory and failures become notes."""
    try:
        result = fn()
        seconds, _ = timing.time_median(fn, device, args.repeats, warmup=1, max_seconds=args.max_seconds)
        peak = timing.peak_added_bytes(fn, device) if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None, None, "out of memory"
    except Exception as e:  # one method failing must not hide the others' numbers
        return None, None, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return result, seconds * 1e3, None if peak is None else peak / 2**20, ""


def flex_hista(hidden, returns, rollout_ids, group_offsets, temperature):
    """FlexAttention, compiled (its eager path materialises the scores): Q = K = normalised hidden."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if "_compiled_flex" not in globals():
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    n = hidden.shape[0]
    group_of = torch.repeat_interleave(torch.arange(group_offsets.numel() - 1, device=hidden.device),
                                       group_offsets.diff(), output_size=n)
    rollout = rollout_ids.to(torch.int64)

    def usable(b, h, q, k):
        return (group_of[q] == group_of[k]) & (rollout[q] != rollout[k])

    block_mask = create_block_mask(usable, None, None, n, n, device=hidden.device, _compile=True)
    q = torch.nn.functional.normalize(hidden.float(), dim=1, eps=1e-6).to(hidden.dtype)[None, None]
    value = torch.zeros(1, 1, n, 16, dtype=hidden.dtype, device=hidden.device)
    value[0, 0, :, 0] = returns.to(hidden.dtype)
    return _compiled_flex(q, q, value, block_mask=block_mask, scale=1.0 / temperature)[0, 0, :, 0].float()


def matmul_rate(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, args) -> Optional[float]:
    """FLOP/s of a matmul with the GEMM shape of one group's similarities, [N, D] x [D, N]."""
    try:
        h = torch.randn(tokens, hidden, device=device, dtype=dtype)
        seconds, _ = timing.time_median(lambda: h @ h.T, device, args.repeats, warmup=2, max_seconds=args.max_seconds)
    except torch.OutOfMemoryError:
        return None
    return 2 * tokens**2 * hidden / seconds


def hista_section(args, env, device, dtype, rows, table):
    methods = {m.strip() for m in args.methods.split(",")}
    grid = [(t, d) for d in ints(args.hidden) for t in ints(args.tokens)]
    grid += [(t, d) for d in ints(args.flex_hidden) for t in ints(args.flex_tokens) if (t, d) not in grid]
    for tokens, hidden in grid:
        case = cases.hista_case(args.groups, args.rollouts, tokens, hidden, dtype, device)
        inputs = (case.hidden, case.returns, case.rollout_ids, case.group_offsets)
        mm = matmul_rate(tokens, hidden, dtype, device, args)
        variants = []
        if "naive" in methods:
            variants.append(("naive PyTorch", lambda: baselines.naive_hista(*inputs, TEMPERATURE, "cosine")))
        if "reference" in methods:
            variants.append(("reference", lambda: sk.hista_values(*inputs, temperature=TEMPERATURE,
                                                                  backend="reference").values))
        if "flex" in methods and hidden <= 256 and device.type == "cuda":
            variants.append(("FlexAttention", lambda: flex_hista(*inputs, TEMPERATURE)))
        if "triton" in methods:
            variants.append(("triton", lambda: sk.hista_values(*inputs, temperature=TEMPERATURE,
                                                               backend="triton").values))
        results, case_rows = {}, {}
        for impl, fn in variants:
            result, ms, peak, note = run_timed(fn, device, args)
            results[impl] = result
            row = base_row(env, "hista", impl, dtype, args, tokens, hidden)
            row.update(median_ms=ms, peak_mib=peak, note=note)
            if ms:
                tflops = case.flops / (ms / 1e3) / 1e12
                row.update(tflops=tflops, matmul_tflops=None if mm is None else mm / 1e12,
                           pct_matmul=None if mm is None else 100 * tflops * 1e12 / mm)
            case_rows[impl] = row
        # Side by side within the case: speedup over naive PyTorch, difference from the reference.
        naive_ms = case_rows.get("naive PyTorch", {}).get("median_ms")
        truth = results.get("reference")
        for impl, row in case_rows.items():
            if naive_ms and row["median_ms"]:
                row["speedup_vs_baseline"] = naive_ms / row["median_ms"]
            if truth is not None and results[impl] is not None and impl != "reference":
                row["max_abs_diff"] = float((results[impl].float() - truth).abs().max())
            rows.append(row)
            table.append(row)
        del case, inputs, results, variants
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sweep_section(args, env, device, dtype, rows, table):
    from sveb_kernels.hista import triton as hista_triton

    tokens, hidden = (int(x) for x in args.sweep_case.lower().split("x"))
    case = cases.hista_case(args.groups, args.rollouts, tokens, hidden, dtype, device)
    inputs = (case.hidden, case.returns, case.rollout_ids, case.group_offsets)
    mm = matmul_rate(tokens, hidden, dtype, device, args)
    for cfg in hista_triton.candidate_configs(device, dtype):
        def fn(cfg=cfg):
            return hista_triton.hista_values(*inputs, TEMPERATURE, "cosine", None, None, 0.0, config=cfg)[0]
        _, ms, peak, note = run_timed(fn, device, args)
        row = base_row(env, "sweep", "triton", dtype, args, tokens, hidden)
        row.update(median_ms=ms, peak_mib=peak, note=note, config=config_label(cfg))
        if ms:
            tflops = case.flops / (ms / 1e3) / 1e12
            row.update(tflops=tflops, matmul_tflops=None if mm is None else mm / 1e12,
                       pct_matmul=None if mm is None else 100 * tflops * 1e12 / mm)
        rows.append(row)
        table.append(row)


def gae_section(args, env, device, rows, table):
    for shape in [s for s in args.gae.split(",") if s.strip()]:
        batch, length = (int(x) for x in shape.lower().split("x"))
        case = cases.gae_case(batch, length, device)
        inputs, options = (case.rewards, case.values, case.mask), dict(gamma=1.0, lam=0.95)
        loop_ms, truth = None, None
        for impl, fn in (("per-token loop", lambda: baselines.gae_loop(*inputs, **options)),
                         ("reference", lambda: sk.gae(*inputs, **options, backend="reference")),
                         ("triton", lambda: sk.gae(*inputs, **options, backend="triton"))):
            result, ms, peak, note = run_timed(fn, device, args)
            if impl == "per-token loop":
                loop_ms = ms
            if impl == "reference":
                truth = result
            row = base_row(env, "gae", impl, case.rewards.dtype, args, length, None)
            row.update(groups=batch, rollouts=None, median_ms=ms, peak_mib=peak, note=note,
                       speedup_vs_baseline=None if not (ms and loop_ms) else loop_ms / ms)
            if truth is not None and result is not None and impl != "reference":
                row["max_abs_diff"] = float((result[0] - truth[0]).abs().max())
            rows.append(row)
            table.append(row)


def base_row(env, section, impl, dtype, args, tokens, hidden) -> dict:
    row = dict.fromkeys(FIELDS)
    row.update(env)
    row.update(section=section, impl=impl, dtype=str(dtype).replace("torch.", ""), groups=args.groups,
               rollouts=args.rollouts, tokens_per_group=tokens, hidden=hidden, note="", config="")
    return row


def config_label(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in asdict(cfg).items())


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(table: list[dict], env: dict) -> str:
    lines = [f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
             f"commit {env['commit']}", "",
             f"{'section':<7} {'impl':<15} {'B/G':>4} {'N|T':>6} {'D':>5} {'ms':>10} {'TFLOP/s':>8} {'% mm':>6} "
             f"{'mm TF/s':>8} {'speedup':>8} {'peak MiB':>9} {'max|diff|':>10}  note / config"]
    for r in table:
        lines.append(f"{r['section']:<7} {r['impl']:<15} {fmt(r['groups'], 'd'):>4} {fmt(r['tokens_per_group'], 'd'):>6} "
                     f"{fmt(r['hidden'], 'd'):>5} {fmt(r['median_ms'], '10.3f'):>10} {fmt(r['tflops'], '8.1f'):>8} "
                     f"{fmt(r['pct_matmul'], '6.1f'):>6} {fmt(r['matmul_tflops'], '8.1f'):>8} "
                     f"{fmt(r['speedup_vs_baseline'], '7.1f'):>8} {fmt(r['peak_mib'], '9.1f'):>9} "
                     f"{fmt(r['max_abs_diff'], '10.2e'):>10}  {r['note']}{r['config']}")
    return "\n".join(lines)


def goals(table: list[dict]) -> str:
    """The targets the kernels were written for (H100), read off this run's rows."""
    def find(section, impl, tokens=None, hidden=None):
        return [r for r in table if r["section"] == section and r["impl"] == impl
                and (tokens is None or r["tokens_per_group"] == tokens) and (hidden is None or r["hidden"] == hidden)]

    out = ["", "targets (on an H100):"]
    fused = find("hista", "triton", 16384, 4096)
    if fused and fused[0]["pct_matmul"] is not None:
        pct = fused[0]["pct_matmul"]
        out.append(f"  N=16k D=4096: {fused[0]['tflops']:.0f} TFLOP/s = {pct:.0f}% of the same-shape matmul "
                   f"(target >= 60%): {'met' if pct >= 60 else 'NOT met'}")
    speedups = [r["speedup_vs_baseline"] for r in find("hista", "triton") if r["speedup_vs_baseline"]]
    if speedups:
        out.append(f"  vs naive PyTorch: {min(speedups):.1f}x .. {max(speedups):.1f}x where naive ran "
                   f"(target >= 5x): {'met' if min(speedups) >= 5 else 'NOT met'}")
    for r in find("hista", "triton", 65536):
        naive = find("hista", "naive PyTorch", 65536, r["hidden"])
        naive_state = (naive[0]["note"] or "ran") if naive else "not run"
        out.append(f"  N=64k D={r['hidden']}: triton {'ran' if r['median_ms'] else r['note']}, "
                   f"naive PyTorch: {naive_state}")
    for r in find("gae", "triton"):
        if r["speedup_vs_baseline"]:
            goal = " (target >= 100x at B=64 T=8192)" if (r["groups"], r["tokens_per_group"]) == (64, 8192) else ""
            out.append(f"  GAE B={r['groups']} T={r['tokens_per_group']}: {r['speedup_vs_baseline']:.0f}x the "
                       f"per-token loop{goal}")
    return "\n".join(out)


def append_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                             for k, v in row.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("hista_gpu.py: no CUDA GPU visible; GPU numbers are pending a lent GPU", file=sys.stderr)
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("hista_gpu.py: --device cpu needs TRITON_INTERPRET=1 (a smoke test of this script)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    env = environment(device)
    rows, table = [], []
    hista_section(args, env, device, dtype, rows, table)
    if args.sweep:
        sweep_section(args, env, device, dtype, rows, table)
    gae_section(args, env, device, rows, table)
    text = render(table, env) + "\n" + goals(table)
    print(text)
    if not args.no_csv:
        append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}", file=sys.stderr)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        append_csv(os.path.join(args.out, "hista_gpu.csv"), rows)
        with open(os.path.join(args.out, "hista_gpu.txt"), "w") as f:
            f.write(text + "\n")
    failed = [r for r in rows if r["impl"] == "triton" and r["note"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
