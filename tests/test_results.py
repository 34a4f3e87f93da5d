"""snnet.results: the one row type, its files (every older format still loading), and compare_fronts
(two sets of networks compared at matched cost, frontier against frontier)."""

from __future__ import annotations

import ast
import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from snnet.errors import ResultsError
from snnet.results import BatchLatency, Row, binomial_se, compare_fronts, front_rows, load_results, read_rows, write_results
from snnet.zoo import ZOOS, load_zoo

REPO = Path(__file__).resolve().parents[1]
OLD = REPO / "tests" / "data" / "results-v0"


def row(name: str, flops: float, acc1: float, images: int | None = 10_000) -> dict:
    return {"name": name, "flops": flops, "acc1": acc1, "images": images}


# Ours: A and B and D on the frontier, C dominated by A. Theirs: P Q R S, all on theirs.
OURS = [row("A", 1, 80), row("C", 2, 79), row("B", 4, 84), row("D", 16, 86)]
THEIRS = [row("P", 1, 80), row("Q", 2, 83), row("R", 8, 85), row("S", 16, 87)]


def test_hand_made_fronts() -> None:
    assert [r["name"] for r in front_rows(OURS)] == ["A", "B", "D"]
    c = compare_fronts(OURS, THEIRS)
    # Pieces between the frontiers' points: [1,2) A-P 0, [2,4) A-Q -3, [4,8) B-Q +1, [8,16) B-R -1,
    # and the point 16, D-S -1. Each piece is a factor 2 of cost: a quarter of the log range.
    assert [(s.start, s.end, s.ours, s.theirs, s.diff) for s in c.steps] == [
        (1, 2, "A", "P", 0), (2, 4, "A", "Q", -3), (4, 8, "B", "Q", 1), (8, 16, "B", "R", -1), (16, 16, "D", "S", -1)]
    assert (c.lo, c.hi) == (1, 16)
    assert c.mean == pytest.approx((0 - 3 + 1 - 1) / 4)
    assert (c.worst.start, c.worst.diff) == (2, -3) and (c.best.start, c.best.diff) == (4, 1)
    assert c.ahead == pytest.approx(0.25)
    assert c.se == pytest.approx(binomial_se(80, 10_000)) == pytest.approx(0.4)
    text = c.describe("stitches", "zoo")
    assert "mean -0.75 points" in text and "worst -3.00 points at 2-4 flops (A 80.00 vs Q 83.00)" in text
    assert "stitches ahead on 25% of the range" in text and "standard error of 0.40" in text


def test_range_mean_is_over_log_cost_and_sides_are_antisymmetric() -> None:
    c = compare_fronts(OURS, THEIRS, lo=2, hi=8)
    # [2,4) -3 and [4,8) +1, equal halves of log(8/2); the point 8 (B vs R) is -1.
    assert c.mean == pytest.approx(-1.0) and c.worst.diff == -3 and c.steps[-1].diff == -1
    back = compare_fronts(THEIRS, OURS, lo=2, hi=8)
    assert back.mean == pytest.approx(-c.mean) and back.best.diff == -c.worst.diff
    # A range inside one piece: the mean is that piece's difference.
    assert compare_fronts(OURS, THEIRS, lo=2.5, hi=3.5).mean == pytest.approx(-3)
    # A single point.
    single = compare_fronts(OURS, THEIRS, lo=4, hi=4)
    assert single.mean == pytest.approx(1) and len(single.steps) == 1


