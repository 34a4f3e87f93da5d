"""Tiny registered test families: random-init models that build and run in milliseconds.

Like timm's ``test_*`` models, they exist so that tests, docs and the CLI can exercise the
real name-based paths (``snnet stitches --anchors snnet_tiny_vit_ti,...``) without weights.
Registering them in timm's registry is what makes them first-class model names.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

# name: (embed_dim, num_heads, depth)
_TINY_VITS = {
    "snnet_tiny_vit_ti": (16, 2, 4),
    "snnet_tiny_vit_s": (32, 4, 4),
    "snnet_tiny_vit_b": (64, 8, 4),
    "snnet_tiny_vit_deep": (48, 4, 8),
}

default_cfgs = generate_default_cfgs({
    name: {"num_classes": 10, "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "crop_pct": 1.0, "interpolation": "bilinear", "first_conv": "patch_embed.proj", "classifier": "head"}
    for name in _TINY_VITS
})


def _tiny_vit(name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    dim, heads, depth = _TINY_VITS[name] if name in _TINY_VITS else _TINY_DEIT3S[name]
    args = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=dim, num_heads=heads, depth=depth, mlp_ratio=2.0)
    if name in _TINY_DEIT3S:  # DeiT III: layer scale, position embedding without the class token
        args.update(no_embed_class=True, init_values=1e-4)
    return build_model_with_cfg(VisionTransformer, name, pretrained, **dict(args, **kwargs))


@register_model
def snnet_tiny_vit_ti(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4 blocks, width 16, 32x32 input: a stand-in for DeiT-Ti in tests."""
    return _tiny_vit("snnet_tiny_vit_ti", pretrained, **kwargs)


@register_model
def snnet_tiny_vit_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4 blocks, width 32: a stand-in for DeiT-S in tests."""
    return _tiny_vit("snnet_tiny_vit_s", pretrained, **kwargs)


@register_model
def snnet_tiny_vit_b(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4 blocks, width 64: a stand-in for DeiT-B in tests."""
    return _tiny_vit("snnet_tiny_vit_b", pretrained, **kwargs)


