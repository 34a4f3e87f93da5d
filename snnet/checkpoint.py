"""Training checkpoints: written atomically, read with clear errors, resumed exactly.

A checkpoint is one ``torch.save`` file holding everything that decides the future of a run
(weights, optimizer, schedule, scaler, stitch sampler, data position, every RNG). It is written
to a temporary file, fsynced and renamed over the old one, so a crash leaves the previous
checkpoint or the new one, never a torn file. It carries a SHA-256 of its whole content
(every tensor's bytes, every number), checked on reading, so damaged bytes are refused
instead of resuming with a weight off by thousands.

The last ``keep`` checkpoints are kept: ``checkpoint.pt`` is the latest, and ``checkpoints/``
holds it and the ones before it as ``step-<N>.pt`` (hard links where the filesystem has them, so
the latest costs no second copy), to go back to when the latest is damaged or a run went wrong.
A checkpoint that cannot be written (a full disk) is one :class:`CheckpointError` line; the
previous one stays intact.

Version 2 (the configuration tree, :mod:`snnet.config`) keeps the run's settings as a nested
dict under ``config``; version 1 kept flat ``config`` and ``optim`` dicts, which
:func:`checkpoint_config` converts.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig, from_legacy
from .errors import CheckpointError
from .io import atomic_write
from .sampling import seed_everything  # re-exported: the training loop seeds through here

__all__ = ["CHECKPOINTS_DIR", "CHECKPOINT_NAME", "CHECKPOINT_VERSION", "checkpoint_config", "earlier_checkpoints",
           "load_checkpoint", "peek_checkpoint", "resolve_resume", "rng_state", "run_folder", "save_checkpoint", "seed_everything", "set_rng_state",
           "state_digest"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINTS_DIR = "checkpoints"  # the last few checkpoints, step-<N>.pt (see the module docstring)
CHECKPOINT_VERSION = 2
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


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep: int = 1) -> Path:
    """Write ``state`` atomically: temp file in the same folder, fsync, rename over the old one.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file;
    a write that fails (a full disk) raises :class:`CheckpointError` in one line. With ``keep > 1``
    the new checkpoint is also kept as ``checkpoints/step-<N>.pt`` (``state["step"]``), and only
    the last ``keep`` of those remain.
    """
    path = Path(path)
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    state[DIGEST_KEY] = state_digest(state)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as e:
                # torch's zip writer turns the file's failed write (a full disk) into its own RuntimeError ("unexpected
                # pos 704 vs 598"); the OSError it swallowed says what happened
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        if keep > 1:
            _keep_copy(path, int(state.get("step", 0)), keep)
        else:  # no copy of this one (keep_checkpoints 1, maybe lowered on resume): still, later ones are abandoned
            _drop_later_copies(path.parent, int(state.get("step", 0)))
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CheckpointError(
            f"cannot write checkpoint {path} ({e.strerror or e}); the previous checkpoint is intact"
            + ("; free some disk space and resume with --resume auto" if full else "")) from e
    return path


def _keep_copy(path: Path, step: int, keep: int) -> None:
    """``path`` also as ``checkpoints/step-<step>.pt`` (a hard link, else a copy); the last ``keep`` stay.

    Copies of later steps are of a run resumed from an earlier copy since: they belong to the part it
    abandoned (as the lines of metrics.jsonl after its checkpoint, dropped on resume) and go, so the
    copies kept are this run's latest and the way back from a damaged checkpoint (:func:`_go_back`) never lands after it."""
    folder = path.parent / CHECKPOINTS_DIR
    folder.mkdir(exist_ok=True)
    copy = folder / f"step-{step:08d}.pt"
    _drop_later_copies(path.parent, step)
    copy.unlink(missing_ok=True)
    try:
        os.link(path, copy)
    except OSError:  # no hard links here (some network and FAT filesystems): a real copy
        atomic_write(copy, lambda tmp: shutil.copyfile(path, tmp))
    for old in earlier_checkpoints(path.parent)[keep:]:
        old.unlink(missing_ok=True)


def _drop_later_copies(run: Path, step: int) -> None:
    """Delete the copies in ``run/checkpoints/`` of steps after ``step``: a part of the run given up (:func:`_keep_copy`)."""
    name = f"step-{step:08d}.pt"
    for later in earlier_checkpoints(run):
        if later.name > name:  # zero-padded steps: the names sort as the steps do
            later.unlink(missing_ok=True)


def earlier_checkpoints(run: str | os.PathLike) -> list[Path]:
    """The checkpoints kept in ``run/checkpoints/``, newest first."""
    return sorted(Path(run).glob(f"{CHECKPOINTS_DIR}/step-*.pt"), reverse=True)


def checkpoint_config(state: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint was written with, as a nested dict of the configuration tree: every
    setting (those newer than the checkpoint at their defaults), or for a version 1 checkpoint the
    settings it recorded (it did not record the data, model or space options)."""
    if state.get("version", 1) >= 2:
        return TrainConfig().merged(state["config"]).to_dict()
    return from_legacy(state["config"], state.get("optim"))


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
                              f"{_go_back(path)}") from e
    if isinstance(state, dict) and DIGEST_KEY in state:
        digest = state.pop(DIGEST_KEY)
        if digest != state_digest(state):
            raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the SHA-256 stored in it "
                                  f"(bytes changed on disk); {_go_back(path)}")
    need = {"version", "model", "trainer", "sampler", "rng", "epoch", "epoch_step", "step", "config", "stitches"}
    if not isinstance(state, dict) or not need <= set(state):
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks "
                              f"{sorted(need - set(state)) if isinstance(state, dict) else 'everything'}")
    if state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer snnet (version {state['version']})")
    return state


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's small entries (settings, step, version...) without reading its tensors (memory-mapped),
    unchecked; None if it cannot be read so (:func:`load_checkpoint` then says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_checkpoint reports it properly
        return None
    if not isinstance(state, dict) or not {"config", "step"} <= set(state):
        return None
    return {k: v for k, v in state.items() if k not in ("model", "trainer", "sampler", "rng")}


def run_folder(path: str | os.PathLike) -> Path:
    """The folder of the run that wrote checkpoint ``path``: the one holding it, or for a kept copy
    (``checkpoints/step-<N>.pt``) the one above (a resume may write elsewhere: ``--resume a/checkpoint.pt --out b``)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent


def _go_back(path: Path) -> str:
    """What to do about a checkpoint that cannot be read: the earlier copies this run kept, if any."""
    run = run_folder(path)
    copies = [p for p in earlier_checkpoints(run) if not p.samefile(path)] if path.exists() else earlier_checkpoints(run)
    if copies:
        return f"resume from an earlier copy (--resume {copies[0]}) or start again"
    return "resume from an earlier copy or start again"


def _reason(e: BaseException) -> str:
    """torch's error in a few words: its first line, without the advice to load with weights_only=False
    (unsafe for a file that is damaged or not ours)."""
    first = (str(e).strip().splitlines() or [""])[0]
    if not first or "weights_only" in first.lower() or "weights only" in first.lower():
        return f"{type(e).__name__}: not a readable snnet checkpoint"
    return f"{type(e).__name__}: {first[:200]}"


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
