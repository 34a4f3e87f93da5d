"""One run per output folder, and no run lost by accident.

* A folder that holds a training run (finished or stopped) is never written over unless asked:
  continue it with ``resume``, or replace it with ``overwrite`` (which deletes that run's files,
  and only those).
* A live run holds an OS file lock (``fcntl.flock`` on ``.snnet-run.lock`` in the folder). The
  kernel drops it when the process ends however it ends, so ``kill -9`` leaves nothing stale;
  a second run on the same folder is refused with the first one's PID.
* Ctrl-C (SIGINT) or SIGTERM during training becomes a request to stop after the current step
  (:class:`StopSignals`), so the run can write a consistent checkpoint before it exits.

:func:`check_run_folder` is the read-only check a command runs before any work;
:func:`claim_run_folder` takes the lock for the length of a run.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import signal
import threading
import time
import weakref
from pathlib import Path
from types import FrameType

from .checkpoint import CHECKPOINT_NAME, CHECKPOINTS_DIR, resolve_resume
from .errors import ConfigError, RunFolderError
from .io import PREVIOUS_SUFFIX, check_creatable, read_object, remove_stale_temps
from .families.lm_catalog import TOKENIZER_FILES
from .families.lm_lora import ADAPTERS_NAME
from .model import CONFIG_NAME, WEIGHTS_NAME, is_saved_network

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not locked (the other checks still hold)
    fcntl = None  # type: ignore[assignment]

__all__ = ["EVALS_NAME", "LOCK_NAME", "METRICS_NAME", "RESUMED_FROM", "RUN_ENTRIES", "TB_NAME", "RunLock", "StopSignals", "check_run_folder", "claim_run_folder",
           "foreign_files", "run_entries"]

LOCK_NAME = ".snnet-run.lock"
METRICS_NAME = "metrics.jsonl"
EVALS_NAME = "evals.jsonl"  # the evaluations during training (one JSON object per evaluation)
TRAIN_CONFIG_NAME = "train_config.json"
FINAL_NAME = "final"
TB_NAME = "tb"  # TensorBoard's event files (run.tensorboard)
# everything a training run writes into its folder (and all that --overwrite deletes)
RUN_ENTRIES = (CHECKPOINT_NAME, CHECKPOINTS_DIR, METRICS_NAME, EVALS_NAME, TRAIN_CONFIG_NAME, FINAL_NAME, TB_NAME)
# train_config.json's record of the checkpoint a resume into another folder (--resume a/checkpoint.pt --out b) came from
RESUMED_FROM = "resumed_from"
# what such a resume writes into b before its first checkpoint (a failure in between leaves them: a full disk, Ctrl-C)
_RESUME_START = (TRAIN_CONFIG_NAME, METRICS_NAME, EVALS_NAME, TB_NAME)
# What a run writes atomically (io.atomic_write: a temporary file renamed into place) inside its folders: the saved
# network (save_pretrained's files, a plain model's weights, a language model's adapters), a checkpoint copied where
# hard links fail, and the event files a resume into another folder copies (TensorBoard's writer appends to its own).
# A writer killed mid-write leaves their temporary files, removed when the folder is next claimed.
_ATOMIC_FILES = {FINAL_NAME: (WEIGHTS_NAME, CONFIG_NAME, ADAPTERS_NAME), CHECKPOINTS_DIR: ("step-*.pt",),
                 TB_NAME: ("events.out.tfevents.*",)}
# What a run writes inside its folders (the others of RUN_ENTRIES are files): the saved network (save_pretrained's
# files, a language model's adapters and tokenizer), the kept checkpoints, TensorBoard's event files. A folder by
# one of these names holding anything else holds the user's files, which --overwrite must not delete with the run's.
_RUN_FOLDER_FILES = {
    FINAL_NAME: (*_ATOMIC_FILES[FINAL_NAME], *TOKENIZER_FILES),
    CHECKPOINTS_DIR: _ATOMIC_FILES[CHECKPOINTS_DIR],
    TB_NAME: _ATOMIC_FILES[TB_NAME],
}
_LOCK_RETRY_SECONDS = 0.5  # a concurrent check_run_folder holds the lock shared for microseconds
# The locks this process holds. A forked child (a DataLoader worker) shares a flock with its parent
# through the inherited descriptor, so after `kill -9` of the run the lock stayed held, and a new run on
# the folder was refused naming a dead PID, until the workers noticed (seconds later); each child
# closes its copies at once and forgets them (a release there must not delete the parent's lock file).
_HELD_LOCKS: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for lock in list(_HELD_LOCKS):
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def run_entries(folder: str | os.PathLike) -> list[str]:
    """The names of a training run's files present in ``folder`` (empty: no run there)."""
    folder = Path(folder)
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def foreign_files(folder: str | os.PathLike) -> list[Path]:
    """What a training run does not write but ``folder``'s run entries hold (empty: --overwrite deletes only the
    run's): files in its final/, checkpoints/ or tb/ other than the run's (and their writers' temporary files),
    every file of a final/ whose config.json snnet did not write (another program's network, by the same names),
    and an entry of another kind than the run's (a folder named metrics.jsonl, a file named final)."""
    folder = Path(folder)
    found = []
    for name in run_entries(folder):
        path, patterns = folder / name, _RUN_FOLDER_FILES.get(name)
        if patterns is None or not path.is_dir():
            if (patterns is None) == path.is_dir():
                found.append(path)
            continue
        # io.atomic_write's temporary names, and the bytes io.keep_previous keeps while a save replaces a file (all of
        # a save's files since they are recorded in config.json: a save killed in between leaves them)
        ours = [*patterns, *(f".{p}.*.tmp" for p in patterns), *(p + PREVIOUS_SUFFIX for p in patterns)]
        if name == FINAL_NAME and (path / CONFIG_NAME).exists() and not is_saved_network(path):
            ours = []  # a Hugging Face model's config.json and model.safetensors: the names are a run's, the files not
        found += [p for p in sorted(path.iterdir())
                  if p.is_dir() or not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in ours)]
    return found