def test_lower_is_better_metrics_keep_their_orientation() -> None:
    """Bits per byte (lower is better): the same fronts as top-1 = 100 - bpb give the same pieces, with
    the differences in bits per byte (so of the opposite sign), the same worst and best pieces and share ahead."""
    bpb = lambda rows: [{"name": r["name"], "flops": r["flops"], "bpb": 100 - r["acc1"], "images": r["images"]}  # noqa: E731
                        for r in rows]
    acc, low = compare_fronts(OURS, THEIRS), compare_fronts(bpb(OURS), bpb(THEIRS), y="bpb")
    assert [(s.ours, s.theirs, s.diff) for s in low.steps] == [(s.ours, s.theirs, -s.diff) for s in acc.steps]
    assert low.mean == pytest.approx(-acc.mean) and low.ahead == pytest.approx(acc.ahead)
    assert (low.worst.start, low.worst.diff) == (2, 3) and (low.best.start, low.best.diff) == (4, -1)
    assert low.se is None  # a binomial error is an accuracy's, not a bits-per-byte figure's
    assert "mean +0.7500 bpb" in low.describe("stitches", "zoo")


def test_theirs_starting_dearer_raises_lo_and_dominated_rows_change_nothing() -> None:
    c = compare_fronts(OURS, THEIRS[1:])  # theirs' cheapest is now Q at 2
    assert c.lo == 2 and c.steps[0].theirs == "Q"
    padded = compare_fronts(OURS + [row("E", 8, 70)], THEIRS + [row("T", 16, 60)])
    assert padded.mean == compare_fronts(OURS, THEIRS).mean


def test_accepts_result_objects_and_other_columns() -> None:
    ours = [Row(i, r["name"], r["flops"], 0, r["acc1"], 99.0, 0.5, 10_000, i == 0) for i, r in enumerate(OURS)]
    theirs = [{"name": r["name"], "flops": r["flops"], "val_acc1": r["acc1"]} for r in THEIRS]
    c = compare_fronts([{**r.to_dict(), "val_acc1": r.acc1} for r in ours], theirs, y="val_acc1")
    assert c.mean == pytest.approx(-0.75) and c.y == "val_acc1"
    assert compare_fronts(ours, [dict(r, acc1=r["val_acc1"]) for r in theirs]).mean == pytest.approx(-0.75)
    # No image counts: no standard error.
    assert compare_fronts([row("A", 1, 80, None)], [row("P", 1, 81, None)]).se is None


def test_bad_input() -> None:
    with pytest.raises(ResultsError, match="theirs: no rows"):
        compare_fronts(OURS, [])
    with pytest.raises(ResultsError, match="ours: row 'X' has no acc1"):
        compare_fronts([{"name": "X", "flops": 1}], THEIRS)
    with pytest.raises(ResultsError, match="the range must be positive"):
        compare_fronts(OURS, THEIRS, lo=4, hi=2)


def test_binomial_se() -> None:
    assert binomial_se(50, 10_000) == pytest.approx(0.5)
    assert binomial_se(86.4, 10_000) == pytest.approx(100 * math.sqrt(0.864 * 0.136 / 10_000))


# ------------------------------------------------------------------ the row and its files, old and new


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN, a list of batch latencies equal to its rows."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    a, b = ([vars(x) for x in v] if isinstance(v, tuple) and v and isinstance(v[0], BatchLatency) else v for v in (a, b))
    return a == b


def _check(rows: list[Row], raw: list[dict[str, Any]], text: bool = False) -> None:
    """Every value a file's row holds is the loaded row's (text: read as a CSV cell is read)."""
    assert len(rows) == len(raw)
    for r, d in zip(rows, raw):
        for k, v in d.items():
            got = r.value(k)
            if text and v == "":
                continue  # an empty cell: not given
            if v is None and isinstance(got, float) and math.isnan(got):
                continue  # JSON's null for a value not reported (a zoo row's top-5): read as NaN
            if text:
                got = {True: "True", False: "False"}.get(got, got) if isinstance(got, bool) else got
                if isinstance(got, (tuple, list, dict)):  # nested: JSON text, or a Python literal in older CSVs
                    v = ast.literal_eval(v) if v.startswith(("[{'", "{'")) else json.loads(v)
                elif isinstance(got, (int, float)) and not isinstance(got, bool):
                    v = type(got)(v)
            assert _same(got, v), (r.name, k, got, v)
        if "kind" not in d or (text and d["kind"] == ""):
            assert r.kind == ("anchor" if r.is_anchor else "stitch")  # older rows had no kind: it follows is_anchor


