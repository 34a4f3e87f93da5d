"""Anchors: pretrained models split into stem, blocks and head.

SN-Net cuts every anchor between its blocks. An :class:`Adapter` is the only code that knows
a kind of model's internals: it turns a model into :class:`AnchorParts` — a stem (input to
the first block's input), a flat list of blocks, and a head (last block's output to logits).
Everything else in snnet (stitch space, stitching layers, FLOPs, export) works on parts alone,
so supporting a new kind of model means writing one adapter and registering it.

Blocks are *units*: anything a hierarchical model does between two blocks (Swin's patch
merging, a ResNet stage's downsampling) is folded into the block that follows it, so the
activation between unit ``k-1`` and unit ``k`` is always a well-defined tensor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from .errors import NotStitchableError, UnknownModelError

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
    activations can be stitched when their positions line up one to one.
    """

    layout: str
    channels: int
    spatial: tuple[int, ...]

    @classmethod
    def of(cls, layout: str, t: torch.Tensor) -> "ActivationSpec":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        shape = tuple(t.shape[1:])
        if layout == "tokens":
            return cls(layout, shape[-1], shape[:-1])
        if layout == "nhwc":
            return cls(layout, shape[-1], shape[:-1])
        return cls(layout, shape[0], shape[1:])

    @property
    def positions(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def __str__(self) -> str:
        dims = "x".join(str(s) for s in self.spatial)
        return f"{self.layout}[{dims}, C={self.channels}]"


def stitchable(src: ActivationSpec, dst: ActivationSpec) -> str | None:
    """Why ``src`` cannot be mapped onto ``dst`` position by position, or None if it can."""
    if src.layout == "tokens" and dst.layout != "tokens" or dst.layout == "tokens" and src.layout != "tokens":
        return f"a {src.layout} activation cannot feed a {dst.layout} one"
    if src.spatial != dst.spatial:
        what = "token counts" if src.layout == "tokens" else "spatial sizes"
        return f"{what} differ ({src} vs {dst})"
    return None


class AnchorParts(nn.Module):
    """One anchor as stem → blocks → head, the form every other module of snnet works on.

    The parts share their parameters with the model they were split from (no copy). ``stages``
    gives the number of blocks in each stage (one stage for a plain ViT); ``stitch_stages`` the
    stages in which the paper's recipe stitches this kind of model by default, and
    ``stitch_rule`` how block pairs are enumerated in them (``snnet.space.RULES``).
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
        self.data_config = dict(data_config or {})

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
            specs = [ActivationSpec.of(self.layout, h)]
            for blk in self.blocks:
                h = blk(h)
                specs.append(ActivationSpec.of(self.layout, h))
            out = self.head(h)
        finally:
            self.train(was_training)
        return specs, int(out.shape[-1])


# --------------------------------------------------------------------------- adapters


class Adapter:
    """Knows how one kind of model splits into :class:`AnchorParts`.

    Subclass, implement :meth:`matches` and :meth:`split`, and decorate with
    :func:`register_adapter`; nothing else in snnet needs to change.
    """

    kind: ClassVar[str] = "?"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

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


def split_model(model: nn.Module) -> AnchorParts:
    """Split a model with the first adapter that knows its kind."""
    if isinstance(model, AnchorParts):
        return model
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter.split(model)
    known = ", ".join(a.kind for a in _ADAPTERS)
    raise NotStitchableError(
        f"no adapter knows how to split a {type(model).__name__}; snnet knows: {known}. "
        "Pass an AnchorParts(stem, blocks, head, layout=...) built by hand, or register an "
        "Adapter for this kind of model (see snnet.anchors.Adapter)."
    )


def _data_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "num_classes")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in keys}


class _ViTStem(nn.Module):
    """Patch embedding, class/register tokens and position embedding of a timm ViT.

    Holds only those weights; the position-embedding logic is timm's own method, called on
    this module (it reads the same attribute names), so it stays exactly timm's.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.no_embed_class = vit.no_embed_class
        self.dynamic_img_size = vit.dynamic_img_size
        self.num_prefix_tokens = vit.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.vision_transformer import VisionTransformer

        x = self.patch_embed(x)
        x = VisionTransformer._pos_embed(self, x)  # type: ignore[arg-type]
        x = self.patch_drop(x)
        return self.norm_pre(x)


class _ViTHead(nn.Module):
    """Final norm, pooling and classifier of a timm ViT (timm's own pooling code)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.norm = vit.norm
        self.attn_pool = vit.attn_pool
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.global_pool = vit.global_pool
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.vision_transformer import VisionTransformer

        x = self.norm(x)
        x = VisionTransformer.pool(self, x)  # type: ignore[arg-type]
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)


@register_adapter
class ViTAdapter(Adapter):
    """timm's VisionTransformer (ViT, DeiT, and the shipped Fashion-MNIST family)."""

    kind = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    @classmethod
    def split(cls, model: nn.Module) -> AnchorParts:
        return AnchorParts(
            _ViTStem(model),
            list(model.blocks),
            _ViTHead(model),
            layout="tokens",
            kind=cls.kind,
            data_config=_data_config(model),
        )


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
    known = timm.list_models()
    close = [n for n in known if n.startswith(arch)][:5] or difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " `timm.list_models('*pattern*')` lists the names."
    raise UnknownModelError(f"unknown model name {name!r}: neither timm nor snnet knows it.{hint}")


def create_anchor(spec: AnchorSpec) -> nn.Module:
    """Build one anchor model with timm (weights downloaded, from a file, or random)."""
    import timm

    name = resolve_name(spec.name)
    kwargs: dict[str, Any] = dict(spec.kwargs)
    if spec.file is not None:
        from pathlib import Path

        if not Path(spec.file).is_file():
            raise FileNotFoundError(f"weights file for {spec.name!r} not found: {spec.file}")
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
    except RuntimeError as e:  # timm reports missing/unexpected keys as RuntimeError
        from .errors import CheckpointError

        raise CheckpointError(f"could not load weights for {spec.name!r}: {e}") from e


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
        specs.append(a if isinstance(a, AnchorSpec) else None)
    for s in specs:  # validate every name before building anything
        if s is not None:
            resolve_name(s.name)
    parts = [split_model(create_anchor(s) if s is not None else a) for s, a in zip(specs, anchors)]
    return parts, specs


def as_rows(h: torch.Tensor, layout: str) -> torch.Tensor:
    """An activation as a (positions, channels) matrix: what a stitching layer maps."""
    if layout == "nchw":
        h = h.permute(0, 2, 3, 1)
    return h.reshape(-1, h.shape[-1])

