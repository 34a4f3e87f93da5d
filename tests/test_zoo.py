"""Zoo rows beside the stitches: `kind` in results files, zoo loaders and filters, the plot, `snnet eval --zoo`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import snnet
from snnet.budget import select_stitch
from snnet.errors import ResultsError, ZooError
from snnet.results import (Row, format_results, frontier, load_results, mark_pareto, merge_rows, network_rows,
                           pareto_front, write_results)
from snnet.zoo import ZOOS, ZooFilter, load_zoo, read_zoo

from .conftest import TINY_VITS, _run, _traces


def _net_rows() -> list[Row]:
    """Two anchors and three stitches: ids 0..4."""
    rows = [(0, "ti", 100, 60.0), (1, "b", 400, 80.0), (2, "ti[:1]+b[1:]", 350, 79.0), (3, "ti[:2]+b[2:]", 250, 75.0),
            (4, "ti[:3]+b[3:]", 200, 55.0)]
    return [Row(i, n, f, 10 * f, a, a + 10, 1.0, 50, i < 2) for i, n, f, a in rows]


def _zoo_row(name: str, flops: int, acc1: float, family: str = "fam", **kw) -> Row:
    return Row(None, name, flops, 10 * flops, acc1, math.nan, math.nan, 50, False, kind="zoo",
                        extra={"source": "test-zoo", "family": family, **kw})


# ------------------------------------------------------------------ kind on result rows


def test_kind_is_derived_for_old_files_and_round_trips(tmp_path: Path) -> None:
    old = [r.to_dict() for r in _net_rows()]
    for r in old:
        del r["kind"]  # a results.json written before zoo rows existed
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert [r.kind for r in load_results(tmp_path)] == ["anchor", "anchor", "stitch", "stitch", "stitch"]

    rows = _net_rows() + [_zoo_row("deit_like", 300, 90.0, img_size=224)]
    json_path, csv_path = write_results(rows, tmp_path / "out")
    written = json.loads(json_path.read_text())
    assert [r["kind"] for r in written] == ["anchor", "anchor", "stitch", "stitch", "stitch", "zoo"]
    assert written[-1]["id"] is None and written[-1]["family"] == "fam" and written[-1]["source"] == "test-zoo"
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:3] == ["id", "name", "kind"] and table[-1]["id"] == "" and table[-1]["kind"] == "zoo"
    for path in (json_path, csv_path):
        back = load_results(path)
        assert [r.kind for r in back] == [r.kind for r in rows]
        zoo = back[-1]
        assert zoo.id is None and zoo.is_zoo and not zoo.is_anchor and zoo.acc1 == 90.0 and math.isnan(zoo.acc5)
        assert zoo.value("img_size") == 224 and zoo.value("family") == "fam"


@pytest.mark.parametrize("kw, message", [
    (dict(id=3, kind="zoo"), "no stitch id"),
    (dict(id=None, kind="stitch"), "needs a stitch id"),
    (dict(id=0, kind="anchor", is_anchor=False), "contradicts"),
    (dict(id=0, kind="teacher"), "not one of"),
])
def test_inconsistent_rows_are_rejected(kw: dict, message: str) -> None:
    base = dict(name="x", flops=1, params=1, acc1=1.0, acc5=1.0, loss=1.0, images=1, is_anchor=False)
    with pytest.raises(ValueError, match=message):
        Row(**{**base, **kw})


def test_load_results_rejects_a_zoo_model_twice(tmp_path: Path) -> None:
    write_results(_net_rows() + [_zoo_row("m", 300, 90.0), _zoo_row("m", 310, 91.0)], tmp_path)
    with pytest.raises(ResultsError, match="zoo model 'm'"):
        load_results(tmp_path)


def test_frontiers_keep_stitches_and_zoo_apart() -> None:
    # a zoo model that beats every stitch does not push any stitch off the SN-Net frontier
    rows = _net_rows() + [_zoo_row("z_cheap", 50, 95.0), _zoo_row("z_mid", 300, 70.0), _zoo_row("z_big", 500, 99.0)]
    assert pareto_front(rows) == {0, 3, 2, 1} == pareto_front(_net_rows())
    marked = mark_pareto(rows)
    assert {r.name for r in marked if r.pareto and r.is_zoo} == {"z_cheap", "z_big"}
    assert {r.id for r in marked if r.pareto and not r.is_zoo} == {0, 1, 2, 3}
    assert [r.name for r in frontier([r for r in rows if r.is_zoo])] == ["z_cheap", "z_big"]
    assert len(network_rows(rows)) == 5


def test_selecting_by_budget_never_returns_a_zoo_model() -> None:
    rows = _net_rows() + [_zoo_row("z_best", 120, 99.0)]  # cheaper and better than every stitch
    for budget in ("flops<=150", "flops<=1000", "params<=5K"):
        chosen = select_stitch(rows, budget)
        assert chosen.id is not None and "z_best" not in chosen.name
        assert all(isinstance(k, int) for k in chosen.candidates)
    assert select_stitch(rows, "flops<=150").name == "ti"
    # a results file carrying zoo rows works as the accuracy source of a network's costs too
    assert select_stitch([r.to_dict() for r in _net_rows()], "flops<=300", [r.to_dict() for r in rows]).name == "ti[:2]+b[2:]"


def test_merge_and_format_leave_zoo_rows_aside() -> None:
    base = [r.to_dict() for r in _net_rows() + [_zoo_row("z", 120, 99.0)]]
    merged = merge_rows(base, [Row(2, "ti[:1]+b[1:]", latency_ms=3.0), _zoo_row("z2", 1, 1.0).to_dict()], "the profile")
    assert [r.name for r in merged] == ["ti", "b", "ti[:1]+b[1:]", "ti[:2]+b[2:]", "ti[:3]+b[3:]", "z"]
    assert merged[2].latency_ms == 3.0 and merged[-1].latency_ms is None
    assert merged[2].acc1 == _net_rows()[2].acc1 and merged[2].flops == _net_rows()[2].flops  # the rest kept
    text = format_results(_net_rows() + [_zoo_row("z", 120, 99.0)])
    assert "z " not in text.replace("zoo", "") and "1 zoo models from test-zoo" in text
    assert "best top-1 80.00% (b)" in text


# ------------------------------------------------------------------ zoo files and filters


def _fmnist_zoo(path: Path) -> Path:
    """A small file in the schema the Fashion-MNIST zoo is written in."""
    models = [
        {"name": f"fmnist_vit_w{w}_d6_p7", "arch": {"embed_dim": w, "num_heads": 2, "depth": 6, "patch_size": 7,
                                                    "mlp_ratio": 4.0},
         "params": 1000 * w, "flops": 20000 * w, "val_acc1": 70.0 + w / 10, "test_acc1": 69.0 + w / 10, "epochs": 12,
         "image_steps": 600000, "seconds": 10.0 * w, "threads": 1, "command": "python scripts/train_fmnist_zoo.py"}
        for w in (16, 24, 48)]
    path.write_text(json.dumps({"dataset": "fashion-mnist", "split": {"train": 50000, "val": 10000, "test": 10000,
                                                                       "how": "last 10,000 training images"},
                                "recipe": {"epochs": 12}, "torch": "2.x", "timm": "1.x", "models": models}))
    return path


def test_fmnist_zoo_file_by_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fmnist_zoo(tmp_path / "fmnist_zoo.json")
    monkeypatch.setitem(ZOOS, "fmnist", path)
    test = load_zoo("fmnist")  # the test split by default
    assert [r.acc1 for r in test] == [70.6, 71.4, 73.8] and all(r.kind == "zoo" and r.id is None for r in test)
    assert [r.acc1 for r in load_zoo("fmnist", split="val")] == [71.6, 72.4, 74.8]
    assert [r.acc1 for r in load_zoo("fmnist", split="validation")] == [71.6, 72.4, 74.8]  # snnet eval's aliases too
    assert [r.acc1 for r in load_zoo("fmnist", split="eval")] == [70.6, 71.4, 73.8]
    assert test[0].images == 10000 and test[0].value("source") == "fmnist" and test[0].value("split") == "test"
    assert test[0].value("seconds") == 160.0 and test[0].value("arch")["embed_dim"] == 16
    assert [r.name for r in load_zoo(path, flops="400K-", params="-30K")] == ["fmnist_vit_w24_d6_p7"]
    zoo = read_zoo("fmnist", "val")
    assert zoo.split == "val" and zoo.families() == {"fmnist": 3} and "3 models" in zoo.describe()


def test_missing_or_broken_zoo_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ZOOS, "fmnist", tmp_path / "absent.json")
    with pytest.raises(ZooError, match=r"missing: it is made by `python scripts/train_fmnist_zoo.py`"):
        load_zoo("fmnist")
    with pytest.raises(ZooError, match="timm-in1k or fmnist, or the path"):
        load_zoo("nonesuch")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "a", "params": 1, "flops": 1}]}))
    with pytest.raises(ZooError, match=r"model 0 \(a\) is invalid: no acc1"):
        load_zoo(bad)
    bad.write_text("{oops")
    with pytest.raises(ZooError, match="corrupt"):
        load_zoo(bad)
    with pytest.raises(ZooError, match="not one of"):
        load_zoo(_fmnist_zoo(tmp_path / "z.json"), split="holdout")


@pytest.mark.parametrize("text, expected", [
    ("1G-20G", (1e9, 2e10)), ("1g-", (1e9, None)), ("-20G", (None, 2e10)), ("5.5M..1e8", (5.5e6, 1e8)),
    (" 300K - 2M ", (3e5, 2e6)),
])
def test_range_filters_parse(text: str, expected: tuple) -> None:
    assert ZooFilter.parse(flops=text).flops == expected


@pytest.mark.parametrize("kw, message", [
    (dict(flops="20G"), "range of FLOPs"), (dict(params="a-b"), "--zoo-params"), (dict(flops="20G-1G"), "is empty"),
    (dict(img_size="224px"), "image sizes"),
])
def test_bad_filters_say_what_to_write(kw: dict, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        ZooFilter.parse(**kw)


# ------------------------------------------------------------------ the shipped timm-in1k table


def test_timm_table_has_the_papers_families_and_snnets_counts() -> None:
    zoo = read_zoo("timm-in1k")
    assert zoo.license and "Apache-2.0" in zoo.license
    assert zoo.meta["source"]["commit"] == "aa4b5850c1543fa488abf260f18390eda46cf85d"
    families = zoo.families()
    for fam in ("deit", "vit", "swin", "resnet", "convnext", "levit", "efficientnet", "regnet", "mobilenet"):
        assert families.get(fam, 0) >= 3, fam
    by_name = {m.name: m for m in zoo.models}
    # the paper's DeiT FLOPs, counted like the stitches (snnet stitches --anchors deit prints the same)
    assert by_name["deit_tiny_patch16_224.fb_in1k"].flops == 1_258_411_200
    assert by_name["deit_base_patch16_224.fb_in1k"].acc1 == pytest.approx(81.98, abs=0.001)
    assert all(m.images == 50000 and m.value("img_size") for m in zoo.models)
    # the table is what snnet's counter says today: rebuild one model on the meta device and count
    from snnet.anchors import AnchorSpec, create_anchor
    from snnet.flops import model_costs

    m = by_name["swin_tiny_patch4_window7_224.ms_in1k"]
    with torch.device("meta"):
        model = create_anchor(AnchorSpec(m.extra["model"], kwargs=(("img_size", m.value("img_size")),)))
    assert model_costs(model, (3, m.value("img_size"), m.value("img_size"))) == (m.flops, m.params)


def test_timm_filters_select_families_sizes_and_ranges() -> None:
    rows = load_zoo("timm-in1k", family="deit,swin", img_size=224, flops="1G-20G")
    assert rows and {r.value("family") for r in rows} == {"deit", "swin"}
    assert all(r.value("img_size") == 224 and 1e9 <= r.flops <= 2e10 for r in rows)
    with pytest.raises(ZooError, match="no family 'swim'. Did you mean swin"):
        load_zoo("timm-in1k", family="swim")
    with pytest.raises(ZooError, match="no model of zoo timm-in1k passes"):
        load_zoo("timm-in1k", family="deit", params="-1K")


# ------------------------------------------------------------------ plot


def test_plot_draws_one_trace_per_zoo_family_and_the_zoo_frontier(tmp_path: Path) -> None:
    from snnet.plot import plot_pareto

    zoo = [_zoo_row("a1", 90, 50.0, "alpha"), _zoo_row("a2", 300, 85.0, "alpha"), _zoo_row("b1", 200, 82.0, "beta")]
    html, png = plot_pareto(mark_pareto(_net_rows() + zoo), tmp_path / "p.html", tmp_path / "p.png")
    traces = {t["name"]: t for t in _traces(html.read_text())}
    assert set(traces) == {"stitches", "anchors", "Pareto frontier", "zoo frontier", "alpha", "beta"}
    assert traces["alpha"]["legendgroup"] == traces["beta"]["legendgroup"] == "zoo"
    assert traces["zoo frontier"]["x"] == [90, 200, 300] and traces["zoo frontier"]["y"] == [50.0, 82.0, 85.0]
    assert traces["Pareto frontier"]["x"] == [100, 250, 350, 400]  # the stitches' own frontier, zoo aside
    hover = " ".join(traces["alpha"]["text"])
    assert "a2" in hover and "family alpha" in hover and "params 3.00K" in hover and "FLOPs 300" in hover
    assert "top-1 85.00%" in hover
    assert traces["alpha"]["marker"]["size"] == [900, 3000] and traces["stitches"]["marker"]["size"][0] == 3500
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_plot_leaves_zoo_models_out_and_says_so(tmp_path: Path) -> None:
    from dataclasses import replace

    from snnet.plot import plot_pareto

    timed = [replace(r, latency_ms=r.flops / 100) for r in _net_rows()] + [_zoo_row("z", 120, 99.0)]
    (html,) = plot_pareto(timed, tmp_path / "lat.html", x="latency_ms")
    text = html.read_text()
    names = {t["name"] for t in _traces(text)}
    assert "z" not in " ".join(" ".join(t.get("text", [])) for t in _traces(text)) and "fam" not in names
    assert "1 zoo models left out: no latency_ms measured" in text


def test_a_plot_that_draws_no_zoo_model_is_not_titled_as_beside_the_zoo(tmp_path: Path) -> None:
    # every zoo model left out of a latency plot: its title read "SN-Net (6 networks) vs zoo f (0 models)"
    from dataclasses import replace

    from snnet.plot import plot_pareto

    timed = [replace(r, latency_ms=r.flops / 100) for r in _net_rows()] + [_zoo_row("z", 120, 99.0)]
    (html,) = plot_pareto(timed, tmp_path / "lat.html", x="latency_ms")
    text = html.read_text()
    assert "0 models" not in text and " vs zoo " not in text
    assert "1 zoo models left out: no latency_ms measured" in text


# ------------------------------------------------------------------ snnet eval --zoo


@pytest.fixture
def tiny_results(tmp_path: Path) -> Path:
    """A tiny family's results file, as `snnet eval` writes it (evaluated on a few random images)."""
    from snnet.evaluate import evaluate

    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
    write_results(evaluate(net, batches, progress=False), tmp_path / "eval")
    return tmp_path / "eval" / "results.json"