def _agree(a_rows: list[Row], b_rows: list[Row]) -> None:
    """Two readings of the same rows have the same typed fields."""
    assert len(a_rows) == len(b_rows)
    for a, b in zip(a_rows, b_rows):
        for k in ("id", "name", "kind", "flops", "params", "acc1", "acc5", "loss", "images", "is_anchor", "pareto",
                  "latency_ms", "latency_p90_ms", "peak_mem_mb", "latency_by_batch", "bpb", "ppl", "eval_protocol"):
            assert _same(a.value(k), b.value(k)), (a.name, k)


def _text(rows: list[Row]) -> str:
    """Rows as JSON text: equal rows give equal text (NaN included, which compares unequal to itself)."""
    return json.dumps([r.to_dict() for r in rows])


SHIPPED = ["docs/demo", "docs/lm-demo", "docs/v1-v2/v1", "docs/v1-v2/2way+lora+ros"]


@pytest.mark.parametrize("folder", SHIPPED + ["tests/data/results-v0/eval-profile"])
def test_older_results_files_load_with_the_same_values(folder: str, tmp_path: Path) -> None:
    """What earlier versions wrote (the demo's, the LM demo's, the v1/v2 study's, an evaluation
    profiled by batch size with its CSV's nested cells as Python literals): the JSON and the CSV load
    into the same rows, each value as the file has it, and write back unchanged."""
    base = REPO / folder
    json_path, csv_path = (base / "results.json", base / "results.csv") if base.is_dir() else \
        (base.with_suffix(".json"), base.with_suffix(".csv"))
    rows = load_results(json_path)
    _check(rows, json.loads(json_path.read_text()))
    from_csv = load_results(csv_path)
    _check(from_csv, list(csv.DictReader(csv_path.open())), text=True)
    _agree(rows, from_csv)
    write_results(rows, tmp_path)
    assert _text(load_results(tmp_path)) == _text(rows)  # JSON: every value back, extra entries included
    _agree(rows, load_results(tmp_path / "results.csv"))  # CSV: nested extra cells are JSON text now, not Python literals


def test_a_profile_only_file_loads_as_rows_without_accuracy(tmp_path: Path) -> None:
    """`snnet profile` before any evaluation wrote accuracy null: the same reader takes it (it was read
    by a fallback behind a caught error), and reading rows, budgets and the server's table all work."""
    path = OLD / "profile-only.json"
    raw = json.loads(path.read_text())
    rows = load_results(path)
    _check(rows, [{k: v for k, v in d.items()} for d in raw])
    assert all(r.acc1 is None and r.pareto is None for r in rows)
    assert [r.id for r in rows if r.latency_by_batch] == [0, 2]
    assert [b.batch_size for b in rows[0].latency_by_batch] == [1, 2]
    assert read_rows(path) == rows == read_rows(raw)
    from snnet.budget import select_stitch
    from snnet.deploy.controller import LatencyTable

    assert LatencyTable.from_rows(rows).batch_sizes(2) == (1, 2)
    assert select_stitch(rows, "flops<=1M").ranked_by == "flops"
    write_results(rows, tmp_path, csv_file=False)
    assert load_results(tmp_path) == rows and not (tmp_path / "results.csv").exists()


