"""Training checkpoints: written atomically, read with clear errors, resumed exactly.

A checkpoint is one ``torch.save`` file holding everything that decides the future of a run
(weights, optimizer, schedule, scaler, stitch sampler, data position, every RNG). It is written
to a temporary file, fsynced and renamed over the old one, so a crash leaves the previous
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_write

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "load_checkpoint", "resolve_resume", "rng_state", "save_checkpoint",
           "set_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1

def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: temp file in the same folder, fsync, rename over the old one.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint, raising :class:`CheckpointError` if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
        raise CheckpointError(f"checkpoint {path} is corrupt or not an snnet training checkpoint ({type(e).__name__}: "
                              f"{e}); resume from an earlier one or start again") from e
    need = {"version", "model", "trainer", "sampler", "rng", "epoch", "epoch_step", "step", "config", "stitches"}
    if not isinstance(state, dict) or not need <= set(state):
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks "
                              f"{sorted(need - set(state)) if isinstance(state, dict) else 'everything'}")
    if state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer snnet (version {state['version']})")
    return state


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_resume(resume: str | None, out_dir: str | os.PathLike) -> Path | None:
    """``'auto'`` -> ``out_dir/checkpoint.pt`` if it exists (else a fresh start); a path must exist."""
    if resume is None:
        return None
    if resume == "auto":
        path = Path(out_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint there (expected a file or a folder with {CHECKPOINT_NAME})")
    return path
