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
    dim, heads, depth = _TINY_VITS[name]
    args = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=dim, num_heads=heads, depth=depth, mlp_ratio=2.0)
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
