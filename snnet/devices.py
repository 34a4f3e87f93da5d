"""Which device a run, an evaluation or a load goes to: the name given, checked against this machine.

Kept apart from the training loop so that loading a network or an exported stitch (which must not
import training) checks a device the same way a run does.
"""

from __future__ import annotations

import os
import platform

import torch

from .errors import ConfigError

__all__ = ["cpu_model", "default_device"]


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


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the OS reports it ("AMD EPYC", "Intel(R) Xeon(R) Platinum ..."), for benchmark
    records: runs on machines of the same size but another CPU differ in speed and in the last digits of a training
    (another kernel sums in another order), and a record without it cannot say which it was. Linux's
    ``/proc/cpuinfo``, else :func:`platform.processor` (macOS, Windows), else ``"unknown"``."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
