"""Accuracy-vs-cost plots of an evaluated stitch space: an interactive HTML and a static PNG.

The HTML (plotly) embeds plotly.js (~4.7 MB) rather than linking the CDN: results are often
looked at on machines without internet (clusters, this project's CI), and a single
self-contained file can be copied or attached on its own — ``include_plotlyjs='directory'`` would
save space per extra plot but breaks as soon as the HTML is moved without its ``plotly.min.js``.
The PNG is drawn with matplotlib (plotly's own image export needs kaleido and a browser).

Zoo rows (individually trained networks, :mod:`snnet.zoo`) are drawn beside the stitches: one
legend entry per zoo family (a click hides that family; the group's title only labels the zoo: with
``groupclick="toggleitem"`` plotly.js gives a group title no click), muted and beneath the stitched network's points, with the zoo's own frontier as a dashed line.
With a zoo every dot's area is proportional to the network's parameters, and a cost axis
that spans more than two decades turns logarithmic. Zoo models have no latency or memory measured
on this device, so a plot against those leaves them out and says so in its title.

Reference rows (the SN-Net authors' published results, :mod:`snnet.reference`) are drawn beside a
run the same way, as open diamonds with their own dotted frontier, one group per published table.
"""

from __future__ import annotations

import os
from pathlib import Path
import math
from typing import Any, Sequence

from .errors import ResultsError
from .results import LOWER_IS_BETTER, Row, frontier, measured, network_rows
from .io import atomic_write
from .report import human

__all__ = ["plot_pareto", "AXES", "Y_AXES"]

# x-axis key -> axis title; other keys work too (their name is the title)
AXES = {"flops": "FLOPs (multiply-accumulates)", "params": "parameters", "latency_ms": "latency (ms)",
        "peak_mem_mb": "peak memory (MB)"}
# y-axis key -> axis title (a language model's rows are plotted on bits per byte or perplexity)
Y_AXES = {"acc1": "top-1 accuracy (%)", "bpb": "bits per byte (lower is better)", "ppl": "perplexity (lower is better)"}


# colours: the stitched network's stand out, the zoo's are muted and drawn beneath them
STITCH, ANCHOR, FRONT = "#1f77b4", "#d62728", "#2ca02c"
ZOO_FRONT = "#444444"
REFERENCE = "#9467bd"  # the authors' published networks, beside a run
_LOG_SPAN = 100  # a cost axis spanning more than this factor is drawn logarithmic
_MAX_DOT = 40  # px: the largest network's dot (area proportional to params)


