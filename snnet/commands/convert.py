"""``snnet convert``: an SN-Net trained with the authors' code, as a saved snnet network."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SnnetError


def convert(
    from_reference: Annotated[Path, typer.Option("--from-reference", help="A checkpoint saved by the authors' code (ziplab/SN-Net: snnet_deit.pth, snnet_swin.pth, resnet_18_50.pth, snnet_levit.pth; ziplab/SN-Netv2: snnetv2_deit3_s_l.pth, ...).")],
    anchors: Annotated[str, typer.Option("--anchors", "-a", help="Its anchors, in the reference's order: deit, swin, resnet, resnet18-swin_t, levit, or comma-separated timm names (SN-Netv2: deit3_small_patch16_224.fb_in22k_ft_in1k,deit3_large_patch16_224.fb_in22k_ft_in1k).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the converted network (config.json, model.safetensors).")],
    all_pairs: Annotated[bool, typer.Option("--all-pairs", help="The checkpoint stitched every pair of anchors (the reference's nearest_stitching=False, which also runs three-anchor routes).")] = False,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle any Python object in the file (only for files you trust).")] = False,
) -> None:
    """Convert a reference SN-Net checkpoint (anchors and stitching layers) into snnet's format.

    The converted network runs its routes as the reference does (route mode 'reference', saved in its
    config): its networks are the ones the authors measured. An SN-Netv2 checkpoint (two ViT anchors,
    small->large and large->small layers, low-rank) is recognised by its keys.
    """
    from ..commands.options import split_names
    from ..convert import convert_reference, load_reference_state
    from ..model import create_snnet

    _check_out(out)  # before reading a possibly large checkpoint
    names = split_names(anchors)
    state = load_reference_state(from_reference, trust=trust_checkpoint)
    heads = [v.shape[0] for k, v in state.items()
             if re.fullmatch(r"anchors\.0\.(head|head\.fc|head\.l|fc)\.weight", k)]
    # SN-Netv2's code keeps a bank of layers per direction: a second bank means large->small layers
    two_way = len(names) == 2 and any(k.startswith("stitch_layers.1.") for k in state) and not any(
        re.match(r"stitch_layers\.\d+\.\d+\.\d+\.transform", k) for k in state)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".transform.lora_A")}
    if len(ranks) > 1:
        raise SnnetError(f"{from_reference} holds low-rank stitching layers of ranks {sorted(ranks)}; snnet gives all "
                         "layers of a network one rank")
    net = create_snnet(names, num_classes=heads[0] if heads else None, nearest=not all_pairs, chains=all_pairs, two_way=two_way,
                       lora_rank=ranks.pop() if ranks else 0, route_mode="reference")
    report = convert_reference(net, state, names)
    net.save_pretrained(out)
    typer.echo(f"converted {from_reference} ({report.layout} layout): {report.anchor_tensors} anchor tensors, "
               f"{report.reference_layers} reference stitching layers into snnet's {report.snnet_layers}; "
               f"{len(net.space)} networks, run as the reference runs them; saved to {out}")
    if report.skipped:
        typer.echo(f"skipped {len(report.skipped)} entries that hold no learned state (split-BN aux copies, Swin "
                   f"masks/indices, LeViT attention-bias indices), e.g. {report.skipped[0]}")
    for note in report.notes:
        typer.echo(f"note: {note}")


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot receive the network, before any work: a file, a folder that already holds
    a network, or a place nothing can be written."""
    if out.exists() and not out.is_dir():
        raise SnnetError(f"--out {out} is a file; give a folder for the converted network")
    held = [name for name in ("config.json", "model.safetensors") if (out / name).exists()]
    if held:  # the weights alone too (a save interrupted before its config, or copied by hand): they would be replaced
        raise SnnetError(f"{out} already holds a saved network ({', '.join(held)}); choose another --out")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SnnetError(f"cannot write to {out}: {parent} is not a writable folder; choose another --out")
