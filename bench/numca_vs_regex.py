"""Number detection: Numca's numeric_spans against what trainers do today (decode + regex), side by
side in one run.

    baseline     tokenizer decode of every token (one Rust batch call), Python `re` with the docs/CONTRACT.md §2b
                 regex over each row's text, bisect to map matches back to tokens, the canonical
                 form and float() in Python (a Python hash() as the key: the cheapest identity)
    reference    sveb_kernels.numeric_spans(backend="reference") on the batch's device
    triton       backend="triton" (CUDA only; the interpreter is not a speed)

on B rows of T tokens of math-reasoning-like text (numbers in ~13% of the tokens) from a locally
trained tokenizer of each family (sveb_kernels.numca.toy_tokenizers). It also times
`numca_values`, and `NumericVocab.from_tokenizer` on a synthetic byte-level BPE of 150k tokens.
The targets it was written for: reference >= 20x the baseline (CPU); triton >= 1000x and >= 30%
of the measured DRAM bandwidth (copy ceiling of this run) counting the bytes the op must move:
token ids + mask in, end/key/value/start out (30 bytes a token with int64 ids). Rows are appended to `--csv`
(default numca.csv in $SVEB_RESULTS_DIR or ~/.cache/sveb_kernels/).

    python bench/numca_vs_regex.py                  # B=256, T=2048, llama3 and qwen2 tokenizers
    python bench/numca_vs_regex.py --quick          # B=32, T=512
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import time

import torch

import sveb_kernels as sk
from sveb_kernels.benchmark.baselines import regex_baseline
from sveb_kernels.benchmark.cases import numca_token_batch as make_batch
from sveb_kernels.benchmark.report import environment, user_results_dir
from sveb_kernels.benchmark.timing import time_median
from sveb_kernels.numca import NumericVocab, toy_tokenizers

DEFAULT_CSV = os.path.join(user_results_dir(), "numca.csv")  # curated results in bench/results/ are copied by hand
FIELDS = ["timestamp", "device_name", "torch", "cuda", "triton", "commit", "op", "family", "batch", "seq_len",
          "impl", "median_ms", "speedup_vs_baseline", "gbytes_per_s", "pct_copy_bandwidth", "numbers", "agree", "note"]


def synthetic_vocab_build(size: int) -> float:
    """Seconds for NumericVocab.from_tokenizer on a byte-level BPE with `size` random tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ", "Ã", "©", "â", "Ĥ"]
    rng = random.Random(0)
    vocab = {}
    while len(vocab) < size:
        vocab.setdefault("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t0 = time.perf_counter()
    NumericVocab.from_tokenizer(tok)
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device) -> float:
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    seconds, _ = time_median(lambda: y.copy_(x), device, repeats=20)
    return 2 * x.numel() / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--families", default="llama3,qwen2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the baseline is one Python thread, and on a shared 2-core "
                        "machine OpenMP threads that wait for a busy core make timings swing by 10x)")
    p.add_argument("--quick", action="store_true", help="B=32, T=512")
    p.add_argument("--csv", default=DEFAULT_CSV)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len = 32, 512
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(device)
    rows = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None

    def add(**row):
        rows.append({**env, **row})
        r = rows[-1]
        speedup = "" if r.get("speedup_vs_baseline") is None else f"x{r['speedup_vs_baseline']:.1f}"
        agree = "" if r.get("agree") is None else ("agrees" if r["agree"] else "DISAGREES")
        bandwidth_pct = "" if r.get("pct_copy_bandwidth") is None else f"{r['pct_copy_bandwidth']:.0f}% of copy BW"
        print(f"{r['op']:<14} {r['family']:<16} {r['impl']:<15} {r['median_ms']:>10.3f} ms {speedup:>8} "
              f"{bandwidth_pct:>16} {agree:>9}  {r.get('note', '')}", flush=True)

    print(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    for family in args.families.split(","):
        tok = toy_tokenizers.build(family)
        vocab = NumericVocab.from_tokenizer(tok)
        ids, mask = make_batch(tok, args.batch, args.seq_len)
        specials = set(torch.nonzero(vocab.special).flatten().tolist())
        shape = dict(family=family, batch=args.batch, seq_len=args.seq_len)

        base_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            base = regex_baseline(tok, ids, mask, specials)
            base_times.append(time.perf_counter() - t0)
        base_s = statistics.median(base_times)
        numbers = sum(map(sum, base[0]))
        add(op="numeric_spans", impl="baseline", median_ms=base_s * 1e3, speedup_vs_baseline=1.0, numbers=numbers,
            agree=True, note="decode + re + bisect", **shape)
        d_ids, d_mask, d_vocab = ids.to(device), mask.to(device), vocab.to(device)
        backends = ["reference"] + (["triton"] if device.type == "cuda" else [])
        for backend in backends:
            fn = lambda: sk.numeric_spans(d_ids, d_vocab, d_mask, backend=backend, validate=False)  # noqa: E731
            out = fn()
            agree = (out.end.cpu().tolist() == base[0] and out.start.cpu().tolist() == base[3])
            seconds, _ = time_median(fn, device, repeats=args.repeats)
            moved = ids.numel() * (ids.element_size() + 1 + 1 + 8 + 8 + 4)
            gbps = moved / seconds / 1e9
            add(op="numeric_spans", impl=backend, median_ms=seconds * 1e3, speedup_vs_baseline=base_s / seconds,
                gbytes_per_s=gbps, pct_copy_bandwidth=None if bandwidth is None else 100 * moved / seconds / bandwidth,
                numbers=int(out.end.sum()), agree=agree, **shape)
        spans = sk.numeric_spans(d_ids, d_vocab, d_mask)
        returns = torch.rand(args.batch, device=device)
        groups = torch.arange(args.batch, device=device) // 16
        for backend in backends:
            for match in ("last", "prefix"):
                fn = lambda: sk.numca_values(spans, returns, groups, d_mask, match=match, backend=backend)  # noqa: E731
                seconds, _ = time_median(fn, device, repeats=args.repeats)
                add(op="numca_values", impl=backend, median_ms=seconds * 1e3, note=f"match={match}, groups of 16",
                    **shape)
    seconds = synthetic_vocab_build(150_000)
    add(op="vocab_build", family="byte-level 150k", batch=0, seq_len=0, impl="from_tokenizer", median_ms=seconds * 1e3,
        note="NumericVocab.from_tokenizer, synthetic 150k-token byte-level BPE")
    if bandwidth is not None:
        print(f"copy bandwidth measured in this run: {bandwidth / 1e9:.0f} GB/s")
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
