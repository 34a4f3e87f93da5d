"""Pareto plots: an offline interactive HTML with one trace per legend group, and a valid PNG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from snnet.errors import ResultsError
from snnet.evaluate import Row, mark_pareto
from snnet.plot import plot_pareto

from .conftest import _traces

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(latency: bool = False) -> list[Row]:
    rows = [  # id, name, flops, acc1: two anchors, four stitches (two of them on the frontier)
        (0, "ti", 100, 60.0), (1, "b", 400, 80.0), (2, "ti[:1]+b[1:]", 350, 79.0),
        (3, "ti[:2]+b[2:]", 250, 75.0), (4, "ti[:3]+b[3:]", 200, 55.0), (5, "ti[:3]+b[2:]", 300, 70.0),
    ]
    return mark_pareto([
        Row(i, n, f, 10 * f, a, a + 10, 1.0, 50, i < 2, latency_ms=f / 100 if latency else None)
        for i, n, f, a in rows])


def test_html_has_one_trace_per_legend_group_with_hover(tmp_path: Path) -> None:
    results = _results()
    html_path, png_path = plot_pareto(results, tmp_path / "p.html", tmp_path / "p.png")
    html = html_path.read_text()
    traces = _traces(html)
    by_name = {t["name"]: t for t in traces}
    assert list(by_name) == ["stitches", "anchors", "Pareto frontier"]
    assert len({t["legendgroup"] for t in traces}) == 3  # a legend click hides exactly one group
    assert len(by_name["anchors"]["x"]) == 2 and len(by_name["stitches"]["x"]) == 4
    # frontier: ti (100, 60) -> ti[:2]+b[2:] (250, 75) -> ti[:1]+b[1:] (350, 79) -> b (400, 80), by cost
    assert by_name["Pareto frontier"]["x"] == [100, 250, 350, 400]
    assert by_name["Pareto frontier"]["y"] == [60.0, 75.0, 79.0, 80.0]
    hover = " ".join(by_name["stitches"]["text"])
    for r in results[2:]:
        assert r.name in hover and f"id {r.id}" in hover
    assert "params 3.50K" in hover and "FLOPs 350" in hover and "top-5 89.00%" in hover
    # plotly.js is embedded, so the page works offline
    assert not re.search(r"<script[^>]*src=", html) and "plotly.js v" in html and len(html) > 1_000_000
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_png_is_a_readable_image(tmp_path: Path) -> None:
    import matplotlib.image

    (_, png_path) = plot_pareto(_results(), tmp_path / "p.html", tmp_path / "sub" / "p.png")
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0  # something was drawn


def test_latency_axis(tmp_path: Path) -> None:
    (html_path,) = plot_pareto(_results(latency=True), tmp_path / "p.html", x="latency_ms")
    traces = {t["name"]: t for t in _traces(html_path.read_text())}
    assert traces["anchors"]["x"] == [1.0, 4.0]
    assert "latency 1.000 ms" in " ".join(traces["anchors"]["text"])
    with pytest.raises(ResultsError, match="latency_ms"):
        plot_pareto(_results(), tmp_path / "q.html", x="latency_ms")
    assert not (tmp_path / "q.html").exists()


def test_the_png_leaves_the_callers_matplotlib_backend_and_figures_alone(tmp_path: Path) -> None:
    """The PNG was drawn with pyplot after ``matplotlib.use("Agg")``: a notebook's backend switched to
    Agg under it (its inline figures stopped showing), and an interactive backend closes every open
    figure on a switch. It is drawn on a Figure of its own now."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        mine = plt.figure()
        plot_pareto(_results(), tmp_path / "p.html", tmp_path / "p.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    finally:
        plt.close("all")
        plt.switch_backend(before)


def test_the_docs_promise_no_legend_group_title_click_the_figure_does_not_have(tmp_path: Path) -> None:
    # with legend.groupclick "toggleitem" (a click on a zoo family hides that family alone) plotly.js
    # draws no click target on a legend group's title: a click on "zoo: ..." hides nothing
    import json

    import snnet.plot

    from snnet.zoo import load_zoo

    html = plot_pareto([*_results(), *load_zoo("fmnist")[:3]], tmp_path / "p.html")[0].read_text()
    start = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html)
    decoder = json.JSONDecoder()
    _, end = decoder.raw_decode(html, start.end())
    layout, _ = decoder.raw_decode(html, re.search(r",\s*", html[end:]).end() + end)
    assert layout["legend"]["groupclick"] == "toggleitem"
    assert any(t.get("legendgrouptitle") for t in _traces(html))
    docs = Path(__file__).resolve().parents[1] / "docs" / "zoo.md"
    for text in (snnet.plot.__doc__, docs.read_text()):
        flat = " ".join(text.split())
        assert not re.search(r"click on the (zoo's )?group'?s? title hides", flat), flat


