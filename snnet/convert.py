"""Bring an SN-Net trained with the authors' code (ziplab/SN-Net, ziplab/SN-Netv2) into snnet's format.

The reference code saves ``{'model': state_dict}`` (DeiT, Swin, LeViT, SN-Netv2 scripts) or
``{'state_dict': ...}`` (its timm ``train.py`` for ResNet and ResNet→Swin). Its state dict holds
the anchors as ``anchors.<i>.<the anchor model's own keys>`` and the stitching layers as
``transform`` Linear/1x1-conv modules, indexed by the reference's own enumeration
(:mod:`snnet.reference` lists the folders and their commits):

* plain ViTs (``stitching_deit``): ``stitch_layers.<pair>.<layer>.transform.{weight,bias}``,
  ``pair`` counting the anchor pairs it stitches, ``layer`` the sliding windows of paired
  stitching;
* Swin (``stitching_swin``) and LeViT (``stitching_levit``): ``stitch_layers.<stage>.<pair>.<layer>``
  for the stages they stitch (Swin 0-2, LeViT 0-1);
* ResNet / ResNet→Swin (``stitching_resnet_swin``): the same with ``<stage - 1>`` (stages 1-2)
  and 1x1 convolutions;
* SN-Netv2 (``classification``): ``stitch_layers.<direction>.<position>.transform.{weight,bias,
  lora_A,lora_B}``, direction 0 small→large and 1 large→small, one low-rank layer per matched
  position (``lora_B @ lora_A`` scaled by 1/rank, snnet's ``lora_alpha`` 1).

Where depths differ, the SN-Net code numbers its layers by zipping its stitches with the
interpolated block map, so the stitch resuming at target block ``k`` uses layer ``map[k - 1]``;
snnet gives each unpaired stitch its own layer, so such a layer is copied to every snnet layer
whose stitch used it: every stitch computes what it computed before.

Anchor weights go through timm's own loaders where timm has one: ``checkpoint_filter_fn`` turns
Microsoft's Swin layout (patch merging at the end of a stage) and DeiT III's ``gamma_1/gamma_2``
into timm's; Facebook's LeViT layout (one flat ``blocks`` sequence, ``Linear_BN``'s ``c``/``bn``)
is renamed here (:func:`levit_names`). Keys that cannot be placed are refused, by name; the only
ones skipped are entries that hold no learned state (split batch-norm's ``aux_bn`` copies, used in
training only; Swin's cached masks and indices; LeViT's attention-bias index tables).

A converted network is built in the reference route mode (:class:`snnet.model.StitchedNet`): its
stitched routes run exactly as the reference's (the DeiT code ends them without the final
LayerNorm), so its networks are the ones the authors measured.
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

__all__ = ["ConversionReport", "convert_reference", "levit_names", "load_reference_state", "reference_layout"]

# entries of the reference's checkpoints that hold no learned state an eval network needs
_SKIP = (re.compile(r"\.aux_bn\."), re.compile(r"relative_position_index$"), re.compile(r"attn_mask$"),
         re.compile(r"attention_bias_idxs$"))
_LAYER_KEY = re.compile(r"^stitch_layers\.((?:\d+\.)+)transform\.(weight|bias|lora_A|lora_B)$")
# keys only a network saved by snnet has: its stitching layers' ``proj`` (the reference's are ``transform``)
_SNNET_KEY = re.compile(r"^stitch_layers\.\d+\.(proj\.|lora_a$|lora_b$)")


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
    unpickles anything, for files from a source you trust. A network or checkpoint saved by snnet
    itself is refused in one line: it needs no conversion.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a network saved by snnet, not a checkpoint of the authors' code: it needs "
                                  "no conversion (load it with snnet.load or --model)")
        raise CheckpointError(f"{path} is a folder; --from-reference takes the .pth file the authors' code saved")
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is a safetensors file, as snnet saves networks; the authors' code saves .pth "
                              "files (a network saved by snnet needs no conversion: load its folder with snnet.load)")
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
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(_SNNET_KEY.match(k) for k in state):
        raise CheckpointError(f"{path} was saved by snnet (its keys are snnet's, e.g. "
                              f"{next(k for k in state if _SNNET_KEY.match(k))}), not by the authors' code: it needs no "
                              "conversion (resume or load it with snnet)")
    return state


def reference_layout(net: Any) -> str:
    """Which reference folder builds an SN-Net like ``net`` (:func:`snnet.reference.layout_of`), or raise."""
    from .reference import layout_of

    kinds = {p.kind for p in net.anchors}
    layout = layout_of(kinds, net.space.config.two_way)
    if layout is None:
        raise CheckpointError(f"the reference code has no SN-Net of {sorted(kinds)} anchors"
                              + (" with SN-Netv2's two-way space" if net.space.config.two_way else "")
                              + " to convert from")
    return layout


# ------------------------------------------------------------------ anchors


def levit_names(model: torch.nn.Module) -> dict[str, str]:
    """timm's key -> Facebook's, for every entry of a timm LeViT's state dict.

    Facebook's LeViT (the reference's ``levit.py``) runs one flat ``blocks`` sequence: per stage,
    an attention and an MLP residual (``.m``) per block, then (between stages) an attention
    subsample and an MLP residual, which timm keeps as the next stage's ``downsample``; its
    ``Linear_BN`` / ``Conv2d_BN`` hold ``c`` and ``bn`` where timm's ``LinearNorm`` / ``ConvNorm``
    hold ``linear`` and ``bn``, its ``b16`` stem is a Sequential with activations between the
    convolutions (0, 2, 4, 6), its ``BN_Linear`` head ``bn`` and ``l``.
    """
    flat: dict[str, str] = {}  # timm module prefix -> Facebook's
    n = 0
    for s, stage in enumerate(model.stages):
        if s:
            flat[f"stages.{s}.downsample.attn_downsample."] = f"blocks.{n}."
            flat[f"stages.{s}.downsample.mlp."] = f"blocks.{n + 1}.m."
            n += 2
        for b in range(len(stage.blocks)):
            flat[f"stages.{s}.blocks.{b}.attn."] = f"blocks.{n}.m."
            flat[f"stages.{s}.blocks.{b}.mlp."] = f"blocks.{n + 1}.m."
            n += 2
    inner = [(r"^(q|proj)\.ln\.", r"\1.1."), (r"^ln1\.", "0."), (r"^ln2\.", "2."), (r"(^|\.)linear\.", r"\1c.")]
    out = {}
    for key in model.state_dict():
        m = re.match(r"stem\.conv(\d)\.(linear|bn)\.(.+)$", key)
        if m:
            out[key] = f"patch_embed.{2 * (int(m[1]) - 1)}.{'c' if m[2] == 'linear' else 'bn'}.{m[3]}"
            continue
        m = re.match(r"(head|head_dist)\.(linear|bn)\.(.+)$", key)
        if m:
            out[key] = f"{m[1]}.{'l' if m[2] == 'linear' else 'bn'}.{m[3]}"
            continue
        prefix = next((p for p in flat if key.startswith(p)), None)
        if prefix is not None:
            rest = key[len(prefix):]
            for pattern, repl in inner:
                rest = re.sub(pattern, repl, rest)
            out[key] = flat[prefix] + rest
    return out


def _anchor_state(kind: str, model: torch.nn.Module, own: dict[str, torch.Tensor],
                  label: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An anchor's checkpoint entries in its timm model's layout, and timm key -> checkpoint key for messages."""
    names = {k: k for k in own}
    if kind == "swin":  # Microsoft's layout (patch merging at a stage's end) -> timm's
        from timm.models.swin_transformer import checkpoint_filter_fn

        # timm's filter looks up the block of every relative-position table and raises AttributeError for a block
        # the model lacks (a deeper anchor's checkpoint): keep those out of it, to be refused as unexpected keys
        modules = dict(model.named_modules())
        stray = {k: v for k, v in own.items()
                 if k.endswith(".relative_position_bias_table") and k.rsplit(".", 1)[0] not in modules}
        kept = {k: v for k, v in own.items() if k not in stray}
        return {**_unresampled(kept, checkpoint_filter_fn(kept, model), {}, label), **stray}, {}
    if kind == "levit" and any(k.startswith("patch_embed.") for k in own):  # Facebook's layout -> timm's
        names = levit_names(model)
        to_timm = {fb: k for k, fb in names.items()}
        return {to_timm.get(k, k): v for k, v in own.items()}, names
    if kind == "vit" and any(re.search(r"\.gamma_\d$", k) for k in own):  # DeiT III's layer scale (SN-Netv2)
        from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

        renamed = {k: re.sub(r"gamma_([0-9])$", r"ls\1.gamma", k) for k in own}
        names = {v: k for k, v in renamed.items()}
        return _unresampled(own, vit_filter(own, model, adapt_layer_scale=True), names, label), names
    return own, names


