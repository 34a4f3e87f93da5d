"""``snnet convert``: an SN-Net trained with the authors' code, as a saved snnet network."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SnnetError


def convert(
    from_reference: Annotated[Path, typer.Option("--from-reference", help="A checkpoint saved by the authors' SN-Net code (ziplab/SN-Net: snnet_deit.pth, snnet_swin.pth, resnet_18_50.pth, ...).")],
    anchors: Annotated[str, typer.Option("--anchors", "-a", help="Its anchors, in the reference's order: deit, swin, resnet, resnet18-swin_t, or comma-separated timm names.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the converted network (config.json, model.safetensors).")],
    all_pairs: Annotated[bool, typer.Option("--all-pairs", help="The checkpoint stitched every pair of anchors (the reference's nearest_stitching=False).")] = False,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle any Python object in the file (only for files you trust).")] = False,
) -> None:
    """Convert a reference SN-Net checkpoint (anchors and stitching layers) into snnet's format."""
    from ..commands.options import split_names
    from ..convert import convert_reference, load_reference_state
    from ..model import create_snnet

    if (out / "config.json").exists():
        raise SnnetError(f"{out} already holds a saved network; choose another --out")
    names = split_names(anchors)
    state = load_reference_state(from_reference, trust=trust_checkpoint)
    heads = [v.shape[0] for k, v in state.items() if re.fullmatch(r"(module\.)?anchors\.0\.(head|head\.fc|fc)\.weight", k)]
    net = create_snnet(names, num_classes=heads[0] if heads else None, nearest=not all_pairs)
    report = convert_reference(net, state, names)
    net.save_pretrained(out)
    typer.echo(f"converted {from_reference} ({report.layout} layout): {report.anchor_tensors} anchor tensors, "
               f"{report.reference_layers} reference stitching layers into snnet's {report.snnet_layers}; "
               f"{len(net.space)} networks; saved to {out}")
    if report.skipped:
        typer.echo(f"skipped {len(report.skipped)} training-only entries (split-BN aux copies, Swin masks/indices), "
                   f"e.g. {report.skipped[0]}")
    for note in report.notes:
        typer.echo(f"note: {note}")
