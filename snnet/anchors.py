"""Anchors: pretrained models split into stem, blocks and head.

SN-Net cuts every anchor between its blocks. An :class:`Adapter` is the only code that knows
a kind of model's internals: it turns a model into :class:`AnchorParts` — a stem (input to
the first block's input), a flat list of blocks, and a head (last block's output to logits).
Everything else in snnet (stitch space, stitching layers, FLOPs, export) works on parts alone,
so supporting a new kind of model means writing one adapter and registering it.

Blocks are *units*: anything a hierarchical model does between two blocks (Swin's patch
merging, a ResNet stage's downsampling) is folded into the block that follows it, so the
activation between unit ``k-1`` and unit ``k`` is always a well-defined tensor. A ViT may also be
cut inside its blocks (``cut="sublayer"``, :func:`cut_parts`): each block becomes two units, its
attention and its MLP, each with the residual around it, as the transformer papers call them
sublayers.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from .config import CUTS
from .errors import NotStitchableError, SnnetError, UnknownModelError

# The layouts an activation between two blocks can have. The stitching layer maps channels
# at every position, so it only needs to know where the channel axis is.
#   tokens: (B, N, C)   ViT/DeiT
#   nhwc:   (B, H, W, C) timm's Swin
#   nchw:   (B, C, H, W) CNNs
LAYOUTS = ("tokens", "nhwc", "nchw")


@dataclass(frozen=True)
class ActivationSpec:
    """Shape of one activation between blocks, without the batch dimension.

    ``spatial`` is the token count for ``tokens`` and ``(H, W)`` for feature maps; two
    activations can be stitched when their positions line up one to one. ``prefix`` is how
    many of the tokens are not patches (class, distillation, register tokens): a position of
    one anchor can only stand for the same kind of position in another.
    """

    layout: str
    channels: int
    spatial: tuple[int, ...]
    prefix: int = 0

    @classmethod
    def of(cls, layout: str, t: torch.Tensor, prefix: int = 0) -> "ActivationSpec":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        shape = tuple(t.shape[1:])
        if layout == "nchw":
            return cls(layout, shape[0], shape[1:])
        return cls(layout, shape[-1], shape[:-1], prefix if layout == "tokens" else 0)

    @property
    def positions(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def __str__(self) -> str:
        dims = "x".join(str(s) for s in self.spatial)
        return f"{self.layout}[{dims}, C={self.channels}]"


def _feeds(src_layout: str, dst_layout: str, src_prefix: int = 0, dst_prefix: int = 0) -> str | None:
    """Why activations of one layout (and extra-token count) cannot feed another's, or None.

    Feature maps (NCHW, NHWC) feed each other through a permute. Tokens are refused from and
    into maps: a ViT's class token has no counterpart in a feature map, and snnet does not
    invent one (the paper stitches CNNs only into hierarchical transformers).
    """
    if (src_layout == "tokens") != (dst_layout == "tokens"):
        if dst_layout == "tokens":
            return ("a feature map cannot feed tokens, nor tokens a feature map (stitch a CNN into a model that keeps "
                    "feature maps: Swin, ConvNeXt, another CNN)")
        return ("tokens cannot feed a feature map, nor a feature map tokens (stitch a transformer on tokens only with "
                "another one on tokens)")
    if src_prefix != dst_prefix:
        return (f"the tokens carry {src_prefix} vs {dst_prefix} extra tokens besides the patches (class, distillation, "
                "register tokens): stitch anchors with the same extra tokens, e.g. distilled DeiTs only with distilled ones")
    return None


def stitchable(src: ActivationSpec, dst: ActivationSpec) -> str | None:
    """Why ``src`` cannot be mapped onto ``dst`` position by position, or None if it can."""
    why = _feeds(src.layout, dst.layout, src.prefix, dst.prefix)
    if why is not None:
        return why
    if src.spatial != dst.spatial:
        what = "token counts" if src.layout == "tokens" else "spatial sizes"
        return f"{what} differ ({src} vs {dst})"
    return None


class AnchorParts(nn.Module):
    """One anchor as stem → blocks → head, the form every other module of snnet works on.

    The parts share their parameters with the model they were split from (no copy). ``stages``
    gives the number of blocks in each stage (one stage for a plain ViT); ``stitch_stages`` the
    stages in which the paper's recipe stitches this kind of model by default, and
    ``stitch_rule`` how block pairs are enumerated in them (``snnet.space.RULES``);
    ``prefix_tokens`` how many leading tokens are not patches (ViT's class token: 1); ``cut``
    what a unit in ``blocks`` is, a whole block or a sublayer (:func:`cut_parts`).
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        *,
        layout: str,
        stages: Sequence[int] | None = None,
        stitch_stages: Sequence[int] | None = None,
        kind: str = "custom",
        data_config: dict[str, Any] | None = None,
        stitch_rule: str = "window",
        prefix_tokens: int = 0,
        cut: str = "block",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.layout = layout
        self.stages = tuple(stages) if stages is not None else (len(self.blocks),)
        if sum(self.stages) != len(self.blocks):
            raise ValueError(f"stages {self.stages} do not add up to {len(self.blocks)} blocks")
        self.stitch_stages = tuple(stitch_stages) if stitch_stages is not None else tuple(range(len(self.stages)))
        self.stitch_rule = stitch_rule
        self.kind = kind
        self.prefix_tokens = prefix_tokens if layout == "tokens" else 0
        self.data_config = dict(data_config or {})
        self.cut = cut  # what a unit is: a block, or a sublayer (see cut_parts)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def stage_ranges(self) -> list[range]:
        """Block indices of each stage."""
        out, start = [], 0
        for n in self.stages:
            out.append(range(start, start + n))
            start += n
        return out

    def run(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` on an activation."""
        for blk in self.blocks[start:stop]:
            h = blk(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run(self.stem(x)))

    @torch.no_grad()
    def probe(self, input_size: tuple[int, ...]) -> tuple[list[ActivationSpec], int]:
        """Spec of the input of every block plus the last block's output (``depth + 1``
        specs), and the number of outputs of the head.

        Found by running one zero image, so it holds for any kind of model.
        """
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            h = self.stem(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
            specs = [ActivationSpec.of(self.layout, h, self.prefix_tokens)]
            for blk in self.blocks:
                h = blk(h)
                specs.append(ActivationSpec.of(self.layout, h, self.prefix_tokens))
            out = self.head(h)
        finally:
            self.train(was_training)
        return specs, int(out.shape[-1])


@dataclass(frozen=True)
class Route:
    """The modules (no copies) that one stitch runs, by segment: what a network's forward runs
    (:meth:`snnet.model.StitchedBase.route`) and what an exported stitch holds
    (:class:`snnet.deploy.export.StitchRoute`)."""

    stem: nn.Module
    blocks: tuple[tuple[nn.Module, ...], ...]  # the blocks of each segment
    layers: tuple[nn.Module, ...]  # the stitching layer after each segment but the last
    head: nn.Module

    def modules(self) -> tuple[nn.Module, ...]:
        """Everything in the order forward calls it: stem, blocks, layer, blocks, ..., head."""
        out: list[nn.Module] = [self.stem]
        for k, blocks in enumerate(self.blocks):
            if k:
                out.append(self.layers[k - 1])
            out += blocks
        return (*out, self.head)


# --------------------------------------------------------------------------- adapters


def timm_class(path: str) -> type:
    """A timm model class from ``"module.Class"`` (a module under ``timm.models``)."""
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"timm.models.{module}"), name)


class Adapter:
    """Knows how one kind of model splits into :class:`AnchorParts`.

    Subclass, name the timm classes it handles in ``model_classes`` (or override
    :meth:`matches`), implement :meth:`split`, and decorate with :func:`register_adapter`;
    nothing else in snnet needs to change.

    An adapter matches its classes *exactly*: a subclass may change the forward pass (DeiT's
    distilled ViT adds a token and a head), and splitting it as its base would give parts
    that silently compute something else. Such a subclass is refused by :func:`split_model`
    until an adapter lists it.
    """

    kind: ClassVar[str] = "?"
    model_classes: ClassVar[tuple[str, ...]] = ()  # "module.Class" under timm.models, matched exactly

    @classmethod
    def classes(cls) -> tuple[type, ...]:
        return tuple(timm_class(p) for p in cls.model_classes)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model) in cls.classes()

    @classmethod
    def split(cls, model: nn.Module) -> AnchorParts:
        raise NotImplementedError


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available to :func:`split_model`."""
    _ADAPTERS.append(cls)
    return cls


def adapters() -> list[type[Adapter]]:
    return list(_ADAPTERS)


def _overridden(model_cls: type, base: type) -> list[str]:
    """Methods of ``base`` that ``model_cls`` (a subclass) redefines."""
    names: set[str] = set()
    for c in model_cls.__mro__:
        if c is base:
            break
        names |= {k for k, v in vars(c).items() if callable(v) and hasattr(base, k) and not k.startswith("__")}
    return sorted(names)


def split_model(model: nn.Module) -> AnchorParts:
    """Split a model with the first adapter that knows its kind.

    A subclass of a class an adapter knows is refused here, before anything runs: the
    adapter reproduces only its own classes' forward passes.
    """
    if isinstance(model, AnchorParts):
        return model
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return _holding_all(model, adapter.split(model), adapter.kind)
    name = type(model).__name__
    for adapter in _ADAPTERS:
        base = next((c for c in adapter.classes() if isinstance(model, c)), None)
        if base is not None:
            changed = _overridden(type(model), base)
            what = f"redefines {', '.join(changed)}" if changed else "may build different modules"
            raise NotStitchableError(
                f"{name} subclasses timm's {base.__name__} and {what}; snnet's {adapter.kind} adapter reproduces "
                f"only {base.__name__}'s own forward, so it would split {name} wrongly. Register an Adapter that "
                "lists this class (see snnet.anchors.Adapter).")
    known = ", ".join(a.kind for a in _ADAPTERS)
    raise NotStitchableError(
        f"no adapter knows how to split {name} models; snnet knows: {known}. "
        "Pass an AnchorParts(stem, blocks, head, layout=...) built by hand, or register an "
        "Adapter for this kind of model (see snnet.anchors.Adapter)."
    )


def _holding_all(model: nn.Module, parts: AnchorParts, kind: str) -> AnchorParts:
    """``parts``, once sure they hold every parameter and buffer of ``model``.

    A stem or head runs the model's own code (:class:`TimmPart`), which may read any of its
    modules; one the parts do not hold would be neither saved, moved to a device nor trained.
    A timm version that adds such a module is refused here, by name, rather than run half-moved.
    """
    held = {id(t) for t in [*parts.parameters(), *parts.buffers()]}
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in held]
    if missing:
        raise NotStitchableError(
            f"snnet's {kind} adapter leaves {len(missing)} weight(s) of {type(model).__name__} in no part "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): this build or timm version has "
            "modules the adapter does not know; build the model with its defaults or update the adapter")
    return parts


def _data_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "num_classes")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in keys}


class TimmPart(nn.Module):
    """The stem or the head of a timm model: the model's own methods, run on the model itself.

    It holds the timm model it came from, as PEFT's wrappers hold their base model, and computes
    ``fn(model, x)`` (``model._pos_embed``, ``model.forward_head``...): timm's code runs with its
    own ``self``, whatever attributes a timm version reads, and nothing is copied or re-bound. The
    model is held, not registered, because it also holds the blocks, which are
    :class:`AnchorParts`'s. What the piece computes with (``names``) is registered on it under the
    model's own names, shared, not copied: the piece's parameters, and state-dict keys such as
    ``stem.patch_embed.proj.weight`` or ``head.norm.weight``. :func:`split_model` checks that an
    anchor's parts hold every parameter and buffer of its model, so no piece computes with weights
    that nothing saves, moves or trains.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.__dict__["model"] = model  # held, not registered (see above)
        self.names = tuple(n for n in names if isinstance(getattr(model, n, None), (nn.Module, nn.Parameter)))
        for n in self.names:
            setattr(self, n, getattr(model, n))
        self.fn = fn

    def _repoint(self) -> None:
        # The piece's parameters are the model's; where something replaced one on the piece (a load with
        # assign=True, a conversion that makes new parameters), the model computes with the new one.
        for n, p in self._parameters.items():
            if getattr(self.model, n) is not p:
                setattr(self.model, n, p)

    def _apply(self, fn: Any, recurse: bool = True) -> "TimmPart":
        super()._apply(fn, recurse)
        self._repoint()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._repoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the model's own code reads its training flag (a distilled head returns both logits only in
        # training); the model is not registered, so train()/eval() reach the piece, not it
        self.model.training = self.training
        return self.fn(self.model, x)

    def __deepcopy__(self, memo: dict[int, Any]) -> "TimmPart":
        # A copy holds a copy of the model with this piece's weights and the model's settings only:
        # copying all of it would copy every block of the anchor (an exported route would carry them).
        shell = copy.copy(self.model)
        for slot in ("_modules", "_parameters", "_buffers"):
            setattr(shell, slot, {n: v for n, v in getattr(self.model, slot).items() if n in self.names})
        twin = TimmPart(copy.deepcopy(shell, memo), self.names, self.fn)
        twin.training = self.training
        return twin

    def without(self, name: str, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> "TimmPart":
        """Another piece of the same model, computed by ``fn`` with all this one holds but ``name``."""
        return TimmPart(self.model, [n for n in self.names if n != name], fn)

    def extra_repr(self) -> str:
        return f"{type(self.model).__name__}: {getattr(self.fn, '__name__', self.fn)}"


def vit_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ViT's forward_features up to the first block (its own ``_pos_embed``)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def norm_then_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final norm of forward_features, then the model's own forward_head."""
    return model.forward_head(model.norm(x))


def timm_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own forward_head."""
    return model.forward_head(x)


def without_final_norm(head: nn.Module) -> nn.Module | None:
    """A ViT-like head without the final norm of forward_features (the model's forward_head alone),
    sharing the head's modules; None when the head has no such norm.

    The reference DeiT code ends its stitched routes so (``forward_head`` on the target's last
    block output), while the anchors run whole apply the norm: :mod:`snnet.model`'s reference
    route mode uses this head on stitched routes.
    """
    if not (isinstance(head, TimmPart) and head.fn is norm_then_head):
        return None
    return head.without("norm", timm_head)


_VIT_STEM = ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre")
_VIT_HEAD = ("norm", "attn_pool", "fc_norm", "head_drop", "head")


@register_adapter
class ViTAdapter(Adapter):
    """timm's VisionTransformer (ViT, DeiT, the shipped Fashion-MNIST family) and DeiT's
    distilled ViT: a distillation token after the class token, and two heads whose outputs
    are averaged, as timm does at inference."""

    kind = "vit"
    model_classes = ("vision_transformer.VisionTransformer", "deit.VisionTransformerDistilled")

    @classmethod
    def split(cls, model: nn.Module) -> AnchorParts:
        distilled = hasattr(model, "dist_token")
        stem = TimmPart(model, _VIT_STEM + (("dist_token",) if distilled else ()), vit_stem)
        head = TimmPart(model, _VIT_HEAD + (("head_dist",) if distilled else ()), norm_then_head)
        return AnchorParts(stem, list(model.blocks), head, layout="tokens", kind=cls.kind,
                           data_config=_data_config(model), prefix_tokens=model.num_prefix_tokens)


_SUBLAYERS = (("norm1", "attn", "ls1", "drop_path1"), ("norm2", "mlp", "ls2", "drop_path2"))


class Sublayer(nn.Module):
    """One residual sublayer of a timm ViT block: ``x + drop_path(ls(fn(norm(x))))``, with ``fn``
    its attention or its MLP.

    It registers the block's own modules under the block's names (shared, not copied), so a
    sublayer's state-dict keys are the block's (``norm1.weight``, ``attn.qkv.weight``...) and the two
    sublayers of a block hold all of it between them. The computation is timm's ``Block.forward``
    split at its one internal residual sum; :func:`cut_parts` refuses block classes it does not know.
    """

    def __init__(self, block: nn.Module, names: tuple[str, str, str, str]) -> None:
        super().__init__()
        self.names = names
        for n in names:
            setattr(self, n, getattr(block, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, fn, scale, drop = (getattr(self, n) for n in self.names)
        return x + drop(scale(fn(norm(x))))

    def extra_repr(self) -> str:
        return self.names[1]


def cut_parts(parts: AnchorParts, cut: str, label: str = "anchor") -> AnchorParts:
    """``parts`` with the units ``cut`` names: as split (``"block"``), or every ViT block as its two
    sublayers (``"sublayer"``: attention, then MLP), which doubles the places a stitch can cut.

    Only timm's own pre-norm ``Block`` is cut (exactly that class: another block computes
    something else between its sublayers); parts already cut are returned as they are.
    """
    if cut not in CUTS:
        raise NotStitchableError(f"unknown cut {cut!r}; expected one of {', '.join(CUTS)}")
    if cut == parts.cut:
        return parts
    if parts.cut != "block":
        raise NotStitchableError(f"{label} is already cut into {parts.cut}s; it cannot be cut into {cut}s")
    block_cls = timm_class("vision_transformer.Block")
    odd = next((type(b).__name__ for b in parts.blocks if type(b) is not block_cls), None)
    if parts.layout != "tokens" or odd is not None:
        found = f"its blocks are {odd}" if odd is not None else f"it is a {parts.kind} ({parts.layout} activations)"
        raise NotStitchableError(
            f"cut='sublayer' cuts timm ViT blocks (vision_transformer.Block) between attention and MLP, "
            f"but {label} cannot be cut so: {found}; use cut='block'")
    units = [Sublayer(b, names) for b in parts.blocks for names in _SUBLAYERS]
    return AnchorParts(parts.stem, units, parts.head, layout=parts.layout, stages=[2 * n for n in parts.stages],
                       stitch_stages=parts.stitch_stages, kind=parts.kind, data_config=parts.data_config,
                       stitch_rule=parts.stitch_rule, prefix_tokens=parts.prefix_tokens, cut=cut)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class AnchorSpec:
    """How to build one anchor from a model name, so a saved network can be rebuilt.

    ``file`` loads local weights through timm's real pretrained path
    (``pretrained_cfg_overlay=dict(file=...)``); ``pretrained`` downloads them.
    """

    name: str
    pretrained: bool = False
    file: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pretrained": self.pretrained, "file": self.file, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnchorSpec":
        return cls(d["name"], bool(d.get("pretrained", False)), d.get("file"), tuple(sorted((d.get("kwargs") or {}).items())))


def resolve_name(name: str) -> str:
    """Check a model name against timm's registry (snnet's own family included).

    Accepts hyphens for underscores (``fmnist-vit-ti``) and timm's ``arch.tag`` form;
    an unknown name raises with the closest known names.
    """
    import timm

    from . import pretrained, tiny  # noqa: F401  (register snnet's families with timm)

    candidates = [name, name.replace("-", "_")]
    for cand in candidates:
        arch = cand.split(".", 1)[0]
        if timm.is_model(arch):
            return cand
    arch = candidates[-1].split(".", 1)[0]
    close = near_names(arch, timm.list_models())
    hint = f" Did you mean: {', '.join(close)}?" if close else " `timm.list_models('*pattern*')` lists the names."
    raise UnknownModelError(f"unknown model name {name!r}: neither timm nor snnet knows it.{hint}")


def near_names(arch: str, known: Sequence[str], n: int = 5) -> list[str]:
    """Known names close to a mistyped one, its own family first.

    The family is the name's leading letters (``deit``, ``levit``, ``eva``, ``swinv``): names
    it starts, then that family's names by similarity, then any close name.
    """
    import re

    arch = arch.lower()
    fam = re.match(r"[a-z]+", arch)
    same = [k for k in known if fam and k.startswith(fam.group())]
    ordered = sorted((k for k in known if k.startswith(arch)), key=lambda k: (len(k), k))
    ordered += difflib.get_close_matches(arch, same, n=n, cutoff=0.0)
    ordered += difflib.get_close_matches(arch, known, n=n, cutoff=0.6)
    return list(dict.fromkeys(ordered))[:n]


# what a file of weights starts with when torch.save wrote it: a zip archive, or (before torch 1.6) a pickle
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_weights_file(path: str | os.PathLike[str], what: str) -> Path:
    """Refuse, before any model is built, a weights file torch or timm could only fail on with a traceback.

    Reads a few bytes: a ``.safetensors`` file must have a whole JSON header; any other file must
    start like a file ``torch.save`` wrote. A folder, an empty file or a text file is named in one
    line, which starts with ``what`` (e.g. ``weights for 'deit_tiny'``, ``--from-reference``).
    """
    from .errors import CheckpointError

    p = Path(path)
    kinds = "a .safetensors file, or a .pth/.pt/.bin file saved by torch"
    if p.is_dir():
        raise CheckpointError(f"{what}: {p} is a folder; give {kinds}")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} not found")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if p.suffix == ".safetensors":
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} for a file of {size} bytes")
                json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{what}: {p} is not a readable safetensors file ({e}); "
                                      "download or save it again") from e
            return p
    if not head.startswith(_TORCH_MAGIC):
        wrong = "empty" if size == 0 else f"not a weights file: it starts with {head!r}"
        raise CheckpointError(f"{what}: {p} is {wrong}; give {kinds}")
    return p


def create_anchor(spec: AnchorSpec) -> nn.Module:
    """Build one anchor model with timm (weights downloaded, from a file, or random)."""
    import timm

    from .errors import CheckpointError, reason

    name = resolve_name(spec.name)
    kwargs: dict[str, Any] = dict(spec.kwargs)
    if spec.file is not None:
        check_weights_file(spec.file, f"weights for {spec.name!r}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(spec.file))
    pretrained = spec.pretrained or spec.file is not None
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            # CNNs take any input size and have no img_size argument: drop it for them
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        # timm reports missing/unexpected keys as a RuntimeError of several lines (keep them all); a file
        # that passed check_weights_file may still be damaged inside, or hold an unsafe pickle
        if isinstance(e, SnnetError) or not (isinstance(e, RuntimeError) or spec.file is not None):
            raise
        source = f" from {spec.file}" if spec.file is not None else ""
        raise CheckpointError(f"could not load weights for {spec.name!r}{source}: {reason(e, 400, whole=True)}") from e


AnchorLike = str | AnchorSpec | nn.Module | AnchorParts


def anchor_label(a: AnchorLike, index: int) -> str:
    """A short readable name for an anchor, used in stitch names."""
    if isinstance(a, AnchorSpec):
        a = a.name
    if isinstance(a, str):
        return a.split(".", 1)[0].replace("-", "_")
    return f"{type(a).__name__.lower()}{index}"


def build_parts(anchors: Sequence[AnchorLike], *, pretrained: bool = False, files: Sequence[str | None] | None = None,
                model_kwargs: dict[str, Any] | None = None) -> tuple[list[AnchorParts], list[AnchorSpec | None]]:
    """Turn names, specs or modules into parts (and the specs that rebuild them)."""
    if len(anchors) < 2:
        raise NotStitchableError(f"a family needs at least two anchors to stitch, got {len(anchors)}")
    if files is not None and len(files) != len(anchors):
        raise ValueError(f"got {len(files)} weight files for {len(anchors)} anchors")
    specs: list[AnchorSpec | None] = []
    for i, a in enumerate(anchors):
        if isinstance(a, str):
            a = AnchorSpec(a, pretrained, files[i] if files else None, tuple(sorted((model_kwargs or {}).items())))
        elif isinstance(a, AnchorSpec) and model_kwargs:  # img_size, num_classes asked for every anchor: specs too
            a = replace(a, kwargs=tuple(sorted({**dict(a.kwargs), **model_kwargs}.items())))
        specs.append(a if isinstance(a, AnchorSpec) else None)
    for s in specs:  # validate every name before building anything
        if s is not None:
            resolve_name(s.name)
    parts = [split_model(create_anchor(s) if s is not None else a) for s, a in zip(specs, anchors)]
    check_kinds(parts, [anchor_label(a, k) for k, a in enumerate(anchors)])
    return parts, specs


def check_kinds(parts: Sequence[AnchorParts], labels: Sequence[str]) -> None:
    """Refuse, before anything runs, anchors whose activations can never feed each other.

    A family mixing tokens and feature maps, or ViTs with different extra tokens, has at
    least one such pair among neighbours in cost, so the whole family is refused here with
    the reason rather than later with shapes.
    """
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            # the feature map first: either way round it cannot feed the other
            x, y = (j, i) if parts[i].layout == "tokens" and parts[j].layout != "tokens" else (i, j)
            a, b = parts[x], parts[y]
            why = _feeds(a.layout, b.layout, a.prefix_tokens, b.prefix_tokens)
            if why is not None:
                raise NotStitchableError(
                    f"anchors {labels[x]!r} ({a.kind}, {_kind_of(a)}) and {labels[y]!r} ({b.kind}, {_kind_of(b)}) "
                    f"cannot be stitched: {why}")


def _kind_of(p: AnchorParts) -> str:
    if p.layout != "tokens":
        return f"{p.layout} feature maps"
    return f"tokens, {p.prefix_tokens} extra" if p.prefix_tokens else "tokens"


def as_rows(h: torch.Tensor, layout: str) -> torch.Tensor:
    """An activation as a (positions, channels) matrix: what a stitching layer maps."""
    if layout == "nchw":
        h = h.permute(0, 2, 3, 1)
    return h.reshape(-1, h.shape[-1])

