"""Comparison networks as data: zoos of individually trained models, set beside the stitches.

SN-Net's claim is that one stitched network is worth as much as many individually trained ones; a
*zoo* is those many, as a table of models with their accuracy and cost. Two come with snnet:

- ``"timm-in1k"``: timm's ImageNet-1k models, top-1/top-5 from timm's published results and FLOPs
  counted by snnet's own counter at each model's evaluation size (``snnet/data_files/timm_in1k.json``,
  built by ``scripts/build_timm_zoo.py``; source and license in ``snnet/data_files/README.md``).
- ``"fmnist"``: Fashion-MNIST ViTs trained one by one with the shipped family's recipe
  (``snnet/weights/fmnist_zoo.json``, made by :data:`FMNIST_ZOO_SCRIPT`).

Any JSON file of the same shape is a zoo too: ``{"models": [{"name", "params", "flops", "acc1", ...}]}``,
where a model may report one accuracy per split instead (``"val_acc1"``, ``"test_acc1"``).

:func:`load_zoo` gives result rows of kind "zoo" (:class:`~snnet.results.Row`), which
:func:`~snnet.results.write_results` and :func:`~snnet.plot.plot_pareto` take beside the stitches;
:func:`read_zoo` gives the :class:`Zoo` itself (its models, provenance and license), and
:class:`ZooFilter` narrows one by family, image size, params or FLOPs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import ZooError
from .report import human, parse_count
from .results import Row

__all__ = ["FMNIST_ZOO_SCRIPT", "ZOOS", "Zoo", "ZooFilter", "load_zoo", "read_zoo", "zoo_path"]

_PACKAGE = Path(__file__).resolve().parent
# the zoos that ship with snnet, by name
ZOOS: dict[str, Path] = {
    "timm-in1k": _PACKAGE / "data_files" / "timm_in1k.json",
    "fmnist": _PACKAGE / "weights" / "fmnist_zoo.json",
}
# what makes a shipped zoo's file, named when it is missing
FMNIST_ZOO_SCRIPT = "scripts/train_fmnist_zoo.py"
_MAKERS = {"timm-in1k": "scripts/build_timm_zoo.py", "fmnist": FMNIST_ZOO_SCRIPT}
_SPLITS = ("val", "test", "train")


# ====================================================================================== filters


def _range(text: str | Sequence[float | None] | None, what: str, option: str) -> tuple[float | None, float | None]:
    """``"1G-20G"``, ``"1G-"``, ``"-20G"`` (or ``..`` for ``-``), or a (low, high) pair -> (low, high)."""
    if text is None:
        return (None, None)
    if not isinstance(text, str):
        low, high = text
        return (low, high)
    m = re.fullmatch(r"\s*([^-–]*?)\s*(?:-|–|\.\.)\s*([^-–]*?)\s*", text)
    try:
        if m is None or not (m[1] or m[2]):
            raise ValueError(text)
        low, high = (parse_count(m[1]) if m[1] else None), (parse_count(m[2]) if m[2] else None)
    except ValueError:
        raise ZooError(f"cannot read {option} {text!r}: give a range of {what} like 1G-20G, 1G- or -20G "
                       "(K, M, G, T prefixes)") from None
    if low is not None and high is not None and low > high:
        raise ZooError(f"{option} {text!r} is empty: its low end is above its high end")
    return (low, high)


def _words(text: str | Iterable[str] | None) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text or ())
    return tuple(w.strip().lower() for w in items if w.strip())


@dataclass(frozen=True)
class ZooFilter:
    """Which zoo models to keep: any of ``families``, any of ``img_sizes``, params and FLOPs within
    inclusive (low, high) bounds (None: unbounded). The empty filter keeps everything."""

    families: tuple[str, ...] = ()
    img_sizes: tuple[int, ...] = ()
    params: tuple[float | None, float | None] = (None, None)
    flops: tuple[float | None, float | None] = (None, None)

    @classmethod
    def parse(cls, family: str | Iterable[str] | None = None, img_size: str | int | Iterable[int] | None = None,
              params: str | Sequence[float | None] | None = None,
              flops: str | Sequence[float | None] | None = None) -> "ZooFilter":
        """From what a user types: ``family="deit,swin"``, ``img_size="224,384"`` (or 224),
        ``params="5M-100M"``, ``flops="1G-20G"`` (open ends: ``"1G-"``, ``"-20G"``)."""
        words = (str(img_size),) if isinstance(img_size, int) else _words(
            img_size if img_size is None or isinstance(img_size, str) else map(str, img_size))
        try:
            sizes = tuple(int(w) for w in words)
        except ValueError:
            raise ZooError(f"cannot read image sizes {img_size!r}: give pixels like 224 or 224,384") from None
        return cls(_words(family), sizes, _range(params, "parameters", "--zoo-params"),
                   _range(flops, "FLOPs", "--zoo-flops"))

    def accepts(self, m: Row) -> bool:
        def within(v: float, bounds: tuple[float | None, float | None]) -> bool:
            return (bounds[0] is None or v >= bounds[0]) and (bounds[1] is None or v <= bounds[1])

        return ((not self.families or str(m.value("family")).lower() in self.families)
                and (not self.img_sizes or m.value("img_size") in self.img_sizes)
                and within(m.params, self.params) and within(m.flops, self.flops))

    def __bool__(self) -> bool:
        return self != ZooFilter()

    def __str__(self) -> str:
        def bounds(b: tuple[float | None, float | None]) -> str:
            return f"{human(b[0]) if b[0] is not None else ''}-{human(b[1]) if b[1] is not None else ''}"

        parts = [f"family {','.join(self.families)}"] if self.families else []
        parts += [f"image size {','.join(map(str, self.img_sizes))}"] if self.img_sizes else []
        parts += [f"params {bounds(self.params)}"] if self.params != (None, None) else []
        parts += [f"FLOPs {bounds(self.flops)}"] if self.flops != (None, None) else []
        return "; ".join(parts) or "no filter"


# ====================================================================================== zoos


@dataclass(frozen=True)
class Zoo:
    """A zoo: its models (rows of kind "zoo", their ``family``, ``source`` and ``img_size`` in
    ``extra``), the split their accuracy is on, and where the numbers come from."""

    name: str
    models: tuple[Row, ...]
    path: Path
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)  # the file's header

    @property
    def license(self) -> str | None:
        src = self.meta.get("source")
        return self.meta.get("license") or (src.get("license") if isinstance(src, Mapping) else None)

    def families(self) -> dict[str, int]:
        """Family -> number of models, largest first."""
        counts: dict[str, int] = {}
        for m in self.models:
            family = str(m.value("family"))
            counts[family] = counts.get(family, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def select(self, where: ZooFilter) -> "Zoo":
        """The models ``where`` accepts. A family the zoo does not have, or a filter nothing passes, is an error."""
        known = {f.lower() for f in self.families()}
        for f in where.families:
            if f not in known:
                close = difflib.get_close_matches(f, sorted(known), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ZooError(f"zoo {self.name} has no family {f!r}.{hint} Its families: {', '.join(sorted(known))}")
        chosen = tuple(m for m in self.models if where.accepts(m))
        if not chosen:
            sizes = sorted({m.value("img_size") for m in self.models if m.value("img_size") is not None})
            span = (f"FLOPs {human(min(m.flops for m in self.models))}-{human(max(m.flops for m in self.models))}, "
                    f"params {human(min(m.params for m in self.models))}-{human(max(m.params for m in self.models))}"
                    + (f", image sizes {','.join(map(str, sizes))}" if sizes else ""))
            raise ZooError(f"no model of zoo {self.name} passes {where}: loosen the filters (it spans {span})")
        return replace(self, models=chosen)

    def rows(self) -> list[Row]:
        """The models as results rows of kind "zoo"."""
        return list(self.models)

    def describe(self) -> str:
        """One line: name, size, families, split, provenance and license."""
        fams = self.families()
        shown = ", ".join(f"{f} {n}" for f, n in list(fams.items())[:8]) + (", ..." if len(fams) > 8 else "")
        src = self.meta.get("source")
        where = str(self.path)
        if isinstance(src, Mapping) and src.get("repository"):  # a zoo file of one's own may name no commit
            where = str(src["repository"]) + (f"@{str(src['commit'])[:10]}" if src.get("commit") else "")
        return (f"zoo {self.name}: {len(self.models)} models, {len(fams)} families ({shown})"
                f"{f', {self.split} split' if self.split else ''}; from {where}"
                f"{f', license {self.license}' if self.license else ''}")


def zoo_path(zoo: str | os.PathLike) -> tuple[str, Path]:
    """(name, file) of a shipped zoo's name or of a zoo file's path. A missing file names what makes it."""
    if isinstance(zoo, str) and zoo in ZOOS:
        path = ZOOS[zoo]
        if not path.is_file():
            raise ZooError(f"the {zoo} zoo's table {path} is missing: it is made by `python {_MAKERS[zoo]}` "
                           "(run from the repository root)")
        return zoo, path
    path = Path(zoo)
    if not path.is_file():
        raise ZooError(f"no zoo {str(zoo)!r}: give {' or '.join(ZOOS)}, or the path of a zoo JSON file")
    return path.stem, path


def read_zoo(zoo: str | os.PathLike, split: str | None = None) -> Zoo:
    """A zoo by name (:data:`ZOOS`) or path. ``split`` picks ``<split>_acc1`` where models report one
    accuracy per split (default: test); a zoo with a single accuracy per model ignores it."""
    name, path = zoo_path(zoo)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path} is corrupt or not a zoo file ({e})") from e
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(m, dict) for m in entries):
        raise ZooError(f"{path} is not a zoo file: expected an object with a non-empty list of models")
    per_split = any(f"{s}_acc1" in m for m in entries for s in _SPLITS)
    if split is not None:  # the aliases snnet eval --split takes (validation, eval, ...) name the same splits
        from .data import _SPLIT_ALIASES

        split = _SPLIT_ALIASES.get(split, split)
    if per_split and split is not None and split not in _SPLITS:
        raise ZooError(f"zoo {name} reports accuracy per split: {split!r} is not one of {', '.join(_SPLITS)}")
    used = (split or "test") if per_split else None
    family = str(data.get("family") or name)
    images = data.get("split", {}).get(used) if used and isinstance(data.get("split"), dict) else data.get("images")
    models = []
    for k, m in enumerate(entries):
        try:
            models.append(_model(m, name, family, used, images))
        except (KeyError, ValueError, TypeError) as e:
            msg = f"no {e.args[0]}" if isinstance(e, KeyError) else str(e)
            raise ZooError(f"{path}: model {k} ({m.get('name', '?')}) is invalid: {msg}") from e
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ZooError(f"{path} lists model {next(n for n in names if names.count(n) > 1)!r} twice")
    return Zoo(name, tuple(models), path, used, {k: v for k, v in data.items() if k != "models"})


_OWN = {"name", "family", "params", "flops", "acc1", "acc5", "loss", "img_size", "images"}


def _model(m: Mapping[str, Any], source: str, family: str, split: str | None, images: Any) -> Row:
    """One model of a zoo file as a row of kind "zoo" (NaN where the zoo reports nothing)."""
    def acc(key: str) -> float | None:
        v = m.get(f"{split}_{key}", m.get(key)) if split else m.get(key)
        return None if v is None else float(v)

    acc1 = acc("acc1")
    if acc1 is None:
        raise KeyError(f"{split}_acc1" if split else "acc1")
    if not 0 <= acc1 <= 100:
        raise ValueError(f"top-1 {acc1} is not a percentage")
    params, flops = int(m["params"]), int(m["flops"])
    if params <= 0 or flops <= 0:
        raise ValueError("params and flops must be positive")
    own = {k for k in m if k in _OWN or re.fullmatch(rf"(?:{'|'.join(_SPLITS)})_(?:acc1|acc5|loss)", k)}
    info: dict[str, Any] = {"source": source, "family": str(m.get("family") or family)}
    if m.get("img_size") is not None:
        info["img_size"] = int(m["img_size"])
    extra = {k: v for k, v in m.items() if k not in own}
    if "source" in extra:  # "source" names the zoo (plots, results); a model's own source is kept beside it
        extra["model_source"] = extra.pop("source")
    if split:
        extra["split"] = split
    acc5, loss = acc("acc5"), acc("loss")
    return Row(None, str(m["name"]), flops, params, acc1, math.nan if acc5 is None else acc5,
               math.nan if loss is None else loss, int(m.get("images") or images or 0), False, kind="zoo",
               extra={**info, **extra})


def load_zoo(zoo: str | os.PathLike, split: str | None = None, *, where: ZooFilter | None = None,
             family: str | Iterable[str] | None = None, img_size: str | int | Iterable[int] | None = None,
             params: str | Sequence[float | None] | None = None,
             flops: str | Sequence[float | None] | None = None) -> list[Row]:
    """A zoo's models as results rows of kind "zoo", filtered: what the results files and plots take.

    ``load_zoo("fmnist", split="val")``; ``load_zoo("timm-in1k", family="deit,swin", img_size=224,
    flops="1G-20G")``. The keyword filters are read as :meth:`ZooFilter.parse` reads them; ``where``
    is a ready-made filter (it and the keywords cannot be combined).
    """
    keywords = ZooFilter.parse(family, img_size, params, flops)
    if where is not None and keywords:
        raise ValueError("give either where= or the keyword filters, not both")
    return read_zoo(zoo, split).select(where or keywords).rows()