def _unresampled(own: dict[str, torch.Tensor], out: dict[str, torch.Tensor], names: dict[str, str],
                 label: str) -> dict[str, torch.Tensor]:
    """``out``, timm's filter of ``own``, unless the filter resampled a tensor to the model's shape (position
    embedding, patch embedding, relative-position table): the anchor is then not the checkpoint's (another
    image or window size), and its network would not be the authors' one."""
    originals = {id(v) for v in own.values()}
    changed = [f"{label}{names.get(k, k)} {tuple(own[names.get(k, k)].shape) if names.get(k, k) in own else ''} -> "
               f"{tuple(v.shape)}" for k, v in out.items() if id(v) not in originals]
    if changed:
        raise CheckpointError(f"the checkpoint's {label.rstrip('.') or 'anchor'} is not this model: timm would resample "
                              f"{_few(changed)} to fit it (another image, patch or window size); give the anchors "
                              "the authors trained")
    return out


# ------------------------------------------------------------------ stitching layers


def _reference_layer(space: Any, stitch: Any, layout: str, ref: list[int]) -> str:
    """The SN-Net reference's key prefix of the layer serving ``stitch`` (``ref[k]``: the reference's
    index of snnet's anchor ``k``; snnet orders anchors by cost, the reference as they were given)."""
    from .space import paired_pairs

    A, B = space.anchors[stitch.src], space.anchors[stitch.dst]
    stage = next(s for s in range(len(A.stages)) if sum(A.stages[:s]) < stitch.src_end <= sum(A.stages[:s + 1]))
    i, j = stitch.src_end - sum(A.stages[:stage]) - 1, stitch.dst_start - sum(B.stages[:stage])
    na, nb = A.stages[stage], B.stages[stage]
    if na == nb:
        groups = paired_pairs(na, space.config.kernel_size, space.config.stride)
        if layout != "deit":  # the hierarchical code keeps only the pairs that move forward in depth
            groups = [g for g in ([(a, b) for a, b in g if b > a] for g in groups) if g]
        layer = next((n for n, g in enumerate(groups) if (i, j) in g), None)
        if layer is None:  # a network built with another rule (e.g. rule='window' on Swin: backward pairs)
            raise CheckpointError(f"stitch {stitch.name} is not one of the reference's stitches (its {layout} code "
                                  "stitches forward in depth only): build the network with the reference's stitching "
                                  "options (the defaults)")
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
    return f"stitch_layers.{stage - 1 if layout == 'resnet_swin' else stage}.{pair[0]}.{layer}."