def test_a_nan_top1_does_not_put_a_dominated_stitch_on_the_plotted_frontier(tmp_path: Path) -> None:
    import math

    from snnet.results import frontier

    def row(i: int, name: str, flops: int, acc: float, anchor: bool = False) -> Row:
        return Row(i, name, flops, 10 * flops, acc, acc + 10, 1.0, 50, anchor)

    # s3 and s1 cost the same; s1 is more accurate, s2's top-1 was not measured
    rows = [row(0, "t", 50, 40.0, True), row(3, "s3", 100, 50.0), row(2, "s2", 100, math.nan), row(1, "s1", 100, 60.0),
            row(4, "b", 200, 70.0, True)]
    assert [r.name for r in frontier(rows)] == ["t", "s1", "b"]
    assert [r.name for r in mark_pareto(rows) if r.pareto] == ["t", "s1", "b"]
    front = next(t for t in _traces(plot_pareto(rows, tmp_path / "p.html")[0].read_text()) if t["name"] == "Pareto frontier")
    assert front["x"] == [50, 100, 200] and front["y"] == [40.0, 60.0, 70.0]


def test_with_a_zoo_no_dot_is_larger_than_the_largest_size_the_reference_rows_included(tmp_path: Path) -> None:
    # the dots' scale was set by the network's and the zoo's params alone: a reference table of larger
    # networks drew diamonds past the largest size (79 px against 40 for deit beside a small zoo)
    from dataclasses import replace

    from snnet.plot import _MAX_DOT

    net = _results()
    zoo = [replace(r, id=None, name=f"z{k}", kind="zoo", is_anchor=False, extra={"source": "z", "family": "f"})
           for k, r in enumerate(net[:2])]
    ref = [replace(r, kind="reference", params=100 * r.params, extra={"source": "reference:t", "ref_id": r.id})
           for r in net]
    traces = _traces(plot_pareto([*net, *zoo, *ref], tmp_path / "p.html")[0].read_text())
    largest = {t["name"]: 2 * max(t["marker"]["size"]) / t["marker"]["sizeref"]
               for t in traces if isinstance(t.get("marker", {}).get("size"), list) and t["marker"]["size"]}
    assert "reference:t" in largest  # area sizeref: diameter**2 = 2 * size / sizeref
    assert max(largest.values()) ** 0.5 == pytest.approx(_MAX_DOT)


def test_rows_without_a_top5_or_a_top1_are_plotted(tmp_path: Path) -> None:
    # a Row's unmeasured fields are None: the hover text's NaN checks raised TypeError on them
    rows = [Row(0, "a", 100, 1000, acc1=50.0, is_anchor=True), Row(1, "s", 150, 1500, acc1=55.0)]
    traces = {t["name"]: t for t in _traces(plot_pareto(rows, tmp_path / "p.html", tmp_path / "p.png")[0].read_text())}
    assert "top-1 55.00%" in traces["stitches"]["text"][0] and "top-5" not in traces["stitches"]["text"][0]
    lm = [Row(0, "a", 100, 1000, is_anchor=True, bpb=2.0, ppl=4.0), Row(1, "s", 150, 1500, bpb=1.9, ppl=3.9)]
    traces = {t["name"]: t for t in _traces(plot_pareto(lm, tmp_path / "q.html", tmp_path / "q.png", y="bpb")[0].read_text())}
    assert "1.9000 bits/byte" in traces["stitches"]["text"][0] and "top-1" not in traces["stitches"]["text"][0]
    (html,) = plot_pareto([Row(0, "a", 100, 1000, is_anchor=True, bpb=2.0)], tmp_path / "r.html", y="bpb")
    assert "2.0000 bits/byte" in " ".join(t["text"][0] for t in _traces(html.read_text()) if t["text"])
