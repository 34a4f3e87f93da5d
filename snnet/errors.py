"""Errors snnet raises on bad input.

Every error a user can cause derives from :class:`SnnetError`, so the CLI can print the
message (which says what was wrong and what to do) instead of a traceback.
"""

from __future__ import annotations

import os
import re
import sys


class SnnetError(Exception):
    """Base class of every error caused by bad input to snnet.

    Raised in a DataLoader worker, torch re-creates the error in the main process with its whole
    traceback as the message; the one line it was raised with is taken back from it, so the
    command line still prints one line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            args = (_raised_message(args[0], type(self)),)
        super().__init__(*args)


def reason(e: BaseException, limit: int = 200, whole: bool = False) -> str:
    """Another library's exception in one line for a message of ours: its type and first line
    (``whole``: every line, joined), at most ``limit`` characters of it.

    torch's refusal to unpickle a file (``weights_only``) is said in snnet's words, naming the
    object it refused, without torch's advice to load it unsafely, which a user cannot take from
    the command line and should not take for a file of unknown origin.
    """
    text = str(e).strip()
    if re.search(r"weights[_ ]only", text, re.IGNORECASE):
        blocked = re.search(r"unsupported globals?:?\s+([\w.]+)", text, re.IGNORECASE)
        what = f" ({blocked.group(1).rstrip('.')})" if blocked else ""
        return f"it holds Python objects besides tensors{what}, refused: unpickling them could run any code"
    said = " ".join(text.split()) if whole else (text.splitlines() or [""])[0]
    return f"{type(e).__name__}: {said[:limit]}" if said else type(e).__name__


def _raised_message(text: str, kind: type) -> str:
    """The message of the exception a formatted traceback ends with (torch's worker re-raise text)."""
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        if last.startswith(name):
            return last[len(name):]
    return last


class UnknownModelError(SnnetError, KeyError):
    """A model name that neither timm nor snnet knows."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class NotStitchableError(SnnetError, ValueError):
    """Anchors that cannot be stitched together (or fewer than two of them)."""


class StitchNotFoundError(SnnetError, KeyError):
    """A stitch id or name that is not in the stitch space."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointError(SnnetError, ValueError):
    """A checkpoint that is corrupt, incomplete, or made for another network."""


class ResultsError(SnnetError, ValueError):
    """A results file that is missing, corrupt, or was not written by ``snnet eval``."""


class TrainingError(SnnetError, RuntimeError):
    """Training cannot go on as configured (e.g. a batch that does not fit in device memory)."""


class BudgetError(SnnetError, ValueError):
    """A budget that cannot be read, or that no stitch of the space fits."""


class ExportError(SnnetError, RuntimeError):
    """A stitch that cannot be exported: unwritable path, failed trace, or failed verification."""


class ConfigError(SnnetError, ValueError):
    """An option value that cannot work (a negative count, a NaN learning rate, an unknown device...)."""


class RunFolderError(SnnetError):
    """An output folder that holds another run, is in use by a live run, or cannot be written."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) or SIGTERM after writing a checkpoint; resume from it.

    A KeyboardInterrupt, so code that handles Ctrl-C keeps working; it says where to resume.
    """

    def __init__(self, step: int, total: int, checkpoint: object, signal_name: str = "SIGINT") -> None:
        super().__init__(f"training interrupted by {signal_name} at step {step} of {total}; checkpoint {checkpoint}")
        self.step, self.total, self.checkpoint, self.signal_name = step, total, checkpoint, signal_name


class ServeError(SnnetError, ValueError):
    """A server that cannot start as configured: no latency table for the stitches to serve, a bad SLO..."""


class ZooError(SnnetError, ValueError):
    """A zoo of comparison networks that is missing or malformed, or a zoo filter that cannot be read."""


class SnnetWarning(UserWarning):
    """Something the user should know that does not stop the work (the command line prints ``warning: ...``)."""


# snnet's own files: a warning names the first line outside them (user_stacklevel)
_PACKAGE_DIR = os.path.dirname(__file__) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this that names the first caller outside
    snnet, the user's own line, however deep inside snnet the warning is raised (a fixed number named a line of
    snnet's once the call went through one more of its functions). Python 3.12's ``skip_file_prefixes``, on 3.11.

    timm's files are passed over too: it calls snnet's registered models (``timm.create_model('fmnist_vit_ti',
    pretrained=True)``), and a line of its factory is not the user's either."""
    skipped = (_PACKAGE_DIR, *_library_dirs("timm"))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


def _library_dirs(*names: str) -> tuple[str, ...]:
    """The folders of those packages ``names`` that are imported (one that is not has no frame to pass over: this
    module imports none of them)."""
    modules = (sys.modules.get(name) for name in names)
    return tuple(os.path.dirname(m.__file__) + os.sep for m in modules if m is not None and m.__file__)


class UnverifiedFileWarning(SnnetWarning):
    """A file loaded without its checksum checked: none is recorded for it, or the record itself is gone.

    Said once per file and line of the caller's that loads it (Python's default warning filter), never silently.
    """