class _Groups:
    """The plot's groups: anchors, stitches and their frontier; the zoo by family, and its frontier."""

    def __init__(self, results: Sequence[Row], x: str, y: str = "acc1") -> None:
        self.y = y
        network = network_rows(results)
        missing = [r.name for r in network if r.value(x) is None]
        if missing:
            hint = " (measure it first, e.g. with `snnet profile`)" if x in ("latency_ms", "peak_mem_mb") else ""
            raise ResultsError(f"{len(missing)} results have no {x!r}, e.g. {missing[0]!r}: cannot plot against it{hint}")
        zoo = [r for r in results if r.is_zoo]
        self.zoo = [r for r in zoo if r.value(x) is not None]
        self.zoo_omitted = len(zoo) - len(self.zoo)  # e.g. no latency measured on this device
        reference = [r for r in results if r.kind == "reference"]
        self.references: dict[str, list[Row]] = {}
        for r in reference:
            if r.value(x) is not None:
                self.references.setdefault(str(r.value("source")), []).append(r)
        self.reference_omitted = len(reference) - sum(map(len, self.references.values()))
        self.reference_fronts = {src: frontier(rows, x, y) for src, rows in self.references.items()}
        if not network and not self.zoo and not self.references:
            raise ResultsError("no results to plot")
        self.anchors = [r for r in network if r.is_anchor]
        self.stitches = [r for r in network if not r.is_anchor]
        self.frontier = frontier(network, x, y) if network else []
        self.zoo_frontier = frontier(self.zoo, x, y) if self.zoo else []
        self.families: dict[str, list[Row]] = {}
        for r in sorted(self.zoo, key=lambda r: str(r.value("family"))):
            self.families.setdefault(str(r.value("family")), []).append(r)
        self.sources = sorted({str(r.value("source")) for r in zoo})
        compared = [r for rows in self.references.values() for r in rows]
        shown = [r.value(x) for r in [*network, *self.zoo, *compared] if r.value(x) is not None and r.value(x) > 0]
        self.log_x = bool(self.zoo or self.references) and bool(shown) and max(shown) > _LOG_SPAN * min(shown)
        # every sized dot (the reference rows' too) on one scale: the largest network's is _MAX_DOT
        self.max_params = max((r.params for r in [*network, *self.zoo, *compared]), default=1) or 1

    def title(self, x: str, xlabel: str, n_network: int) -> str:
        metric = Y_AXES.get(self.y, self.y).split(" (")[0]
        beside = [f"the authors' {src} ({len(rows)} networks)" for src, rows in self.references.items()]
        # a zoo none of whose models is drawn (no latency for them) is not named as what the network is plotted beside
        beside += [f"zoo {', '.join(self.sources)} ({len(self.zoo)} models)"] if self.zoo else []
        omitted = [f"{n} {what}" for n, what in ((self.zoo_omitted, "zoo models"),
                                                  (self.reference_omitted, "reference networks")) if n]
        # a published table plotted as the network (`snnet eval --results reference:deit`): the paper's figure
        sources = {str(r.value("source")) for r in [*self.anchors, *self.stitches]}
        published = sources.pop() if len(sources) == 1 and next(iter(sources)).startswith("reference:") else None
        if published:
            net = f"SN-Net as its authors published it ({published}, {n_network} networks)"
        elif not beside and not omitted:
            return f"SN-Net: {metric} vs {xlabel} ({n_network} networks)"
        else:
            net = f"SN-Net ({n_network} networks)"
        text = f"{net} vs {' and '.join(beside)}: {metric} vs {xlabel}" if beside else f"{net}: {metric} vs {xlabel}"
        if not n_network:  # a zoo or published table alone: no stitched network in it to name
            text = f"{' and '.join(beside)}: {metric} vs {xlabel}"
        if omitted:
            text += f" - {' and '.join(omitted)} left out: no {x} measured for them on this device"
        return text


def _hover(r: Row, x: str) -> str:
    if r.is_zoo:
        lines = [f"<b>{r.name}</b>", f"zoo {r.value('source')}, family {r.value('family')}"]
    elif r.kind == "reference":
        lines = [f"<b>{r.name}</b>", f"{r.value('source')}: the authors' id {r.value('ref_id')} (snnet id {r.id})"]
    else:
        lines = [f"<b>{r.name}</b>", f"id {r.id}{' (anchor)' if r.is_anchor else ''}"]
    lines += [f"FLOPs {human(r.flops)}", f"params {human(r.params)}"]
    # what a producer did not measure is None (a Row built with a top-1 alone, a language model's with bits per byte)
    top = [f"top-{k} {v:.2f}%" for k, v in ((1, r.acc1), (5, r.acc5)) if measured(v)]
    if top:
        lines.append("  ".join(top))
    if r.is_zoo and r.value("img_size") is not None:
        lines.append(f"image size {r.value('img_size')}")
    if r.is_zoo and r.value("flops_from") == "timm GMACs":
        lines.append("FLOPs: timm's GMACs (snnet could not count this model)")
    if r.value("bpb") is not None:
        ppl = r.value("ppl")
        lines.append(f"{r.value('bpb'):.4f} bits/byte" + (f", perplexity {ppl:.3f}" if ppl is not None else ""))
    if r.latency_ms is not None:
        lines.append(f"latency {r.latency_ms:.3f} ms")
    if x not in ("flops", "params", "latency_ms"):
        lines.append(f"{x} {r.value(x)}")
    return "<br>".join(lines)


def _zoo_colours(families: Sequence[str]) -> dict[str, str]:
    from plotly.colors import qualitative, unlabel_rgb

    # muted, so the stitches stand out; as hex, which both plotly and matplotlib read
    palette = ["#%02x%02x%02x" % tuple(int(v) for v in unlabel_rgb(c))
               for c in qualitative.Set2 + qualitative.Pastel1 + qualitative.Set3]
    return {f: palette[k % len(palette)] for k, f in enumerate(families)}


