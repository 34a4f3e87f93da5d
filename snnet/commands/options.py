"""Options several commands share, and how they are read."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

__all__ = ["DEFAULT_ANCHORS", "AnchorsOpt", "ImgSizeOpt", "read_routes", "split_names"]

# The shipped Fashion-MNIST family: the default wherever anchors can be omitted.
DEFAULT_ANCHORS = "fmnist"

AnchorsOpt = Annotated[str, typer.Option(
    "--anchors", "-a", help="A family (fmnist, deit, swin, resnet, resnet18-swin_t, convnext) or comma-separated timm model names, in any order.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the anchors' own).")]


def split_names(anchors: str) -> list[str]:
    """``--anchors``: a family name (deit, swin, resnet, ...) or comma-separated model names."""
    from ..model import expand_family

    return expand_family(anchors)


def read_routes(path: "os.PathLike[str] | str") -> tuple[str, ...]:
    """``--routes``: the JSON ``snnet stitches --select klas --json`` prints (its ``routes``), a
    JSON list of route names, or a text file with one route name per line."""
    import json
    from pathlib import Path

    from ..errors import SnnetError

    p = Path(path)
    if not p.is_file():
        raise SnnetError(f"--routes {p}: no such file (write one with `snnet stitches --select klas --json > {p.name}`)")
    text = p.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        data = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if isinstance(data, dict):
        data = data.get("routes")
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise SnnetError(f"--routes {p}: expected a list of route names (or `snnet stitches --select klas --json` output)")
    return tuple(data)
