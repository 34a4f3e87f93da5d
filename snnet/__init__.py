"""snnet: Stitchable Neural Networks (Pan, Cai, Zhuang, CVPR 2023) for timm model families.

    import snnet
    net = snnet.create_snnet(["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
    net.init_stitching(calibration_loader)   # least-squares fit of every stitching layer
    net.select("deit_tiny_patch16_224[:4]+deit_small_patch16_224[3:]")
    logits = net(images)
"""

from . import pretrained, tiny  # noqa: F401  (register the shipped and the tiny test families with timm)
from . import adapters  # noqa: F401  (register the Swin, ResNet and ConvNeXt adapters)
from .anchors import ActivationSpec, Adapter, AnchorParts, AnchorSpec, register_adapter, split_model
from .errors import CheckpointError, NotStitchableError, SnnetError, StitchNotFoundError, UnknownModelError
from .model import InitReport, StitchCost, StitchedNet, create_snnet
from .space import Segment, SpaceConfig, Stitch, StitchSpace

load = StitchedNet.from_pretrained

__all__ = [
    "ActivationSpec", "Adapter", "AnchorParts", "AnchorSpec", "CheckpointError", "InitReport", "NotStitchableError",
    "Segment", "SnnetError", "SpaceConfig", "Stitch", "StitchCost", "StitchNotFoundError", "StitchSpace", "StitchedNet",
    "UnknownModelError", "create_snnet", "load", "register_adapter", "split_model",
]
__version__ = "0.1.0"