def plot_pareto(
    results: Sequence[Row],
    html_path: str | os.PathLike,
    png_path: str | os.PathLike | None = None,
    x: str = "flops",
    title: str | None = None,
    y: str = "acc1",
) -> list[Path]:
    """Plot ``y`` (top-1 accuracy; a language model's ``bpb`` or ``ppl``) against ``x`` ('flops', 'params',
    'latency_ms', ...); return the written paths.

    Anchors, stitches and the Pareto frontier are separate traces, so clicking a legend entry
    hides that group; hovering a point shows the stitch's name, id, params, FLOPs and accuracies.
    Zoo rows among ``results`` add one trace per zoo family and the zoo's frontier (module docstring).
    """
    import plotly.graph_objects as go

    results = list(results)
    g = _Groups(results, x, y)
    xlabel = AXES.get(x, x)
    title = title or g.title(x, xlabel, len(network_rows(results)))
    sized = bool(g.zoo)  # with a zoo, a larger dot is a larger network

    def marker(rows: list[Row], size: float, **style: Any) -> dict[str, Any]:
        if not sized:
            return dict(size=size, **style)
        # area proportional to params, on one scale for every trace
        return dict(size=[r.params for r in rows], sizemode="area", sizeref=2 * g.max_params / _MAX_DOT ** 2,
                    sizemin=size / 2, **style)

    def scatter(rows: list[Row], name: str, rank: int, group: str | None = None, **style: Any) -> go.Scatter:
        return go.Scatter(x=[r.value(x) for r in rows], y=[r.value(y) for r in rows], name=name,
                          legendgroup=group or name, legendrank=rank,
                          text=[_hover(r, x) for r in rows], hovertemplate="%{text}<extra></extra>", **style)

    traces = []
    if g.zoo:
        zoo_title = dict(text=f"zoo: {', '.join(g.sources)} (click a family to hide it)")
        traces.append(scatter(g.zoo_frontier, "zoo frontier", 10, "zoo", legendgrouptitle=zoo_title, mode="lines",
                              line=dict(color=ZOO_FRONT, width=2, dash="dash", shape="hv")))
        colours = _zoo_colours(list(g.families))
        for k, (fam, rows) in enumerate(g.families.items()):
            traces.append(scatter(rows, fam, 20 + k, "zoo", mode="markers", marker=marker(
                rows, 7, color=colours[fam], opacity=0.6, line=dict(width=0.5, color="#777777"))))
    for k, (src, rows) in enumerate(g.references.items()):
        group = dict(text=f"the authors' published results: {src}")
        traces += [
            scatter(rows, f"{src}", 5 + 2 * k, src, legendgrouptitle=group, mode="markers",
                    marker=marker(rows, 9, color=REFERENCE, symbol="diamond-open", line=dict(width=1.5))),
            scatter(g.reference_fronts[src], f"{src} frontier", 6 + 2 * k, src, mode="lines",
                    line=dict(color=REFERENCE, width=2, dash="dot", shape="hv")),
        ]
    network = [
        scatter(g.stitches, "stitches", 1, mode="markers", marker=marker(g.stitches, 8, color=STITCH, opacity=0.8)),
        # anchors are also labelled on the plot itself (the hover text stays the full description)
        scatter(g.anchors, "anchors", 2, mode="markers+text", textposition="top center",
                texttemplate=[r.name for r in g.anchors],
                marker=marker(g.anchors, 14, color=ANCHOR, symbol="star", line=dict(width=1, color="black"))),
        # the frontier's members get a ring, so a one-point frontier still shows
        scatter(g.frontier, "Pareto frontier", 3, mode="lines+markers", line=dict(color=FRONT, width=3, shape="hv"),
                marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(width=2, color=FRONT))),
    ]
    traces += [t for t in network if t.x]  # no legend entry for what is not there (a zoo alone, no anchors among the rows)
    fig = go.Figure(traces)
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=Y_AXES.get(y, y), template="plotly_white",
                      hovermode="closest", legend=dict(itemclick="toggle", itemdoubleclick="toggleothers",
                                                       groupclick="toggleitem"))
    if g.log_x:
        fig.update_xaxes(type="log")
    if x in ("flops", "params"):
        fig.update_xaxes(tickformat="~s")
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(html_path, lambda p: fig.write_html(str(p), include_plotlyjs=True, full_html=True))
    written = [html_path]
    if png_path is not None:
        written.append(_png(g, Path(png_path), x, xlabel, title))
    return written


