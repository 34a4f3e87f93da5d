"""Plain-text tables and human-readable numbers, shared by every command that prints results."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

# what human() writes, read back: lower-case SI prefix -> factor (budgets and zoo filters parse counts with it)
COUNT_PREFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
# a plain decimal number as counts and budgets are written: 5, 5.5, .5, 1e9
NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_COUNT = re.compile(rf"\s*({NUMBER})\s*([kmgt]?)\s*")


def parse_count(text: str) -> float:
    """What :func:`human` writes, read back: ``"20G"`` -> 2e10, ``"5.5m"`` -> 5.5e6, ``"1e9"`` -> 1e9
    (SI prefixes K, M, G, T, either case). Raises ValueError for anything else."""
    m = _COUNT.fullmatch(text.lower())
    if m is None:
        raise ValueError(text)
    return float(m[1]) * COUNT_PREFIXES[m[2]]


def percentile(values: Iterable[float], q: float, *, nearest: bool = False) -> float:
    """The ``q``-quantile (0..1) of ``values``; nan when there are none.

    Interpolated between the two nearest values (numpy's default), or with ``nearest=True`` the
    nearest rank: the smallest value with at least a ``q`` share of the values at or below it, a
    latency that was actually observed (what a p95 checked against an SLO should be).
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan
    return float(np.quantile(v, q, method="inverted_cdf" if nearest else "linear"))


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (with an optional unit: '1.23 GFLOPs')."""
    units = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1.0, ""))
    for k, (div, suffix) in enumerate(units):
        if abs(n) >= div or div == 1.0:
            if k > 0 and abs(round(n / div, 0 if div == 1.0 else 2)) >= 1000:  # 999,999 prints 1.00M, not 1000.00K
                div, suffix = units[k - 1]
            text = f"{n / div:.0f}" if div == 1.0 else f"{n / div:.2f}"
            return f"{text}{' ' if unit else ''}{suffix}{unit}"
    raise AssertionError("unreachable: the last unit takes every number")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], formats: dict[str, Any] | None = None) -> str:
    """Render rows as an aligned text table.

    ``columns`` are (key, header) pairs; ``formats`` maps a key to a function that turns the
    value into text (default ``str``). Numbers are right-aligned, text left-aligned.
    """
    formats = formats or {}
    cells = [[formats.get(k, _default)(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    numeric = [all(_is_number(r.get(k)) for r in rows) if rows else False for k, _ in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([h for _, h in columns]), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _default(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def progress(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A progress bar with throughput and ETA (tqdm); a silent no-op bar when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)
