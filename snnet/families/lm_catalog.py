"""The language models snnet names, their shipped configs, and how one is loaded.

snnet ships the ``config.json`` of every member of the families below (package data in
``snnet/data_files/lm``; ``SOURCES.md`` there says where each value comes from), so a family's
stitch space can be built on the meta device and priced without a download. One family,
``stdlib-lm`` (:mod:`snnet.lm_family`), snnet trains and ships whole: its members' sources are
folders inside the package (``snnet:weights/lm/<member>``), loaded like any local folder. Weights come only
through transformers' own path: ``AutoModelForCausalLM.from_pretrained`` of a hub id (which
downloads) or of a local folder (``save_pretrained`` output, or a hub snapshot on disk).

A stitched language model reads one token stream, so all its anchors must share a tokenizer:
:func:`check_token_ids` compares what the configs say about special tokens (all that is known
without a download) and :func:`check_tokenizers` compares loaded tokenizers entry by entry.
Members of one family may pad their embedding matrices to different sizes (Pythia 50,304 /
50,432 / 50,688 rows; Qwen2.5 151,936 / 152,064) while sharing one tokenizer, so the stitched
network scores logits over the shared ids only (:attr:`snnet.families.causal_lm.StitchedLM.vocab_size`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..errors import CheckpointError, NotStitchableError, UnknownModelError

__all__ = ["LMFamily", "LMSpec", "PACKAGE_SOURCE", "TOKENIZER_FILES", "check_token_ids", "check_tokenizers", "expand_lm",
           "load_config", "load_model", "load_tokenizer", "lm_families", "looks_like_lm", "member_config", "package_folder",
           "resolve_lm"]

_DATA = ("data_files", "lm")
PACKAGE_SOURCE = "snnet:"  # a member whose files ship inside the package (families.json: "snnet:weights/lm/...")
# the names (fnmatch patterns) of the files a transformers tokenizer is saved as and read from: what a saved language
# model holds beside its weights (a run's final/: snnet.runlock), all read together by AutoTokenizer.from_pretrained
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class LMFamily:
    """A named family: its members (snnet name -> hub id), in order of size, and its tokenizer."""

    name: str
    title: str
    tokenizer: str
    members: tuple[tuple[str, str], ...]

    @property
    def names(self) -> list[str]:
        return [m for m, _ in self.members]


def _data_file(name: str) -> Any:
    return resources.files("snnet").joinpath(*_DATA, name)


@functools.cache
def lm_families() -> dict[str, LMFamily]:
    """Every named family, from the shipped ``families.json``."""
    raw = json.loads(_data_file("families.json").read_text())
    return {k: LMFamily(k, v["title"], v["tokenizer"], tuple(v["members"].items())) for k, v in raw.items()}


@functools.cache
def _members() -> dict[str, tuple[str, str]]:
    """snnet member name -> (family, hub id)."""
    return {m: (f.name, hub) for f in lm_families().values() for m, hub in f.members}


def package_folder(source: str) -> Path | None:
    """The folder inside the installed package that a member's source ``snnet:<path>`` names (a
    family snnet trains and ships itself, e.g. ``stdlib-lm``), or None for a hub id."""
    if not source.startswith(PACKAGE_SOURCE):
        return None
    return Path(str(resources.files("snnet").joinpath(*source[len(PACKAGE_SOURCE):].split("/"))))


def _shipped_folder(name: str) -> Path:
    """A shipped member's folder, refused in one line when its files are missing."""
    folder = package_folder(_members()[name][1])
    assert folder is not None
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{name!r} ships with snnet in {folder}, but its files are missing: reinstall snnet, "
                              "or train the family with scripts/train_lm_family.py")
    return folder


