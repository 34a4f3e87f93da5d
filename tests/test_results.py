"""compare_fronts: two sets of networks compared at matched cost, frontier against frontier."""

from __future__ import annotations

import math

import pytest

from snnet.errors import ResultsError
from snnet.results import StitchResult, binomial_se, compare_fronts, front_rows


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
    ours = [StitchResult(i, r["name"], r["flops"], 0, r["acc1"], 99.0, 0.5, 10_000, i == 0) for i, r in enumerate(OURS)]
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
