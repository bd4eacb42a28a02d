"""`sveb-kernels bench`: what every op costs with every backend, against what users write without us.

runner.py (the runs and agreement checks), cases.py (synthetic RL batches), baselines.py (naive
PyTorch Hista, FlexAttention, the per-token GAE loop, decode + regex number detection), timing.py (medians, peaks, ceilings),
report.py (table / JSON / CSV), plot.py (matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys

CSV_NAME = "sveb_bench.csv"


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="time every op x backend against the baselines; table, JSON, CSV, plot")
    p.add_argument("--quick", action="store_true", help="small sizes: within a minute on a 2-core CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--ops", default="hista,gae,numca",
                   help="comma-separated subset of: hista, hista_backward (forward + backward vs dense autograd), "
                        "gae, numca")
    p.add_argument("--sizes", default=None,
                   help="Hista tokens per group, comma-separated, e.g. 4096,16384 (the table and plot show the "
                        "batch's total tokens: groups x tokens per group, rollout lengths drawn around the mean)")
    p.add_argument("--hidden", type=int, default=0, help="Hista hidden size D (default 4096 GPU, 512 CPU)")
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per group")
    p.add_argument("--groups", type=int, default=2, help="groups (prompts) per Hista batch")
    p.add_argument("--gae", default="64x4096", help="GAE batch BxT")
    p.add_argument("--numca", default=None, help="numeric_spans batch BxT (default 256x2048, --quick 32x512)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per implementation after one warm-up call (default 5, --quick 3); the table "
                        "shows their median and spread, and flags rows whose spread is over 25%%")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's, less the cores the load average says other "
                        "processes use). On a busy machine multi-threaded ops wait for descheduled threads and "
                        "swing by 10x; --threads 1 gives the steadiest CPU numbers")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' for stdout)")
    p.add_argument("--csv", metavar="PATH", default=None,
                   help=f"append rows to this CSV (default: {CSV_NAME} in $SVEB_RESULTS_DIR, else in "
                        "~/.cache/sveb_kernels; never inside the repository)")
    p.add_argument("--no-csv", action="store_true", help="do not append to any CSV")
    p.add_argument("--plot", metavar="PNG",
                   help="plot time and peak memory of every op against total tokens, one panel per op")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    from . import plot, report
    from .runner import Config, run

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sveb-kernels bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    from .timing import default_cpu_threads

    if args.threads:
        torch.set_num_threads(args.threads)
        threads_why = "--threads"
    elif device.type == "cpu":
        threads, threads_why = default_cpu_threads()
        torch.set_num_threads(threads)
    else:
        threads_why = ""
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    unknown = set(ops) - {"hista", "hista_backward", "gae", "numca"}
    if unknown:
        print(f"sveb-kernels bench: unknown --ops {sorted(unknown)}", file=sys.stderr)
        return 2
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else ()
        batch, length = (int(x) for x in args.gae.lower().split("x"))
        numca_shape = tuple(int(x) for x in args.numca.lower().split("x")) if args.numca else (0, 0)
        if len(numca_shape) != 2:
            raise ValueError
    except ValueError:
        print("sveb-kernels bench: --sizes takes integers like 4096,16384, --gae and --numca a shape like 64x4096",
              file=sys.stderr)
        return 2
    config = Config(device=device, quick=args.quick, ops=ops, hista_tokens=sizes, hidden_size=args.hidden,
                    rollouts=args.rollouts, groups=args.groups, gae_shape=(batch, length), numca_shape=numca_shape,
                    repeats=args.repeats, threads=torch.get_num_threads(), threads_why=threads_why)
    result = run(config)
    env = report.environment(device)
    if args.json == "-":
        print(report.as_json(result, env))
    else:
        print(report.table(result, env))
        if args.json:
            with open(args.json, "w") as f:
                f.write(report.as_json(result, env))
    csv_path = None if args.no_csv else (args.csv or os.path.join(report.user_results_dir(), CSV_NAME))
    if csv_path and result.rows:
        report.append_csv(result, env, csv_path)
        print(f"appended {len(result.rows)} rows to {csv_path}", file=sys.stderr)
    if args.plot:
        plot.plot_report(result, args.plot, f"sveb-kernels bench on {env['device_name']}, torch {env['torch']}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r.agree is not False for r in result.rows) else 1
