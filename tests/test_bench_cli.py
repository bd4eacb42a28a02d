"""`sveb-kernels bench` runs end to end at tiny sizes and its implementations agree."""

import csv
import json
import subprocess
import sys

import pytest


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "sveb_kernels.cli", "bench", "--sizes", "48,96", "--hidden", "24",
                           "--rollouts", "3", "--gae", "5x67", "--numca", "3x40", "--repeats", "2", *args],
                          capture_output=True, text=True, timeout=300)


def test_bench_json_rows_agree(tmp_path):
    out_csv = tmp_path / "r.csv"
    proc = run_bench("--json", "-", "--csv", str(out_csv))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rows = result["rows"]
    impls = {(r["op"], r["impl"]) for r in rows}
    assert {("hista_values", "naive PyTorch"), ("hista_values", "reference"), ("gae", "per-token loop"),
            ("gae", "reference"), ("numeric_spans", "decode+regex"), ("numeric_spans", "reference"),
            ("numca_values", "reference")} <= impls
    # every backend agrees with the reference / the regex baseline; baselines are compared where possible
    assert all(r["agree"] is True for r in rows if r["impl"] in ("reference", "triton", "cuda"))
    assert all(r["agree"] is not False for r in rows)
    assert all(r["median_ms"] > 0 and r["peak_mib"] is not None for r in rows)
    assert result["environment"]["device_name"] and result["ceilings"]["matmul_flops_per_s"] > 0
    with open(out_csv) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and written[0]["device_name"] == result["environment"]["device_name"]


def test_bench_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "hista.png"
    proc = run_bench("--no-csv", "--plot", str(png), "--ops", "hista")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "naive PyTorch" in proc.stdout and "reference" in proc.stdout and "gae" not in proc.stdout.split("\n", 3)[-1]
    assert png.stat().st_size > 1000


def test_bench_rejects_bad_arguments():
    assert run_bench("--ops", "hista,warp").returncode == 2
    assert run_bench("--gae", "64by4096").returncode == 2
    assert run_bench("--numca", "64").returncode == 2


def test_bench_writes_to_the_user_cache_never_the_repository(tmp_path):
    """Without --csv the rows go to $XDG_CACHE_HOME/sveb_kernels; the curated CSV in the repo stays as it is."""
    import os
    import pathlib

    tracked = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results" / "sveb_bench.csv"
    before = tracked.read_bytes() if tracked.exists() else None
    env = {k: v for k, v in os.environ.items() if k != "SVEB_RESULTS_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "sveb_kernels.cli", "bench", "--ops", "gae", "--gae", "3x17",
                           "--repeats", "2"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tracked.parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = tmp_path / "cache" / "sveb_kernels" / "sveb_bench.csv"
    with open(written) as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} >= {"per-token loop", "reference"} and str(written) in proc.stderr
    assert (tracked.read_bytes() if tracked.exists() else None) == before
    # The table says how many threads were used and why, and has a spread column.
    assert "threads: " in proc.stdout and "spread" in proc.stdout


def _report(spreads, ceiling_after=1e11, one_thread=None):
    from sveb_kernels.benchmark.runner import Report, Row

    rows = [Row("gae", "B=64 T=4096, a case label longer than thirty-four characters", f"impl{i}", median_ms=1.0,
                spread_pct=s, total_tokens=64 * 4096) for i, s in enumerate(spreads)]
    ceilings = {"matmul": "float32 1024^3 matmul", "matmul_flops_per_s": 1e11, "copy_bytes_per_s": 1e10,
                "matmul_flops_per_s_after": ceiling_after}
    if one_thread:
        ceilings["matmul_flops_per_s_1thread"] = one_thread
    return Report(config={}, ceilings=ceilings, rows=rows)


ENV = {"device_name": "CPU test", "torch": "t", "triton": "t", "commit": "c", "threads": 4, "cpu_count": 4,
       "load_average": 0.5}


