"""The language-model side of shared commands (``snnet stitches --anchors pythia``)."""

from __future__ import annotations

from typing import Any

from ..errors import SnnetError


def lm_space(names: list[str], img_size: int | None, select: str | None, context: int | None,
             space: dict[str, Any]) -> Any:
    """The stitch space of language-model anchors, built on the meta device (no weights, no download
    for the families snnet ships configs of), priced per generated token at ``context`` tokens."""
    from ..families.causal_lm import DEFAULT_CONTEXT, create_stitched_lm

    if img_size is not None:
        raise SnnetError("--img-size is for image models; a language model's FLOPs are per generated token at a "
                         "context length: use --context")
    if select is not None:
        raise SnnetError("--select klas scores image models on calibration images; list a language model's whole "
                         "space without it")
    return create_stitched_lm(names, device="meta", context=context or DEFAULT_CONTEXT, **space)
