"""Text for language models: documents on disk, tokenised into fixed-length blocks, a held-out split.

The default corpus is the Python standard library's own source (:func:`stdlib_sources`): every
Python install carries it, so it needs no download, and it is real text written by many people
over decades (code, comments, docstrings). Its files differ between Python versions, so
:func:`corpus_fingerprint` names exactly what was read. Any other folder of text files works the
same way (:func:`text_files`), e.g. a Debian text package's files.

The held-out split is by document (:func:`split_documents`): a file is either trained on or held
out, decided by a hash of its path relative to the corpus root, so the split is the same on every
machine and does not move when files are added.

:func:`token_blocks` tokenises the documents (each followed by the end-of-text token), cuts the
stream into blocks of ``block_size + 1`` tokens (``block_size`` predictions each) and records,
per block, how many UTF-8 bytes of text its predicted tokens cover: what bits per byte divide by
(:mod:`snnet.lm_eval`). With a ``seed`` it reads the documents in a seeded order
(:func:`snnet.data.spread_order`), and ``max_blocks`` blocks take an even share of each document, from
places spread through it drawn with the seed: they come from documents spread over the whole corpus, where
the sorted files' first blocks are a few modules of one package, the seeded files' all of one or two large
files, and each file's first blocks mostly its docstring and imports. Without a seed ``max_blocks`` are the
first blocks of the stream (what ``snnet demo --lm`` and the ``stdlib-lm`` zoo were measured on).
Tokenisers without offsets are refused rather than guessed at.
:class:`ByteTokenizer` (one token per byte) needs no vocabulary file at all.
"""

from __future__ import annotations

import bisect
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from .data import spread_order
from .errors import SnnetError

__all__ = ["ByteTokenizer", "TokenBlocks", "corpus_fingerprint", "split_documents", "stdlib_root", "stdlib_sources",
           "text_files", "text_loader", "token_blocks"]

# folders of the standard library that are not its own source text: tests (deliberately odd files,
# some not valid UTF-8), third-party packages, caches
_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"})


def stdlib_root() -> Path:
    """The folder of this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root: str | Path, pattern: str = "*.py", skip: frozenset[str] = _SKIP) -> list[Path]:
    """Files under ``root`` matching ``pattern``, in a stable order, outside the ``skip`` folders."""
    root = Path(root)
    if not root.is_dir():
        raise SnnetError(f"no text corpus at {root}: give a folder of text files")
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and not skip & set(p.relative_to(root).parts[:-1]))
    if not files:
        raise SnnetError(f"{root} holds no {pattern} files to read")
    return files


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files (tests, third-party packages and caches left out)."""
    return text_files(stdlib_root())


def corpus_fingerprint(files: Sequence[Path], root: str | Path) -> str:
    """A short hash of the corpus's file names and sizes (and the Python version for the stdlib):
    two runs read the same text if and only if their fingerprints agree."""
    h = hashlib.sha256()
    if Path(root).resolve() == stdlib_root().resolve():  # its files differ between Python versions; another corpus's do not
        h.update(f"python {sys.version_info.major}.{sys.version_info.minor}\n".encode())
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def split_documents(files: Sequence[Path], root: str | Path, held_out: float = 0.1) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files: a file is held out when the hash of its path relative to ``root``
    falls in the first ``held_out`` share of hash space. Stable across machines and file additions."""
    if not 0 < held_out < 1:
        raise SnnetError(f"the held-out share must be between 0 and 1, got {held_out}")
    train, val = [], []
    for p in files:
        digest = hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()
        (val if int.from_bytes(digest[:8], "big") / 2 ** 64 < held_out else train).append(p)
    if not train or not val:
        raise SnnetError(f"splitting {len(files)} files with held_out={held_out} left one side empty: use more files")
    return train, val


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255) and an end-of-text token (256): no vocabulary file."""

    eos_token_id = 256
    bos_token_id = None
    pad_token_id = 256

    def __len__(self) -> int:
        return 257

    def encode_bytes(self, text: str) -> tuple[list[int], list[int]]:
        data = list(text.encode("utf-8"))
        return data, [1] * len(data)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _byte_ends(text: str) -> np.ndarray:
    """UTF-8 byte offset of the end of every character of ``text`` (cumulative byte lengths)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lengths = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    return np.cumsum(lengths)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the UTF-8 bytes each token accounts for (they sum to the bytes
    up to the last token's end: text between tokens is given to the token after it)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_bytes(text)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise SnnetError(f"{type(tokenizer).__name__} gives no character offsets, which bits per byte need: use a "
                         "fast (Rust) tokenizer or snnet.text.ByteTokenizer") from e
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        return [], []
    ends = np.concatenate([[0], _byte_ends(text)])
    end_bytes = ends[np.maximum.accumulate(np.array([e for _, e in offsets]))]
    counts = np.diff(np.concatenate([[0], end_bytes]))
    return list(ids), counts.tolist()


@dataclass(frozen=True)
class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of ``block_size + 1`` token ids and the UTF-8 bytes their last ``block_size`` tokens
    (the predicted ones) cover. Item ``k`` is ``{"input_ids": (block_size + 1,), "bytes": ()}``."""

    ids: torch.Tensor  # (blocks, block_size + 1), long
    byte_counts: torch.Tensor  # (blocks,), long
    fingerprint: str = ""
    seed: int | None = None  # the seed of the documents' order (spread_order) and of the places of their shares,
    # None: as given (sorted), the first blocks
    deterministic_items: ClassVar[bool] = True  # fetching a block draws no random numbers (snnet.sampling.SeededItems)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[k], "bytes": self.byte_counts[k]}

    @property
    def block_size(self) -> int:
        return int(self.ids.shape[1]) - 1

    @property
    def tokens(self) -> int:
        """Predicted tokens in all blocks."""
        return len(self) * self.block_size