def _resume_started(folder: Path) -> Path | None:
    """The checkpoint whose resume into ``folder`` failed before its first checkpoint, if ``folder``'s run entries are
    only what that resume writes until then (and train_config.json records it); None if they are anything else."""
    present = run_entries(folder)
    if not present or not set(present) <= set(_RESUME_START) or foreign_files(folder):
        return None
    recorded = (read_object(folder / TRAIN_CONFIG_NAME) or {}).get(RESUMED_FROM)
    return Path(recorded) if isinstance(recorded, str) else None


class RunLock:
    """An exclusive ``flock`` on ``folder/.snnet-run.lock``, holding the owner's PID; see :meth:`acquire`."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> "RunLock":
        """Lock ``folder`` for this process, or raise :class:`RunFolderError` naming the holder's PID."""
        path = Path(folder) / LOCK_NAME
        if fcntl is None:
            return cls(None, path)
        deadline = time.monotonic() + _LOCK_RETRY_SECONDS
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise RunFolderError(f"cannot lock {path} ({e.strerror}); choose another --out") from e
                pid = _read_pid(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise RunFolderError(_busy_message(Path(folder), pid)) from None
            # The previous holder deletes the file when it ends; if it did so between our open and
            # our lock, we hold a lock on a deleted file that nobody else can see: start over.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        lock = cls(fd, path)
        _HELD_LOCKS.add(lock)
        return lock

    def release(self) -> None:
        """Delete the lock file and drop the lock (the file goes first, while still locked: see acquire)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        _HELD_LOCKS.discard(self)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    except (OSError, ValueError):
        return None


def _busy_message(folder: Path, pid: int | None) -> str:
    who = f"a running snnet train (PID {pid})" if pid else "another running snnet train"
    return f"{folder} is in use by {who}; wait for it to end or stop it, or choose another --out"


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The PID of the live run holding ``folder`` (0 if unknown), or None if no run holds it. Read-only."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run (an unreadable one: claim_run_folder will say)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two checks never block each other
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _read_pid(fd) or 0
            return None
        return None
    finally:
        os.close(fd)  # drops the shared lock at once


def check_run_folder(out: str | os.PathLike, resume: str | None = None, overwrite: bool = False) -> Path | None:
    """Everything about ``out`` that can stop a run, checked before any work; creates nothing.

    Refuses (one line each) ``resume`` with ``overwrite``; an ``out`` that is a file or cannot be
    written; a folder a live run holds; a missing ``resume`` checkpoint; a folder that holds a
    run which neither ``resume`` continues nor ``overwrite`` replaces (a resume into ``out`` from another folder that
    failed before its first checkpoint is continued by the same ``resume``: ``auto`` says so); and an ``overwrite`` of a run
    whose folders hold files it did not write (:func:`foreign_files`). Returns the checkpoint to
    resume from (None: a fresh start).
    """
    return _check(Path(out), resume, overwrite, locked=False)


def _check(out: Path, resume: str | None, overwrite: bool, locked: bool) -> Path | None:
    if overwrite and resume is not None:
        raise ConfigError("--overwrite deletes the run that --resume would continue: give one of them")
    check_creatable(out, error=RunFolderError)
    holder = None if locked else lock_holder(out)  # our own lock would look busy
    if holder is not None:
        raise RunFolderError(_busy_message(out, holder))
    resume_path = resolve_resume(resume, out)
    present = run_entries(out) if out.is_dir() else []
    continues = resume == "auto" or (resume_path is not None and resume_path.resolve().is_relative_to(out.resolve()))
    started = _resume_started(out) if present and not overwrite else None
    if resume_path is not None and started is not None and started == resume_path.resolve():
        continues = True  # the same command again, after it failed before its first checkpoint: taken over
    if resume == "auto" and resume_path is None and started is not None:
        # a fresh start here would write over the history the resume copied: the run it holds is the checkpoint's
        raise RunFolderError(f"--resume auto: {out} holds the start of a resume of {started}, which ended before its "
                             f"first checkpoint: run it again with --resume {started}, replace it with --overwrite, or "
                             "choose another --out")
    if resume == "auto" and resume_path is None and (FINAL_NAME in present or CHECKPOINTS_DIR in present):
        # a fresh start here would write over the run's network and drop the copies it kept (a later step's go
        # when a checkpoint is written): checkpoint.pt was deleted (after the run ended, to free the space) or moved
        copies = sorted((out / CHECKPOINTS_DIR).glob("step-*.pt"), reverse=True)
        back = f"resume from a kept copy with --resume {copies[0]}, " if copies else ""
        raise RunFolderError(f"--resume auto: {out} holds a training run ({', '.join(present)}) but no "
                             f"{CHECKPOINT_NAME} to continue it from: {back}replace the run with --overwrite (deletes "
                             "those files), or choose another --out")
    if present and not overwrite and not continues:
        finished = FINAL_NAME in present
        what = "a finished" if finished else "an unfinished"
        go_on = (f"train further from its network with --init {out / FINAL_NAME} and a new --out" if finished
                 else "continue it with --resume auto")
        raise RunFolderError(f"{out} already holds {what} training run ({', '.join(present)}): {go_on}, replace it "
                             "with --overwrite (deletes those files), or choose another --out")
    foreign = foreign_files(out) if present and overwrite else []
    if foreign:  # --overwrite deletes the run's files: these are not, and would have gone with them
        shown = ", ".join(str(p.relative_to(out)) for p in foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                                           if len(foreign) > 3 else "")
        raise RunFolderError(f"--overwrite: {out} holds files a training run does not write ({shown}), which deleting "
                             "the run's would delete too: move them out of the run's folders, or choose another --out")
    return resume_path


def claim_run_folder(out: str | os.PathLike, resume: str | None = None, overwrite: bool = False) -> RunLock:
    """Create ``out``, lock it for this run, and make it ready: :func:`check_run_folder` again under
    the lock (nothing can change in between), the old run's files deleted if ``overwrite`` (or if they are only
    the start of this same resume, failed before its first checkpoint), and the temporary files of writers killed
    mid-write removed. Release the lock when the run ends."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"--out {out}: cannot create it ({e.strerror or e}); choose a writable folder") from e
    lock = RunLock.acquire(out)
    try:
        resume_path = _check(out, resume, overwrite, locked=True)
        # the start of this same resume, failed before its first checkpoint: begun again from nothing, like --overwrite
        retried = resume_path is not None and _resume_started(out) == resume_path.resolve()
        if overwrite or retried:
            for name in run_entries(out):
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        remove_stale_temps(out, RUN_ENTRIES)
        for folder, names in _ATOMIC_FILES.items():
            remove_stale_temps(out / folder, names)
    except BaseException:
        lock.release()
        raise
    return lock


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM, while active, only set :attr:`received`; the training loop stops
    after the step in progress and writes a checkpoint. The same signal a second time acts at once,
    as usual; the other one stays deferred (torchrun answers Ctrl-C with SIGTERM to its workers,
    which must not cut their checkpoint short).

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name
        signal.signal(signum, self._old.pop(signum))  # type: ignore[arg-type]

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old = {}

    def start(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def stop(self) -> None:
        self._restore()
