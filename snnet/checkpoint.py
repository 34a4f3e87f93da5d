"""Training checkpoints: written atomically, read with clear errors, resumed exactly.

A checkpoint is one ``torch.save`` file holding everything that decides the future of a run
(weights, optimizer, schedule, scaler, stitch sampler, data position, every RNG). It is written
to a temporary file, fsynced and renamed over the old one, so a crash leaves the previous
checkpoint or the new one, never a torn file. It carries a SHA-256 of its whole content
(every tensor's bytes, every number), checked on reading, so damaged bytes are refused
instead of resuming with a weight off by thousands.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_write

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "load_checkpoint", "resolve_resume", "rng_state", "save_checkpoint",
           "seed_everything", "set_rng_state", "state_digest"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
DIGEST_KEY = "sha256"  # the checkpoint's checksum, over everything else in it


def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: its structure, every tensor's dtype, shape and bytes, every value.

    Computed on the loaded objects (not on the file's bytes, which would have to hold their own
    checksum), so it is the same before saving and after loading.
    """
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)};".encode())
            for k, v in obj.items():
                feed(k)
                feed(v)
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__[0]}{len(obj)};".encode())
            for v in obj:
                feed(v)
        else:  # numbers, strings, None: repr is exact (floats round-trip)
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    feed(state)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: temp file in the same folder, fsync, rename over the old one.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    state[DIGEST_KEY] = state_digest(state)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint, raising :class:`CheckpointError` if it is missing, corrupt or damaged.

    A checkpoint with a checksum must match it; one written before snnet stored checksums
    loads unverified.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
        raise CheckpointError(f"checkpoint {path} is corrupt or not an snnet training checkpoint ({_reason(e)}); "
                              "resume from an earlier one or start again") from e
    if isinstance(state, dict) and DIGEST_KEY in state:
        digest = state.pop(DIGEST_KEY)
        if digest != state_digest(state):
            raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the SHA-256 stored in it "
                                  "(bytes changed on disk); resume from an earlier copy or start again")
    need = {"version", "model", "trainer", "sampler", "rng", "epoch", "epoch_step", "step", "config", "stitches"}
    if not isinstance(state, dict) or not need <= set(state):
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks "
                              f"{sorted(need - set(state)) if isinstance(state, dict) else 'everything'}")
    if state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer snnet (version {state['version']})")
    return state


def _reason(e: BaseException) -> str:
    """torch's error in a few words: its first line, without the advice to load with weights_only=False
    (unsafe for a file that is damaged or not ours)."""
    first = (str(e).strip().splitlines() or [""])[0]
    if not first or "weights_only" in first.lower() or "weights only" in first.lower():
        return f"{type(e).__name__}: not a readable snnet checkpoint"
    return f"{type(e).__name__}: {first[:200]}"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` — everything a run draws from
    outside its own generators (random-init weights, dropout, augmentation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
