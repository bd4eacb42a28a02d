"""Time and peak memory against tokens per group, one line per Hista implementation."""

from __future__ import annotations

from .runner import Report


def plot_hista(report: Report, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.op == "hista_values" and r.median_ms is not None]
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in impls:
        mine = sorted((r for r in rows if r.impl == impl), key=lambda r: r.tokens_per_group)
        x = [r.tokens_per_group for r in mine]
        ax_time.plot(x, [r.median_ms for r in mine], marker="o", label=impl)
        if all(r.peak_mib is not None for r in mine):
            ax_mem.plot(x, [r.peak_mib for r in mine], marker="o", label=impl)
    for ax, ylabel in ((ax_time, "median time (ms)"), (ax_mem, "peak added memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per group")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