def test_a_json_only_write_keeps_a_results_csv_already_there_in_step(tmp_path: Path) -> None:
    """write_results(csv_file=False) (what `snnet profile` writes when some rows have no accuracy) replaced
    results.json alone: an evaluation's results.csv beside it went on holding the rows before the profile
    (fewer, without their latency), contradicting the JSON."""
    evaluated = [Row(0, "a", 10, 5, 50.0, 80.0, 1.0, 100, True), Row(1, "b", 20, 6, 60.0, 85.0, 1.0, 100, False)]
    write_results(evaluated, tmp_path)
    profiled = [replace(evaluated[0], latency_ms=1.0), Row(1, "b", 20, 6, latency_ms=2.0), Row(2, "c", 30, 7, latency_ms=3.0)]
    assert write_results(profiled, tmp_path, csv_file=False) == (tmp_path / "results.json", tmp_path / "results.csv")
    back = load_results(tmp_path / "results.csv")
    assert back == load_results(tmp_path / "results.json") and [r.latency_ms for r in back] == [1.0, 2.0, 3.0]
    (tmp_path / "results.csv").unlink()  # none there: the JSON alone, as before
    assert write_results(profiled, tmp_path, csv_file=False) == (tmp_path / "results.json",)
    assert not (tmp_path / "results.csv").exists()


def test_a_folder_holding_results_csv_alone_loads_it(tmp_path: Path) -> None:
    """load_results reads "a results.json/.csv file or their folder", but a folder holding the results.csv alone
    (the JSON not copied, or the CSV edited on its own) was refused: "no results file at DIR/results.json"."""
    rows = [Row(0, "a", 10, 5, 50.0, 80.0, 1.0, 100, True), Row(1, "b", 20, 6, 60.0, 85.0, 1.0, 100, False)]
    write_results(rows, tmp_path)
    both = load_results(tmp_path)
    (tmp_path / "results.json").unlink()
    assert load_results(tmp_path) == load_results(tmp_path / "results.csv") and [r.acc1 for r in both] == [50.0, 60.0]
    (tmp_path / "results.csv").unlink()
    with pytest.raises(ResultsError, match="no results file at .*results.json"):
        load_results(tmp_path)


@pytest.mark.parametrize("zoo", sorted(ZOOS))
def test_zoo_files_load_as_rows_with_the_same_values(zoo: str) -> None:
    """A zoo JSON (``{"models": [...]}``) gives rows of kind zoo, each value as the file has it."""
    data = json.loads(ZOOS[zoo].read_text())
    rows = load_zoo(zoo)
    assert len(rows) == len(data["models"]) and all(r.kind == "zoo" and r.id is None for r in rows)
    split = "test" if any("test_acc1" in m for m in data["models"]) else None
    for r, m in zip(rows, data["models"]):
        assert (r.name, r.flops, r.params) == (m["name"], m["flops"], m["params"])
        assert r.acc1 == m[f"{split}_acc1" if split else "acc1"]
        assert r.value("family") == m.get("family", data.get("family", zoo)) and r.value("source") == zoo
        assert r.value("img_size") == m.get("img_size")
        assert _same(r.acc5, m.get(f"{split}_acc5" if split else "acc5", math.nan))


def test_a_row_from_a_dict_needs_what_its_kind_needs() -> None:
    """The format of a row is recognised from its content: a listing needs id, name and cost; an
    evaluated row also top-5 and is_anchor (older files' missing loss/images/pareto read as before);
    a zoo row its name, cost and top-1. Whatever else is kept in ``extra``."""
    listing = Row.from_dict({"id": 3, "name": "a", "flops": 10, "params": 2, "is_anchor": False, "kl": 0.5})
    assert (listing.acc1, listing.loss, listing.pareto, listing.value("kl")) == (None, None, None, 0.5)
    old = Row.from_dict({"id": 3, "name": "a", "flops": 10, "params": 2, "acc1": 50, "acc5": 90, "is_anchor": True})
    assert old.kind == "anchor" and math.isnan(old.loss) and old.images == 0 and old.pareto is False
    with pytest.raises(KeyError, match="params"):
        Row.from_dict({"id": 3, "name": "a", "flops": 10})
    with pytest.raises(KeyError, match="acc5"):
        Row.from_dict({"id": 3, "name": "a", "flops": 10, "params": 2, "acc1": 50, "is_anchor": True})
    with pytest.raises(ValueError, match="zoo row has no stitch id"):
        Row(3, "z", kind="zoo")
    # what a profile adds to an evaluated row: its measurements and settings, never the network's cost or name
    measured = Row(3, "a", 99, 99, latency_ms=2.0, latency_by_batch=({"batch_size": 1, "latency_ms": 2.0,
                                                                      "latency_p90_ms": 3.0},), extra={"profile": {}})
    both = old.merged(measured)
    assert (both.flops, both.acc1, both.latency_ms, both.latency_by_batch[0].latency_p90_ms) == (10, 50, 2.0, 3.0)
    assert both.value("profile") == {}