def _two_way_layer(space: Any, slot: Any, ref: list[int]) -> str:
    """SN-Netv2's key prefix of the layer of ``slot``: its direction's bank (the reference's index of the
    anchor the layer leaves) and its matched position (the small anchor's blocks at the cut, minus one)."""
    small = min(range(len(space.anchors)), key=lambda k: space.anchors[k].depth)
    position = slot.joins[0][0] if slot.src == small else slot.joins[0][1]
    return f"stitch_layers.{ref[slot.src]}.{position - 1}."


def _unused_reference_layers(space: Any, layout: str, ref: list[int]) -> set[str]:
    """Prefixes of layers the reference builds but none of its stitches uses: where depths differ the
    SN-Net code makes one layer per block of the shallower stage and numbers its stitches by the block
    map, which can skip some (e.g. 2 -> 3 blocks uses layer 0 only); SN-Netv2's code builds a
    small->large layer after the small anchor's last block, which no network runs."""
    if layout == "snnetv2":
        small = min(range(len(space.anchors)), key=lambda k: space.anchors[k].depth)
        return {f"stitch_layers.{ref[small]}.{space.anchors[small].depth - 1}."}
    dead = set()
    for a in range(len(space.anchors) - 1):
        A, B = space.anchors[a], space.anchors[a + 1]
        for stage in (s for s in A.stitch_stages if s in B.stitch_stages and s < len(B.stages)):
            na, nb = A.stages[stage], B.stages[stage]
            if na < nb:
                used = {k * na // nb for k in range(nb - 1)}  # map[k - 1] for k = 1 .. nb - 1
                dead |= {_prefix(space, layout, stage, (ref[a], ref[a + 1]), n) for n in set(range(na)) - used}
    return dead


def _copy_layer(layer: Any, state: dict[str, torch.Tensor], src: str, index: int) -> None:
    """Copy the reference layer at key prefix ``src`` into snnet stitching layer ``layer`` (number ``index``)."""
    low_rank = f"{src}transform.lora_A" in state
    if low_rank != bool(layer.rank):
        raise CheckpointError(f"{src}transform is {'low-rank (lora_A/lora_B)' if low_rank else 'a plain layer'} but snnet "
                              f"layer {index} is {'low-rank' if layer.rank else 'plain'}: build the network with "
                              f"lora_rank={state[src + 'transform.lora_A'].shape[0] if low_rank else 0}")
    params = [("weight", layer.proj.weight), ("bias", layer.proj.bias)]
    if low_rank:
        params += [("lora_A", layer.lora_a), ("lora_B", layer.lora_b)]
    for part, param in params:
        key = src + "transform." + part
        if key not in state:
            raise CheckpointError(f"the checkpoint has no {key} for snnet stitching layer {index}: was it "
                                  f"trained with other anchors or stitching options?")
        value = state[key]
        if value.numel() != param.numel():
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}; snnet layer {index} needs {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.reshape(param.shape))  # a 1x1 conv and a Linear hold the same matrix


