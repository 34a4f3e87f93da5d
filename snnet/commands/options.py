"""Options several commands share, and how they are read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

__all__ = ["DEFAULT_ANCHORS", "SUBSET_SEED", "AnchorsOpt", "ImgSizeOpt", "ZooFamilyOpt", "ZooFlopsOpt", "ZooImgSizeOpt",
           "ZooOpt", "ZooParamsOpt", "RoutesFile", "read_routes", "read_routes_file", "read_zoo_options", "split_ints",
           "split_names", "split_stitches"]

# The shipped Fashion-MNIST family: the default wherever anchors can be omitted.
DEFAULT_ANCHORS = "fmnist"

# The seed of what `snnet eval --limit` and --calib-images choose (snnet.data.spread_order: images; a language model's
# files, snnet.text.token_blocks): fixed, so results repeat
SUBSET_SEED = 0

AnchorsOpt = Annotated[str, typer.Option(
    "--anchors", "-a", help="A family (fmnist, fmnist-converged, deit, deit-distilled, eva02, swin, swinv2, convnext, levit, resnet, resnet18-swin_t, regnety, mobilenetv3: snnet.adapters.FAMILIES) or comma-separated timm model names, in any order. Language models: a family (gpt2, pythia, qwen2.5, smollm2, llama3.2) or comma-separated member names (pythia-160m,...), hub ids or local model folders.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the anchors' own).")]

# A zoo of individually trained networks to plot beside the stitches (snnet.zoo), and its filters.
ZooOpt = Annotated[Optional[str], typer.Option(
    "--zoo", help="Plot a zoo of individually trained networks beside the stitches: timm-in1k (timm's ImageNet "
                  "models), fmnist (the Fashion-MNIST zoo), or a zoo JSON file. Its rows go into the results with "
                  "kind 'zoo'.")]
ZooFamilyOpt = Annotated[Optional[str], typer.Option(
    "--zoo-family", help="Only these zoo families, comma-separated (timm-in1k: deit, vit, swin, resnet, convnext, "
                         "levit, efficientnet, mobilenet, regnet, ...).")]
ZooImgSizeOpt = Annotated[Optional[str], typer.Option(
    "--zoo-img-size", help="Only zoo models evaluated at these image sizes, e.g. 224 or 224,384.")]
ZooParamsOpt = Annotated[Optional[str], typer.Option(
    "--zoo-params", help="Only zoo models with parameters in this range, e.g. 5M-100M, 5M- or -100M.")]
ZooFlopsOpt = Annotated[Optional[str], typer.Option(
    "--zoo-flops", help="Only zoo models with FLOPs (multiply-accumulates) in this range, e.g. 1G-20G.")]


def split_names(anchors: str) -> list[str]:
    """``--anchors``: a family name (deit, swin, resnet, ...) or comma-separated model names."""
    from ..model import expand_family

    return expand_family(anchors)


def split_ints(text: str, option: str) -> list[int]:
    """A comma-separated list of positive integers (``--batch-sizes 1,2,4``)."""
    from ..errors import SnnetError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SnnetError(f"{option} takes comma-separated whole numbers >= 1 such as 1,2,4,8,16; got {text!r}")
    return values


def split_stitches(text: str | None) -> list[str] | None:
    """``--stitches``: comma-separated stitch ids or names; None (every stitch) when the option is not given."""
    from ..errors import SnnetError

    if text is None:
        return None
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise SnnetError(f"--stitches {text!r} names no stitch: give comma-separated ids or names")
    return keys


def read_zoo_options(zoo: str | None, family: str | None, img_size: str | None, params: str | None,
                     flops: str | None, split: str | None = None):
    """The :class:`~snnet.zoo.Zoo` the ``--zoo*`` options ask for (filtered), or None without ``--zoo``.

    Filters without ``--zoo`` are an error rather than silently ignored."""
    from ..errors import ZooError
    from ..zoo import ZooFilter, read_zoo

    where = ZooFilter.parse(family, img_size, params, flops)  # bad filter text fails even without a zoo
    if zoo is None:
        if where:
            raise ZooError("--zoo-family/--zoo-img-size/--zoo-params/--zoo-flops filter a zoo: add --zoo timm-in1k "
                           "(or fmnist, or a zoo file)")
        return None
    return read_zoo(zoo, split).select(where)


@dataclass(frozen=True)
class RoutesFile:
    """A ``--routes`` file read: its route names, and the cut they were chosen with."""

    path: str
    routes: tuple[str, ...]
    # `snnet stitches --select klas --json`'s "cut" (space.cut: what the routes' indices count, blocks or
    # sublayers); None for a plain list or text file, which is read with the run's own cut
    cut: str | None = None


def read_routes(path: "os.PathLike[str] | str") -> tuple[str, ...]:
    """``--routes``: the JSON ``snnet stitches --select klas --json`` prints (its ``routes``), a
    JSON list of route names, or a text file with one route name per line."""
    return read_routes_file(path).routes


def read_routes_file(path: "os.PathLike[str] | str") -> RoutesFile:
    """:func:`read_routes` with the cut the file records (``snnet stitches --select klas --json``'s)."""
    import json
    from pathlib import Path

    from ..config import CUTS
    from ..errors import SnnetError

    p = Path(path)
    if p.is_dir():
        raise SnnetError(f"--routes {p} is a folder: give the file `snnet stitches --select klas --json > routes.json` "
                         "wrote (or one route name per line)")
    if not p.is_file():
        raise SnnetError(f"--routes {p}: no such file (write one with `snnet stitches --select klas --json > {p.name}`)")
    try:
        text = p.read_text()
    except UnicodeDecodeError:  # a weights file or checkpoint given by mistake: a traceback before
        raise SnnetError(f"--routes {p} is not a text file: give the JSON `snnet stitches --select klas --json` wrote "
                         "(or one route name per line)") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    cut = None
    if isinstance(data, dict):
        data, cut = data.get("routes"), data.get("cut")
        if cut is not None and cut not in CUTS:
            raise SnnetError(f"--routes {p}: its cut {cut!r} is not one of {', '.join(CUTS)} (write the file again "
                             "with `snnet stitches --select klas --cut CUT --json`)")
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise SnnetError(f"--routes {p}: expected a list of route names (or `snnet stitches --select klas --json` output)")
    return RoutesFile(str(path), tuple(data), cut)


def say_skipped(dataset: object, what: str) -> None:
    """One line on stderr when unreadable images of ``what`` were left out (``--skip-bad-images``,
    ``data.skip_unreadable``): how many, the first and why, and how many are used."""
    from ..data import skipped_images

    skipped = skipped_images(dataset)  # type: ignore[arg-type]
    if skipped and int(os.environ.get("RANK", "0")) == 0:  # one message, not one per process
        path, reason = skipped[0]
        typer.echo(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} of {what}, first "
                   f"{path} ({reason}); using the other {len(dataset)}", err=True)  # type: ignore[arg-type]
