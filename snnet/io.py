"""Atomic file writes: a crash while saving leaves the previous file intact, never a torn one.

Every file snnet writes (networks, checkpoints, results, plots, exports) goes through
:func:`atomic_write`: the content is written to a temporary file in the same folder, flushed
to disk, and renamed over the target in one step. A process killed mid-write leaves its
temporary file behind; :func:`remove_stale_temps` clears those once no writer can be alive.
Weight files are checksummed (:func:`sha256_file`) so damaged bytes are refused on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from .errors import SnnetError, UnverifiedFileWarning, reason, user_stacklevel

if TYPE_CHECKING:  # annotations only: this module does not load torch
    import torch

_TMP_SUFFIX = ".tmp"
# a file's bytes before a save replaced it, kept (a hard link, no copy) until the save's record of checksums (its
# config.json, written last) is in: a save stopped between the two leaves the old record beside these old bytes
PREVIOUS_SUFFIX = ".previous"
# where a saved network's or stitch's config.json records its files' checksums: name -> SHA-256 hex
CHECKSUMS_KEY = "sha256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # as sha256_file writes it
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask sets it: set it back


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    ``durable`` also fsyncs the file and its folder, so the rename survives a power cut.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private (0600); give them the usual mode
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
            pass
    return path


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left for ``names`` in ``folder`` (a killed writer's).

    Only safe when no writer of those files can be running (e.g. while holding the run's lock):
    a live writer's temporary file would be deleted under it. Returns the files removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*{_TMP_SUFFIX}"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as hex (read in chunks: weight files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_checksum(config: dict, name: str, path: str | os.PathLike) -> None:
    """Note in ``config`` (a config.json's content) the SHA-256 of the file ``path`` that will be called ``name``."""
    config[CHECKSUMS_KEY] = {**(config.get(CHECKSUMS_KEY) or {}), name: sha256_file(path)}


def read_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path`` (a saved config.json), or None when it is missing, unreadable, not UTF-8,
    not JSON or not an object: the files of a folder that snnet may not have written."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def recorded_checksums(record: str | os.PathLike) -> dict[str, str]:
    """The file names and SHA-256s a saved config.json ``record`` holds ({} when there is none, or it is unreadable):
    the files that save wrote."""
    checksums = (read_object(record) or {}).get(CHECKSUMS_KEY)
    if not isinstance(checksums, Mapping):
        return {}
    return {k: v for k, v in checksums.items() if isinstance(k, str) and isinstance(v, str)}


def verify_checksum(path: str | os.PathLike, config: Mapping, record: str | os.PathLike, fix: str,
                    error: type[SnnetError] = SnnetError) -> bool:
    """Check file ``path`` against the SHA-256 that ``config`` (read from ``record``) holds for its name.

    A config without one (written before snnet recorded checksums, or with the entry deleted) is
    accepted unverified, with a warning (:func:`warn_unverified`): returns False. A mismatch raises
    ``error`` in one line naming the file, a checksum that is not one (a number, a list) one naming the
    record as corrupt; ``fix`` says what to do.
    """
    path = Path(path)
    checksums = config.get(CHECKSUMS_KEY)
    if checksums is not None and not isinstance(checksums, Mapping):
        raise error(f"{record} is corrupt (its {CHECKSUMS_KEY} is {checksums!r}, not a table of file names and SHA-256s), "
                    f"so {path} cannot be verified; {fix}")
    expected = checksums.get(path.name) if checksums is not None else None
    if expected is None:
        warn_unverified(path, f"{record} records no SHA-256 for it", fix)
        return False
    if not (isinstance(expected, str) and _SHA256_HEX.fullmatch(expected)):  # else the file was called damaged
        raise error(f"{record} is corrupt (its SHA-256 for {path.name} is {expected!r}, not 64 hex digits), so {path} "
                    f"cannot be verified; {fix}")
    if sha256_file(path) != expected:
        raise error(f"{path} is damaged: its SHA-256 differs from the one recorded in {record} "
                    f"(bytes changed on disk or in transfer); {fix}")
    return True


def previous_of(path: str | os.PathLike) -> Path:
    """Where :func:`keep_previous` keeps ``path``'s bytes while a save replaces it: ``<name>.previous`` beside it."""
    path = Path(path)
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def keep_previous(path: str | os.PathLike, record: str | os.PathLike) -> Path:
    """Before a save replaces ``path`` and then ``record`` (the config.json holding its SHA-256), hard-link the
    bytes ``record`` names to :func:`previous_of` ``path``: a save stopped between the two files leaves the old
    record beside them, and the old save loadable (:func:`recorded_previous`). The caller deletes the link once
    the new record is in. Returns the link's path.

    After a save stopped between its files, the previous bytes are the only ones the record in place names:
    they stay (replacing them with the unmatched new ones lost the old save at a second such stop).
    """
    path, record = Path(path), Path(record)
    previous = previous_of(path)
    if not path.is_file() or not record.is_file():
        return previous
    try:
        want = json.loads(record.read_text())[CHECKSUMS_KEY][path.name]
    except (OSError, ValueError, KeyError, TypeError):  # a record without checksums: the file in place is its own
        want = None
    if previous.is_file() and want is not None and sha256_file(path) != want:
        return previous
    previous.unlink(missing_ok=True)
    try:
        os.link(path, previous)  # no copy: the old bytes stay where they are
    except OSError:  # a file system without hard links: the save is as before, renames only
        pass
    return previous


@contextmanager
def replacing(paths: Iterable[str | os.PathLike], record: str | os.PathLike) -> Iterator[None]:
    """Around a save that replaces ``paths`` and then, last, ``record`` (the config.json holding their SHA-256):
    each file's old bytes are kept (:func:`keep_previous`) until the block ends, then dropped.

    Killed inside the block, the old record and the kept bytes still load (:func:`recorded_previous`). An
    exception inside it, before ``record`` is replaced, puts every file back as it was (files the save added are
    removed) and propagates: a failed save leaves the save before it whole, not one loading with a warning."""
    paths, record = [Path(p) for p in paths], Path(record)
    added = [p for p in paths if not p.exists()]
    before = _identity(record)
    kept = [keep_previous(p, record) for p in paths]
    try:
        yield
    except Exception as e:
        if _identity(record) == before:  # the new record is not in: the files it would have named go back
            stuck = []
            for path, previous in zip(paths, kept):
                try:
                    if before is not None and previous.is_file():
                        if path.is_file() and os.path.samefile(previous, path):  # failed before it was replaced:
                            previous.unlink()  # a rename of a file onto another link of it does nothing, and left it
                        else:
                            os.replace(previous, path)
                    elif path in added:
                        path.unlink(missing_ok=True)
                except OSError as err:
                    stuck.append(f"{path.name} ({reason(err)}; " + (f"its earlier bytes, which the loaders read, stay "
                                 f"in {previous.name})" if previous.is_file() else "remove it by hand)"))
            if stuck:
                raise SnnetError(f"a save into {record.parent} failed ({reason(e)}) and could not put back "
                                 f"{', '.join(stuck)}") from e
        raise
    for previous in kept:
        previous.unlink(missing_ok=True)


def _identity(path: Path) -> tuple[int, int] | None:
    """What tells a file from the one renamed over it (inode and change time), None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def recorded_previous(path: str | os.PathLike, config: Mapping) -> Path | None:
    """The bytes a stopped save kept for ``path`` (:func:`keep_previous`) if they are the ones ``config`` (the
    record still in place) checksums, else None: what to load instead of a ``path`` that fails its checksum."""
    previous = previous_of(path)
    checksums = config.get(CHECKSUMS_KEY)
    want = checksums.get(Path(path).name) if isinstance(checksums, Mapping) else None
    return previous if want is not None and previous.is_file() and sha256_file(previous) == want else None


def warn_unverified(path: str | os.PathLike, why: str, fix: str) -> None:
    """Say, once per file and process, that ``path`` is loaded without its checksum checked, and why.

    Verification must never turn off silently: a deleted checksum entry or record file would
    otherwise let damaged bytes load as a network that is quietly wrong.
    """
    import warnings

    warnings.warn(f"{path} is loaded UNVERIFIED: {why} (written before snnet recorded checksums, or the record "
                  f"was removed), so damaged bytes would go unnoticed; to be safe, {fix}", UnverifiedFileWarning,
                  stacklevel=user_stacklevel())  # the user's line: a fixed count named one of snnet's


def check_creatable(path: str | os.PathLike, what: str = "--out", error: type[SnnetError] = SnnetError) -> Path:
    """Prove that folder ``path`` exists and is writable, or can be created, without creating it.

    A temporary file is made and removed in ``path`` or, if it does not exist yet, in its
    nearest existing parent (where it would be created). Raises ``error`` with one line.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise error(f"{what} {path}: {probe} is a file, not a folder; choose a folder")
    try:
        probe_write(probe)
    except OSError as e:
        raise error(f"{what} {path}: cannot write in {probe} ({e.strerror or e}); choose a writable folder") from e
    return path


def probe_write(folder: str | os.PathLike) -> None:
    """Create and delete a temporary file in ``folder``: raises OSError if files cannot be written there."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".snnet-write-test.")
    os.close(fd)
    os.unlink(name)


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of ``path`` (see :func:`update_json`).

    Files such as the family's ``family.json`` or a zoo table are written by several processes
    at once (one model each, one per core). The lock file lives in the temporary folder, keyed
    by the path, so nothing but artifacts lands beside them. No-op where there is no ``fcntl``.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the write itself stays atomic (as runlock does without fcntl)
        yield
        return
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"snnet-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: str | os.PathLike, change: Callable[[dict], dict]) -> dict:
    """Read the JSON object in ``path`` (``{}`` if there is none), write ``change(it)`` back atomically,
    under :func:`locked`; returns what was written."""
    path = Path(path)
    with locked(path):
        data = json.loads(path.read_text()) if path.is_file() else {}
        new = change(data)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(new, indent=2) + "\n"), durable=False)
    return new


def safetensors_kind(path: str | os.PathLike) -> str | None:
    """The ``snnet`` entry of a safetensors file's metadata (what snnet wrote it as: ``snnet-stitch``, ``lora``, ...),
    None if it has none or is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("snnet")
    except (SafetensorError, OSError, ValueError):
        return None


def in_saved_dtype(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``module`` (built in float32, its weights loaded from ``state``) in the floating dtype it was saved in,
    where all of ``state``'s floating tensors share one (bfloat16, float16): it comes back as it was saved."""
    saved = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(saved) == 1 and saved != {v.dtype for v in module.state_dict().values() if v.is_floating_point()}:
        module.to(saved.pop())
    return module
