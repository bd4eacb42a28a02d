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
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(report: Report, env: dict) -> str:
    c = report.ceilings
    lines = [
        f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}",
        f"ceilings measured in this run: {c['matmul']} {c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s, "
        f"copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s",
        "",
        f"{'op':<13} {'case':<34} {'impl':<15} {'median ms':>10} {'speedup':>8} {'peak MiB':>9} "
        f"{'rate':>14} {'% ceil':>7} {'agree':>6}  note",
    ]
    for r in report.rows:
        rate = "-" if r.rate is None else f"{r.rate:.3g} {r.rate_unit}"
        agree = "-" if r.agree is None else ("yes" if r.agree else "NO")
        lines.append(
            f"{r.op:<13} {r.case[:34]:<34} {r.impl:<15} {_fmt(r.median_ms, '10.3f'):>10} "
            f"{_fmt(r.speedup, '7.1f') + ('x' if r.speedup else ''):>8} {_fmt(r.peak_mib, '9.1f'):>9} "
            f"{rate:>14} {_fmt(r.pct_of_ceiling, '6.1f'):>7} {agree:>6}  {r.note}"
        )
    return "\n".join(lines)


def as_json(report: Report, env: dict) -> str:
    return json.dumps({"environment": env, "config": report.config, "ceilings": report.ceilings,
                       "rows": [asdict(r) for r in report.rows]}, indent=1)


def append_csv(report: Report, env: dict, path: str) -> None:
    """Appends one line per row (Liger-Kernel style: results accumulate with the GPU name)."""
    fields = list(env) + list(asdict(report.rows[0])) if report.rows else list(env)
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in report.rows:
            writer.writerow({**env, **asdict(row)})
