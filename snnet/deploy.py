"""Deployment: pick a stitch for the resources at hand, and ship it alone.

* :func:`profile` measures every stitch's latency and peak memory on this device;
  :func:`merge_profile` stores them beside FLOPs, params and accuracy in ``results.json``.
* :class:`Budget` / :func:`parse_budget` / :func:`select_stitch` pick the most accurate stitch
  within a budget in FLOPs, params, latency or memory (``StitchedNet.select(budget=...)``).
* :func:`extract` turns one stitch into a plain :class:`StitchRoute` module holding only the
  weights its route uses; :func:`save_stitch`/:func:`load_stitch` (safetensors + config,
  rebuilt without the stitched network), :func:`export_program` (``torch.export``) and
  :func:`export_onnx` (verified with onnxruntime) write it. Every file is written to a
  temporary name, verified, then renamed into place; nothing half-written is left behind.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .anchors import ActivationSpec, AnchorSpec, create_anchor, split_model
from .errors import BudgetError, CheckpointError, ExportError, SnnetError
from .io import atomic_write
from .report import human, progress as report_progress
from .space import Stitch
from .stitching import StitchingLayer

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = [
    "Budget", "ProfileResult", "Selection", "StitchRoute", "export_onnx", "export_program", "export_stitch", "extract",
    "load_stitch", "merge_profile", "parse_budget", "profile", "route_bytes", "save_stitch", "select_stitch",
]

MB = 2 ** 20  # memory is reported in MiB (what nvidia-smi and torch call "MB")

# ====================================================================================== budgets

# Budget field -> (the results/cost row key it limits, how to print a value)
_METRICS: dict[str, tuple[str, Callable[[float], str]]] = {
    "flops": ("flops", lambda v: f"{human(v)} FLOPs"),
    "params": ("params", lambda v: f"{human(v)} params"),
    "latency_ms": ("latency_ms", lambda v: f"{v:.3g} ms"),
    "memory_mb": ("peak_mem_mb", lambda v: f"{v:.3g} MB"),
}
_KEYS = {"flops": "flops", "flop": "flops", "macs": "flops", "mac": "flops",
         "params": "params", "param": "params", "parameters": "params",
         "latency": "latency_ms", "latency_ms": "latency_ms", "lat": "latency_ms", "time": "latency_ms",
         "memory": "memory_mb", "memory_mb": "memory_mb", "mem": "memory_mb", "peak_mem_mb": "memory_mb"}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
_MEMORY = {"b": 1 / MB, "kb": 1 / 1024, "kib": 1 / 1024, "mb": 1.0, "mib": 1.0, "gb": 1024.0, "gib": 1024.0}
_ACCEPTED = ("flops<=2G (K/M/G/T, optional FLOPs/MACs), params<=5M (K/M/G/T), latency<=30ms (us/ms/s), "
             "memory<=200MB (B/KB/MB/GB, binary); the unit alone also says the cost: 2GFLOPs, 30ms, 200MB")
_ITEM = re.compile(r"^\s*(?:(?P<key>[a-z_]+)\s*(?P<op><=|<|=|:)\s*)?(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)\s*(?P<unit>[a-zµ]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """Upper bounds on what a stitch may cost; ``None`` means no bound on that cost.

    ``flops`` are multiply-accumulates (the paper's FLOPs) at the network's input size,
    ``latency_ms`` and ``memory_mb`` (MiB) are as measured by :func:`profile` on this device.
    """

    flops: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or math.isinf(v)):
                raise BudgetError(f"budget {f.name}={v!r} must be a finite number >= 0")

    def limits(self) -> list[tuple[str, float]]:
        """(Budget field, bound) of every bounded cost, in field order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __str__(self) -> str:
        return ", ".join(f"{k.split('_')[0]}<={_METRICS[k][1](v).replace(' FLOPs', '').replace(' params', '')}"
                         for k, v in self.limits()) or "no budget"


def parse_budget(text: str | Sequence[str] | Budget | Mapping[str, float]) -> Budget:
    """Parse ``"flops<=2G"``, ``"2GFLOPs"``, ``"latency=30ms,memory=200MB"``, ``"params=5M"``...

    Items are separated by commas (or given as a list); ``<=``, ``<``, ``=`` and ``:`` all mean
    "at most". Also accepts a :class:`Budget` or a mapping of its fields.
    """
    if isinstance(text, Budget):
        return text
    if isinstance(text, Mapping):
        unknown = set(text) - {f.name for f in fields(Budget)}
        if unknown:
            raise BudgetError(f"unknown budget keys {sorted(unknown)}; use flops, params, latency_ms, memory_mb")
        return Budget(**text)
    items = [text] if isinstance(text, str) else list(text)
    parts = [p for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise BudgetError(f"empty budget; write one like {_ACCEPTED}")
    found: dict[str, float] = {}
    for part in parts:
        key, value = _parse_item(part)
        if key in found:
            raise BudgetError(f"budget {part.strip()!r} bounds {key} twice; give each cost once")
        found[key] = value
    return Budget(**found)


def _parse_item(part: str) -> tuple[str, float]:
    m = _ITEM.match(part.lower())
    if m is None:
        raise BudgetError(f"cannot read budget {part.strip()!r}; write it like {_ACCEPTED}")
    key = m["key"]
    if key is not None and key not in _KEYS:
        raise BudgetError(f"unknown cost {key!r} in budget {part.strip()!r}; the costs are flops, params, latency, memory")
    metric = _KEYS[key] if key else None
    num, unit = float(m["num"]), m["unit"]
    # a count with an optional word: "2g", "2gflops", "5m", "5mparams"
    word = next((w for w in ("flops", "flop", "macs", "mac", "params", "param") if unit.endswith(w)), "")
    prefix = unit[: len(unit) - len(word)]
    if metric is None:  # the unit says which cost is meant
        if word:
            metric = _KEYS[word]
        elif unit in _TIME:
            metric = "latency_ms"
        elif unit in _MEMORY:
            metric = "memory_mb"
        else:
            raise BudgetError(f"budget {part.strip()!r} does not say which cost it bounds; write it like {_ACCEPTED}")
    if metric in ("flops", "params"):
        if prefix in _COUNT and (not word or _KEYS[word] == metric):
            return metric, num * _COUNT[prefix]
        accepted = "K, M, G, T (optionally followed by FLOPs/MACs)" if metric == "flops" else "K, M, G, T"
    elif metric == "latency_ms":
        if unit in _TIME:
            return metric, num * _TIME[unit]
        accepted = "us, ms, s"
    else:
        if unit in _MEMORY:
            return metric, num * _MEMORY[unit]
        accepted = "B, KB, MB, GB (binary: 1 MB = 2**20 bytes)"
    raise BudgetError(f"unknown unit {m['unit']!r} for {metric.split('_')[0]} in budget {part.strip()!r}; accepted units: {accepted}")


# ====================================================================================== results rows


def _row(obj: Any) -> dict[str, Any]:
    """A cost/result object (StitchCost, StitchResult, ProfileResult or dict) as a plain dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return asdict(obj)


def read_rows(results: Any) -> list[dict[str, Any]]:
    """Results as dict rows: a path (``results.json`` or its folder), or a sequence of rows/objects.

    Files are read with :func:`snnet.evaluate.load_results` when they hold accuracies; a file
    written by ``snnet profile`` alone (accuracy null) is read as plain rows.
    """
    from .evaluate import RESULTS_JSON, load_results
    from .errors import ResultsError

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


def _merge(base: list[dict[str, Any]], extra: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
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


# ====================================================================================== selection


@dataclass(frozen=True)
class Selection:
    """The stitch a budget selects, and why."""

    id: int
    name: str
    budget: Budget
    ranked_by: str  # "acc1" (measured) or "flops" (the accuracy proxy)
    reason: str
    candidates: tuple[int, ...]  # ids of every stitch within the budget
    values: Mapping[str, Any] = field(default_factory=dict, hash=False)  # the chosen stitch's row
    stitch: Stitch | None = None  # set when selecting on a StitchedNet

    def __str__(self) -> str:
        return self.reason


def select_stitch(net_or_costs: Any, budget: Any, results: Any = None) -> Selection:
    """The most accurate stitch within every bound of ``budget``.

    ``net_or_costs`` is a :class:`~snnet.model.StitchedNet` or a list of cost/result rows;
    ``results`` (rows or a ``results.json`` path) adds measured accuracy and latency/memory.
    With measured top-1 for every candidate the best top-1 wins; otherwise the candidate with
    the most FLOPs, since along SN-Net's frontier more compute buys more accuracy (FLOPs, not
    the budgeted cost: they are exact where a measured latency is noisy). A budget below the cheapest stitch raises
    :class:`~snnet.errors.BudgetError` naming the cheapest.
    """
    budget = parse_budget(budget)
    net = net_or_costs if isinstance(net_or_costs, nn.Module) else None
    rows = [c.to_dict() for c in net.costs()] if net is not None else read_rows(net_or_costs)
    if results is not None:
        rows = _merge(rows, read_rows(results), "the results")
    if not rows:
        raise BudgetError("no stitches to select from")
    for name, bound in budget.limits():
        key = _METRICS[name][0]
        missing = [r for r in rows if r.get(key) is None]
        if missing:
            hint = ("run `snnet profile` first (it measures this device) and pass its results.json"
                    if name in ("latency_ms", "memory_mb") else "pass results that hold it")
            raise BudgetError(f"a {name.split('_')[0]} budget needs the {key} of every stitch, but "
                              f"{len(missing)} of {len(rows)} have none (e.g. {missing[0]['name']!r}): {hint}")
        cheapest = min(rows, key=lambda r: (r[key], r["id"]))
        if bound < cheapest[key]:
            raise BudgetError(f"budget {Budget(**{name: bound})} is below the cheapest stitch, "
                              f"{cheapest['name']!r} (id {cheapest['id']}) at {_METRICS[name][1](cheapest[key])}: "
                              "raise the budget")
    within = [r for r in rows if all(r[_METRICS[n][0]] <= b for n, b in budget.limits())]
    if not within:
        cheapest = {n: min(rows, key=lambda r: (r[_METRICS[n][0]], r["id"])) for n, _ in budget.limits()}
        detail = "; ".join(f"the cheapest in {n.split('_')[0]} is {r['name']!r} at {_METRICS[n][1](r[_METRICS[n][0]])}"
                           for n, r in cheapest.items())
        raise BudgetError(f"no stitch meets every bound of {budget} at once ({detail}): loosen one of them")
    measured = all(isinstance(r.get("acc1"), (int, float)) and not math.isnan(r["acc1"]) for r in within)
    if measured:
        ranked_by = "acc1"
        best = max(within, key=lambda r: (r["acc1"], -r["flops"], -r["id"]))
    else:
        # FLOPs, whatever is budgeted: they are exact (a measured latency is noisy) and the paper's frontier axis
        ranked_by = "flops"
        best = max(within, key=lambda r: (r["flops"], r["params"], -r["id"]))
    shown = [f"top-1 {best['acc1']:.2f}%"] if measured else []
    shown += [_METRICS[n][1](best[_METRICS[n][0]]) for n in _METRICS if best.get(_METRICS[n][0]) is not None]
    why = ("the most accurate (measured top-1)" if measured else
           "no measured accuracy, so by proxy the one with the most FLOPs (more compute buys more "
           "accuracy along the SN-Net frontier)")
    reason = (f"{best['name']} (id {best['id']}): {why} of the {len(within)} of {len(rows)} stitches within "
              f"{budget}; it has {', '.join(shown)}")
    stitch = net.space[int(best["id"])] if net is not None else None
    return Selection(int(best["id"]), best["name"], budget, ranked_by, reason,
                     tuple(sorted(int(r["id"]) for r in within)), best, stitch)


# ====================================================================================== the route of one stitch


class StitchRoute(nn.Module):
    """One stitch as a plain module: source stem and blocks, stitching layer, target blocks, head.

    An anchor is a route with an identity stitch and no target blocks. ``forward`` runs the
    same modules in the same order as :meth:`StitchedNet.forward` does for that stitch.
    """

    def __init__(self, src_stem: nn.Module, src_blocks: Sequence[nn.Module], stitch: nn.Module | None,
                 dst_blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.src_stem = src_stem
        self.src_blocks = nn.ModuleList(src_blocks)
        self.stitch = stitch if stitch is not None else nn.Identity()
        self.dst_blocks = nn.ModuleList(dst_blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.src_stem(x)
        for blk in self.src_blocks:
            h = blk(h)
        h = self.stitch(h)
        for blk in self.dst_blocks:
            h = blk(h)
        return self.head(h)


def _route_view(net: "StitchedNet", stitch: Stitch) -> StitchRoute:
    """A route sharing the network's modules (no copy): for counting bytes and for :func:`extract`."""
    return StitchRoute(*net.route(stitch))


def route_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def extract(net: "StitchedNet", stitch: int | str | Stitch) -> StitchRoute:
    """A standalone copy of one stitch: deep copies of only the modules on its route, in eval mode."""
    s = net.space[stitch]
    route = copy.deepcopy(_route_view(net, s))  # one deepcopy keeps weights shared within the route shared
    route.snnet_stitch = s.name  # type: ignore[assignment]  # plain attribute: where it came from
    return route.eval()


# ====================================================================================== files

STITCH_CONFIG = "config.json"
STITCH_WEIGHTS = "model.safetensors"
STITCH_FORMAT = "snnet-stitch"
STITCH_VERSION = 1
FORMATS = ("safetensors", "pt2", "onnx")


def _check_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove a file can be written there, before any work."""
    from .evaluate import check_writable

    return check_writable(out, error=ExportError)


def stitch_config(net: "StitchedNet", stitch: int | str | Stitch) -> dict[str, Any]:
    """Everything :func:`load_stitch` needs to rebuild a stitch without the stitched network."""
    s = net.space[stitch]

    def anchor(k: int) -> dict[str, Any]:
        spec = net.specs[k]
        if spec is not None:  # rebuilt from its timm name at random init; the weights come from the file
            spec = AnchorSpec(spec.name, False, None, spec.kwargs).to_dict()
        return {"label": net.labels[k], "kind": net.anchors[k].kind, "spec": spec}

    layer = None
    if not s.is_anchor:
        slot = net.space.layers[s.layer]
        layer = {"src_spec": asdict(slot.src_spec), "dst_spec": asdict(slot.dst_spec)}
    src = net.anchors[s.src]
    return {
        "format": STITCH_FORMAT, "version": STITCH_VERSION, "id": s.id, "name": s.name,
        "src": anchor(s.src), "src_end": s.src_end,
        "dst": anchor(s.dst) if s.dst is not None else None, "dst_start": s.dst_start, "stitching_layer": layer,
        "input_size": list(net.input_size), "num_classes": net.num_classes,
        "data_config": {k: v for k, v in src.data_config.items() if k != "num_classes"},
    }


def save_stitch(route: StitchRoute, directory: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` (the route's weights only) and ``config.json``, each atomically.

    ``config`` is :func:`stitch_config` of the stitch the route was extracted from.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = _check_dir(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in route.state_dict().items()}
    # safetensors refuses tensors sharing memory; clone the rare shared ones
    seen: set[int] = set()
    for k, v in state.items():
        if v.untyped_storage().data_ptr() in seen:
            state[k] = v.clone()
        seen.add(state[k].untyped_storage().data_ptr())

    def verify(p: Path) -> None:
        with safe_open(str(p), "pt") as f:
            if set(f.keys()) != set(state):
                raise ExportError(f"{p} does not hold the route's tensors after writing: disk full or filesystem error?")

    def write(p: Path) -> None:
        save_file(state, str(p), metadata={"format": "pt", "snnet": STITCH_FORMAT})
        verify(p)

    atomic_write(out / STITCH_WEIGHTS, write)
    atomic_write(out / STITCH_CONFIG, lambda p: p.write_text(json.dumps(dict(config), indent=2) + "\n"))
    return out


def _spec(d: Mapping[str, Any]) -> ActivationSpec:
    return ActivationSpec(d["layout"], int(d["channels"]), tuple(d["spatial"]))


def load_stitch(directory: str | os.PathLike, anchors: Sequence[nn.Module] | None = None,
                map_location: str | torch.device = "cpu") -> StitchRoute:
    """Rebuild a stitch saved by :func:`save_stitch`, without its stitched network.

    The route's anchors are built from their timm names at random init, cut to the route, and
    the saved weights loaded (strictly). Anchors that were your own modules must be passed
    again as ``anchors`` (source, then target for a stitch), freshly constructed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / STITCH_CONFIG, directory / STITCH_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{directory} is not an exported stitch: it needs {STITCH_CONFIG} and {STITCH_WEIGHTS} "
                              "(written by `snnet export --format safetensors`)")
    try:
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != STITCH_FORMAT:
            raise KeyError("format")
        ends = [cfg["src"]] + ([cfg["dst"]] if cfg["dst"] is not None else [])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt or not an exported snnet stitch ({e})") from e
    if cfg.get("version", 0) > STITCH_VERSION:
        raise CheckpointError(f"{cfg_path} was written by a newer snnet (format {cfg['version']}); upgrade snnet")
    if anchors is not None and len(anchors) != len(ends):
        raise CheckpointError(f"this stitch uses {len(ends)} anchors, {len(anchors)} were given")
    parts = []
    for k, end in enumerate(ends):
        if anchors is not None:
            module = anchors[k]
        elif end["spec"] is None:
            raise CheckpointError(f"anchor {end['label']!r} was your own module: pass it again with load_stitch(dir, anchors=[...])")
        else:
            module = create_anchor(AnchorSpec.from_dict(end["spec"]))
        parts.append(split_model(module))
    src = parts[0]
    if cfg["dst"] is None:
        route = StitchRoute(src.stem, list(src.blocks), None, [], src.head)
    else:
        layer = cfg["stitching_layer"]
        dst = parts[1]
        route = StitchRoute(src.stem, list(src.blocks[: cfg["src_end"]]),
                            StitchingLayer(_spec(layer["src_spec"]), _spec(layer["dst_spec"])),
                            list(dst.blocks[cfg["dst_start"]:]), dst.head)
    try:
        state = load_file(str(w_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} is corrupt or unreadable ({e}); export the stitch again") from e
    own = route.state_dict()
    bad = sorted(set(own) ^ set(state)) + sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if bad:
        raise CheckpointError(f"{w_path} does not match the route its config describes (first mismatches: "
                              f"{', '.join(bad[:3])}); export the stitch again")
    route.load_state_dict(state)
    route.snnet_stitch = cfg["name"]  # type: ignore[assignment]
    return route.to(map_location).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _batch_dim() -> dict[str, dict[int, Any]]:
    # the batch size stays free in the exported graph (AUTO keeps it static if the model pins it)
    return {"x": {0: torch.export.Dim.AUTO}}


def export_program(route: nn.Module, example: torch.Tensor, path: str | os.PathLike, atol: float = 1e-5) -> Path:
    """Export with ``torch.export`` and save a ``.pt2`` program; verified by reloading and comparing outputs."""
    path = Path(path)
    _check_dir(path.parent)
    route = route.eval()
    with torch.inference_mode():
        want = route(example)
    try:
        program = torch.export.export(route, (example,), dynamic_shapes=_batch_dim())
    except Exception as e:  # torch raises many kinds here; say which model part failed
        raise ExportError(f"torch.export could not trace this stitch: {type(e).__name__}: {str(e).splitlines()[0]}") from e

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with torch.inference_mode():
        got = torch.export.load(io.BytesIO(buffer.getvalue())).module()(example)
    diff = _max_diff(got, want)
    if not diff <= atol:
        raise ExportError(f"the torch.export program's outputs differ from the stitch's by {diff:.3g} (> {atol}); not saved")
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return path


def export_onnx(route: nn.Module, example: torch.Tensor, path: str | os.PathLike, atol: float = 1e-5) -> Path:
    """Export to ONNX (torch's dynamo exporter) and verify with onnxruntime on CPU.

    The file is written to a temporary name, run with onnxruntime on ``example``, and renamed
    into place only if its outputs are within ``atol`` of PyTorch's; otherwise it is deleted
    and :class:`~snnet.errors.ExportError` raised.
    """
    path = Path(path)
    _check_dir(path.parent)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'snnet[export]'") from e
    route = route.eval()
    with torch.inference_mode():
        want = route(example).cpu()

    def write_and_verify(p: Path) -> None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(route, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                            dynamic_shapes=_batch_dim(), verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export of this stitch failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        program.save(str(p), external_data=False)  # one self-contained file
        try:
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: example.detach().cpu().numpy()})[0])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot run the exported ONNX file ({type(e).__name__}: {e}); not saved") from e
        diff = _max_diff(got, want)
        if not diff <= atol:
            raise ExportError(f"onnxruntime's outputs differ from the stitch's by {diff:.3g} (> {atol}); ONNX file not saved")

    atomic_write(path, write_and_verify)  # a file that fails verification is deleted, never renamed into place
    return path


