"""Accuracy-vs-cost plots of an evaluated stitch space: an interactive HTML and a static PNG.

The HTML (plotly) embeds plotly.js (~4.7 MB) rather than linking the CDN: results are often
looked at on machines without internet (clusters, this project's CI), and a single
self-contained file can be copied or attached on its own — ``include_plotlyjs='directory'`` would
save space per extra plot but breaks as soon as the HTML is moved without its ``plotly.min.js``.
The PNG is drawn with matplotlib (plotly's own image export needs kaleido and a browser).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import ResultsError
from .results import StitchResult, pareto_front
from .io import atomic_write
from .report import human

__all__ = ["plot_pareto", "AXES"]

# x-axis key -> axis title; other keys work too (their name is the title)
AXES = {"flops": "FLOPs (multiply-accumulates)", "params": "parameters", "latency_ms": "latency (ms)",
        "peak_mem_mb": "peak memory (MB)"}


def _groups(results: Sequence[StitchResult], x: str) -> tuple[list[StitchResult], list[StitchResult], list[StitchResult]]:
    """Anchors, stitches, and the frontier sorted by cost (the three legend entries)."""
    missing = [r.name for r in results if r.value(x) is None]
    if missing:
        hint = " (measure it first, e.g. with `snnet profile`)" if x in ("latency_ms", "peak_mem_mb") else ""
        raise ResultsError(f"{len(missing)} results have no {x!r}, e.g. {missing[0]!r}: cannot plot against it{hint}")
    if not results:
        raise ResultsError("no results to plot")
    front = pareto_front(results, x)
    anchors = [r for r in results if r.is_anchor]
    stitches = [r for r in results if not r.is_anchor]
    frontier = sorted((r for r in results if r.id in front), key=lambda r: (r.value(x), r.id))
    return anchors, stitches, frontier


def _hover(r: StitchResult, x: str) -> str:
    lines = [f"<b>{r.name}</b>", f"id {r.id}{' (anchor)' if r.is_anchor else ''}",
             f"FLOPs {human(r.flops)}", f"params {human(r.params)}", f"top-1 {r.acc1:.2f}%  top-5 {r.acc5:.2f}%"]
    if r.latency_ms is not None:
        lines.append(f"latency {r.latency_ms:.3f} ms")
    if x not in ("flops", "params", "latency_ms"):
        lines.append(f"{x} {r.value(x)}")
    return "<br>".join(lines)


def plot_pareto(
    results: Sequence[StitchResult],
    html_path: str | os.PathLike,
    png_path: str | os.PathLike | None = None,
    x: str = "flops",
    title: str | None = None,
) -> list[Path]:
    """Plot top-1 accuracy against ``x`` ('flops', 'params', 'latency_ms', ...); return the written paths.

    Anchors, stitches and the Pareto frontier are separate traces, so clicking a legend entry
    hides that group; hovering a point shows the stitch's name, id, params, FLOPs and accuracies.
    """
    import plotly.graph_objects as go

    results = list(results)
    anchors, stitches, frontier = _groups(results, x)
    xlabel = AXES.get(x, x)
    title = title or f"SN-Net: top-1 accuracy vs {xlabel} ({len(results)} networks)"

    def scatter(rows: list[StitchResult], name: str, **style) -> go.Scatter:
        return go.Scatter(x=[r.value(x) for r in rows], y=[r.acc1 for r in rows], name=name, legendgroup=name,
                          text=[_hover(r, x) for r in rows], hovertemplate="%{text}<extra></extra>", **style)

    fig = go.Figure([
        scatter(stitches, "stitches", mode="markers", marker=dict(size=8, color="#1f77b4", opacity=0.75)),
        # anchors are also labelled on the plot itself (the hover text stays the full description)
        scatter(anchors, "anchors", mode="markers+text", textposition="top center", texttemplate=[r.name for r in anchors],
                marker=dict(size=14, color="#d62728", symbol="star", line=dict(width=1, color="black"))),
        # the frontier's members get a ring, so a one-point frontier still shows
        scatter(frontier, "Pareto frontier", mode="lines+markers", line=dict(color="#2ca02c", width=2, shape="hv"),
                marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(width=2, color="#2ca02c"))),
    ])
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="top-1 accuracy (%)", template="plotly_white",
                      hovermode="closest", legend=dict(itemclick="toggle", itemdoubleclick="toggleothers"))
    if x in ("flops", "params"):
        fig.update_xaxes(tickformat="~s")
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(html_path, lambda p: fig.write_html(str(p), include_plotlyjs=True, full_html=True))
    written = [html_path]
    if png_path is not None:
        written.append(_png(anchors, stitches, frontier, Path(png_path), x, xlabel, title))
    return written


def _png(anchors: list[StitchResult], stitches: list[StitchResult], frontier: list[StitchResult], path: Path,
         x: str, xlabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    try:
        ax.scatter([r.value(x) for r in stitches], [r.acc1 for r in stitches], s=24, c="#1f77b4", alpha=0.75,
                   label="stitches", zorder=2)
        ax.step([r.value(x) for r in frontier], [r.acc1 for r in frontier], where="post", c="#2ca02c", lw=2,
                label="Pareto frontier", zorder=1, marker="o", markersize=11, markerfacecolor="none")
        ax.scatter([r.value(x) for r in anchors], [r.acc1 for r in anchors], s=160, c="#d62728", marker="*",
                   edgecolors="black", linewidths=0.6, label="anchors", zorder=3)
        for r in anchors:
            ax.annotate(r.name, (r.value(x), r.acc1), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
        if x in ("flops", "params"):
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 10M, 2.5G: like the HTML's SI ticks
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    return path
