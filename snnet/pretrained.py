"""The shipped Fashion-MNIST anchor family, registered into timm's model registry.

Three DeiT-style ViTs (tiny / small / base widths, shallow enough to train on a
CPU) that differ ~30x in FLOPs. They are ordinary timm models: once this module
is imported, ``timm.create_model('fmnist_vit_ti', pretrained=True)`` builds the
model and loads the weights shipped in ``snnet/weights/`` through timm's own
pretrained path (``pretrained_cfg['file']`` -> ``timm.models.load_state_dict``,
which reads ``.safetensors``), so every timm tool (data config resolution,
``features_only``, ``num_classes`` override...) works on them unchanged.

The weights are produced by ``scripts/train_fmnist_family.py``. Each member also ships trained
with the converged recipe (``snnet/recipes/fmnist-converged.yaml``: no augmentation, 24 epochs),
under the pretrained tag ``converged``: ``timm.create_model('fmnist_vit_s.converged',
pretrained=True)``, or the family ``fmnist-converged`` (files in ``snnet/weights/converged/``).

Any other member of the same design (another width, depth, patch size: the Fashion-MNIST
*zoo* of ``scripts/train_fmnist_zoo.py``) is ``timm.create_model('fmnist_vit', embed_dim=...,
...)``, with weights from a file (``pretrained_cfg_overlay=dict(file=...)``); its canonical
name, e.g. ``fmnist_vit_w24_d6_p7``, is :attr:`FmnistVitSpec.name`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .errors import SnnetError

__all__ = ["FMNIST_FAMILY", "FmnistVitSpec", "TAGS", "WEIGHTS_DIR", "default_heads", "normalize_name", "tagged_name",
           "weights_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The shipped trainings of the family, as timm pretrained tags: the default (no tag: the family's recipe,
# the demo's anchors) and "converged" (trained until the validation top-1 stopped rising), each with its
# own folder under WEIGHTS_DIR (named as the tag), its family.json (checksums, accuracies) and model card.
TAGS = ("", "converged")


IMG_SIZE = 28
_SPEC_NAME = re.compile(r"fmnist_vit_w(\d+)_d(\d+)_p(\d+)(?:_h(\d+))?(?:_m(\d+(?:\.\d+)?))?")


def default_heads(embed_dim: int) -> int:
    """The family's head count for a width: heads of 16 channels, at least two (16 -> 2, 96 -> 6)."""
    return max(2, embed_dim // 16)


@dataclass(frozen=True)
class FmnistVitSpec:
    """Architecture of one Fashion-MNIST ViT of the family's design (everything else is shared)."""

    embed_dim: int
    num_heads: int
    depth: int = 6
    patch_size: int = 7
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if min(self.embed_dim, self.num_heads, self.depth, self.patch_size) < 1 or self.mlp_ratio <= 0:
            raise SnnetError(f"every size of a Fashion-MNIST ViT must be positive: {self}")
        if self.embed_dim % self.num_heads:
            raise SnnetError(f"width {self.embed_dim} does not split into {self.num_heads} heads; pick a head count "
                             f"that divides it (a name takes one as _h<N>, e.g. fmnist_vit_w{self.embed_dim}_d6_p7_h2)")
        if IMG_SIZE % self.patch_size:
            raise SnnetError(f"patch size {self.patch_size} does not tile a {IMG_SIZE}x{IMG_SIZE} image; use 2, 4, 7 or 14")

    @property
    def name(self) -> str:
        """``fmnist_vit_w<width>_d<depth>_p<patch>``, plus ``_h<heads>`` / ``_m<mlp ratio>`` where they
        differ from the family's rule (:func:`default_heads`, ratio 4)."""
        name = f"fmnist_vit_w{self.embed_dim}_d{self.depth}_p{self.patch_size}"
        if self.num_heads != default_heads(self.embed_dim):
            name += f"_h{self.num_heads}"
        return name + (f"_m{self.mlp_ratio:g}" if self.mlp_ratio != 4.0 else "")

    @classmethod
    def parse(cls, name: str) -> "FmnistVitSpec":
        """The spec a name stands for: a shipped member (``fmnist_vit_s``) or ``fmnist_vit_w24_d6_p7[_h2][_m4]``."""
        name = normalize_name(name).partition(".")[0]
        if name in FMNIST_FAMILY:
            return FMNIST_FAMILY[name]
        m = _SPEC_NAME.fullmatch(name)
        if m is None:
            raise SnnetError(f"{name!r} is not a Fashion-MNIST ViT name; write fmnist_vit_w<width>_d<depth>_p<patch> "
                             "(optionally _h<heads>, _m<mlp ratio>), e.g. fmnist_vit_w24_d6_p7")
        width, depth, patch = int(m[1]), int(m[2]), int(m[3])
        heads = int(m[4]) if m[4] else default_heads(width)
        return cls(width, heads, depth, patch, float(m[5]) if m[5] else 4.0)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model('fmnist_vit', ...)`` for this architecture."""
        return asdict(self)


# Picked on the validation split, from the zoo of ViTs of this design trained one by one with
# the family's recipe (snnet/weights/fmnist_zoo.json, scripts/train_fmnist_zoo.py): three members
# of the zoo's accuracy/FLOPs frontier, each about twice the width of the one before. Depth 3
# wins over depth 6 at every cost on this data (w96_d3 87.46 % val top-1 at 5.9 M MACs beats
# w96_d6's 86.99 % at 11.8 M), so anchors of depth 6 sat below the zoo's frontier and so did
# their stitches (README, "Does an SN-Net match networks trained alone?").
FMNIST_FAMILY: dict[str, FmnistVitSpec] = {
    "fmnist_vit_ti": FmnistVitSpec(embed_dim=24, num_heads=2, depth=3),
    "fmnist_vit_s": FmnistVitSpec(embed_dim=48, num_heads=3, depth=3),
    "fmnist_vit_b": FmnistVitSpec(embed_dim=96, num_heads=6, depth=3),
}


def normalize_name(name: str) -> str:
    """Map CLI-friendly spellings to registry names: ``'FMNIST-ViT-Ti'`` -> ``'fmnist_vit_ti'``.

    Only hyphens and case are normalized; a pretrained tag after ``.`` is kept.
    """
    arch, dot, tag = name.partition(".")
    return arch.strip().lower().replace("-", "_") + dot + tag


def weights_path(name: str) -> Path:
    """The shipped ``.safetensors`` file of a family member (``fmnist_vit_s``, ``fmnist_vit_s.converged``)."""
    arch, _, tag = normalize_name(name).partition(".")
    return WEIGHTS_DIR / tag / f"{arch}.safetensors"


def _build_command(name: str) -> str:
    """The command that builds a shipped member's weights (of its tag)."""
    tag = name.partition(".")[2]
    return "python scripts/train_fmnist_family.py" + (f" --recipe fmnist-{tag} --family.tag {tag}" if tag else "")


def tagged_name(name: str, tag: str) -> str:
    """A member's name with a pretrained tag (``fmnist_vit_s.converged``); the untagged name for ``""``."""
    return f"{name}.{tag}" if tag else name


def _cfg(name: str) -> dict[str, Any]:
    tag = name.partition(".")[2]
    recipe = f"with the {tag} recipe (snnet/recipes/fmnist-{tag}.yaml) " if tag else ""
    return {
        "file": str(weights_path(name)),
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": (0.2860,),
        "std": (0.3530,),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2302.06586",
        "notes": (f"Trained from scratch on Fashion-MNIST {recipe}by scripts/train_fmnist_family.py; "
                  f"see {(weights_path(name).parent / 'MODEL_CARD.md').relative_to(WEIGHTS_DIR.parent.parent)}"),
    }


# ``fmnist_vit`` (any architecture of the design) has no shipped weights: only a file overlay.
# The untagged cfg comes first, so it stays each member's default.
default_cfgs = generate_default_cfgs({tagged_name(name, tag): _cfg(tagged_name(name, tag)) for name in FMNIST_FAMILY
                                      for tag in TAGS} | {"fmnist_vit": dict(
    _cfg("fmnist_vit"), file=None, notes="Any width/depth/patch of the Fashion-MNIST ViT design; weights from a "
                                          "file written by scripts/train_fmnist_zoo.py")})


def _check_shipped(name: str) -> None:
    """Refuse a shipped weights file whose bytes are not those ``family.json`` records (a damaged
    install or a half-copied file would otherwise load as a network that is silently wrong)."""
    import json

    from .io import verify_checksum, warn_unverified

    family = weights_path(name).parent / "family.json"
    fix = f"reinstall snnet, or rebuild the weights with `{_build_command(name)}`"
    if not family.is_file():
        warn_unverified(weights_path(name), f"{family}, which records the shipped files' SHA-256, is missing", fix)
        return
    try:
        record = json.loads(family.read_text())
    except ValueError as e:
        raise SnnetError(f"{family} is corrupt ({e}): the shipped weights cannot be verified; {fix}") from e
    verify_checksum(weights_path(name), _checksums(record), family, fix)


def _checksums(record: Any) -> dict[str, Any]:
    """``family.json``'s checksums as :func:`~snnet.io.verify_checksum` reads them: its ``sha256`` table (by file name)
    and, from a family.json written before that table, each model's own ``sha256`` entry: such a file was read as
    recording none, and a damaged weights file loaded with only a warning."""
    from .io import CHECKSUMS_KEY

    if not isinstance(record, dict):
        return {}
    models, table = record.get("models"), record.get(CHECKSUMS_KEY)
    if table is not None and not isinstance(table, dict):
        return {CHECKSUMS_KEY: table}  # refused as corrupt, not read as recording none
    # an entry that is not a checksum (a number) is kept: verify_checksum calls the record corrupt, not the weights
    older = {str(m.get("file") or f"{n}.safetensors"): m["sha256"] for n, m in models.items()
             if isinstance(m, dict) and m.get("sha256") is not None} if isinstance(models, dict) else {}
    return {CHECKSUMS_KEY: {**older, **(table or {})}}


def _create(name: str, pretrained: bool, spec: FmnistVitSpec, **kwargs: Any) -> VisionTransformer:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    arch = name  # the architecture; ``name`` gains the pretrained tag, which names the weights
    tag = kwargs.get("pretrained_cfg")  # timm passes the tag of "fmnist_vit_s.converged" here
    if isinstance(tag, str) and tag:
        if tag not in TAGS:
            raise SnnetError(f"{name} has no pretrained tag {tag!r}; its shipped trainings are "
                             f"{', '.join(repr(t) for t in TAGS if t)} and the default (no tag)")
        name = tagged_name(arch, tag)
    if pretrained and not overlay and not weights_path(name).is_file():
        # timm would raise a bare FileNotFoundError; say where the weights come from.
        if arch not in FMNIST_FAMILY:
            raise SnnetError(f"{name} has no shipped weights; pass a file written by scripts/train_fmnist_zoo.py "
                             "(pretrained_cfg_overlay=dict(file=...))")
        raise SnnetError(
            f"pretrained weights for {name} are missing ({weights_path(name)}); they are shipped with "
            f"snnet and built by `{_build_command(name)}`"
        )
    if pretrained and not overlay and arch in FMNIST_FAMILY:
        _check_shipped(name)
    model_args: dict[str, Any] = dict(
        img_size=IMG_SIZE,
        patch_size=spec.patch_size,
        in_chans=1,
        num_classes=10,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        class_token=True,
        global_pool="token",
    )
    return build_model_with_cfg(
        VisionTransformer,
        arch,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(model_args, **kwargs),
    )


@register_model
def fmnist_vit(pretrained: bool = False, embed_dim: int = 16, num_heads: int | None = None, depth: int = 6,
               patch_size: int = 7, mlp_ratio: float = 4.0, **kwargs: Any) -> VisionTransformer:
    """Any Fashion-MNIST ViT of the family's design (heads default to :func:`default_heads`)."""
    spec = FmnistVitSpec(embed_dim, num_heads or default_heads(embed_dim), depth, patch_size, mlp_ratio)
    return _create("fmnist_vit", pretrained, spec, **kwargs)


@register_model
def fmnist_vit_ti(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/7 for 28x28 Fashion-MNIST: width 24, 2 heads, depth 3."""
    return _create("fmnist_vit_ti", pretrained, FMNIST_FAMILY["fmnist_vit_ti"], **kwargs)


@register_model
def fmnist_vit_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/7 for 28x28 Fashion-MNIST: width 48, 3 heads, depth 3."""
    return _create("fmnist_vit_s", pretrained, FMNIST_FAMILY["fmnist_vit_s"], **kwargs)


@register_model
def fmnist_vit_b(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/7 for 28x28 Fashion-MNIST: width 96, 6 heads, depth 3."""
    return _create("fmnist_vit_b", pretrained, FMNIST_FAMILY["fmnist_vit_b"], **kwargs)