def export_stitch(net: "StitchedNet", stitch: int | str | Stitch, out: str | os.PathLike,
                  formats: Sequence[str] = FORMATS, batch_size: int = 2, atol: float = 1e-5) -> dict[str, Path]:
    """Extract one stitch and write it in each of ``formats`` into ``out``, all or nothing.

    Formats: ``safetensors`` (``model.safetensors`` + ``config.json``, :func:`load_stitch`),
    ``pt2`` (``model.pt2``, ``torch.export.load``), ``onnx`` (``model.onnx``). Every file is
    staged in a temporary folder inside ``out`` and verified; the files move into ``out`` only
    when every format succeeded, so a failure leaves ``out`` as it was. The example input is a
    random batch at the network's input size.
    """
    formats = _check_formats(formats)
    s = net.space[stitch]  # unknown stitch: fails before any work
    out = _check_dir(out)
    route = extract(net, s).cpu()
    example = torch.randn(batch_size, *net.input_size, generator=torch.Generator().manual_seed(0))
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".snnet-export-"))
    try:
        written: list[Path] = []
        if "safetensors" in formats:
            save_stitch(route, stage, stitch_config(net, s))
            written += [stage / STITCH_WEIGHTS, stage / STITCH_CONFIG]
        if "pt2" in formats:
            written.append(export_program(route, example, stage / "model.pt2", atol))
        if "onnx" in formats:
            written.append(export_onnx(route, example, stage / "model.onnx", atol))
        paths = {}
        for p in written:
            os.replace(p, out / p.name)
            paths[p.name] = out / p.name
        return paths
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = formats.split(",")
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise ExportError(f"unknown export format {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return chosen


# ====================================================================================== profiling


@dataclass(frozen=True)
class ProfileResult:
    """Latency and peak memory of one stitch on one device.

    ``latency_ms`` is the median and ``latency_p90_ms`` the 90th percentile of ``repeats``
    timed forwards after warm-up. ``peak_mem_mb`` (MiB) is what running this stitch alone
    needs at once: its weights, the input batch and the peak of intermediate tensors alive
    during one forward (see :func:`profile`).
    """

    id: int
    name: str
    latency_ms: float
    latency_p90_ms: float
    peak_mem_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile was measured; stored with every row so numbers are never read out of context."""

    device: str
    batch_size: int
    input_size: tuple[int, ...]
    threads: int | None
    warmup: int
    repeats: int
    memory: str  # how peak_mem_mb was measured

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), input_size=list(self.input_size))


class _LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the bytes of tensor storages created by ops and still alive, and their peak.

    Every op's outputs are recorded by storage (views share their base's storage, so they
    add nothing); a storage is released when the last tensor seen using it is garbage
    collected. Storages that existed before (weights, the input) are excluded. What this does
    not see: scratch memory inside a kernel (e.g. a fused attention's workspace) and the
    allocator's rounding and caching, so it is a lower bound of the process's real growth.
    """

    def __init__(self, exclude: Iterable[int]) -> None:
        super().__init__()
        self.exclude = set(exclude)
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude or st.nbytes() == 0:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)