def token_blocks(files: Sequence[Path], tokenizer: Any, block_size: int, *, max_blocks: int | None = None,
                 fingerprint: str = "", seed: int | None = None) -> TokenBlocks:
    """Tokenise ``files`` (UTF-8 text; each followed by the end-of-text token) into blocks of
    ``block_size + 1`` tokens, reading only as many files as ``max_blocks`` needs: in the order given, or with
    ``seed`` in :func:`snnet.data.spread_order` (the same files for the same seed). With both, a file gives at
    most ``ceil(max_blocks / len(files))`` blocks (one when there are more files than blocks), so that a few
    blocks come from as many files, not from the first one or two: a file cut short ends at a block's end,
    without its end-of-text token, and its blocks are pieces of it from places spread through it, drawn with
    ``seed`` (:func:`_spread_tokens`), not its first ones. When that reads every file and is still short (small
    files), they are read again with the fewest blocks each that can make up ``max_blocks``
    (:func:`_fewest_blocks`). Without ``seed``, ``max_blocks`` are the first blocks of the files' stream."""
    if block_size < 1:
        raise SnnetError(f"block_size must be >= 1 token, got {block_size}")
    if seed is not None:
        files = [files[i] for i in spread_order(len(files), seed)]
    if tokenizer.eos_token_id is None:
        raise SnnetError("the tokenizer has no end-of-text token to separate documents with")
    step = block_size + 1
    need = None if max_blocks is None else max_blocks * step
    per = None if max_blocks is None or seed is None else -(-max_blocks // max(len(files), 1))
    whole: dict[Path, tuple[list[int], list[int]]] = {}  # files read to their end: not tokenised again
    while True:
        ids, counts, sizes = _read(files, tokenizer, step, need, per, whole, seed)
        if per is None or len(ids) >= need or None not in sizes:  # type: ignore[operator]
            break
        per = _fewest_blocks(sizes, step, need, per)  # every file read, some cut short, and too few blocks
    n = len(ids) // step
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise SnnetError(f"{len(files)} files gave {len(ids)} tokens: not one block of {step}")
    grid = torch.tensor(ids[: n * step], dtype=torch.long).view(n, step)
    per_token = torch.tensor(counts[: n * step], dtype=torch.long).view(n, step)
    return TokenBlocks(grid, per_token[:, 1:].sum(1), fingerprint, seed)


def _read(files: Sequence[Path], tokenizer: Any, step: int, need: int | None, per: int | None,
          whole: dict[Path, tuple[list[int], list[int]]],
          seed: int | None = None) -> tuple[list[int], list[int], list[int | None]]:
    """The token stream of ``files`` (each followed by the end-of-text token) and the bytes of each token, until
    ``need`` tokens; with ``per``, a file fills at most ``per`` blocks of ``step`` tokens (the one it starts in
    counted), cut short at the last one's end, and the files it reads to their end are kept in ``whole`` (a
    pass with more blocks per file takes them whole again, without tokenising them again). With ``seed`` too, a
    file cut short gives pieces spread through it (:func:`_spread_tokens`), not its first tokens. The third
    value: the tokens of each file read, None for one cut short."""
    ids: list[int] = []
    counts: list[int] = []
    sizes: list[int | None] = []
    for index, path in enumerate(files):
        room = None if per is None else (len(ids) // step + per) * step - len(ids)
        if path in whole:
            t, c = whole[path]
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # not UTF-8 text (or unreadable): not part of the corpus
            t, c = (_encode(tokenizer, text) if room is None else
                    _spread_tokens(tokenizer, text, room, step, np.random.default_rng((seed, index))))
        ended = room is None or len(t) < room  # else no room for its end-of-text token: the next file begins a block
        if ended and room is not None:
            whole[path] = t, c
        ids += t + [tokenizer.eos_token_id] if ended else t
        counts += c + [0] if ended else c
        sizes.append(len(t) if ended else None)
        if need is not None and len(ids) >= need:
            break
    return ids, counts, sizes


def _fewest_blocks(sizes: Sequence[int | None], step: int, need: int, per: int) -> int:
    """The fewest blocks per file, more than ``per``, with which files of these ``sizes`` in tokens (None: cut
    short at ``per``, taken to be long enough) give ``need`` tokens: the share of each file stays as even as
    the small files let it (doubling it instead gave the first large files twice what they needed to)."""
    def reaches(most: int) -> bool:
        at = 0
        for size in sizes:
            room = (at // step + most) * step - at
            at += room if size is None or size >= room else size + 1
        return at >= need

    # reaches() grows with the blocks per file, and a file cut short (there is one) given one block more than
    # ``need`` fills holds all of it: the first that reaches, by bisection
    most = -(-need // step) + 1
    return bisect.bisect_left(range(per + 1, most + 1), True, key=reaches) + per + 1


def _spread_tokens(tokenizer: Any, text: str, room: int, step: int,
                   rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """``room`` tokens of ``text`` and their bytes (all of them when it has fewer), as :func:`_first_tokens` gives
    them, but taken in pieces spread through it, not its first tokens (mostly a file's docstring and imports):
    one filling the block the file starts in, then one per whole block of ``step`` tokens, so that no block joins
    two places of the file. Each piece starts at a line's start, one in each of as many even shares of the text
    at a place drawn with ``rng``; a file not much longer than its pieces is shared out as the text its first
    ``room`` tokens leave over, and one whose pieces still run past its end (its end has fewer tokens per
    character than its start) gives its first tokens. Only the pieces' text is tokenised (and, for a file not
    much longer than them, its first ``room`` tokens' too)."""
    head = room % step or step
    pieces = [head] + [step] * ((room - head) // step)
    ends = np.concatenate([[0], _byte_ends(text)])  # the UTF-8 bytes before each character
    draws = (np.arange(len(pieces)) + rng.random(len(pieces))) / len(pieces)  # one in each of the even shares
    spread = _pieces(tokenizer, text, ends, pieces, draws * len(text))
    if spread is not None:
        return spread
    first = _first_tokens(tokenizer, text, room)
    if len(first[0]) < room:
        return first  # the whole file: it ends within its share
    covered = int(np.searchsorted(ends, sum(first[1]), side="right")) - 1  # the characters of its first tokens
    before = np.cumsum([0] + pieces[:-1]) * covered / room  # the characters of the pieces before each, about
    return _pieces(tokenizer, text, ends, pieces, draws * (len(text) - covered) + before) or first


def _pieces(tokenizer: Any, text: str, ends: np.ndarray, pieces: Sequence[int],
            places: np.ndarray) -> tuple[list[int], list[int]] | None:
    """The tokens of ``text`` in ``pieces`` (so many tokens each) from the start of the line at each of ``places``
    (characters; the place itself when the line began before the last piece ended), and their bytes; None when one
    runs past the text's end. ``ends``: the UTF-8 bytes before each character."""
    ids: list[int] = []
    counts: list[int] = []
    end = 0  # the character after the last piece
    for n, place in zip(pieces, places):
        at = max(int(place), end)
        line = text.rfind("\n", 0, at) + 1
        start = line if line >= end else at
        t, c = _first_tokens(tokenizer, text[start:], n)
        if len(t) < n:
            return None
        end = int(np.searchsorted(ends, ends[start] + sum(c), side="right")) - 1
        ids += t
        counts += c
    return ids, counts


# characters at the end of a tokenised prefix whose tokens the text after it could change (a word, a run of
# spaces or symbols cut in two): the tokens ending in them are not used
_PREFIX_MARGIN = 256


def _first_tokens(tokenizer: Any, text: str, n: int) -> tuple[list[int], list[int]]:
    """The first ``n`` tokens of ``text`` (all of them when it has fewer) and their bytes, as :func:`_encode`
    gives them, tokenising only as much of a long text as they need: a limit's first blocks of a large file
    (the standard library's largest is 750 kB) cost what the blocks do, not what the file does."""
    chars = 4 * n + _PREFIX_MARGIN
    while chars < len(text):
        t, c = _encode(tokenizer, text[:chars])
        settled = len(text[: chars - _PREFIX_MARGIN].encode("utf-8"))
        if int(np.searchsorted(np.cumsum(c), settled, side="right")) >= n:  # n tokens end before the margin
            return t[:n], c[:n]
        chars *= 2
    t, c = _encode(tokenizer, text)
    return t[:n], c[:n]


def text_loader(blocks: TokenBlocks, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Any]:
    """A DataLoader of ``{"input_ids": (batch, block_size + 1), "bytes": (batch,)}`` batches."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(blocks, batch_size=batch_size, shuffle=shuffle, generator=gen)
