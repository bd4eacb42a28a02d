"""Table, JSON and CSV output of a benchmark run, stamped with the machine, versions and commit."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict

import torch

from .runner import Report


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "commit": commit,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


NOISY_SPREAD_PCT = 25.0  # repeats further apart than this (slowest - fastest, of the median) are flagged


def user_results_dir() -> str:
    """Where results go unless the user names a file: $SVEB_RESULTS_DIR, else a per-user cache
    ($XDG_CACHE_HOME or ~/.cache, /sveb_kernels). Never the repository: a run must not dirty a checkout."""
    if os.environ.get("SVEB_RESULTS_DIR"):
        return os.environ["SVEB_RESULTS_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sveb_kernels")


def noise_warnings(report: Report, env: dict) -> list[str]:
    """What in this run makes its times unreliable: repeats that disagree, a machine whose speed
    changed during the run, threads that reach far less together than alone, a loaded CPU."""
    warnings = []
    timed = [r for r in report.rows if r.spread_pct is not None]
    noisy = [r for r in timed if r.spread_pct > NOISY_SPREAD_PCT]
    if noisy:
        warnings.append(f"{len(noisy)} of {len(timed)} timings vary by more than {NOISY_SPREAD_PCT:.0f}% between "
                        "repeats (marked 'noisy'): their times and speedups may be far off")
    c = report.ceilings
    before, after = c["matmul_flops_per_s"], c.get("matmul_flops_per_s_after")
    if after and max(before, after) > 1.3 * min(before, after):
        warnings.append(f"the matmul ceiling moved from {before / 1e12:.3g} to {after / 1e12:.3g} TFLOP/s during "
                        "the run: the machine's speed changed (other processes, clocks)")
    over = [r for r in report.rows if r.pct_of_ceiling is not None and r.pct_of_ceiling > 100]
    if over:
        warnings.append(f"{len(over)} rows exceed 100% of the ceiling: the ceiling was measured while the "
                        "machine was slower than during those rows")
    one, threads = c.get("matmul_flops_per_s_1thread"), env.get("threads") or 1
    if one and before < 0.5 * threads * one:
        warnings.append(f"{threads} threads reach {before / one:.1f}x the matmul rate of one thread (ideal "
                        f"{threads}x): the threads wait for busy cores; --threads 1 gives steadier numbers")
    load, cores = env.get("load_average"), env.get("cpu_count")
    if load is not None and cores and load > cores:
        warnings.append(f"load average {load:.1f} on {cores} cores: other processes compete for the CPU")
    if warnings:
        advice = "an idle machine, more --repeats" + (", --threads 1" if threads > 1 else "")
        warnings.append(f"for trustworthy ratios: {advice}")
    return warnings


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(report: Report, env: dict) -> str:
    c = report.ceilings
    why = report.config.get("threads_why")
    lines = [
        f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}",
        f"ceilings measured in this run: {c['matmul']} {c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s, "
        f"copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s",
    ]
    if why:
        lines.append(f"threads: {env.get('threads')} ({why})")
    case_width = max([34] + [len(r.case) for r in report.rows])
    lines += [
        "",
        f"{'op':<13} {'case':<{case_width}} {'impl':<15} {'median ms':>10} {'spread':>7} {'speedup':>8} "
        f"{'peak MiB':>9} {'rate':>14} {'% ceil':>7} {'agree':>6}  note",
    ]
    for r in report.rows:
        rate = "-" if r.rate is None else f"{r.rate:.3g} {r.rate_unit}"
        agree = "-" if r.agree is None else ("yes" if r.agree else "NO")
        noisy = r.spread_pct is not None and r.spread_pct > NOISY_SPREAD_PCT
        note = "; ".join(n for n in (r.note, "noisy" if noisy else "") if n)
        spread = "-" if r.spread_pct is None else f"{r.spread_pct:.0f}%"
        lines.append(
            f"{r.op:<13} {r.case:<{case_width}} {r.impl:<15} {_fmt(r.median_ms, '10.3f'):>10} {spread:>7} "
            f"{_fmt(r.speedup, '7.1f') + ('x' if r.speedup else ''):>8} {_fmt(r.peak_mib, '9.1f'):>9} "
            f"{rate:>14} {_fmt(r.pct_of_ceiling, '6.1f'):>7} {agree:>6}  {note}"
        )
    warnings = noise_warnings(report, env)
    if warnings:
        lines += ["", "WARNING: these numbers are noisy."] + [f"  - {w}" for w in warnings]
    return "\n".join(lines)


def as_json(report: Report, env: dict) -> str:
    return json.dumps({"environment": env, "config": report.config, "ceilings": report.ceilings,
                       "noise_warnings": noise_warnings(report, env),
                       "rows": [asdict(r) for r in report.rows]}, indent=1)


def append_csv(report: Report, env: dict, path: str) -> None:
    """Appends one line per row (Liger-Kernel style: results accumulate with the GPU name)."""
    fields = list(env) + list(asdict(report.rows[0])) if report.rows else list(env)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:  # keep an existing file's columns (one written by an older version has fewer)
        with open(path, newline="") as f:
            fields = next(csv.reader(f), fields)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in report.rows:
            writer.writerow({**env, **asdict(row)})