# ------------------------------------------------------------------ the conversion


def convert_reference(net: Any, state: dict[str, torch.Tensor], anchor_names: list[str]) -> ConversionReport:
    """Load a reference SN-Net ``state`` into ``net`` (built from ``anchor_names``, the reference's
    anchor order); raises :class:`CheckpointError` naming every key it cannot place."""
    from . import adapters  # noqa: F401  (registers snnet's adapters: the command line imports the package without them)
    from .anchors import AnchorSpec, create_anchor, split_model
    from .reference import SKIPS_FINAL_NORM, reference_ids

    skipped = sorted(k for k in state if any(p.search(k) for p in _SKIP))
    pending = {k: v for k, v in state.items() if k not in skipped}
    layout = reference_layout(net)
    order = {spec.name: k for k, spec in enumerate(net.specs) if spec is not None}
    if sorted(order) != sorted(anchor_names):
        raise CheckpointError(f"the network's anchors {sorted(order)} are not {sorted(anchor_names)}")
    ref = [anchor_names.index(spec.name) for spec in net.specs]
    held = {int(m[1]) for k in pending if (m := re.match(r"anchors\.(\d+)\.", k))}
    if held and max(held) >= len(anchor_names):  # before the layers: they would be read as another space's
        raise CheckpointError(f"the checkpoint holds {max(held) + 1} anchors (anchors.0 to anchors.{max(held)}) but "
                              f"{len(anchor_names)} were given ({', '.join(anchor_names)}): give all of them, in the "
                              "reference's order")

    # anchors: each through its timm model (and timm's own filter for older layouts), then split like the net's
    placed = 0
    for ref_index, name in enumerate(anchor_names):
        prefix = f"anchors.{ref_index}."
        own = {k[len(prefix):]: pending.pop(k) for k in [k for k in pending if k.startswith(prefix)]}
        k = order[name]
        spec = net.specs[k]
        model = create_anchor(AnchorSpec(spec.name, False, None, spec.kwargs))
        own, names = _anchor_state(net.anchors[k].kind, model, own, prefix)
        expected = model.state_dict()
        wrong = [f"{prefix}{names.get(key, key)} {tuple(v.shape)} (needs {tuple(expected[key].shape)})"
                 for key, v in own.items() if key in expected and v.shape != expected[key].shape]
        missing = [key for key in expected if key not in own]
        unexpected = [key for key in own if key not in expected]
        if missing or unexpected or wrong:  # load_state_dict raises a multi-line RuntimeError on a wrong shape
            raise CheckpointError(
                f"anchor {ref_index} ({name}) of the checkpoint does not fit: "
                + "; ".join(f"{what} {_few(keys)}" for what, keys in
                            (("missing", [prefix + names.get(key, key) for key in missing]),
                             ("unexpected", [prefix + names.get(key, key) for key in unexpected]),
                             ("wrong shape", wrong)) if keys))
        model.load_state_dict(own)
        net.anchors[k].load_state_dict(split_model(model).state_dict())
        placed += len(own)

    # stitching layers: every snnet layer from the reference layer its stitches used
    used: set[str] = set()
    for slot, layer in zip(net.space.layers, net.stitch_layers):
        if layout == "snnetv2":
            src = _two_way_layer(net.space, slot, ref)
        else:
            # a three-anchor route (chains) reuses the layers of two-anchor stitches: those say which layer it is
            sources = {_reference_layer(net.space, s, layout, ref) for s in net.space.layer_stitches(slot.index)
                       if len(s.segments) == 2}
            if len(sources) != 1:
                raise CheckpointError(f"snnet layer {slot.index} serves stitches that the reference gives different "
                                      f"layers ({', '.join(sorted(sources))}); keep the reference's kernel_size/stride")
            src = sources.pop()
        _copy_layer(layer, state, src, slot.index)
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
        notes.append(f"{len({k.rsplit('.', 2)[0] for k in unused})} reference stitching layer(s) that no network of the "
                     f"reference runs were left out ({_few(unused)})")
    ids = reference_ids(net.space, {p.kind for p in net.anchors}, [order[n] for n in anchor_names])
    if len(ids) != len(net.space):
        notes.append(f"{len(net.space) - len(ids)} of the {len(net.space)} networks are not among the reference's")
    if layout in SKIPS_FINAL_NORM and net.route_mode != "reference":
        notes.append("this network's stitched ViT routes apply the target's final LayerNorm, which the reference's skip "
                     "(docs/differences.md): build it with route_mode='reference' to run the reference's networks")
    return ConversionReport(placed, len(used), len(net.stitch_layers), layout, tuple(skipped), tuple(notes))


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
