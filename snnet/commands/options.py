"""Options several commands share, and how they are read."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

__all__ = ["DEFAULT_ANCHORS", "AnchorsOpt", "ImgSizeOpt", "split_names"]

# The shipped Fashion-MNIST family: the default wherever anchors can be omitted.
DEFAULT_ANCHORS = "fmnist"

AnchorsOpt = Annotated[str, typer.Option(
    "--anchors", "-a", help="A family (fmnist, deit, deit-distilled, eva02, swin, swinv2, convnext, levit, resnet, resnet18-swin_t, regnety, mobilenetv3: snnet.adapters.FAMILIES) or comma-separated timm model names, in any order.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the anchors' own).")]


def split_names(anchors: str) -> list[str]:
    """``--anchors``: a family name (deit, swin, resnet, ...) or comma-separated model names."""
    from ..model import expand_family

    return expand_family(anchors)
