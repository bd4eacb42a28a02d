"""The quick plot of a run: Hista's time and peak memory against the batch's total tokens (the same
numbers as the table's "tok"), and one bar panel per other op (time per implementation, speedup)."""

from __future__ import annotations

from .runner import Report


def _plain_ticks(ax, values) -> None:
    """Ticks at the measured sizes, written as numbers (1,867), not as powers of two."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:,}" for v in values], rotation=30, ha="right")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plain_log_y(ax) -> None:
    """Log-scale y ticks written as plain numbers (0.2, 30), not as 2 x 10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_report(report: Report, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in report.rows if r.median_ms is not None]
    hista = [r for r in timed if r.op == "hista_values"]
    others = list(dict.fromkeys(r.op for r in timed if r.op != "hista_values"))
    panels = (2 if hista else 0) + len(others)
    if not panels:
        raise ValueError("nothing to plot: no timed rows in this run")
    columns = min(panels, 3)
    rows_of_panels = -(-panels // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.2 * columns, 4.2 * rows_of_panels), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    if hista:
        ax_time, ax_mem = axes[0], axes[1]
        sizes = sorted({r.total_tokens for r in hista})
        for impl in dict.fromkeys(r.impl for r in hista):
            mine = sorted((r for r in hista if r.impl == impl), key=lambda r: r.total_tokens)
            x = [r.total_tokens for r in mine]
            ax_time.plot(x, [r.median_ms for r in mine], marker="o", label=impl)
            if all(r.peak_mib is not None for r in mine):
                ax_mem.plot(x, [r.peak_mib for r in mine], marker="o", label=impl)
        case = hista[0].case.split(",")
        for ax, ylabel, what in ((ax_time, "median time per call (ms, log)", "time"),
                                 (ax_mem, "peak added memory (MiB, log)", "peak memory")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_ticks(ax, sizes)
            _plain_log_y(ax)
            ax.set_xlabel(f"total tokens in the batch ({case[0]},{case[-1]})")
            ax.set_ylabel(ylabel)
            ax.set_title(f"hista_values {what}: lower is better")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    for ax, op in zip(axes[2 if hista else 0:], others):
        mine = [r for r in timed if r.op == op]
        labels = [r.impl for r in mine]
        bars = ax.barh(range(len(mine)), [r.median_ms for r in mine], color="tab:blue")
        ax.set_yticks(range(len(mine)))
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        ax.set_xlabel("median time per call (ms)")
        ax.set_title(f"{op}: {mine[0].case}\n{mine[0].total_tokens:,} total tokens; shorter is better", fontsize=10)
        for bar, r in zip(bars, mine):
            text = f" {r.median_ms:.3g} ms" + (f", {r.speedup:.2g}x" if r.speedup else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=9)
        ax.margins(x=0.35)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


plot_hista = plot_report  # the name of earlier versions
