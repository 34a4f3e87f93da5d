"""Which device a run, an evaluation or a load goes to: the name given, checked against this machine.

Kept apart from the training loop so that loading a network or an exported stitch (which must not
import training) checks a device the same way a run does.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["default_device"]


def default_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, else CUDA if there is one, else CPU; a bare 'cuda' becomes this process's GPU (LOCAL_RANK).

    A name torch does not know, or a device this machine does not have, raises :class:`ConfigError`.
    """
    try:
        device = torch.device(name) if name is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: snnet runs on cpu, cuda or mps")
    return device
