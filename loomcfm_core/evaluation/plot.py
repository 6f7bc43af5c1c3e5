"""Distance against NFE, one curve per model (a checkpoint, the base and reflowed models of a pipeline, the
arms of an ablation), every point labelled with its method."""

from __future__ import annotations

from pathlib import Path

from loomcfm_core.results import MethodResult


def _place_labels(ax, points: list[tuple[float, float, str]], color: str, below: bool, placed: list) -> None:
    """Label each point with its method, moving a label further out until it overlaps none in ``placed``
    (the curves of two models share NFE values, so fixed offsets would print labels on top of each other)."""
    renderer = ax.figure.canvas.get_renderer()
    for x, y, text in points:
        for step in range(12):
            dy = (-10 - 9 * step) if below else (5 + 9 * step)
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7, color=color,
                                va="top" if below else "bottom")
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        placed.append(box)


def plot_fd_vs_nfe(curves: dict[str, list[MethodResult]], metric: str, path: Path) -> Path:
    """:func:`draw_fd_vs_nfe` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = draw_fd_vs_nfe(curves, metric)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_fd_vs_nfe(curves: dict[str, list[MethodResult]], metric: str):
    """One line per model: distance against NFE (log axis with the NFE values as plain ticks), each point
    labelled with its method, no two labels overlapping; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = {label: sorted(rows, key=lambda r: r.nfe) for label, rows in curves.items()}
    lines = [ax.plot([r.nfe for r in rows], [r.distance for r in rows], marker="o", label=label)[0]
             for label, rows in curves.items()]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted({r.nfe for rows in curves.values() for r in rows})))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.ticklabel_format(axis="y", useOffset=False)  # distances close together read as they are, not "+4.418e3"
    ax.margins(x=0.12, y=0.18)
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(f"{metric} vs NFE")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    placed: list = []
    for i, (line, rows) in enumerate(zip(lines, curves.values())):
        _place_labels(ax, [(r.nfe, r.distance, r.method) for r in rows], line.get_color(), i % 2 == 1, placed)
    return fig
