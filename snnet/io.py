"""Atomic file writes: a crash while saving leaves the previous file intact, never a torn one.

Every file snnet writes (networks, checkpoints, results, plots, exports) goes through
:func:`atomic_write`: the content is written to a temporary file in the same folder, flushed
to disk, and renamed over the target in one step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask sets it: set it back


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    ``durable`` also fsyncs the file and its folder, so the rename survives a power cut.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