def test_csv_gives_back_nested_and_boolean_extra_entries(tmp_path: Path) -> None:
    """A profile's settings (a dict), a zoo model's arch (a dict), a list, a boolean: written into
    results.csv as JSON text and read back as they were, as from results.json. Read back as text,
    the server's latency table failed on a CSV profiled at one batch size ('str' has no 'get')."""
    from snnet.deploy.controller import LatencyTable

    extra = {"profile": {"device": "cpu", "batch_size": 8}, "arch": [16, 2], "flag": True, "note": "{not json"}
    rows = [Row(0, "a", 10, 5, 50.0, 90.0, 1.2, 100, True, pareto=True, latency_ms=2.0, extra=extra),
            Row(1, "b", 20, 6, 60.0, 95.0, 1.0, 100, False, pareto=True, latency_ms=3.0, extra=extra)]
    write_results(rows, tmp_path)
    for name in ("results.json", "results.csv"):
        back = load_results(tmp_path / name)
        assert [dict(r.extra) for r in back] == [extra, extra], name
        assert LatencyTable.from_rows(back).ms == {0: ((8, 2.0),), 1: ((8, 3.0),)}


def test_a_row_that_could_not_be_read_back_is_refused_before_writing(tmp_path: Path) -> None:
    """docs/python.md built ``Row(3, "mine", flops=..., acc1=81.5)``: write_results wrote it, and load_results
    refused the file ("missing params"). It is refused before anything is written (an earlier file stays);
    the documented example, with params, round-trips."""
    row = Row(3, "mine", flops=2_000_000, params=5_000_000, acc1=81.5)
    write_results([row], tmp_path)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ResultsError, match="row 'mine' has no params, so its results could not be read back"):
        write_results([Row(3, "mine", flops=2_000_000, acc1=81.5)], tmp_path)
    assert (tmp_path / "results.json").read_text() == before
    (back,) = load_results(tmp_path)
    assert (back.id, back.name, back.flops, back.params, back.acc1) == (3, "mine", 2_000_000, 5_000_000, 81.5)


def test_csv_keeps_text_that_int_or_float_would_read_as_a_number(tmp_path: Path) -> None:
    """An extra text cell such as "007", "1_000" or "+5" came back from results.csv as the number 7, 1000
    or 5 (int() takes them), though no number is written that way. Only a number's own written form is
    read as a number; results.json keeps every type as it was."""
    extra = {"code": "007", "batch": "1_000", "delta": "+5", "ref_id": 5, "kl": 0.25, "big": 1e20, "neg": -3}
    write_results([Row(0, "a", 10, 5, 50.0, 90.0, 1.2, 100, True, extra=extra)], tmp_path)
    for name in ("results.json", "results.csv"):
        assert dict(load_results(tmp_path / name)[0].extra) == extra, name


