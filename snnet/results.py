"""Result rows: what each network of a stitch space (or beside it) scored and cost, on disk and on a frontier.

:class:`Row` is the one row type of snnet. It holds whatever is known of one network: its cost
(``flops``, ``params``: :meth:`snnet.StitchedNet.costs`), its scores from an evaluation (``acc1``,
``acc5``, ``loss``; a language model's ``ppl`` and ``bpb``), its latency and memory on a device
(``latency_ms``, ``latency_p90_ms``, ``peak_mem_mb``, ``latency_by_batch``: :mod:`snnet.deploy.profiling`),
and what it is (``kind``): an anchor, a stitch, a *zoo* model (an individually trained network
plotted beside the stitches for comparison, see :mod:`snnet.zoo`), or a *reference* row (a network
of the same space as the authors published it, see :mod:`snnet.reference`). Every field that a
producer did not measure is ``None``. The same row is a stitch-space listing, an evaluation, a
profile, a zoo member and a serving ladder's rung (:mod:`snnet.deploy.controller`).

Rows are written as ``results.json`` (a list of objects) and ``results.csv`` by
:func:`write_results` and read back by :func:`load_results` (any file an earlier snnet wrote:
evaluations, profile-only files, JSON or CSV; the format is recognised, not guessed by trial).
:func:`pareto_front` finds the stitched network's accuracy/cost frontier, :func:`frontier` that of
any rows (a zoo's), :func:`compare_fronts` compares two sets' frontiers at matched cost, and
:func:`format_results` prints the table. Evaluation itself lives in :mod:`snnet.evaluate`.

A zoo model is not a network of the stitch space: it cannot be selected or exported, so it has no
stitch ``id`` (``None``; null in JSON, empty in CSV) and is known by its ``name`` (unique within
its ``source``). A reference row keeps the stitch ``id`` of the same network in snnet's space, its
``source`` (``reference:deit``) and the reference's own id (``ref_id``). Whatever works on stitches by
id (frontier ids, budgets, merging profiles) leaves zoo and reference rows aside — they are there to
compare with (:func:`is_comparison`): :func:`network_rows` keeps the rest.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import ResultsError, SnnetError
from .io import atomic_write, probe_write
from .report import human, table

__all__ = [
    "KINDS", "LOWER_IS_BETTER", "RESULTS_JSON", "RESULTS_CSV", "BatchLatency", "FrontComparison", "FrontStep", "Row",
    "StitchResult", "better", "binomial_se", "check_writable", "compare_fronts", "format_results", "front_rows", "frontier",
    "is_comparison", "is_zoo", "load_results",
    "mark_pareto", "measured", "network_rows", "pareto_front", "merge_rows", "read_rows", "write_results",
]

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
KINDS = ("anchor", "stitch", "zoo", "reference")
COMPARISON_KINDS = ("zoo", "reference")  # rows plotted beside the network, never part of it
# metrics where less is better (a language model's loss, perplexity, bits per byte): frontiers negate them
LOWER_IS_BETTER = frozenset({"loss", "ppl", "bpb"})


@dataclass(frozen=True)
class BatchLatency:
    """Median and p90 milliseconds of one forward of ``batch_size`` inputs (one entry of a row's
    ``latency_by_batch``: what ``snnet serve`` plans its batches with)."""

    batch_size: int
    latency_ms: float
    latency_p90_ms: float


@dataclass(frozen=True)
class Row:
    """One network — anchor, stitch, zoo model or reference — and whatever is known of it.

    ``flops`` are multiply-accumulates at the evaluated input size (the paper's "FLOPs", batch 1;
    per generated token for a language model); accuracies are percentages on ``images`` images
    (tokens, for a language model, whose ``ppl``/``bpb`` are set too); ``loss`` the mean
    cross-entropy. ``latency_ms``/``latency_p90_ms``/``peak_mem_mb`` are the median, p90 and peak
    memory (MiB) at the profile's batch size and ``latency_by_batch`` the latency at each batch size
    profiled (``snnet profile --batch-sizes``; given as dicts, as files hold them, they become
    :class:`BatchLatency`). ``eval_protocol`` says how the images were prepared. Whatever a
    producer did not measure is None. ``extra`` keeps any further field (a zoo model's ``source`` and
    ``family``, a reference's ``ref_id``, the ``profile`` settings...), saved and loaded unchanged,
    so results files stay readable when tools add columns.

    ``kind`` is "anchor", "stitch", "zoo" or "reference"; left empty it follows ``is_anchor``. A zoo
    row has ``id`` None, ``is_anchor`` False, NaN where its source reported nothing (top-5, loss).
    A reference row has the id of the same network in snnet's space and ``is_anchor`` as that network.
    """

    id: int | None
    name: str
    flops: int | None = None
    params: int | None = None
    acc1: float | None = None
    acc5: float | None = None
    loss: float | None = None
    images: int | None = None
    is_anchor: bool = False
    pareto: bool | None = None
    latency_ms: float | None = None
    peak_mem_mb: float | None = None
    kind: str = ""
    latency_p90_ms: float | None = None
    latency_by_batch: tuple[BatchLatency, ...] | None = None
    ppl: float | None = None
    bpb: float | None = None
    eval_protocol: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        kind = self.kind or ("anchor" if self.is_anchor else "stitch")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
        if kind != "reference" and self.is_anchor != (kind == "anchor"):
            raise ValueError(f"is_anchor={self.is_anchor} contradicts kind={kind!r}")
        if (self.id is None) != (kind == "zoo"):
            raise ValueError("a zoo row has no stitch id (id null) and every other row has one"
                             if kind == "zoo" else f"a {kind} row needs a stitch id")
        object.__setattr__(self, "kind", kind)  # frozen: the derived kind is set once, here
        if self.latency_by_batch is not None:
            object.__setattr__(self, "latency_by_batch", tuple(
                b if isinstance(b, BatchLatency) else BatchLatency(int(b["batch_size"]), float(b["latency_ms"]),
                                                                   float(b["latency_p90_ms"]))
                for b in self.latency_by_batch))

    @property
    def is_zoo(self) -> bool:
        return self.kind == "zoo"

    @property
    def is_comparison(self) -> bool:
        """A zoo or reference row: plotted beside the network, not one of its networks."""
        return self.kind in COMPARISON_KINDS

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: the fields that are set (not None), then ``extra``.

        ``kind`` comes right after ``name``, where a reader of the CSV looks for it."""
        d: dict[str, Any] = {"id": self.id, "name": self.name, "kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "extra" or f.name in d or v is None:
                continue
            d[f.name] = [vars(b) for b in v] if f.name == "latency_by_batch" else v
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Row":
        """Inverse of :meth:`to_dict`, for every row an earlier snnet wrote; unknown keys go to ``extra``.

        Which fields a row must have depends on what it is, recognised from its content: a zoo model
        (``kind`` zoo) needs name, cost and top-1; an evaluated network (a top-1) also its id, top-5
        and whether it is an anchor, and reads what older files left out as they did (loss NaN, 0
        images, not on the frontier); a listing or profile (no top-1) needs id, name and cost.
        Raises KeyError/ValueError/TypeError."""
        zoo, scored = d.get("kind") == "zoo", d.get("acc1") not in (None, "")
        required = _REQUIRED_ZOO if zoo else _REQUIRED if scored else _REQUIRED_COST
        missing = [k for k in required if k not in d]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
        defaults = _ZOO_DEFAULTS if zoo else _DEFAULTS if scored else {}
        known = {k: _convert(k, d.get(k), defaults) for k in _TYPES if d.get(k) not in (None, "") or k in defaults}
        extra = {k: v for k, v in d.items() if k not in _TYPES}
        return cls(**known, extra=extra)

    @classmethod
    def of(cls, row: "Row | Mapping[str, Any]") -> "Row":
        """``row`` as a :class:`Row` (a dict is read with :meth:`from_dict`)."""
        return row if isinstance(row, Row) else cls.from_dict(row)

    def value(self, key: str) -> Any:
        """A field or an ``extra`` entry by name (None if absent): what plots and frontiers sort by."""
        if key in _TYPES:
            return getattr(self, key)
        return self.extra.get(key)

    def merged(self, other: "Row") -> "Row":
        """This row with what ``other`` measured added: every field ``other`` has set except what
        the network is (id, name, kind, cost), and its ``extra`` entries."""
        new = {f: getattr(other, f) for f in _MEASURED if getattr(other, f) is not None}
        return replace(self, **new, extra={**self.extra, **other.extra})


# alias of :class:`Row` kept for the public import ``from snnet.results import StitchResult``
StitchResult = Row

# field name -> type used to read it back from JSON/CSV text
_TYPES: dict[str, Any] = {"id": int, "name": str, "flops": int, "params": int, "acc1": float, "acc5": float,
                          "loss": float, "images": int, "is_anchor": bool, "pareto": bool,
                          "latency_ms": float, "peak_mem_mb": float, "kind": str, "latency_p90_ms": float,
                          "latency_by_batch": tuple, "ppl": float, "bpb": float, "eval_protocol": str}
assert set(_TYPES) == {f.name for f in fields(Row)} - {"extra"}
# what a measurement (evaluation, profile) adds to a row, as opposed to what the network is
_MEASURED = tuple(k for k in _TYPES if k not in ("id", "name", "kind", "flops", "params", "is_anchor"))
_REQUIRED = ("id", "name", "flops", "params", "acc1", "acc5", "is_anchor")
_REQUIRED_ZOO = ("name", "flops", "params", "acc1")
_REQUIRED_COST = ("id", "name", "flops", "params")
# what an evaluated row's file may leave out (or leave empty, in CSV); an empty kind is derived from is_anchor
# (top-5 and loss null: NaN, not reported, written as JSON's null)
_DEFAULTS: dict[str, Any] = {"acc5": math.nan, "loss": math.nan, "images": 0, "pareto": False, "kind": ""}
# a zoo model reports what its source published: no stitch id, often no top-5 or loss
_ZOO_DEFAULTS: dict[str, Any] = dict(_DEFAULTS, id=None, acc5=math.nan, is_anchor=False)


def _convert(key: str, v: Any, defaults: Mapping[str, Any] = _DEFAULTS) -> Any:
    kind = _TYPES[key]
    if v is None or v == "":
        if key in defaults:
            return defaults[key]
        raise ValueError(f"{key} is empty")
    if kind is tuple:  # latency_by_batch: a list in JSON, that list as text in CSV
        if isinstance(v, str):
            # JSON text since this row type; a Python literal (single quotes) in CSVs written before it
            v = ast.literal_eval(v) if v.lstrip("[ {").startswith("'") else json.loads(v)
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{key}={v!r} is not a list")
        return tuple(v)
    if kind is bool:
        if isinstance(v, str):
            if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key}={v!r} is not a boolean")
            return v.lower() in ("true", "1", "yes")
        return bool(v)
    if kind is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        f = float(v)  # "12.0" from a spreadsheet is fine, 12.5 is not
        if not f.is_integer():
            raise ValueError(f"{key}={v!r} is not an integer")
        return int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else int(f)
    return kind(v)


# ---------------------------------------------------------------------------------- frontier


def is_zoo(row: Row | Mapping[str, Any]) -> bool:
    """Whether a result row (object or dict) is a zoo model rather than a network of the stitch space."""
    return (row.get("kind") if isinstance(row, Mapping) else row.kind) == "zoo"


def is_comparison(row: Row | Mapping[str, Any]) -> bool:
    """Whether a result row (object or dict) is there to compare with (zoo, reference), not a network of the space."""
    return (row.get("kind") if isinstance(row, Mapping) else row.kind) in COMPARISON_KINDS


def network_rows(rows: Iterable[Any]) -> list[Any]:
    """The rows of the stitched network (anchors and stitches): zoo and reference rows left out."""
    return [r for r in rows if not is_comparison(r)]


def _staircase(points: Sequence[tuple[float, float, tuple]]) -> list[int]:
    """Positions of the frontier among ``(cost, accuracy, tie-break)`` points, by increasing cost:
    sweeping by cost (ties: higher accuracy, then the tie-break), each point more accurate than
    everything before it. The one rule behind :func:`frontier` and :func:`front_rows`. A point with a NaN
    cost or accuracy (not measured) is never on it, and is left out before sorting: NaN compares false
    with everything, so among the sort keys it put rows of one cost out of order (a dominated one on the front)."""
    measured = [k for k, (cost, acc, _) in enumerate(points) if not (math.isnan(cost) or math.isnan(acc))]
    order = sorted(measured, key=lambda k: (points[k][0], -points[k][1], points[k][2]))
    front, best = [], -math.inf
    for k in order:
        if points[k][1] > best:
            front.append(k)
            best = points[k][1]
    return front


def better(y: str, value: float) -> float:
    """``value`` of metric ``y`` oriented so that higher is better (a loss, perplexity or bits per
    byte is negated): what every frontier ranks by."""
    return -value if y in LOWER_IS_BETTER else value


def _front_positions(rows: Sequence[Row], x: str, y: str) -> list[int]:
    """Positions in ``rows`` of the frontier's members, by increasing cost (see :func:`frontier`)."""
    for r in rows:
        if r.value(x) is None or r.value(y) is None:
            raise ResultsError(f"result {r.name!r} has no {x if r.value(x) is None else y}: "
                               f"cannot place it on a {y}/{x} frontier")
    return _staircase([(r.value(x), better(y, r.value(y)), (r.id is None, r.id or 0, r.name)) for r in rows])


def frontier(rows: Iterable[Row], x: str = "flops", y: str = "acc1") -> list[Row]:
    """The rows no other of them beats (nothing costs as little or less and is more accurate), by cost.

    Strict staircase: sweeping by cost (ties: higher accuracy, then lower id, then name first), a row
    is on the frontier if it is more accurate than everything before it. So of two rows with equal
    cost and accuracy only the first is kept, and a dearer row with merely equal accuracy is not on it.
    Works on any rows: pass one kind at a time (the stitched network's, or a zoo's) for a meaningful line.
    """
    rows = list(rows)
    return [rows[k] for k in _front_positions(rows, x, y)]


def pareto_front(results: Iterable[Row], x: str = "flops", y: str = "acc1") -> set[int]:
    """Ids of the stitched network's rows on its frontier (:func:`frontier`); zoo and reference rows are left aside."""
    return {r.id for r in frontier(network_rows(results), x, y)}


def _group(r: Row) -> tuple[str, str]:
    """Which rows share a frontier: the network's, the zoo's, each reference table's."""
    return (r.kind, str(r.value("source"))) if r.kind == "reference" else ("zoo" if r.is_zoo else "network", "")


def mark_pareto(results: Sequence[Row], x: str = "flops", y: str = "acc1") -> list[Row]:
    """The results with ``pareto`` set: the stitched network's rows on its own frontier, zoo rows
    on the zoo's, a reference table's on its own (each group is compared only with itself)."""
    results = list(results)
    on: set[int] = set()
    for key in {_group(r) for r in results}:
        group = [k for k, r in enumerate(results) if _group(r) == key]
        on.update(group[j] for j in _front_positions([results[k] for k in group], x, y))
    return [replace(r, pareto=k in on) for k, r in enumerate(results)]


# ---------------------------------------------------------------------------------- two frontiers


def binomial_se(acc: float, images: int) -> float:
    """Standard error, in points, of a top-1 of ``acc`` percent measured on ``images`` images:
    ``sqrt(p (1 - p) / n)``. Two models' accuracies differ by noise of about ``sqrt(2)`` times this."""
    p = acc / 100
    return 100 * math.sqrt(p * (1 - p) / images)


@dataclass(frozen=True)
class FrontStep:
    """One piece of the cost range on which both frontiers' best networks stay the same:
    ``ours`` and ``theirs`` are the most accurate networks costing at most ``start``."""

    start: float
    end: float
    ours: str
    ours_y: float
    theirs: str
    theirs_y: float

    @property
    def diff(self) -> float:
        return self.ours_y - self.theirs_y


@dataclass(frozen=True)
class FrontComparison:
    """Two frontiers compared at matched cost over ``[lo, hi]`` (see :func:`compare_fronts`)."""

    x: str
    y: str
    lo: float
    hi: float
    steps: tuple[FrontStep, ...]
    mean: float  # ours - theirs in y's units, averaged over log(cost) on [lo, hi] (for bits per byte, < 0: ours better)
    worst: FrontStep  # where ours trails most (or leads least)
    best: FrontStep  # where ours leads most (or trails least)
    ahead: float  # share of the log-cost range where ours is better (more accurate; lower bits per byte)
    se: float | None  # binomial standard error of one accuracy on the frontiers (largest), if rows say their images

    def describe(self, ours: str = "ours", theirs: str = "theirs") -> str:
        """The comparison in plain words."""
        unit, digits = ("points", 2) if self.y not in LOWER_IS_BETTER else (self.y, 4)

        def at(step: FrontStep) -> str:
            where = human(step.start) if step.end == step.start else f"{human(step.start)}-{human(step.end)}"
            return (f"{step.diff:+.{digits}f} {unit} at {where} {self.x} ({step.ours} {step.ours_y:.{digits}f} vs "
                    f"{step.theirs} {step.theirs_y:.{digits}f})")
        lines = [f"{ours} vs {theirs}, best {self.y} at matched {self.x}, over {human(self.lo)}-{human(self.hi)}:",
                 f"  mean {self.mean:+.{digits}f} {unit} (averaged over log {self.x}); {ours} ahead on {self.ahead:.0%} of the range",
                 f"  worst {at(self.worst)}",
                 f"  best  {at(self.best)}"]
        if self.se is not None:
            lines.append(f"  (one {self.y} has a binomial standard error of {self.se:.2f} points; a difference of two, "
                         f"{math.sqrt(2) * self.se:.2f})")
        return "\n".join(lines)


def front_rows(rows: Iterable[Any], x: str = "flops", y: str = "acc1", side: str = "rows") -> list[dict[str, Any]]:
    """The rows (mappings or result objects, as dicts) on the Pareto staircase, cheapest first: each
    more accurate than every cheaper one (the rule of :func:`pareto_front`, for rows without ids)."""
    rows = [_row(r) for r in rows]
    for r in rows:
        if r.get(x) is None or r.get(y) is None:
            raise ResultsError(f"{side}: row {r.get('name')!r} has no {x if r.get(x) is None else y}")
    return [rows[k] for k in _staircase([(r[x], better(y, r[y]), ()) for r in rows])]


def compare_fronts(ours: Iterable[Any], theirs: Iterable[Any], x: str = "flops", y: str = "acc1",
                   lo: float | None = None, hi: float | None = None) -> FrontComparison:
    """Compare two sets of networks at matched cost: each set's Pareto frontier as a step function
    (the best ``y`` among its rows costing at most ``x``), ours minus theirs, over ``[lo, hi]``.

    Both step functions change only at frontier points, so the range splits into pieces on which
    the difference is constant (:class:`FrontStep`); the comparison is exact, with no grid. The mean
    weighs each piece by its length in log(cost), so every factor of cost counts alike however
    densely either side samples it; the worst and best are over the pieces and the point ``hi``.
    ``lo``/``hi`` default to the range of ``ours``; ``lo`` is raised to the cheapest row of
    ``theirs`` if that is dearer (below it they have nothing to compare with). Differences are in
    ``y``'s units; for a lower-is-better ``y`` (bits per byte, perplexity) "worst", "best" and
    "ahead" follow that orientation, and there is no binomial standard error (``se`` None).

    Rows are mappings or result objects with ``name``, ``x``, ``y`` and, for the standard error,
    ``images`` (the number of images the accuracy was measured on).
    """
    sides = {"ours": [_row(r) for r in ours], "theirs": [_row(r) for r in theirs]}
    for side, rows in sides.items():
        if not rows:
            raise ResultsError(f"{side}: no rows to compare")
    fronts = {side: front_rows(rows, x, y, side) for side, rows in sides.items()}
    lo = max(min(r[x] for r in sides["ours"]) if lo is None else lo, fronts["theirs"][0][x], fronts["ours"][0][x])
    hi = max(r[x] for r in sides["ours"]) if hi is None else hi
    if lo <= 0 or hi < lo:
        raise ResultsError(f"cannot compare over {x} {lo}..{hi}: the range must be positive and hi >= lo "
                           "(and both sides need a row costing at most hi)")

    def best(front: list[dict[str, Any]], at: float) -> dict[str, Any]:
        return [r for r in front if r[x] <= at][-1]

    cuts = sorted({lo, hi} | {r[x] for f in fronts.values() for r in f if lo < r[x] < hi})
    pieces = list(zip(cuts, cuts[1:])) + [(hi, hi)]  # the last, empty piece is the point hi itself
    steps, used = [], []
    for a, b in pieces:
        o, t = best(fronts["ours"], a), best(fronts["theirs"], a)
        steps.append(FrontStep(a, b, str(o.get("name")), float(o[y]), str(t.get("name")), float(t[y])))
        used += [r for r in (o, t) if r.get("images")]
    span = math.log(hi / lo)
    weights = [math.log(s.end / s.start) / span for s in steps] if span > 0 else [0.0] * (len(steps) - 1) + [1.0]
    gain = lambda s: better(y, s.diff)  # noqa: E731  ours' advantage, higher is better
    se = None if y in LOWER_IS_BETTER else max((binomial_se(r[y], int(r["images"])) for r in used), default=None)
    return FrontComparison(
        x, y, lo, hi, tuple(steps), mean=sum(w * s.diff for w, s in zip(weights, steps)),
        worst=min(steps, key=gain), best=max(steps, key=gain),
        ahead=sum(w for w, s in zip(weights, steps) if gain(s) > 0), se=se)


# ---------------------------------------------------------------------------------- files


def check_writable(out_dir: str | os.PathLike, error: type[SnnetError] = SnnetError) -> Path:
    """Create ``out_dir`` and prove a file can be written there, so a long run cannot fail at the end.

    Raises ``error`` (any :class:`SnnetError` subclass, so each command keeps its own) if it cannot.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_write(out)
    except OSError as e:
        raise error(f"cannot write to {out}: {e.strerror or e}. Choose a writable folder with --out") from e
    return out


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _record(row: Row) -> dict[str, Any]:
    """``row.to_dict()`` as a file holds it, so :func:`load_results` reads it back: an evaluated network's row
    (a top-1) carries a top-5, NaN (null in JSON) when unknown. A row built as ``Row(3, "a", ..., acc1=81.5)``
    was written without one and refused on reading ("missing acc5")."""
    d = row.to_dict()
    if row.acc1 is None or row.is_zoo or row.acc5 is not None:
        return d
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[k] = v
        if k == "acc1":
            out["acc5"] = math.nan  # beside the top-1, where an evaluation writes it
    return out


def write_results(results: Sequence[Row], out_dir: str | os.PathLike, csv_file: bool = True) -> tuple[Path, ...]:
    """Write ``results.json`` (a list, one object per row) and, unless ``csv_file`` is False and the folder
    holds no ``results.csv`` yet, ``results.csv`` (nested values, such as ``latency_by_batch``, as JSON text);
    each atomically. Returns the paths written. :func:`load_results` reads either back."""
    out = check_writable(out_dir)
    rows = [_record(r) for r in results]
    for r in rows:  # a row load_results would refuse ("missing params") is refused here, before any file is replaced
        try:
            Row.from_dict(_finite(r))
        except KeyError as e:
            raise ResultsError(f"row {r['name']!r} has no {e.args[0].removeprefix('missing ')}, so its results could not be "
                               "read back: set them when building the row (Row(id, name, flops=..., params=..., ...))") from None
    json_path, csv_path = out / RESULTS_JSON, out / RESULTS_CSV
    # strict JSON: NaN and infinities (a zoo model's unreported top-5 or loss) as null, which reads back as NaN
    atomic_write(json_path, lambda p: p.write_text(json.dumps(_finite(rows), indent=2, allow_nan=False) + "\n"))
    # a results.csv already there is rewritten too: left as it was, it contradicted results.json (`snnet profile`
    # into an evaluation's folder updated the JSON alone, and the CSV kept the rows without their latency)
    if not csv_file and not csv_path.is_file():
        return (json_path,)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
    atomic_write(csv_path, lambda p: p.write_text(buf.getvalue()))
    return json_path, csv_path


def _finite(v: Any) -> Any:
    """``v`` with every NaN or infinite float, however nested, replaced by None (JSON's null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def load_results(path: str | os.PathLike) -> list[Row]:
    """Read rows written by :func:`write_results` (or by any earlier snnet: evaluations, profile-only
    files, listings; see :meth:`Row.from_dict`): a ``results.json``/``.csv`` file or their folder."""
    path = Path(path)
    if path.is_dir():
        # results.json, or the results.csv written beside it when it is alone (kept, copied or edited on its own: the
        # folder was refused as holding "no results file")
        alone = not (path / RESULTS_JSON).is_file() and (path / RESULTS_CSV).is_file()
        path = path / (RESULTS_CSV if alone else RESULTS_JSON)
    if not path.is_file():
        raise ResultsError(f"no results file at {path}: write one with `snnet eval --out DIR`")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (a spreadsheet's "CSV UTF-8") is not data
        if path.suffix.lower() == ".csv":
            records = list(csv.DictReader(io.StringIO(text)))
            # csv puts the cells beyond the header under the key None: no column to read them as
            surplus = next((k for k, row in enumerate(records) if row.get(None)), None)  # type: ignore[call-overload]
            if surplus is not None:
                raise ResultsError(f"{path} is not an snnet results file: entry {surplus} has more cells than the "
                                   "header has columns; fix the file or re-run `snnet eval`")
            # CSV has no types and no "absent": empty cells are absent, extra columns numbers where they parse
            rows: Any = [{k: _from_text(v) if k not in _TYPES else v for k, v in row.items() if v not in ("", None)}
                         for row in records]
        else:
            rows = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ResultsError(f"{path} is corrupt or not a results file ({e}); re-run `snnet eval`") from e
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ResultsError(f"{path} is not an snnet results file: expected a non-empty list of per-stitch objects")
    out = []
    for k, row in enumerate(rows):
        try:
            out.append(Row.from_dict(row))
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ResultsError(f"{path} is not an snnet results file: entry {k} is invalid ({msg})") from e
    ids = [r.id for r in network_rows(out)]
    if len(set(ids)) != len(ids):
        raise ResultsError(f"{path} holds some stitch ids twice: results of different runs were mixed; re-run `snnet eval`")
    for kind, what in (("zoo", "zoo model"), ("reference", "reference network")):
        seen = [(r.value("source"), r.name) for r in out if r.kind == kind]
        if len(set(seen)) != len(seen):
            twice = next(k for k in seen if seen.count(k) > 1)
            raise ResultsError(f"{path} holds {what} {twice[1]!r} (source {twice[0]}) twice: re-write it with "
                               f"`snnet eval --results ... --{kind} ...`")
    return out


def _from_text(v: str) -> Any:
    """An extra column's CSV cell as the value written: a number, a boolean, a nested value (a dict or
    list, written as JSON text; as a Python literal by older snnet), else the text itself.

    A cell is a number only if it is written as that number is ("7", "0.5", "1e+20"): text such as
    "007", "1_000" or "+5" is no number's written form, so it was text and stays text (int() and float()
    would take it). Text that is exactly a number's written form cannot be told from it: results.json
    keeps the types."""
    for kind in (int, float):
        try:
            number = kind(v)
        except ValueError:
            continue
        if str(number) == v:
            return number
    if v in ("True", "False"):  # how csv writes a boolean
        return v == "True"
    if v.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(v)
        except ValueError:
            try:
                return ast.literal_eval(v)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    return v


def measured(v: Any) -> bool:
    """Whether a row's value was measured: a number, not None (a Row's default) or NaN (a file's null)."""
    return isinstance(v, (int, float)) and not math.isnan(v)


def format_results(results: Sequence[Row], x: str = "flops") -> str:
    """A text table of the stitched network's rows sorted by cost, its Pareto frontier (top-1 vs ``x``)
    marked with ``*``. Zoo rows are counted in a last line, not listed (a zoo can hold a thousand)."""
    zoo = [r for r in results if r.is_zoo]
    reference = [r for r in results if r.kind == "reference"]
    results = network_rows(results)
    if not results:
        return f"no stitched networks; {len(zoo)} zoo models, {len(reference)} reference rows"
    front = pareto_front(results, x)
    rows = [dict(r.to_dict(), pareto=r.id in front) for r in sorted(results, key=lambda r: (r.value(x), r.id))]
    columns = [("id", "id")] + [("ref_id", "ref id")] * any(r.value("ref_id") is not None for r in results)
    columns += [("name", "stitch"), ("params", "params"), ("flops", "FLOPs")]
    columns += [(k, h) for k, h in (("latency_ms", "ms"), ("peak_mem_mb", "MB")) if any(r.value(k) is not None for r in results)]
    columns += [("acc1", "top-1 %"), ("acc5", "top-5 %"), ("loss", "loss"), ("is_anchor", "anchor"), ("pareto", "pareto")]
    # not measured: NaN (a file's null) or None (a Row's default), left blank
    text = table(rows, columns, {"params": human, "flops": human, "acc5": lambda v: f"{v:.2f}" if measured(v) else "",
                                 "loss": lambda v: f"{v:.4f}" if measured(v) else "", "pareto": lambda v: "*" if v else ""})
    # a NaN top-1 (not measured) is no best: max() keeps a NaN first row, which every comparison loses to
    scored = [r for r in results if measured(r.acc1)]
    best = max(scored, key=lambda r: (r.acc1, -r.id)) if scored else None
    zoo_line = ""
    beside = [f"{len(rows)} {what} from {', '.join(sorted({str(r.value('source')) for r in rows}))}"
              for what, rows in (("zoo models", zoo), ("reference rows", reference)) if rows]
    if beside:
        zoo_line = f"\n(and {' and '.join(beside)} in the results, not listed: see the plot)"
    return (f"{text}\n\n{len(results)} networks on {results[0].images} images; {len(front)} on the Pareto "
            f"frontier (*); " + (f"best top-1 {best.acc1:.2f}% ({best.name})" if best else "no measured top-1")
            + zoo_line)


# ---------------------------------------------------------------------------------- rows as dicts


def _row(obj: Any) -> dict[str, Any]:
    """A row (:class:`Row` or dict) as a plain dict: what the frontier comparisons read by key."""
    return dict(obj) if isinstance(obj, Mapping) else Row.of(obj).to_dict()


def read_rows(results: Any) -> list[Row]:
    """Results as rows: a path (``results.json``/``.csv`` or its folder, read by :func:`load_results`),
    or a sequence of rows or dicts (each read as :meth:`Row.from_dict` reads a file's)."""
    if isinstance(results, (str, os.PathLike)):
        return load_results(results)
    return [Row.of(r) for r in results]


def merge_rows(base: Sequence[Any], extra: Sequence[Any], what: str) -> list[Row]:
    """``base`` rows, by id, with what ``extra`` rows measured added (:meth:`Row.merged`); names must agree.

    Zoo and reference rows are not the network's: those of ``base`` are kept as they are (after the others),
    those of ``extra`` are ignored (a profile or a new evaluation measures the stitched network only)."""
    base, extra = read_rows(base), read_rows(extra)
    by_id = {int(r.id): r for r in network_rows(base)}  # type: ignore[arg-type]
    for r in network_rows(extra):
        k = int(r.id)  # type: ignore[arg-type]
        if k in by_id and by_id[k].name != r.name:
            raise SnnetError(f"{what} do not belong to this network: stitch {k} is {by_id[k].name!r} here but "
                             f"{r.name!r} there. Use the results written for this network.")
        if k in by_id:
            by_id[k] = by_id[k].merged(r)
    return [by_id[k] for k in sorted(by_id)] + [r for r in base if r.is_comparison]