def test_table_flags_noise_and_keeps_the_whole_case():
    from sveb_kernels.benchmark import report

    quiet = _report([3.0, 8.0])
    assert report.noise_warnings(quiet, ENV) == []
    text = report.table(quiet, ENV)
    assert "WARNING" not in text and "noisy" not in text
    assert "a case label longer than thirty-four characters" in text  # not cut

    noisy = _report([3.0, 80.0])
    text = report.table(noisy, ENV)
    assert "WARNING" in text and "1 of 2 timings vary" in text
    assert [line for line in text.splitlines() if line.startswith("gae")][1].endswith("noisy")
    assert any("ceiling moved" in w for w in report.noise_warnings(_report([1.0], ceiling_after=3e11), ENV))
    # 4 threads reaching only 1.2x one thread's matmul rate: the cores are busy
    assert any("--threads 1" in w for w in report.noise_warnings(_report([1.0], one_thread=1e11 / 1.2), ENV))
    assert any("load average" in w for w in report.noise_warnings(quiet, {**ENV, "load_average": 9.0}))
    quiet.rows[0].pct_of_ceiling = 183.0
    assert any("exceed 100% of the ceiling" in w for w in report.noise_warnings(quiet, ENV))


def test_default_cpu_threads_leave_busy_cores_alone(monkeypatch):
    import os

    import torch

    from sveb_kernels.benchmark import timing

    cores = os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert timing.default_cpu_threads()[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert timing.default_cpu_threads()[0] == min(torch.get_num_threads(), cores)


def test_plot_shows_every_op_against_total_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    from sveb_kernels.benchmark import plot
    from sveb_kernels.benchmark.runner import Report, Row

    rows = [Row("hista_values", f"2x8 rollouts, {n} tok, D=64", impl, tokens_per_group=n // 2, median_ms=n * k,
                peak_mib=float(n), total_tokens=n)
            for n in (100, 200) for impl, k in (("naive PyTorch", 1), ("reference", 2))]
    rows += [Row("gae", "B=4 T=8", "per-token loop", median_ms=5.0, total_tokens=32),
             Row("gae", "B=4 T=8", "reference", median_ms=1.0, speedup=5.0, total_tokens=32)]
    png = tmp_path / "all.png"
    plot.plot_report(Report(config={}, ceilings={}, rows=rows), str(png), "test")
    assert png.stat().st_size > 1000


def test_the_progress_bar_counts_what_runs(monkeypatch):
    """The variant list is built once (one look-up of the available backends), counted for the
    progress bar, and run as counted."""
    import torch

    from sveb_kernels.benchmark import runner

    lookups, totals, steps = [], [], []
    available = runner._backend.available_backends
    monkeypatch.setattr(runner._backend, "available_backends", lambda *a, **k: lookups.append(a) or available(*a, **k))
    progress_init = runner._Progress.__init__
    monkeypatch.setattr(runner._Progress, "__init__",
                        lambda self, total, enabled: totals.append(total) or progress_init(self, total, enabled))
    monkeypatch.setattr(runner._Progress, "step", lambda self, label: steps.append(label))
    config = runner.Config(torch.device("cpu"), quick=True, hista_tokens=(48, 96), hidden_size=24, rollouts=3,
                           gae_shape=(5, 67), numca_shape=(3, 40), repeats=1, progress=False)
    report = runner.run(config)
    assert len(lookups) == 1
    assert totals == [len(steps)] == [len(report.rows)]
    ops = [row.op for row in report.rows]
    assert ops == sorted(ops, key=["hista_values", "hista fwd+bwd", "gae", "numeric_spans", "numca_values"].index)
    assert all(row.median_ms for row in report.rows), [(row.op, row.impl, row.note) for row in report.rows]


def test_bench_hista_backward_against_dense_autograd():
    """`--ops hista_backward`: forward + backward of the op next to autograd through the dense formula
    (the speedup column's baseline), gradients agreeing, peak memory recorded."""
    proc = run_bench("--json", "-", "--no-csv", "--ops", "hista_backward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    assert {r["impl"] for r in rows} >= {"dense autograd", "reference fused bwd"}
    assert all(r["op"] == "hista fwd+bwd" and r["agree"] is True and r["peak_mib"] is not None for r in rows)
    assert all(r["speedup"] is not None for r in rows if r["impl"] != "dense autograd")
