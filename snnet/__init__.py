"""snnet: Stitchable Neural Networks (Pan, Cai, Zhuang, CVPR 2023) for timm model families.

    import snnet
    net = snnet.create_snnet(["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
    net.init_stitching(calibration_loader)   # least-squares fit of every stitching layer
    net.select("deit_tiny_patch16_224[:4]+deit_small_patch16_224[3:]")
    logits = net(images)

``import snnet`` loads torch and timm and registers snnet's model families with timm. The ``snnet``
command line does not: it imports the package without them (seconds of CPU that ``snnet --help`` or a
refused option does not need), each command imports what it uses, and a name below is imported
from its module on first use.
"""

import os as _os
import sys as _sys
from importlib import import_module as _import_module
from typing import Any as _Any

# each public name and the module it lives in (errors, results and config need no torch)
_HOMES = {
    **dict.fromkeys(["ActivationSpec", "Adapter", "AnchorParts", "AnchorSpec", "register_adapter", "split_model"], "anchors"),
    **dict.fromkeys(["CheckpointError", "NotStitchableError", "SnnetError", "StitchNotFoundError", "UnknownModelError"],
                    "errors"),
    **dict.fromkeys(["InitReport", "StitchCost", "StitchedNet", "create_snnet"], "model"),
    "Row": "results", "SpaceConfig": "config", **dict.fromkeys(["Segment", "Stitch", "StitchSpace"], "space"),
}
__all__ = sorted([*_HOMES, "load"])
__version__ = "0.1.0"


def __getattr__(name: str) -> _Any:
    """PEP 562: a public name, imported from its module on first use (the command line's lazy loading)."""
    if name == "load":
        value = __getattr__("StitchedNet").from_pretrained
    elif name in _HOMES:
        value = getattr(_import_module(f".{_HOMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'snnet' has no attribute {name!r}")
    globals()[name] = value
    return value


def _loading_as_command() -> bool:
    """True while ``python -m snnet`` (argv[0] is "-m" while the package loads) or the ``snnet`` script starts."""
    return _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "snnet"


if not _loading_as_command():  # a program's `import snnet`: the library, with snnet's families registered in timm
    from . import adapters, pretrained, tiny  # noqa: F401  (the shipped, the tiny test families; the Swin, ResNet... adapters)

    for _name in __all__:
        __getattr__(_name)
    del _name
