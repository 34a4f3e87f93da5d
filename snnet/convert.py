"""Bring an SN-Net trained with the authors' code (ziplab/SN-Net) into snnet's format.

The reference code saves ``{'model': state_dict}`` (DeiT, Swin, LeViT scripts) or
``{'state_dict': ...}`` (its timm ``train.py`` for ResNet and ResNet→Swin). Its state dict holds
the anchors as ``anchors.<i>.<the timm/Swin model's own keys>`` and the stitching layers as
``transform`` Linear/1x1-conv modules, indexed by the reference's own enumeration:

* plain ViTs (``stitching_deit``): ``stitch_layers.<pair>.<layer>.transform.{weight,bias}``,
  ``pair`` counting the anchor pairs it stitches, ``layer`` the sliding windows of paired
  stitching;
* Swin (``stitching_swin``): ``stitch_layers.<stage>.<pair>.<layer>.transform...`` for stages 0-2;
* ResNet / ResNet→Swin (``stitching_resnet_swin``): the same with ``<stage - 1>`` (stages 1-2)
  and 1x1 convolutions.

Where depths differ, the reference code numbers its layers by zipping its stitches with the
interpolated block map, so the stitch resuming at target block ``k`` uses layer
``map[k - 1]``; snnet gives each unpaired stitch its own layer, so such a layer is copied to
every snnet layer whose stitch used it: every stitch computes what it computed before.

Anchor weights go through timm's own loaders (``checkpoint_filter_fn`` turns Microsoft's Swin
layout, with patch merging at the end of a stage, into timm's). Keys that cannot be placed
are refused, by name; the only ones skipped are training-only state the reference leaves in
its checkpoints (split batch-norm's ``aux_bn`` copies, Swin's cached masks and indices).
"""

from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, reason

__all__ = ["ConversionReport", "convert_reference", "load_reference_state"]

