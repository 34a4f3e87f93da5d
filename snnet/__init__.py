"""snnet: Stitchable Neural Networks (Pan, Cai, Zhuang, CVPR 2023) for timm model families.

    import snnet
    net = snnet.create_snnet(["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
    net.init_stitching(calibration_loader)   # least-squares fit of every stitching layer
    net.select("deit_tiny_patch16_224[:4]+deit_small_patch16_224[3:]")
    logits = net(images)
"""

import os as _os
import sys as _sys

try:  # torch and timm load for seconds: Ctrl-C then must not print their import chain from the command line
    from . import pretrained, tiny  # noqa: F401  (register the shipped and the tiny test families with timm)
    from . import adapters  # noqa: F401  (register the Swin, ResNet and ConvNeXt adapters)
    from .anchors import ActivationSpec, Adapter, AnchorParts, AnchorSpec, register_adapter, split_model
    from .errors import CheckpointError, NotStitchableError, SnnetError, StitchNotFoundError, UnknownModelError
    from .model import InitReport, StitchCost, StitchedNet, create_snnet
    from .results import Row
    from .space import Segment, SpaceConfig, Stitch, StitchSpace
except KeyboardInterrupt:
    # `python -m snnet` (argv[0] is "-m" while the package loads) or the `snnet` script: the command's one line.
    # Imported by a program of yours, the interrupt is yours to handle, as usual.
    if _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "snnet":
        _sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    raise

load = StitchedNet.from_pretrained

__all__ = [
    "ActivationSpec", "Adapter", "AnchorParts", "AnchorSpec", "CheckpointError", "InitReport", "NotStitchableError",
    "Row", "Segment", "SnnetError", "SpaceConfig", "Stitch", "StitchCost", "StitchNotFoundError", "StitchSpace", "StitchedNet",
    "UnknownModelError", "create_snnet", "load", "register_adapter", "split_model",
]
__version__ = "0.1.0"