def member_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` of a member (a fresh dict)."""
    if name not in _members():
        raise UnknownModelError(_unknown(name))
    if package_folder(_members()[name][1]) is not None:
        return json.loads((_shipped_folder(name) / "config.json").read_text())
    return json.loads(_data_file(f"{name}.json").read_text())


@dataclass(frozen=True)
class LMSpec:
    """How to build one language-model anchor, so a saved network can be rebuilt.

    ``source`` is what ``from_pretrained`` reads (a hub id or a local folder); ``member`` is
    snnet's name when the model is one whose config snnet ships (then no download is needed to
    build it without weights).
    """

    label: str
    source: str
    member: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source, "member": self.member}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMSpec":
        return cls(str(d["label"]), str(d["source"]), d.get("member"))


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def expand_lm(text: str) -> list[str] | None:
    """A family name (``pythia``) as its member names; a comma list of names as the list; None if
    ``text`` names no language model at all (so the caller can try vision names)."""
    key = _norm(text)
    fams = {_norm(k): f for k, f in lm_families().items()}
    if key in fams:
        return fams[key].names
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names if names and any(looks_like_lm(n) for n in names) else None


def looks_like_lm(name: str) -> bool:
    """Whether ``name`` is meant as a language model: a member or family name, a hub id of a
    member, or a local folder holding a transformers ``config.json``."""
    key = _norm(name)
    if key in _members() or key in {_norm(k) for k in lm_families()} or _hub_member(name) is not None:
        return True
    path = Path(name).expanduser()
    return path.is_dir() and (path / "config.json").is_file() and "model_type" in _read_json(path / "config.json")


def _hub_member(name: str) -> str | None:
    return next((m for m, (_, hub) in _members().items() if hub.lower() == name.strip().lower()), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _unknown(name: str) -> str:
    from ..anchors import near_names

    known = list(_members()) + list(lm_families())
    close = near_names(_norm(name), known)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    fams = ", ".join(f"{k} ({', '.join(f.names)})" for k, f in lm_families().items())
    return (f"unknown language model {name!r}.{hint} snnet names these families and members: {fams}; "
            "or give a hub id (org/name, downloads) or a local folder written by save_pretrained")


def resolve_lm(name: str) -> LMSpec:
    """Check one anchor name and say how to build it: a member name (``pythia-160m``, any case),
    a member's hub id (``EleutherAI/pythia-160m``), a local folder, or another hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: give a folder written by save_pretrained "
                                  "(or a downloaded hub snapshot)")
        return LMSpec(path.resolve().name, str(path.resolve()))
    key = _norm(name)
    if key in _members():
        if package_folder(_members()[key][1]) is not None:  # trained by snnet and shipped: a local folder
            return LMSpec(key, str(_shipped_folder(key)), key)
        return LMSpec(key, _members()[key][1], key)
    member = _hub_member(name)
    if member is not None:
        return LMSpec(member, _members()[member][1], member)
    parts = name.strip().split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        return LMSpec(parts[1].lower(), name.strip())  # another hub id: from_pretrained downloads it
    raise UnknownModelError(_unknown(name))


def load_config(spec: LMSpec) -> Any:
    """The transformers config of an anchor: the shipped one for a member, else from its source."""
    from transformers import AutoConfig

    if spec.member is not None and not spec.is_local:
        return AutoConfig.for_model(**member_config(spec.member))
    try:
        return AutoConfig.from_pretrained(spec.source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of {spec.label!r} from {spec.source}: {_first_line(e)}") from e


def load_model(spec: LMSpec, *, weights: bool, dtype: Any = None) -> Any:
    """An ``AutoModelForCausalLM`` for one anchor, in eval mode.

    ``weights=True`` loads through ``from_pretrained`` (a hub id downloads; a folder reads
    its safetensors); ``weights=False`` builds the architecture at random init (under a
    ``torch.device("meta")`` context: no memory at all), enough to enumerate and price a space.
    """
    from transformers import AutoModelForCausalLM

    if weights:
        try:  # no dtype: transformers' default, the config's dtype (dtype=None would keep the file's)
            model = AutoModelForCausalLM.from_pretrained(spec.source, **({} if dtype is None else {"dtype": dtype}))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load {spec.label!r} from {spec.source}: {_first_line(e)}") from e
    else:
        model = AutoModelForCausalLM.from_config(load_config(spec), dtype=dtype)
    return model.eval()


def load_tokenizer(spec: LMSpec) -> Any:
    """The anchor's tokenizer through ``AutoTokenizer.from_pretrained`` (hub id or folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.source)
    except Exception as e:  # noqa: BLE001 -- a damaged file fails in json, transformers or tokenizers (a KeyError too)
        raise CheckpointError(f"cannot load the tokenizer of {spec.label!r} from {spec.source}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _token_ids(config: Any) -> dict[str, Any]:
    out = {}
    for key in ("bos_token_id", "eos_token_id"):
        v = getattr(config, key, None)
        out[key.split("_")[0]] = tuple(v) if isinstance(v, (list, tuple)) else v
    return out


def check_token_ids(configs: Sequence[Any], labels: Sequence[str]) -> None:
    """Refuse anchors whose configs name different BOS/EOS token ids: they cannot share a
    tokenizer. (What a config says is all that is known without the tokenizer files; a loaded
    tokenizer is checked in full by :func:`check_tokenizers`.)"""
    ref = _token_ids(configs[0])
    for cfg, label in zip(configs[1:], labels[1:]):
        ids = _token_ids(cfg)
        diff = [f"{k} {ref[k]} vs {ids[k]}" for k in ref if ref[k] is not None and ids[k] is not None and ref[k] != ids[k]]
        if diff:
            raise NotStitchableError(
                f"anchors {labels[0]!r} and {label!r} do not share a tokenizer: their configs name different special "
                f"token ids ({'; '.join(diff)}). A stitched language model reads one token stream, so every anchor must "
                f"use the same tokenizer: take them from one family ({', '.join(lm_families())})")


def _specials(tok: Any) -> dict[str, Any]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {n: (getattr(tok, n, None), getattr(tok, f"{n}_id", None)) for n in names}


def check_tokenizers(tokenizers: Sequence[Any], labels: Sequence[str]) -> int:
    """Check that every tokenizer is the same (vocabulary, special tokens); return its size.

    On a mismatch raises :class:`NotStitchableError` naming the two anchors and what differs:
    the sizes, a few tokens that map to different ids, the special tokens.
    """
    ref, ref_vocab = tokenizers[0], tokenizers[0].get_vocab()
    for tok, label in zip(tokenizers[1:], labels[1:]):
        vocab = tok.get_vocab()
        what = []
        if len(tok) != len(ref):
            what.append(f"sizes {len(ref)} vs {len(tok)}")
        moved = [t for t in ref_vocab if vocab.get(t) != ref_vocab[t]]
        if moved:
            shown = ", ".join(f"{t!r} {ref_vocab[t]} vs {vocab.get(t)}" for t in sorted(moved)[:3])
            what.append(f"{len(moved)} tokens map to other ids or are missing (e.g. {shown})")
        extra = len(set(vocab) - set(ref_vocab))
        if extra:
            what.append(f"{extra} tokens only in {label!r}'s")
        mine, theirs = _specials(ref), _specials(tok)
        # BOS/EOS must agree; a pad or unk token only where both define one (padding is an input convention)
        specials = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]
                    and (k in ("bos_token", "eos_token") or (mine[k][0] is not None and theirs[k][0] is not None))]
        if specials:
            what.append("special tokens " + "; ".join(specials))
        if what:
            raise NotStitchableError(
                f"anchors {labels[0]!r} and {label!r} do not share a tokenizer: {'; '.join(what)}. A stitched language "
                "model reads one token stream, so every anchor must use the same tokenizer")
    return len(ref)