def test_results_json_is_strict_json_and_reads_back_nan(tmp_path: Path) -> None:
    """A zoo or reference row without top-5 or loss (NaN), a NaN in an extra entry: results.json held
    bare NaN, which no strict JSON reader takes (JavaScript's JSON.parse, Go, serde). They are written
    as null now and read back as NaN where the row has NaN for "not reported"."""
    rows = [Row(0, "a", 10, 5, 50.0, 90.0, math.nan, 100, True, pareto=True, extra={"kl": math.inf}),
            Row(1, "a[:1]+b[1:]", 12, 6, 40.0, math.nan, 1.0, 100, False, kind="reference",
                extra={"source": "reference:deit", "ref_id": 3}),
            Row(None, "z", 20, 7, 60.0, math.nan, math.nan, 10, False, kind="zoo",
                extra={"source": "fmnist", "family": "vit", "arch": {"ratio": math.nan}})]
    json_path, _ = write_results(rows, tmp_path)
    text = json_path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))  # strict JSON
    back = load_results(json_path)
    assert math.isnan(back[0].loss) and math.isnan(back[1].acc5) and math.isnan(back[2].acc5) and math.isnan(back[2].loss)
    assert back[0].value("kl") is None and back[2].value("arch") == {"ratio": None}
    assert [(r.id, r.name, r.kind, r.acc1) for r in back] == [(r.id, r.name, r.kind, r.acc1) for r in rows]


def test_a_results_file_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """A results.csv edited in a spreadsheet and saved as "CSV UTF-8" (Excel) starts with a byte order
    mark: it was refused as "not an snnet results file: entry 0 is invalid (missing id)"."""
    rows = [Row(0, "a", 10, 5, 50.0, 90.0, 1.2, 100, True, pareto=True),
            Row(1, "b", 20, 6, 60.0, 95.0, 1.0, 100, False, pareto=True)]
    write_results(rows, tmp_path)
    for name in ("results.csv", "results.json"):
        marked = tmp_path / "bom" / name
        marked.parent.mkdir(exist_ok=True)
        marked.write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
        assert load_results(marked) == rows, name


def test_a_csv_row_with_more_cells_than_the_header_is_refused_in_one_line(tmp_path: Path) -> None:
    """csv puts the cells beyond the header under the key None, as a list: reading it as an extra
    column ended in a TypeError from int() instead of saying what is wrong with the file."""
    path = tmp_path / "results.csv"
    path.write_text("id,name,flops,params\n0,a,100,10\n1,b,200,20,stray\n")
    with pytest.raises(ResultsError, match="entry 1 has more cells than the header"):
        load_results(path)


def test_an_evaluated_row_without_top5_is_written_so_that_it_reads_back(tmp_path: Path) -> None:
    """A row built by hand as the docs show (``Row(3, "mine", flops=..., acc1=81.5)``) was written without
    a top-5, which load_results requires of an evaluated row: snnet refused the file it had just written."""
    rows = [Row(3, "mine", flops=2_000_000, params=5, acc1=81.5), Row(4, "b", 10, 2, 70.0, 90.0, 1.0, 8, False)]
    write_results(rows, tmp_path)
    for name in ("results.json", "results.csv"):
        back = load_results(tmp_path / name)
        assert math.isnan(back[0].acc5) and back[1].acc5 == 90.0, name
        assert [(r.id, r.name, r.flops, r.params, r.acc1) for r in back] == [(3, "mine", 2_000_000, 5, 81.5),
                                                                           (4, "b", 10, 2, 70.0)], name
    assert next(csv.reader((tmp_path / "results.csv").open()))[5:7] == ["acc1", "acc5"]


def test_format_results_leaves_unmeasured_none_fields_blank() -> None:
    # a Row's unmeasured fields are None (Row(0, "a", 100, 1000, acc1=50.0)): the table's NaN checks raised TypeError
    from snnet.results import format_results

    rows = [Row(0, "a", 100, 1000, acc1=50.0, is_anchor=True, images=10), Row(1, "s", 150, 1500, acc1=55.0, images=10)]
    text = format_results(rows)
    assert "best top-1 55.00% (s)" in text and "nan" not in text.lower()
