"""Adapters for hierarchical and convolutional families, and the named families.

Each adapter only says how a model splits into stem → units → head and which stages the
paper's recipe stitches; enumeration, stitching layers, least squares and FLOPs are the
core's, unchanged. A *unit* is one block, with whatever the model does between two stages
folded into the first block of the next stage (timm's Swin, ConvNeXt and LeViT downsample at
the start of a stage; a ResNet block downsamples itself), so every activation between units
is one tensor and the activations inside a stage all share one resolution.

The defaults follow the official SN-Net code: Swin is stitched in every stage but the last,
ResNet in its two middle stages (which is also what ResNet-18 → Swin-T gets, the stages both
allow), LeViT in its first two of three stages, all with the ``forward`` rule of
:mod:`snnet.space`. Families the paper did not use follow the paper's family they are laid
out like: ConvNeXt and Swin V2 get Swin's choices; RegNet, EfficientNet and MobileNetV3 get
ResNet's.

Stages are numbered by resolution, the same way in every feature-map family: stage 0 runs at
1/4 of the input, stage 3 at 1/32 (CNNs whose blocks start at 1/2 fold those blocks into the
stem). So stage ``s`` of a CNN and stage ``s`` of a Swin have one feature-map size, which is
what lets a CNN be stitched into a Swin. Inside a stage the channel count may change (an
EfficientNet stage at 1/16 runs 80-, then 112-channel blocks): stitching maps channels at each
position, so each cut simply gets a layer of its own shape.

:data:`FAMILIES` names whole families with pinned pretrained tags (one training recipe per
family): ``snnet.create_snnet(FAMILIES["swin"], pretrained=True)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .anchors import Adapter, AnchorParts, TimmPart, _data_config, norm_then_head, register_adapter, timm_head
from .errors import NotStitchableError

# Short names of whole families. Tags are pinned so every anchor of a family comes from one
# training recipe (torchvision's for ResNet, Microsoft's ImageNet-1k for Swin, Facebook's for
# ConvNeXt, DeiT and LeViT, Google's TensorFlow ports for MobileNetV3).
FAMILIES: dict[str, list[str]] = {
    "fmnist": ["fmnist_vit_ti", "fmnist_vit_s", "fmnist_vit_b"],  # shipped with snnet (snnet/pretrained.py)
    "fmnist-converged": ["fmnist_vit_ti.converged", "fmnist_vit_s.converged", "fmnist_vit_b.converged"],  # the same, converged
    "deit": ["deit_tiny_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k", "deit_base_patch16_224.fb_in1k"],
    "swin": ["swin_tiny_patch4_window7_224.ms_in1k", "swin_small_patch4_window7_224.ms_in1k",
             "swin_base_patch4_window7_224.ms_in1k"],
    "resnet": ["resnet18.tv_in1k", "resnet50.tv_in1k"],
    "resnet18-swin_t": ["resnet18.tv_in1k", "swin_tiny_patch4_window7_224.ms_in1k"],
    "convnext": ["convnext_tiny.fb_in1k", "convnext_small.fb_in1k", "convnext_base.fb_in1k"],
    "levit": ["levit_192.fb_dist_in1k", "levit_256.fb_dist_in1k"],  # the paper's LeViT family
    "deit-distilled": ["deit_tiny_distilled_patch16_224.fb_in1k", "deit_small_distilled_patch16_224.fb_in1k",
                       "deit_base_distilled_patch16_224.fb_in1k"],
    "swinv2": ["swinv2_tiny_window8_256.ms_in1k", "swinv2_small_window8_256.ms_in1k",
               "swinv2_base_window8_256.ms_in1k"],
    "eva02": ["eva02_tiny_patch14_336.mim_in22k_ft_in1k", "eva02_small_patch14_336.mim_in22k_ft_in1k"],
    "regnety": ["regnety_004.pycls_in1k", "regnety_008.pycls_in1k", "regnety_016.pycls_in1k"],
    "mobilenetv3": ["tf_mobilenetv3_small_100.in1k", "tf_mobilenetv3_large_100.in1k"],
}


def family(name: str) -> list[str] | None:
    """The anchors of a named family, or None: ``swin``, ``ResNet18_Swin-T``... (case, ``-``/``_`` free)."""
    key = name.strip().lower().replace("_", "-")
    return next((list(v) for k, v in FAMILIES.items() if k.replace("_", "-") == key), None)


def _stage_units(stage: nn.Module) -> list[nn.Module]:
    """A stage that downsamples at its start as units: its downsampling folded into block 0."""
    blocks = list(stage.blocks)
    if not blocks:
        raise ValueError(f"{type(stage).__name__} has no blocks: it cannot be split into units")
    if not isinstance(stage.downsample, nn.Identity):
        blocks[0] = nn.Sequential(stage.downsample, blocks[0])
    return blocks


class _StagedAdapter(Adapter):
    """Shared split of timm models built as ``stem → stages → head``.

    A subclass names the timm classes it handles (``model_classes``) and says where the stem,
    the stages' units and the head are (:meth:`pieces`).
    """

    layout: ClassVar[str] = "nchw"
    stitch_stages: ClassVar[tuple[int, ...]] = ()
    stitch_rule: ClassVar[str] = "forward"

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        raise NotImplementedError

    @classmethod
    def model_layout(cls, model: nn.Module) -> str:
        return cls.layout

    @classmethod
    def split(cls, model: nn.Module) -> AnchorParts:
        stem, stages, head = cls.pieces(model)
        return AnchorParts(
            stem, [u for units in stages for u in units], head,
            layout=cls.model_layout(model),
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
    model_classes = ("swin_transformer.SwinTransformer",)
    layout = "nhwc"
    stitch_stages = (0, 1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        # head: final norm, then timm's ClassifierHead (NHWC average pool, dropout, fc)
        return model.patch_embed, [_stage_units(s) for s in model.layers], nn.Sequential(model.norm, model.head)


@register_adapter
class SwinV2Adapter(SwinAdapter):
    """timm's SwinTransformerV2: laid out as Swin v1 (NHWC maps, patch merging at the start of
    stages 1..3); its blocks differ inside (scaled cosine attention, post-norm), which
    stitching never looks into."""

    kind = "swinv2"
    model_classes = ("swin_transformer_v2.SwinTransformerV2",)


class _ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _ToNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


@register_adapter
class SwinV2CrAdapter(SwinAdapter):
    """timm's SwinTransformerV2Cr (``swinv2_cr_*``): each stage takes and returns NCHW maps but
    works in NHWC inside; between two stages the NHWC→NCHW→NHWC round trip is the identity,
    so the units stay NHWC and only the stem and head change layout."""

    kind = "swinv2_cr"
    model_classes = ("swin_transformer_v2_cr.SwinTransformerV2Cr",)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        return (nn.Sequential(model.patch_embed, _ToNHWC()), [_stage_units(s) for s in model.stages],
                nn.Sequential(_ToNCHW(), model.head))


@register_adapter
class ConvNeXtAdapter(_StagedAdapter):
    """timm's ConvNeXt: NCHW maps, a strided conv at the start of stages 1..3."""

    kind = "convnext"
    model_classes = ("convnext.ConvNeXt",)
    stitch_stages = (0, 1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        return model.stem, [_stage_units(s) for s in model.stages], nn.Sequential(model.norm_pre, model.head)


@register_adapter
class ResNetAdapter(_StagedAdapter):
    """timm's ResNet (BasicBlock or Bottleneck): each stage's first block downsamples itself."""

    kind = "resnet"
    model_classes = ("resnet.ResNet",)
    stitch_stages = (1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        stages = [list(model.layer1), list(model.layer2), list(model.layer3), list(model.layer4)]
        return stem, stages, TimmPart(model, ("global_pool", "fc"), timm_head)


def levit_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LeViT's convolutional stem, then (unless the model runs on NCHW maps) its maps as tokens."""
    x = model.stem(x)
    return x if model.use_conv else x.flatten(2).transpose(1, 2)


@register_adapter
class LeViTAdapter(_StagedAdapter):
    """timm's LeViT (``levit_*``, tokens; ``levit_conv_*``, NCHW maps): a convolutional stem,
    then three stages of attention blocks with learned attention biases, stages 1 and 2
    starting with an attention subsample (folded into their first unit). As the official code
    does, stitched in its first two stages with the forward rule: LeViT-192/256 gives 8
    networks."""

    kind = "levit"
    model_classes = ("levit.Levit", "levit.LevitDistilled")
    layout = "tokens"
    stitch_stages = (0, 1)

    @classmethod
    def model_layout(cls, model: nn.Module) -> str:
        return "nchw" if model.use_conv else "tokens"

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        heads = ("head", "head_dist") if hasattr(model, "head_dist") else ("head",)
        return TimmPart(model, ("stem",), levit_stem), [_stage_units(s) for s in model.stages], TimmPart(model, heads, timm_head)


# --------------------------------------------------------------------------- CNNs staged by resolution


def _by_resolution(model: nn.Module, stem: nn.Module, timm_stages: list[list[nn.Module]],
                   modules: list[str]) -> tuple[nn.Module, list[list[nn.Module]]]:
    """Regroup a CNN's timm stages into stages 0..3 at 1/4..1/32 of the input.

    ``modules[i]`` is the name timm's ``feature_info`` gives timm stage ``i``; each
    feature_info entry gives the reduction of the stages up to it. Units at 1/2 join the stem.
    """
    reduction_of = {f["module"]: int(f["reduction"]) for f in model.feature_info}
    reductions: list[int] = []
    pending = 0
    for i, name in enumerate(modules):
        if name in reduction_of:
            reductions += [reduction_of[name]] * (i + 1 - pending)
            pending = i + 1
    if pending != len(modules) or sorted(set(reductions) - {2}) != [4, 8, 16, 32]:
        raise NotStitchableError(
            f"{type(model).__name__} does not reduce its input to 1/4, 1/8, 1/16 and 1/32 in turn "
            f"(reductions {sorted(set(reductions))}): snnet stitches feature maps stage by stage at those sizes; "
            "build the model with its default output_stride (32)")
    early = [u for units, r in zip(timm_stages, reductions) if r <= 2 for u in units]
    stages: list[list[nn.Module]] = [[] for _ in range(4)]
    for units, r in zip(timm_stages, reductions):
        if r > 2:
            stages[r.bit_length() - 3] += units  # 4 -> 0, 8 -> 1, 16 -> 2, 32 -> 3
    return (nn.Sequential(stem, *early) if early else stem), stages


@register_adapter
class RegNetAdapter(_StagedAdapter):
    """timm's RegNet (X, Y, Z): four stages ``s1..s4`` at 1/4..1/32, each starting with a
    strided block; laid out like ResNet, so stitched in ResNet's middle stages."""

    kind = "regnet"
    model_classes = ("regnet.RegNet",)
    stitch_stages = (1, 2)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        names = ["s1", "s2", "s3", "s4"]
        stem, stages = _by_resolution(model, model.stem, [list(getattr(model, n).children()) for n in names], names)
        return stem, stages, nn.Sequential(model.final_conv, model.head)


class _BlocksCnnAdapter(_StagedAdapter):
    """timm's EfficientNet-style CNNs (``conv_stem → bn1 → blocks → head``), whose ``blocks``
    are stages that may keep the resolution and change only the channel count; regrouped by
    resolution and stitched in ResNet's middle stages."""

    stitch_stages = (1, 2)
    head_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def head(cls, model: nn.Module) -> nn.Module:
        return TimmPart(model, cls.head_names, timm_head)

    @classmethod
    def pieces(cls, model: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
        timm_stages = [list(s) for s in model.blocks]
        stem, stages = _by_resolution(model, nn.Sequential(model.conv_stem, model.bn1), timm_stages,
                                      [f"blocks.{i}" for i in range(len(timm_stages))])
        return stem, stages, cls.head(model)


@register_adapter
class EfficientNetAdapter(_BlocksCnnAdapter):
    """timm's EfficientNet (B0-B8, EfficientNetV2, MNASNet, MobileNetV2...): the 1x1 head
    convolution runs before pooling, as in timm."""

    kind = "efficientnet"
    model_classes = ("efficientnet.EfficientNet",)
    head_names = ("global_pool", "classifier")

    @classmethod
    def head(cls, model: nn.Module) -> nn.Module:
        return nn.Sequential(model.conv_head, model.bn2, super().head(model))


@register_adapter
class MobileNetV3Adapter(_BlocksCnnAdapter):
    """timm's MobileNetV3: pooling first, then the 1x1 head convolution, as in timm."""

    kind = "mobilenetv3"
    model_classes = ("mobilenetv3.MobileNetV3",)
    head_names = ("global_pool", "conv_head", "norm_head", "act2", "flatten", "classifier")


# --------------------------------------------------------------------------- EVA


class RopeBlock(nn.Module):
    """One EVA block with the rotary position embedding its model computes once per forward.

    timm's Eva computes the rope in ``_pos_embed`` and passes it to every block; a unit has to
    run on the activation alone, so each block recomputes it from the model's own rope module
    (shared, not copied: it holds only non-persistent buffers; a few sines and cosines, no
    FLOPs). A stitched route thus gives the target's blocks the target's rope, which the
    source's stem never computed.
    """

    def __init__(self, block: nn.Module, rope: nn.Module | None, grid: tuple[int, int]) -> None:
        super().__init__()
        self.block = block
        self.rope = rope
        self.grid = tuple(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = None
        if self.rope is not None:
            # as Eva._pos_embed does for a fixed image size
            rope = self.rope.get_embed() if hasattr(self.rope, "feat_shape") else self.rope.get_embed(shape=self.grid)
        return self.block(x, rope=rope)


def eva_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eva's forward_features up to the first block (its own ``_pos_embed``; the rope it also
    returns is recomputed by each :class:`RopeBlock`)."""
    x = model.patch_embed(x)
    x, _ = model._pos_embed(x)
    return model.norm_pre(x)


@register_adapter
class EvaAdapter(Adapter):
    """timm's Eva (EVA-02, and timm's rope ViTs built on it): a ViT whose blocks take the
    rotary position embedding as a second argument; stitched as a ViT (one stage, window
    rule)."""

    kind = "eva"
    model_classes = ("eva.Eva",)

    @classmethod
    def split(cls, model: nn.Module) -> AnchorParts:
        if model.dynamic_img_size:
            raise NotStitchableError(
                f"{type(model).__name__} built with dynamic_img_size=True: its rotary embedding follows the image "
                "size at run time, which a block alone cannot see; build it with dynamic_img_size=False")
        if model.patch_drop is not None:
            raise NotStitchableError(
                f"{type(model).__name__} built with patch_drop_rate > 0: patch dropout reorders the rotary "
                "embedding per image, which a block alone cannot see; build it with patch_drop_rate=0")
        if model.rope is not None and (any(True for _ in model.rope.parameters()) or model.rope.state_dict()):
            raise NotStitchableError(
                f"{type(model).__name__} learns its rotary embedding (rope_mixed): one set of weights computes the "
                "rope of every block, so no block can be cut out with its own; stitch models with a fixed rope "
                "(EVA-02, vit_base_patch16_rope_224)")
        blocks = [RopeBlock(b, model.rope, model.patch_embed.grid_size) for b in model.blocks]
        stem = TimmPart(model, ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "rope", "norm_pre"),
                        eva_stem)
        head = TimmPart(model, ("norm", "attn_pool", "fc_norm", "head_drop", "head"), norm_then_head)
        return AnchorParts(stem, blocks, head, layout="tokens", kind=cls.kind, data_config=_data_config(model),
                           prefix_tokens=model.num_prefix_tokens)