def test_cli_eval_renders_an_existing_results_file_with_the_timm_zoo(tiny_results: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    before = load_results(tiny_results)
    out = tmp_path / "zoo"
    code = _run(["eval", "--results", str(tiny_results), "--zoo", "timm-in1k", "--zoo-family", "deit,swin",
                 "--zoo-img-size", "224", "--zoo-flops", "1G-20G", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "pareto.html", "pareto.png"}
    rows = load_results(out)
    zoo = [r for r in rows if r.is_zoo]
    assert network_rows(rows) == before  # the stitches are untouched, not evaluated again
    assert zoo and {r.value("family") for r in zoo} == {"deit", "swin"}
    assert all(r.value("img_size") == 224 and 1e9 <= r.flops <= 2e10 and r.value("source") == "timm-in1k" for r in zoo)
    assert "deit_small_patch16_224.fb_in1k" in {r.name for r in zoo}
    traces = {t["name"]: t for t in _traces((out / "pareto.html").read_text())}
    assert {"deit", "swin", "zoo frontier", "stitches", "anchors"} <= set(traces)
    assert len(traces["deit"]["x"]) == sum(r.value("family") == "deit" for r in zoo)
    assert f"{len(zoo)} zoo models from timm-in1k" in printed.out and "license Apache-2.0" in printed.out

    # again on its own output with other filters: the zoo rows are replaced, not added
    code = _run(["eval", "--results", str(out), "--zoo", "timm-in1k", "--zoo-family", "levit", "--out", str(out)])
    assert code == 0
    assert {r.value("family") for r in load_results(out) if r.is_zoo} == {"levit"}


@pytest.mark.parametrize("args, message", [
    (["--zoo-family", "deit"], "add --zoo timm-in1k"),
    (["--zoo", "timm-in1k", "--zoo-family", "dieit"], "Did you mean deit"),
    (["--zoo", "timm-in1k", "--zoo-flops", "lots"], "range of FLOPs"),
    (["--zoo", "timm-in1k", "--model", "somewhere"], "--results plots results that exist"),
])
def test_cli_eval_zoo_mistakes_are_one_line(tiny_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            args: list[str], message: str) -> None:
    code = _run(["eval", "--results", str(tiny_results), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_profile_keeps_zoo_rows_and_eval_draws_latency_without_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from snnet.deploy import merge_profile
    # `snnet profile` into a folder whose results.json already holds a zoo
    rows = [r.to_dict() for r in _net_rows() + [_zoo_row("z", 120, 99.0)]]
    measured = [Row(r.id, r.name, latency_ms=r.flops / 100, latency_p90_ms=r.flops / 90, peak_mem_mb=1.0) for r in _net_rows()]
    merged = merge_profile(rows, [], measured)
    assert merged[-1].name == "z" and merged[-1].latency_ms is None
    write_results(merged, tmp_path / "prof")
    # re-plotted with another zoo: the latency plot is drawn too, its zoo left out
    code = _run(["eval", "--results", str(tmp_path / "prof"), "--zoo", str(_fmnist_zoo(tmp_path / "f.json")),
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "pareto_latency.png").is_file()
    text = (tmp_path / "out" / "pareto_latency.html").read_text()
    assert "3 zoo models left out: no latency_ms measured" in text
    assert {r.value("source") for r in load_results(tmp_path / "out") if r.is_zoo} == {"f"}  # the old zoo replaced


def test_describe_a_zoo_whose_source_names_no_commit(tmp_path: Path) -> None:
    # "any JSON file of the same shape is a zoo": its source may name a repository without a commit
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"source": {"repository": "me/my-models"},
                                "models": [{"name": "a", "params": 10, "flops": 100, "acc1": 50}]}))
    assert read_zoo(path).describe().endswith("from me/my-models")
    path.write_text(json.dumps({"source": {"repository": "me/my-models", "commit": "0123456789abcdef"},
                                "models": [{"name": "a", "params": 10, "flops": 100, "acc1": 50}]}))
    assert read_zoo(path).describe().endswith("from me/my-models@0123456789")


def test_a_models_own_source_does_not_replace_the_zoos_name(tmp_path: Path) -> None:
    # a model's "source" (where its numbers come from) overrode the zoo's name that plots and results group by
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"models": [{"name": "a", "params": 10, "flops": 100, "acc1": 50,
                                            "source": "https://paper-a"}]}))
    row = load_zoo(path)[0]
    assert row.value("source") == "mine" and row.value("model_source") == "https://paper-a"


def test_a_zoo_alone_is_plotted_without_empty_network_entries_or_title(tmp_path: Path) -> None:
    # zoo rows only: the legend had "stitches", "anchors" and "Pareto frontier" entries with nothing
    # behind them (the PNG's too), and the title read "SN-Net (0 networks) vs zoo ..."
    from snnet.plot import plot_pareto

    html, png = plot_pareto(load_zoo("fmnist")[:5], tmp_path / "z.html", tmp_path / "z.png")
    text = html.read_text()
    assert [t["name"] for t in _traces(text)] == ["zoo frontier", "fmnist"]
    assert "SN-Net" not in text and "zoo fmnist (5 models): top-1 accuracy vs FLOPs" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
