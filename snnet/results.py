"""Result rows of a stitch space: what each network scored and cost, on disk and on a frontier.

:class:`StitchResult` is one row (a stitch, an anchor, or a comparison network); rows are written
as ``results.json`` (a list of objects) and ``results.csv`` by :func:`write_results` and read back
by :func:`load_results`. :func:`pareto_front` finds the accuracy/cost frontier and
:func:`format_results` prints the table. Evaluation itself lives in :mod:`snnet.evaluate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import ResultsError, SnnetError
from .io import atomic_write, probe_write
from .report import human, table

__all__ = [
    "RESULTS_JSON", "RESULTS_CSV", "StitchResult", "check_writable", "format_results", "load_results", "mark_pareto",
    "pareto_front", "merge_rows", "read_rows", "write_results",
]

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


@dataclass(frozen=True)
class StitchResult:
    """Accuracy and cost of one network of the space on one dataset.

    ``flops`` are multiply-accumulates at the evaluated input size (the paper's "FLOPs");
    accuracies are percentages. ``latency_ms``/``peak_mem_mb`` are filled in by benchmarking
    tools when measured; ``extra`` keeps any further field (saved and loaded unchanged), so
    results files stay readable when tools add columns.
    """

    id: int
    name: str
    flops: int
    params: int
    acc1: float
    acc5: float
    loss: float
    images: int
    is_anchor: bool
    pareto: bool = False
    latency_ms: float | None = None
    peak_mem_mb: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: the fields (optional ones only when set), then ``extra``."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.name in _OPTIONAL:
                continue
            d[f.name] = v
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StitchResult":
        """Inverse of :meth:`to_dict`; unknown keys go to ``extra``. Raises KeyError/ValueError/TypeError."""
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
        known = {k: _convert(k, d.get(k)) for k in _TYPES if k in d or k in _DEFAULTS}
        extra = {k: v for k, v in d.items() if k not in _TYPES}
        return cls(**known, extra=extra)

    def value(self, key: str) -> Any:
        """A field or an ``extra`` entry by name (None if absent): what plots and frontiers sort by."""
        if key in _TYPES:
            return getattr(self, key)
        return self.extra.get(key)


# field name -> type used to read it back from JSON/CSV text
_TYPES: dict[str, type] = {"id": int, "name": str, "flops": int, "params": int, "acc1": float, "acc5": float,
                           "loss": float, "images": int, "is_anchor": bool, "pareto": bool,
                           "latency_ms": float, "peak_mem_mb": float}
_OPTIONAL = ("latency_ms", "peak_mem_mb")
_REQUIRED = ("id", "name", "flops", "params", "acc1", "acc5", "is_anchor")
# what a file may leave out (or leave empty, in CSV)
_DEFAULTS: dict[str, Any] = {"loss": math.nan, "images": 0, "pareto": False, "latency_ms": None, "peak_mem_mb": None}


def _convert(key: str, v: Any) -> Any:
    kind = _TYPES[key]
    if v is None or v == "":
        if key in _DEFAULTS:
            return _DEFAULTS[key]
        raise ValueError(f"{key} is empty")
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


def pareto_front(results: Iterable[StitchResult], x: str = "flops", y: str = "acc1") -> set[int]:
    """Ids of the results no other result beats: nothing costs as little or less and is more accurate.

    Strict staircase: sweeping by cost (ties: higher accuracy, then lower id first), a result is on
    the frontier if it is more accurate than everything before it. So of two results with equal cost
    and accuracy only the lower id is kept, and a dearer result with merely equal accuracy is not on it.
    """
    rows = list(results)
    for r in rows:
        if r.value(x) is None or r.value(y) is None:
            raise ResultsError(f"result {r.name!r} has no {x if r.value(x) is None else y}: "
                               f"cannot place it on a {y}/{x} frontier")
    front, best = set(), -math.inf
    for r in sorted(rows, key=lambda r: (r.value(x), -r.value(y), r.id)):
        if r.value(y) > best:
            front.add(r.id)
            best = r.value(y)
    return front


def mark_pareto(results: Sequence[StitchResult], x: str = "flops", y: str = "acc1") -> list[StitchResult]:
    """The results with ``pareto`` set from :func:`pareto_front`."""
    front = pareto_front(results, x, y)
    return [replace(r, pareto=r.id in front) for r in results]


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


def _columns(results: Sequence[StitchResult]) -> list[str]:
    cols: list[str] = []
    for r in results:
        cols += [k for k in r.to_dict() if k not in cols]
    return cols


def write_results(results: Sequence[StitchResult], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.json`` (a list, one object per stitch) and ``results.csv``; each atomically."""
    out = check_writable(out_dir)
    rows = [r.to_dict() for r in results]
    json_path, csv_path = out / RESULTS_JSON, out / RESULTS_CSV
    atomic_write(json_path, lambda p: p.write_text(json.dumps(rows, indent=2) + "\n"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(results), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(csv_path, lambda p: p.write_text(buf.getvalue()))
    return json_path, csv_path


def load_results(path: str | os.PathLike) -> list[StitchResult]:
    """Read results written by :func:`write_results`: a ``results.json``/``.csv`` file or their folder."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    if not path.is_file():
        raise ResultsError(f"no results file at {path}: write one with `snnet eval --out DIR`")
    try:
        text = path.read_text()
        if path.suffix.lower() == ".csv":
            # CSV has no types and no "absent": empty cells are absent, extra columns numbers where they parse
            rows: Any = [{k: _from_text(v) if k not in _TYPES else v for k, v in row.items() if v not in ("", None)}
                         for row in csv.DictReader(io.StringIO(text))]
        else:
            rows = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ResultsError(f"{path} is corrupt or not a results file ({e}); re-run `snnet eval`") from e
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ResultsError(f"{path} is not an snnet results file: expected a non-empty list of per-stitch objects")
    out = []
    for k, row in enumerate(rows):
        try:
            out.append(StitchResult.from_dict(row))
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ResultsError(f"{path} is not an snnet results file: entry {k} is invalid ({msg})") from e
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        raise ResultsError(f"{path} holds some stitch ids twice: results of different runs were mixed; re-run `snnet eval`")
    return out


def _from_text(v: str) -> Any:
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def format_results(results: Sequence[StitchResult], x: str = "flops") -> str:
    """A text table sorted by cost, the Pareto frontier (top-1 vs ``x``) marked with ``*``."""
    front = pareto_front(results, x)
    rows = [dict(r.to_dict(), pareto=r.id in front) for r in sorted(results, key=lambda r: (r.value(x), r.id))]
    columns = [("id", "id"), ("name", "stitch"), ("params", "params"), ("flops", "FLOPs")]
    columns += [(k, h) for k, h in (("latency_ms", "ms"), ("peak_mem_mb", "MB")) if any(r.value(k) is not None for r in results)]
    columns += [("acc1", "top-1 %"), ("acc5", "top-5 %"), ("loss", "loss"), ("is_anchor", "anchor"), ("pareto", "pareto")]
    text = table(rows, columns, {"params": human, "flops": human, "loss": lambda v: f"{v:.4f}",
                                 "pareto": lambda v: "*" if v else ""})
    best = max(results, key=lambda r: (r.acc1, -r.id))
    return (f"{text}\n\n{len(results)} networks on {results[0].images} images; {len(front)} on the Pareto "
            f"frontier (*); best top-1 {best.acc1:.2f}% ({best.name})")


# ---------------------------------------------------------------------------------- rows as dicts


def _row(obj: Any) -> dict[str, Any]:
    """A cost/result object (StitchCost, StitchResult, ProfileResult or dict) as a plain dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return asdict(obj)


def read_rows(results: Any) -> list[dict[str, Any]]:
    """Results as dict rows: a path (``results.json`` or its folder), or a sequence of rows/objects.

    Files are read with :func:`load_results` when they hold accuracies; a file
    written by ``snnet profile`` alone (accuracy null) is read as plain rows.
    """
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        path = path / RESULTS_JSON if path.is_dir() else path
        try:
            return [r.to_dict() for r in load_results(path)]
        except ResultsError:
            rows = _read_json_rows(path)
            if rows is None or any(r.get("acc1") is not None for r in rows):
                raise  # a real evaluation file that is broken: report what load_results found
            return rows
    return [_row(r) for r in results]


def _read_json_rows(path: Path) -> list[dict[str, Any]] | None:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and "id" in r and "name" in r for r in rows):
        return rows
    return None


def merge_rows(base: list[dict[str, Any]], extra: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """``base`` rows updated by id with ``extra`` rows' non-null fields; names must agree."""
    by_id = {int(r["id"]): dict(r) for r in base}
    for r in extra:
        k = int(r["id"])
        if k in by_id and by_id[k]["name"] != r["name"]:
            raise SnnetError(f"{what} do not belong to this network: stitch {k} is {by_id[k]['name']!r} here but "
                             f"{r['name']!r} there. Use the results written for this network.")
        if k in by_id:
            by_id[k].update({key: v for key, v in r.items() if v is not None and key not in ("flops", "params")})
    return [by_id[k] for k in sorted(by_id)]
