"""Evaluate every network of a stitch space in one pass, and find its accuracy/cost frontier.

Stitches overlap a lot: all the stitches leaving anchor A run the same stem and the same first
blocks of A, and differ only in where they cut. So per batch each source anchor runs its stem and
blocks *once*, stopping at each cut point the selected stitches need; at a cut, every stitch that
leaves there gets the activation (mapped once per stitching layer) and runs only its own target
suffix and head. An anchor is free: it is the end of its own prefix run. Evaluating the whole
space then costs the anchors' forwards plus the suffixes, not ``len(space)`` full forwards
(``benchmarks/bench_eval.py`` measures the difference).

Results are :class:`StitchResult` rows, written as ``results.json`` (a list of objects that other
tools read back with :func:`load_results`) and ``results.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import ResultsError, SnnetError
from .io import atomic_write
from .model import StitchedNet
from .report import human, progress as report_progress, table
from .space import Stitch

__all__ = [
    "RESULTS_JSON", "RESULTS_CSV", "StitchResult", "check_writable", "evaluate", "format_results", "forward_stitches",
    "load_results", "pareto_front", "write_results",
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


# ---------------------------------------------------------------------------------- evaluation


def forward_stitches(net: StitchedNet, x: torch.Tensor, stitches: Iterable[Stitch]) -> Iterator[tuple[Stitch, torch.Tensor]]:
    """Yield ``(stitch, logits)`` for every stitch on one batch, sharing the work they have in common.

    Each source anchor runs its stem and blocks once, up to its deepest needed cut. At each cut,
    the stitches leaving there take the activation; stitches that also share the stitching layer
    share its output. Only one cut activation per anchor is alive at a time, so memory stays at
    one forward plus one suffix. The numbers equal ``net.select(s); net(x)`` exactly: the same
    modules run on the same tensors.
    """
    by_src: dict[int, dict[int, list[Stitch]]] = defaultdict(lambda: defaultdict(list))
    for s in stitches:
        by_src[s.src][s.src_end].append(s)
    for a in sorted(by_src):
        src = net.anchors[a]
        h, done = src.stem(x), 0
        for cut in sorted(by_src[a]):
            h, done = src.run(h, done, cut), cut
            mapped: dict[int, torch.Tensor] = {}
            for s in by_src[a][cut]:
                if s.is_anchor:
                    yield s, src.head(h)
                    continue
                if s.layer not in mapped:
                    mapped[s.layer] = net.stitch_layers[s.layer](h)
                dst = net.anchors[s.dst]
                yield s, dst.head(dst.run(mapped[s.layer], s.dst_start))


class _Tally:
    """Running top-1/top-k hits and summed loss of one stitch, kept on the device (no sync per batch)."""

    def __init__(self, device: torch.device) -> None:
        self.hits1 = torch.zeros((), dtype=torch.long, device=device)
        self.hits5 = torch.zeros((), dtype=torch.long, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        k = min(5, logits.shape[-1])
        hit = logits.topk(k, dim=-1).indices == target[:, None]
        self.hits1 += hit[:, 0].sum()
        self.hits5 += hit.any(dim=-1).sum()
        self.loss += F.cross_entropy(logits, target, reduction="sum").double()


def _select(net: StitchedNet, stitches: Sequence[int | str | Stitch] | None) -> list[Stitch]:
    if stitches is None:
        return list(net.space)
    chosen = {net.space[key].id: net.space[key] for key in stitches}  # raises StitchNotFoundError
    if not chosen:
        raise SnnetError("no stitches selected: pass ids or names, or None for all")
    return [chosen[k] for k in sorted(chosen)]


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    # bfloat16 is what CPU autocast supports; float16 is the usual choice on CUDA
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(
    net: StitchedNet,
    loader: Iterable[Any],
    stitches: Sequence[int | str | Stitch] | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    amp: bool = False,
) -> list[StitchResult]:
    """Top-1/top-5 accuracy (top-min(5, classes)) and mean cross-entropy of each selected stitch.

    ``loader`` yields ``(images, labels)`` batches; ``stitches`` are ids/names (default: the whole
    space). ``device`` moves the network there (default: where it is). The network's train/eval
    mode and active stitch are left as they were. Results come back in id order, with ``pareto``
    marking the top-1/FLOPs frontier of the evaluated set.
    """
    chosen = _select(net, stitches)  # bad ids fail here, before any work
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.to(dev)
    tallies = {s.id: _Tally(dev) for s in chosen}
    seen, input_size = 0, None
    total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
    bar = report_progress(total, f"eval {len(chosen)} networks", "img", progress)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(), _autocast(dev, amp):
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise SnnetError("evaluate needs a loader of (images, labels) batches")
                x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
                if input_size is None:
                    input_size = _check_batch(net, x)
                bad = y[(y < 0) | (y >= net.num_classes)]
                if len(bad):  # cross_entropy would fail with an index error (or a CUDA assert)
                    raise SnnetError(f"label {int(bad[0])} is outside the network's {net.num_classes} classes: "
                                     "the data does not match this network's head")
                for s, logits in forward_stitches(net, x, chosen):
                    tallies[s.id].update(logits, y)
                seen += len(y)
                bar.update(len(y))
    finally:
        net.train(was_training)
        bar.close()
    if seen == 0:
        raise SnnetError("the loader yielded no images: nothing to evaluate (is the dataset or --limit empty?)")
    costs = net.costs(input_size)
    out = []
    for s in chosen:
        t, c = tallies[s.id], costs[s.id]
        out.append(StitchResult(s.id, s.name, c.flops, c.params, 100.0 * t.hits1.item() / seen,
                                100.0 * t.hits5.item() / seen, t.loss.item() / seen, seen, s.is_anchor))
    return mark_pareto(out)


def _check_batch(net: StitchedNet, x: torch.Tensor) -> tuple[int, ...]:
    if x.ndim != 4 or x.shape[1] != net.input_size[0]:
        raise SnnetError(f"images of shape {tuple(x.shape[1:])} do not fit this network, which takes "
                         f"{tuple(net.input_size)} (channels, height, width): use the data it was trained on")
    return tuple(x.shape[1:])


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
        fd, probe = tempfile.mkstemp(dir=out, prefix=".snnet-write-test.")
        os.close(fd)
        os.unlink(probe)
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