# training-only entries of the reference's checkpoints: nothing in an eval network uses them
_SKIP = (re.compile(r"\.aux_bn\."), re.compile(r"relative_position_index$"), re.compile(r"attn_mask$"))
_ANCHOR_KEY = re.compile(r"^anchors\.(\d+)\.(.+)$")
_LAYER_KEY = re.compile(r"^stitch_layers\.((?:\d+\.)+)transform\.(weight|bias)$")


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion placed and skipped."""

    anchor_tensors: int
    reference_layers: int
    snnet_layers: int
    layout: str
    skipped: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())


def load_reference_state(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside a reference checkpoint file (``model`` / ``state_dict`` entry).

    Read with ``weights_only`` (the reference's ``args`` Namespace allowed); ``trust=True``
    unpickles anything, for files from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    try:
        if trust:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a file it cannot read
        hint = "" if trust else " (if it holds other Python objects and you trust its source, pass --trust-checkpoint)"
        raise CheckpointError(f"cannot read {path}: {reason(e)}{hint}") from e
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors under 'model' or 'state_dict'")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _layout(kinds: set[str]) -> str:
    if kinds == {"vit"}:
        return "deit"
    if kinds == {"swin"}:
        return "swin"
    if "resnet" in kinds and kinds <= {"resnet", "swin"}:
        return "resnet_swin"
    raise CheckpointError(f"the reference code has no SN-Net of {sorted(kinds)} anchors to convert from")


def _reference_layer(space: Any, stitch: Any, layout: str, ref: list[int]) -> str:
    """The reference's key prefix of the layer serving ``stitch`` (``ref[k]``: the reference's index
    of snnet's anchor ``k``; snnet orders anchors by cost, the reference as they were given)."""
    from .space import paired_pairs

    A, B = space.anchors[stitch.src], space.anchors[stitch.dst]
    stage = next(s for s in range(len(A.stages)) if sum(A.stages[:s]) < stitch.src_end <= sum(A.stages[:s + 1]))
    i, j = stitch.src_end - sum(A.stages[:stage]) - 1, stitch.dst_start - sum(B.stages[:stage])
    na, nb = A.stages[stage], B.stages[stage]
    if na == nb:
        groups = paired_pairs(na, space.config.kernel_size, space.config.stride)
        if layout != "deit":  # the hierarchical code keeps only the pairs that move forward in depth
            groups = [g for g in ([(a, b) for a, b in g if b > a] for g in groups) if g]
        layer = next(n for n, g in enumerate(groups) if (i, j) in g)
    elif na < nb:
        mapped = [k * na // nb for k in range(nb)]  # torch's nearest interpolation of na blocks onto nb
        if j < 1 or mapped[j] != i:
            raise CheckpointError(f"stitch {stitch.name} is not one of the reference's unpaired stitches")
        layer = mapped[j - 1]  # the reference zips its stitches with this map
    else:
        raise CheckpointError(f"stitch {stitch.name} goes from a deeper to a shallower stage, which the reference "
                              "code never builds")
    return _prefix(space, layout, stage, (ref[stitch.src], ref[stitch.dst]), layer)


def _prefix(space: Any, layout: str, stage: int, pair: tuple[int, int], layer: int) -> str:
    """The reference's key prefix of a stitching layer: its stage (hierarchical), pair and layer indices."""
    if layout == "deit":
        n = len(space.anchors)
        pairs = [(a, a + 1) for a in range(n - 1)] if space.config.nearest else list(itertools.combinations(range(n), 2))
        if pair not in pairs:
            raise CheckpointError(f"reference anchors {pair} are not stitched by the reference")
        return f"stitch_layers.{pairs.index(pair)}.{layer}."
    if pair[1] != pair[0] + 1:
        raise CheckpointError("the reference's hierarchical code stitches only neighbouring anchors")
    return f"stitch_layers.{stage if layout == 'swin' else stage - 1}.{pair[0]}.{layer}."


def _unused_reference_layers(space: Any, layout: str, ref: list[int]) -> set[str]:
    """Prefixes of layers the reference builds but none of its stitches uses: where depths differ it
    makes one layer per block of the shallower stage and numbers its stitches by the block map,
    which can skip some (e.g. 2 -> 3 blocks uses layer 0 only)."""
    dead = set()
    for a in range(len(space.anchors) - 1):
        A, B = space.anchors[a], space.anchors[a + 1]
        for stage in (s for s in A.stitch_stages if s in B.stitch_stages and s < len(B.stages)):
            na, nb = A.stages[stage], B.stages[stage]
            if na < nb:
                used = {k * na // nb for k in range(nb - 1)}  # map[k - 1] for k = 1 .. nb - 1
                dead |= {_prefix(space, layout, stage, (ref[a], ref[a + 1]), n) for n in set(range(na)) - used}
    return dead


def convert_reference(net: Any, state: dict[str, torch.Tensor], anchor_names: list[str]) -> ConversionReport:
    """Load a reference SN-Net ``state`` into ``net`` (built from ``anchor_names``, the reference's
    anchor order); raises :class:`CheckpointError` naming every key it cannot place."""
    from .anchors import AnchorSpec, create_anchor, split_model

    skipped = sorted(k for k in state if any(p.search(k) for p in _SKIP))
    pending = {k: v for k, v in state.items() if k not in skipped}
    layout = _layout({p.kind for p in net.anchors})
    order = {spec.name: k for k, spec in enumerate(net.specs) if spec is not None}
    if sorted(order) != sorted(anchor_names):
        raise CheckpointError(f"the network's anchors {sorted(order)} are not {sorted(anchor_names)}")
    ref = [anchor_names.index(spec.name) for spec in net.specs]

    # anchors: each through its timm model (and timm's own filter for older layouts), then split like the net's
    placed = 0
    for ref_index, name in enumerate(anchor_names):
        prefix = f"anchors.{ref_index}."
        own = {k[len(prefix):]: pending.pop(k) for k in [k for k in pending if k.startswith(prefix)]}
        k = order[name]
        spec = net.specs[k]
        model = create_anchor(AnchorSpec(spec.name, False, None, spec.kwargs))
        if net.anchors[k].kind == "swin":  # Microsoft's layout (patch merging at a stage's end) -> timm's
            from timm.models.swin_transformer import checkpoint_filter_fn

            own = checkpoint_filter_fn(own, model)
        result = model.load_state_dict(own, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"anchor {ref_index} ({name}) of the checkpoint does not fit: "
                + "; ".join(f"{what} {_few([prefix + key for key in keys])}" for what, keys in
                            (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys))
        net.anchors[k].load_state_dict(split_model(model).state_dict())
        placed += len(own)

    # stitching layers: every snnet layer from the reference layer its stitches used
    used: set[str] = set()
    for slot, layer in zip(net.space.layers, net.stitch_layers):
        sources = {_reference_layer(net.space, s, layout, ref) for s in net.space.layer_stitches(slot.index)}
        if len(sources) != 1:
            raise CheckpointError(f"snnet layer {slot.index} serves stitches that the reference gives different layers "
                                  f"({', '.join(sorted(sources))}); keep the reference's kernel_size/stride")
        src = sources.pop()
        for part, param in (("weight", layer.proj.weight), ("bias", layer.proj.bias)):
            key = src + "transform." + part
            if key not in state:
                raise CheckpointError(f"the checkpoint has no {key} for snnet stitching layer {slot.index}: was it "
                                      f"trained with other anchors or stitching options?")
            value = state[key]
            if value.numel() != param.numel():
                raise CheckpointError(f"{key} has shape {tuple(value.shape)}; snnet layer {slot.index} needs "
                                      f"{tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value.reshape(param.shape))  # a 1x1 conv and a Linear hold the same matrix
        used.add(src)
    layer_keys = [k for k in pending if _LAYER_KEY.match(k)]
    dead = _unused_reference_layers(net.space, layout, ref)
    unused = sorted(k for k in layer_keys if any(k.startswith(d) for d in dead))
    unplaced = [k for k in layer_keys if not any(k.startswith(u) for u in used | dead)]
    unplaced += [k for k in pending if k not in layer_keys]
    if unplaced:
        raise CheckpointError(f"cannot place {len(unplaced)} key(s) of the checkpoint in this network: {_few(sorted(unplaced))}")
    notes = []
    if unused:
        notes.append(f"{len(unused) // 2} reference stitching layer(s) that no stitch of the reference uses were left out "
                     f"({_few(unused)})")
    if layout == "deit":
        notes.append("the reference's stitched ViT routes skip the target anchor's final LayerNorm; snnet's apply it "
                     "(docs/differences.md): the anchors are exact, stitched routes may want a short fine-tune")
    return ConversionReport(placed, len(used), len(net.stitch_layers), layout, tuple(skipped), tuple(notes))


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
