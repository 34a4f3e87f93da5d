"""Options several commands share, and how they are read."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

__all__ = ["DEFAULT_ANCHORS", "AnchorsOpt", "ImgSizeOpt", "split_ints", "split_names"]

# The shipped Fashion-MNIST family: the default wherever anchors can be omitted.
DEFAULT_ANCHORS = "fmnist"

AnchorsOpt = Annotated[str, typer.Option(
    "--anchors", "-a", help="A family (fmnist, deit, deit-distilled, eva02, swin, swinv2, convnext, levit, resnet, resnet18-swin_t, regnety, mobilenetv3: snnet.adapters.FAMILIES) or comma-separated timm model names, in any order.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the anchors' own).")]


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