def _peak_activation_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of intermediate tensors alive during one forward (beyond weights and input)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        net(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    exclude = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers()) + [x]}
    with _LiveTensors(exclude) as mode:
        net(x)
    return mode.peak


def _percentile(values: Sequence[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def profile(
    net: "StitchedNet",
    batch_size: int = 1,
    input_size: Sequence[int] | None = None,
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device | None = None,
    threads: int | None = None,
    stitches: Sequence[int | str | Stitch] | None = None,
    progress: bool = True,
) -> tuple[list[ProfileResult], ProfileSettings]:
    """Measure latency and peak memory of every stitch (or of ``stitches``) on one device.

    Each stitch is selected and run ``warmup`` times, then timed over ``repeats`` forwards
    under ``torch.inference_mode`` on a random batch (CUDA is synchronised around each one).
    ``threads`` sets torch's CPU threads for the run. ``device`` moves the network there.

    Peak memory (MiB) = the route's weight bytes + the input batch + the peak of intermediate
    tensors alive during one forward: on CUDA from the allocator's peak statistics (above
    what was allocated before the forward), on CPU by tracking every tensor ops create until
    it is freed (:class:`_LiveTensors`). It is what this stitch alone needs, not the whole
    stitched network (whose other anchors are resident too).
    """
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise SnnetError(f"need batch_size >= 1, warmup >= 0 and repeats >= 1 (got {batch_size}, {warmup}, {repeats})")
    if threads is not None and threads < 1:
        raise SnnetError(f"--threads must be >= 1, got {threads}")
    chosen = sorted({net.space[k].id for k in stitches}) if stitches is not None else [s.id for s in net.space]
    size = tuple(input_size) if input_size is not None else tuple(net.input_size)
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.to(dev)
    x = torch.randn(batch_size, *size, generator=torch.Generator().manual_seed(0)).to(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    active, was_training, old_threads = net.active, net.training, torch.get_num_threads()
    settings = ProfileSettings(str(dev), batch_size, size, threads if threads is not None else old_threads, warmup, repeats,
                               "cuda allocator peak" if dev.type == "cuda" else "live tensor bytes (torch dispatch)")
    bar = report_progress(len(chosen), f"profile on {dev}", "stitch", progress)
    out = []
    net.eval()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            for k in chosen:
                s = net.select(k)
                for _ in range(warmup):
                    net(x)
                sync()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    net(x)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                act = _peak_activation_bytes(net, x)
                mem = (route_bytes(_route_view(net, s)) + x.numel() * x.element_size() + act) / MB
                out.append(ProfileResult(s.id, s.name, _percentile(times, 0.5), _percentile(times, 0.9), mem))
                bar.update(1)
    finally:
        torch.set_num_threads(old_threads)
        net.select(active)
        net.train(was_training)
        bar.close()
    return out, settings


def merge_profile(rows: Sequence[Any] | None, costs: Sequence[Any], measured: Sequence[ProfileResult],
                  settings: ProfileSettings) -> list[dict[str, Any]]:
    """Results rows with the profile added: ``rows`` (e.g. from ``snnet eval``) when given, else
    ``costs`` rows (id/name/flops/params) with accuracy null. Each row gets ``latency_ms``,
    ``latency_p90_ms``, ``peak_mem_mb`` and the ``profile`` settings."""
    base = read_rows(rows) if rows is not None else [dict(_row(c), acc1=None, acc5=None) for c in costs]
    extra = [dict(r.to_dict(), profile=settings.to_dict()) for r in measured]
    ids = {int(r["id"]) for r in base}
    if any(r["id"] not in ids for r in extra):
        raise SnnetError("the results file lists fewer stitches than this network has: profile the network it was written for")
    return _merge(base, extra, "the results")