_PNG_FAMILIES = 12  # more zoo families than this share one colour and one legend entry in the PNG


def _png(g: _Groups, path: Path, x: str, xlabel: str, title: str) -> Path:
    # a Figure on its own Agg canvas, not pyplot: matplotlib.use("Agg") switched the caller's backend (a
    # notebook's inline figures stopped showing) and pyplot would keep the figure in its global registry
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    def area(rows: list[Row], fixed: float) -> Any:
        """Marker areas (pt^2): proportional to params when a zoo is drawn, at least ``fixed`` / 4."""
        return [max(fixed / 4, 600 * r.params / g.max_params) for r in rows] if g.zoo else fixed

    fig = Figure(figsize=(12, 6.5) if g.zoo else (9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    try:
        if g.zoo:
            colours = _zoo_colours(list(g.families))
            if len(g.families) <= _PNG_FAMILIES:
                for fam, rows in g.families.items():
                    ax.scatter([r.value(x) for r in rows], [r.value(g.y) for r in rows], s=area(rows, 20), c=colours[fam],
                               alpha=0.6, edgecolors="#777777", linewidths=0.4, label=f"zoo: {fam}", zorder=1)
            else:
                ax.scatter([r.value(x) for r in g.zoo], [r.value(g.y) for r in g.zoo], s=area(g.zoo, 20), c="#bbbbbb",
                           alpha=0.6, edgecolors="#777777", linewidths=0.4, zorder=1,
                           label=f"zoo: {len(g.zoo)} models, {len(g.families)} families")
            ax.step([r.value(x) for r in g.zoo_frontier], [r.value(g.y) for r in g.zoo_frontier], where="post",
                    c=ZOO_FRONT, lw=1.5, ls="--", label="zoo frontier", zorder=1)
        for src, rows in g.references.items():
            ax.scatter([r.value(x) for r in rows], [r.value(g.y) for r in rows], s=area(rows, 40), marker="D",
                       facecolors="none", edgecolors=REFERENCE, linewidths=1.2, label=f"the authors': {src}", zorder=2)
            front = g.reference_fronts[src]
            ax.step([r.value(x) for r in front], [r.value(g.y) for r in front], where="post", c=REFERENCE, lw=1.5, ls=":",
                    label=f"{src} frontier", zorder=2)
        if g.stitches:  # as in the HTML, no legend entry for what is not there
            ax.scatter([r.value(x) for r in g.stitches], [r.value(g.y) for r in g.stitches],
                       s=area(g.stitches, 60 if g.zoo else 24), c=STITCH, alpha=0.8,
                       edgecolors="#0b3c5d" if g.zoo else "none", linewidths=0.5, label="stitches", zorder=3)
        if g.frontier:
            ax.step([r.value(x) for r in g.frontier], [r.value(g.y) for r in g.frontier], where="post", c=FRONT, lw=2.5,
                    label="Pareto frontier", zorder=2, marker="o", markersize=11, markerfacecolor="none")
        if g.anchors:
            stars = [max(160, a) for a in area(g.anchors, 160)] if g.zoo else 160  # a star never smaller than unsized
            ax.scatter([r.value(x) for r in g.anchors], [r.value(g.y) for r in g.anchors], s=stars, c=ANCHOR, marker="*",
                       edgecolors="black", linewidths=0.6, label="anchors", zorder=4)
        for r in g.anchors:
            ax.annotate(r.name, (r.value(x), r.value(g.y)), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
        if g.log_x:
            ax.set_xscale("log")
        if x in ("flops", "params"):
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 10M, 2.5G: like the HTML's SI ticks
        ax.set(xlabel=xlabel, ylabel=Y_AXES.get(g.y, g.y))
        ax.set_title(title, fontsize=10 if g.zoo else None, wrap=True)
        ax.grid(alpha=0.3)
        if g.zoo:
            legend = ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
            for handle in legend.legend_handles:  # one marker size in the legend, whatever the dots' sizes
                if hasattr(handle, "set_sizes"):
                    handle.set_sizes([40])
        else:
            ax.legend(loc="upper right" if g.y in LOWER_IS_BETTER else "lower right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        fig.clear()  # its artists go now, not whenever the garbage collector finds them
    return path
