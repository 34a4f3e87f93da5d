"""Budgets, and the stitch that fits one.

A :class:`Budget` bounds FLOPs, params, latency or memory; :func:`parse_budget` reads one from
text (``"flops<=2G"``, ``"latency<=30ms"``); :func:`select_stitch` picks the most accurate stitch
within it from costs and result rows. It is a pure function of those rows, so
``StitchedNet.select(budget=...)`` calls it without reaching up into deployment code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .errors import BudgetError
from .report import COUNT_PREFIXES, NUMBER, human, parse_count
from .results import Row, better, measured, merge_rows, network_rows, read_rows
from .space import Stitch

__all__ = ["Budget", "MB", "Selection", "parse_budget", "select_stitch"]

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
_TIME = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
_MEMORY = {"b": 1 / MB, "kb": 1 / 1024, "kib": 1 / 1024, "mb": 1.0, "mib": 1.0, "gb": 1024.0, "gib": 1024.0}
# keys that name their unit, so a bare number after them is in that unit
_KEY_UNITS = {"latency_ms": "ms", "memory_mb": "mb", "peak_mem_mb": "mb"}
_ACCEPTED = ("flops<=2G (K/M/G/T, optional FLOPs/MACs), params<=5M (K/M/G/T), latency<=30ms (us/ms/s), "
             "memory<=200MB (B/KB/MB/GB, binary); the unit alone also says the cost: 2GFLOPs, 30ms, 200MB")
_ITEM = re.compile(rf"^\s*(?:(?P<key>[a-z_]+)\s*(?P<op><=|<|=|:)\s*)?(?P<num>{NUMBER})\s*(?P<unit>[a-zµ]*)\s*$")


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
    if not unit and key in _KEY_UNITS:  # "latency_ms<=30": the key names the unit, as Budget(latency_ms=30) does
        unit = _KEY_UNITS[key]
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
        if prefix in COUNT_PREFIXES and (not word or _KEYS[word] == metric):
            return metric, parse_count(m["num"] + prefix)
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
    row: Row | None = field(default=None, hash=False)  # the chosen stitch's row (its costs and measurements)
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
    rows = net.costs() if net is not None else read_rows(net_or_costs)
    if results is not None:
        rows = merge_rows(rows, read_rows(results), "the results")
    rows = network_rows(rows)  # zoo models in a results file are for comparison: never a choice
    if not rows:
        raise BudgetError("no stitches to select from")
    for name, bound in budget.limits():
        key = _METRICS[name][0]
        missing = [r for r in rows if r.value(key) is None]
        if missing:
            # `snnet profile` measures image networks only: a language model's networks have no latency or memory
            # snnet can measure, so sending its user there would send them to a refusal
            lm = getattr(net, "_format", "snnet") != "snnet"
            hint = ("pass results that hold it, or give a flops or params budget (FLOPs per generated token): "
                    "`snnet profile` measures image networks only" if lm and name in ("latency_ms", "memory_mb")
                    else "run `snnet profile` first (it measures this device) and pass its results.json"
                    if name in ("latency_ms", "memory_mb") else "pass results that hold it")
            raise BudgetError(f"a {name.split('_')[0]} budget needs the {key} of every stitch, but "
                              f"{len(missing)} of {len(rows)} have none (e.g. {missing[0].name!r}): {hint}")
        cheapest = min(rows, key=lambda r: (r.value(key), r.id))
        if bound < cheapest.value(key):
            raise BudgetError(f"budget {Budget(**{name: bound})} is below the cheapest stitch, "
                              f"{cheapest.name!r} (id {cheapest.id}) at {_METRICS[name][1](cheapest.value(key))}: "
                              "raise the budget")
    within = [r for r in rows if all(r.value(_METRICS[n][0]) <= b for n, b in budget.limits())]
    if not within:
        cheapest = {n: min(rows, key=lambda r: (r.value(_METRICS[n][0]), r.id)) for n, _ in budget.limits()}
        detail = "; ".join(f"the cheapest in {n.split('_')[0]} is {r.name!r} at {_METRICS[n][1](r.value(_METRICS[n][0]))}"
                           for n, r in cheapest.items())
        raise BudgetError(f"no stitch meets every bound of {budget} at once ({detail}): loosen one of them")
    # a language model's rows rank by bits per byte (lower is better), an image model's by top-1
    ranked_by = next((m for m in ("bpb", "acc1") if all(measured(r.value(m)) for r in within)), "flops")
    by_accuracy = ranked_by != "flops"
    if by_accuracy:
        best = max(within, key=lambda r: (better(ranked_by, r.value(ranked_by)), -r.flops, -r.id))
    else:
        # FLOPs, whatever is budgeted: they are exact (a measured latency is noisy) and the paper's frontier axis
        ranked_by = "flops"
        best = max(within, key=lambda r: (r.flops, r.params, -r.id))
    shown = ([f"{best.bpb:.4f} bits/byte"] if ranked_by == "bpb" else [f"top-1 {best.acc1:.2f}%"]) if by_accuracy else []
    shown += [_METRICS[n][1](best.value(_METRICS[n][0])) for n in _METRICS if best.value(_METRICS[n][0]) is not None]
    # a proxy because some candidates were measured and others not is said as such, not as "no measured accuracy"
    metric = "bpb" if any(r.value("bpb") is not None for r in within) else "acc1"
    unmeasured = [r for r in within if not measured(r.value(metric))]
    lack = ("no measured accuracy" if len(unmeasured) == len(within) else
            f"{len(unmeasured)} of the {len(within)} candidates {'has' if len(unmeasured) == 1 else 'have'} no measured "
            f"{'bits per byte' if metric == 'bpb' else 'top-1'} (e.g. {unmeasured[0].name!r})" if unmeasured else "")
    why = ("the best (lowest measured bits per byte)" if ranked_by == "bpb" else "the most accurate (measured top-1)"
           if by_accuracy else
           f"{lack}, so by proxy the one with the most FLOPs (more compute buys more "
           "accuracy along the SN-Net frontier)")
    reason = (f"{best.name} (id {best.id}): {why} of the {len(within)} of {len(rows)} stitches within "
              f"{budget}; it has {', '.join(shown)}")
    stitch = net.space[int(best.id)] if net is not None else None
    return Selection(int(best.id), best.name, budget, ranked_by, reason,
                     tuple(sorted(int(r.id) for r in within)), best, stitch)