@register_model
def snnet_tiny_vit_deep(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """8 blocks, width 48: an anchor of unequal depth, for unpaired stitching."""
    return _tiny_vit("snnet_tiny_vit_deep", pretrained, **kwargs)


# --------------------------------------------------------------------------- hierarchical kinds
# Tiny stand-ins for the paper's other families, laid out like the real ones (four stages,
# strides 4/8/16/32, so on a 32x32 image the stages are 8x8, 4x4, 2x2, 1x1): Swin-T/S/B,
# ResNet-18/50 and ConvNeXt-T/S/B, with the same depth pattern per stage (equal early stages,
# a deeper third stage) at a few channels.
from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402
from timm.models.swin_transformer import SwinTransformer  # noqa: E402

_TINY_CFG = {"num_classes": 10, "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
             "crop_pct": 1.0, "interpolation": "bilinear"}

# name: (embed_dim, depths)
_TINY_SWINS = {
    "snnet_tiny_swin_t": (8, (2, 2, 2, 2)),
    "snnet_tiny_swin_s": (12, (2, 2, 6, 2)),
    "snnet_tiny_swin_b": (16, (2, 2, 6, 2)),
}
# name: (block, layers, channels)
_TINY_RESNETS = {
    "snnet_tiny_resnet18": (BasicBlock, (2, 2, 2, 2), (4, 8, 16, 32)),
    "snnet_tiny_resnet50": (Bottleneck, (1, 3, 4, 1), (8, 16, 32, 64)),
}
# name: (dims, depths)
_TINY_CONVNEXTS = {
    "snnet_tiny_convnext_t": ((8, 16, 32, 64), (1, 2, 2, 1)),
    "snnet_tiny_convnext_s": ((8, 16, 32, 64), (1, 2, 4, 1)),
}

default_cfgs.update(generate_default_cfgs({
    **{n: dict(_TINY_CFG, first_conv="patch_embed.proj", classifier="head.fc") for n in _TINY_SWINS},
    **{n: dict(_TINY_CFG, first_conv="conv1", classifier="fc") for n in _TINY_RESNETS},
    **{n: dict(_TINY_CFG, first_conv="stem.0", classifier="head.fc") for n in _TINY_CONVNEXTS},
}))


def _tiny_swin(name: str, pretrained: bool, **kwargs: Any) -> SwinTransformer:
    dim, depths = _TINY_SWINS[name]
    heads = tuple(dim * 2**i // 4 for i in range(4))  # head width 4 in every stage
    args = dict(img_size=32, patch_size=4, window_size=2, num_classes=10, embed_dim=dim, depths=depths,
                num_heads=heads, mlp_ratio=2.0)
    return build_model_with_cfg(SwinTransformer, name, pretrained, **dict(args, **kwargs))


def _tiny_resnet(name: str, pretrained: bool, **kwargs: Any) -> ResNet:
    block, layers, channels = _TINY_RESNETS[name]
    # a deep stem of width 4 (8 channels out) instead of ResNet's fixed 64-channel 7x7 conv
    args = dict(block=block, layers=layers, channels=channels, stem_type="deep", stem_width=4, num_classes=10)
    return build_model_with_cfg(ResNet, name, pretrained, **dict(args, **kwargs))


def _tiny_convnext(name: str, pretrained: bool, **kwargs: Any) -> ConvNeXt:
    dims, depths = _TINY_CONVNEXTS[name]
    args = dict(dims=dims, depths=depths, num_classes=10)
    return build_model_with_cfg(ConvNeXt, name, pretrained, **dict(args, **kwargs))


@register_model
def snnet_tiny_swin_t(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin, depths (2, 2, 2, 2), width 8, window 2, 32x32 input: a stand-in for Swin-T."""
    return _tiny_swin("snnet_tiny_swin_t", pretrained, **kwargs)


@register_model
def snnet_tiny_swin_s(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin, depths (2, 2, 6, 2), width 12: a stand-in for Swin-S (deeper third stage)."""
    return _tiny_swin("snnet_tiny_swin_s", pretrained, **kwargs)


@register_model
def snnet_tiny_swin_b(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin, depths (2, 2, 6, 2), width 16: a stand-in for Swin-B."""
    return _tiny_swin("snnet_tiny_swin_b", pretrained, **kwargs)


@register_model
def snnet_tiny_resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """BasicBlock ResNet, layers (2, 2, 2, 2), widths 4..32: a stand-in for ResNet-18."""
    return _tiny_resnet("snnet_tiny_resnet18", pretrained, **kwargs)


@register_model
def snnet_tiny_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Bottleneck ResNet, layers (1, 3, 4, 1), widths 32..256 out: a stand-in for ResNet-50."""
    return _tiny_resnet("snnet_tiny_resnet50", pretrained, **kwargs)


@register_model
def snnet_tiny_convnext_t(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    """ConvNeXt, depths (1, 2, 2, 1), widths 8..64: a stand-in for ConvNeXt-T."""
    return _tiny_convnext("snnet_tiny_convnext_t", pretrained, **kwargs)


@register_model
def snnet_tiny_convnext_s(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    """ConvNeXt, depths (1, 2, 4, 1): a stand-in for ConvNeXt-S (deeper third stage)."""
    return _tiny_convnext("snnet_tiny_convnext_s", pretrained, **kwargs)


# --------------------------------------------------------------------------- LeViT and DeiT III
# Stand-ins for the paper's LeViT-192/256 family (three stages of four blocks, a 16x stem, two
# heads averaged at inference: timm's LevitDistilled at 64x64, so the stages are 4x4, 2x2, 1x1
# tokens) and for SN-Netv2's DeiT3-S/L (layer scale, position embedding without the class token,
# 4 and 8 blocks: the 1:2 depths of DeiT3-S and -L).
from timm.models.levit import LevitDistilled  # noqa: E402

# name: (embed_dims, heads)
_TINY_LEVITS = {
    "snnet_tiny_levit_a": ((16, 24, 32), (2, 3, 4)),
    "snnet_tiny_levit_b": ((24, 32, 40), (3, 4, 5)),
}
# name: (embed_dim, num_heads, depth)
_TINY_DEIT3S = {
    "snnet_tiny_deit3_s": (16, 2, 4),
    "snnet_tiny_deit3_l": (32, 4, 8),
}
default_cfgs.update(generate_default_cfgs({
    **{n: dict(_TINY_CFG, input_size=(3, 64, 64), first_conv="stem.conv1.linear", classifier=("head.linear", "head_dist.linear"))
       for n in _TINY_LEVITS},
    **{n: dict(_TINY_CFG, first_conv="patch_embed.proj", classifier="head") for n in _TINY_DEIT3S},
}))


def _tiny_levit(name: str, pretrained: bool, **kwargs: Any) -> LevitDistilled:
    dims, heads = _TINY_LEVITS[name]
    args = dict(img_size=64, num_classes=10, embed_dim=dims, key_dim=4, num_heads=heads, depth=(4, 4, 4))
    return build_model_with_cfg(LevitDistilled, name, pretrained, **dict(args, **kwargs))


@register_model
def snnet_tiny_levit_a(pretrained: bool = False, **kwargs: Any) -> LevitDistilled:
    """LeViT, depths (4, 4, 4), widths 16..32, 64x64 input: a stand-in for LeViT-192."""
    return _tiny_levit("snnet_tiny_levit_a", pretrained, **kwargs)


@register_model
def snnet_tiny_levit_b(pretrained: bool = False, **kwargs: Any) -> LevitDistilled:
    """LeViT, depths (4, 4, 4), widths 24..40: a stand-in for LeViT-256."""
    return _tiny_levit("snnet_tiny_levit_b", pretrained, **kwargs)


@register_model
def snnet_tiny_deit3_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT III layout (layer scale, no class-token position), 4 blocks, width 16: a stand-in for DeiT3-S."""
    return _tiny_vit("snnet_tiny_deit3_s", pretrained, **kwargs)


@register_model
def snnet_tiny_deit3_l(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT III layout, 8 blocks, width 32: a stand-in for DeiT3-L (twice the small one's depth)."""
    return _tiny_vit("snnet_tiny_deit3_l", pretrained, **kwargs)
