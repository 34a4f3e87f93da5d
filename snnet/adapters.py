"""Adapters for hierarchical families: timm's Swin, ResNet and ConvNeXt.

Each adapter only says how a model splits into stem → units → head and which stages the
paper's recipe stitches; enumeration, stitching layers, least squares and FLOPs are the
core's, unchanged. A *unit* is one block, with whatever the model does between two stages
folded into the first block of the next stage (timm's Swin and ConvNeXt downsample at the
start of a stage; a ResNet block downsamples itself), so every activation between units is
one tensor and the activations inside a stage all share one resolution.

The defaults follow the official SN-Net code: Swin is stitched in every stage but the last,
ResNet in its two middle stages (which is also what ResNet-18 → Swin-T gets, the stages both
allow), both with the ``forward`` rule of :mod:`snnet.space`. ConvNeXt, a family the paper did
not use, is laid out like Swin and gets Swin's choices.

:data:`FAMILIES` names the paper's families with pinned pretrained tags (one training recipe
per family): ``snnet.create_snnet(FAMILIES["swin"], pretrained=True)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .anchors import Adapter, AnchorParts, _data_config, register_adapter

# Short names of whole families. Tags are pinned so every anchor of a family comes from one
# training recipe (torchvision's for ResNet, Microsoft's ImageNet-1k for Swin, Facebook's for
# ConvNeXt and DeiT).
FAMILIES: dict[str, list[str]] = {
    "fmnist": ["fmnist_vit_ti", "fmnist_vit_s", "fmnist_vit_b"],  # shipped with snnet (snnet/pretrained.py)
    "deit": ["deit_tiny_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k", "deit_base_patch16_224.fb_in1k"],
    "swin": ["swin_tiny_patch4_window7_224.ms_in1k", "swin_small_patch4_window7_224.ms_in1k",
             "swin_base_patch4_window7_224.ms_in1k"],
    "resnet": ["resnet18.tv_in1k", "resnet50.tv_in1k"],
    "resnet18-swin_t": ["resnet18.tv_in1k", "swin_tiny_patch4_window7_224.ms_in1k"],
    "convnext": ["convnext_tiny.fb_in1k", "convnext_small.fb_in1k", "convnext_base.fb_in1k"],
}


def family(name: str) -> list[str] | None:
    """The anchors of a named family, or None: ``swin``, ``ResNet18_Swin-T``... (case, ``-``/``_`` free)."""
    key = name.strip().lower().replace("_", "-")
    return next((list(v) for k, v in FAMILIES.items() if k.replace("_", "-") == key), None)


def _stage_units(stage: nn.Module) -> list[nn.Module]:
    """A stage that downsamples at its start as units: its downsampling folded into block 0."""
    blocks = list(stage.blocks)
    if not blocks:
        raise ValueError(f"a {type(stage).__name__} without blocks cannot be split into units")
    if not isinstance(stage.downsample, nn.Identity):
        blocks[0] = nn.Sequential(stage.downsample, blocks[0])
    return blocks


class _StagedAdapter(Adapter):
    """Shared split of timm models built as ``stem → stages → head``.

    A subclass names the timm class it handles (``module.Class`` under ``timm.models``) and
    says where the stem, the stages' units and the head are (:meth:`pieces`).
    """

    model_class: ClassVar[str]
    layout: ClassVar[str] = "nchw"
    stitch_stages: ClassVar[tuple[int, ...]] = ()
    stitch_rule: ClassVar[str] = "forward"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        import importlib

        module, name = cls.model_class.rsplit(".", 1)
        return isinstance(model, getattr(importlib.import_module(f"timm.models.{module}"), name))

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        raise NotImplementedError

    @classmethod
    def split(cls, model: nn.Module) -> AnchorParts:
        stem, stages, head = cls.pieces(model)
        return AnchorParts(
            stem, [u for units in stages for u in units], head,
            layout=cls.layout,
            stages=[len(units) for units in stages],
            stitch_stages=[s for s in cls.stitch_stages if s < len(stages)],
            stitch_rule=cls.stitch_rule,
            kind=cls.kind,
            data_config=_data_config(model),
        )


@register_adapter
class SwinAdapter(_StagedAdapter):
    """timm's SwinTransformer (v1): NHWC maps, patch merging at the start of stages 1..3."""

    kind = "swin"
    model_class = "swin_transformer.SwinTransformer"
    layout = "nhwc"
    stitch_stages = (0, 1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        # head: final norm, then timm's ClassifierHead (NHWC average pool, dropout, fc)
        return model.patch_embed, [_stage_units(s) for s in model.layers], nn.Sequential(model.norm, model.head)


@register_adapter
class ConvNeXtAdapter(_StagedAdapter):
    """timm's ConvNeXt: NCHW maps, a strided conv at the start of stages 1..3."""

    kind = "convnext"
    model_class = "convnext.ConvNeXt"
    stitch_stages = (0, 1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        return model.stem, [_stage_units(s) for s in model.stages], nn.Sequential(model.norm_pre, model.head)


class _ResNetHead(nn.Module):
    """Global pooling, dropout and classifier of a timm ResNet (timm's own forward_head)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.global_pool = resnet.global_pool
        self.fc = resnet.fc
        self.drop_rate = resnet.drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.resnet import ResNet

        return ResNet.forward_head(self, x)  # type: ignore[arg-type]


@register_adapter
class ResNetAdapter(_StagedAdapter):
    """timm's ResNet (BasicBlock or Bottleneck): each stage's first block downsamples itself."""

    kind = "resnet"
    model_class = "resnet.ResNet"
    stitch_stages = (1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        stages = [list(model.layer1), list(model.layer2), list(model.layer3), list(model.layer4)]
        return stem, stages, _ResNetHead(model)
