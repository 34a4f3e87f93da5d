#!/usr/bin/env python
"""Train the shipped language-model family ``stdlib-lm`` from scratch and write its artifacts.

1. Reads this Python's standard library source (``snnet.text.stdlib_sources``), split by file into
   training and held-out parts (a hash of each file's path: ``snnet.text.split_documents``), and
   records the corpus's fingerprint.
2. Trains one byte-level BPE tokenizer (HF ``tokenizers``, 2,048 tokens) on the training files only.
3. Trains ``stdlib-lm-xs``, ``stdlib-lm-s`` and ``stdlib-lm-m`` (``snnet.lm_family.STDLIB_LM_ARCHS``:
   Llama-style decoders) one after the other, each through snnet's training loop
   (``snnet.lm_family.train_lm_member`` -> ``snnet.train.train``, ``task: causal-lm``) with the
   ``stdlib-lm`` recipe (``snnet/recipes/stdlib-lm.yaml``). Each model's run lives in
   ``--family.runs/<model>``; an interrupted run resumes where it stopped.
4. Writes into ``--family.out`` (default ``snnet/weights/lm``): ``<model>/`` (``config.json``,
   float16 ``model.safetensors``, the tokenizer; loadable with ``AutoModelForCausalLM.from_pretrained``),
   ``family.json`` (measured params, FLOPs per token, held-out perplexity and bits per byte after
   the float16 round trip, tokens and wall time, the recipe, the corpus and tokenizer fingerprints,
   the exact command and library versions) and ``MODEL_CARD.md`` (generated from ``family.json``).

With ``--zoo`` it trains the LM zoo instead (``snnet.lm_family.STDLIB_LM_ZOO_ARCHS``: the same design at
other widths, each alone, with the same recipe, data, steps and loop) into ``--family.zoo_out`` (default
``runs/lm_zoo``: results only, nothing is shipped) and writes ``zoo.json`` there: every member measured on
the held-out blocks above and on the first ``--family.demo_blocks`` (those ``snnet demo --lm`` measures its
stitches on), beside the shipped members measured the same way. ``scripts/lm_zoo_compare.py`` compares them.

Everything is seeded and the data order is a function of the seed; the tokenizer trainer is
deterministic. A rerun with the same command, Python (its standard library is the corpus) and
library versions reproduces the numbers up to floating-point nondeterminism of the CPU kernels.

    python scripts/train_lm_family.py                        # the shipped recipe, one model after another
    python scripts/train_lm_family.py --schedule.max_steps 20 --family.out /tmp/lm   # a quick try
    python scripts/train_lm_family.py --card-only            # regenerate MODEL_CARD.md
    python scripts/train_lm_family.py --zoo                  # the LM zoo -> runs/lm_zoo/zoo.json
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import snnet
from snnet.commands.config_cli import parse
from snnet.io import atomic_write, update_json
from snnet.lm_demo import LMDemoOptions
from snnet.lm_family import (EOS, STDLIB_LM_ARCHS, STDLIB_LM_ZOO_ARCHS, VOCAB_SIZE, family_dir, score_lm,
                             tokenizer_fingerprint, train_lm_member, train_tokenizer)
from snnet.members import command_line
from snnet.text import corpus_fingerprint, split_documents, stdlib_root, stdlib_sources, token_blocks
from snnet.train import result_settings


@dataclass(frozen=True)
class LMFamilyOptions:
    """Which members to train, where their runs and artifacts go, and what they are measured on."""

    models: tuple[str, ...] = tuple(STDLIB_LM_ARCHS)
    """The members to train (stdlib-lm-xs, stdlib-lm-s, stdlib-lm-m), one after the other; with --zoo, the
    zoo members (default: all of snnet.lm_family.STDLIB_LM_ZOO_ARCHS)."""
    out: str = str(family_dir())
    """Where each member's folder, family.json and MODEL_CARD.md go."""
    runs: str = "runs/lm_family"
    """Where each member's training run goes (runs/<model>: checkpoints, metrics)."""
    vocab_size: int = VOCAB_SIZE
    """Tokens of the byte-level BPE tokenizer trained on the training files."""
    eval_blocks: int = 200
    """Held-out blocks every member is measured on (the first N of the held-out files)."""
    zoo_out: str = "runs/lm_zoo"
    """Where --zoo writes each zoo member's folder and zoo.json (results only: the zoo is not shipped)."""
    demo_blocks: int = LMDemoOptions().eval_blocks
    """--zoo also measures every member on the first N held-out blocks, the ones snnet demo --lm measures
    its stitches on, so the two results compare at equal text."""
    threads: int = 1
    """torch threads."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        unknown = [m for m in self.models if m not in STDLIB_LM_ARCHS and m not in STDLIB_LM_ZOO_ARCHS]
        if unknown:
            raise snnet.SnnetError(f"unknown member(s) {', '.join(unknown)}; the family is {', '.join(STDLIB_LM_ARCHS)}, "
                                   f"the zoo (--zoo) {', '.join(STDLIB_LM_ZOO_ARCHS)}")
        if self.eval_blocks < 1 or self.demo_blocks < 1:
            raise snnet.SnnetError(f"family.eval_blocks and family.demo_blocks must be >= 1, got {self.eval_blocks}, "
                                   f"{self.demo_blocks}")

    def members(self, zoo: bool) -> tuple[str, ...]:
        """The members this run trains: the family's, or with ``zoo`` the zoo's (never a mix: they go to
        different places)."""
        if not zoo:
            wrong = [m for m in self.models if m not in STDLIB_LM_ARCHS]
            if wrong:
                raise snnet.SnnetError(f"{', '.join(wrong)} belong(s) to the zoo: add --zoo")
            return self.models
        if self.models == tuple(STDLIB_LM_ARCHS):
            return tuple(STDLIB_LM_ZOO_ARCHS)
        wrong = [m for m in self.models if m not in STDLIB_LM_ZOO_ARCHS]
        if wrong:
            raise snnet.SnnetError(f"--zoo trains the zoo ({', '.join(STDLIB_LM_ZOO_ARCHS)}), not {', '.join(wrong)}")
        return self.models


def _fmt(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e5 else f"{v / 1e3:.1f} k"


def write_model_card(family: dict[str, Any], out: Path) -> None:
    """Render MODEL_CARD.md from family.json, so the card never disagrees with the measurements."""
    models = family["models"]
    rows = "\n".join(
        f"| `{name}` | {m['arch']['hidden']} | {m['arch']['heads']} x {m['arch']['hidden'] // m['arch']['heads']} | {m['arch']['layers']} | {m['arch']['intermediate']} "
        f"| {m['params']:,} | {_fmt(m['flops'])} | {m['held_out']['ppl']:.2f} | {m['held_out']['bpb']:.4f} "
        f"| {m['held_out']['acc1']:.1f} % | {m['seconds'] / 60:.1f} min |"
        for name, m in models.items())
    names = list(models)
    small, large = models[names[0]], models[names[-1]]
    recipe, corpus = family["recipe"], family["corpus"]
    commands = "\n".join(dict.fromkeys(m["command"] for m in models.values()))
    card = f"""# stdlib-lm: a small language-model family trained on Python's standard library (snnet)

Three decoder language models of one design at three sizes, sharing one tokenizer, trained from
scratch on this machine by snnet's own training loop. They are the default anchors of
`snnet demo --lm`: small enough to train in minutes on a CPU, yet {large['flops'] / small['flops']:.1f}x apart in
FLOPs per token and {small['held_out']['bpb'] - large['held_out']['bpb']:.3f} bits per byte apart on held-out text, so
stitching them is meaningful. They are not useful language models beyond that.

Load one with transformers (the folder is an ordinary `save_pretrained` folder), or by its snnet name:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
import snnet.lm as lm
folder = lm.resolve_lm("stdlib-lm-s").source         # snnet/weights/lm/stdlib-lm-s
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
net = lm.create_stitched_lm("stdlib-lm", weights=True, load_tokenizers=True, context={recipe['data.block_size']})
```

## Architecture

transformers `LlamaForCausalLM` (RMSNorm, rotary positions with theta 10,000, SwiGLU MLP, no
biases), tied input and output embeddings, {recipe['data.block_size']} positions.

| model | width | heads x width | layers | MLP | params | FLOPs / token | held-out ppl | held-out bits/byte | next-token top-1 | training time |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}

FLOPs are multiply-accumulates per generated token at a {recipe['data.block_size']}-token context, counted as
`snnet stitches` counts them (`docs/language-models.md`, "What is counted"). Held-out figures are
measured on the first {family['eval_blocks']} blocks of {recipe['data.block_size']} predicted tokens of the held-out files
({family['eval_tokens']:,} tokens, {family['eval_bytes']:,} bytes of text) **after** reloading the shipped float16
weights through `AutoModelForCausalLM.from_pretrained`; bits per byte are the summed negative
log-likelihood in bits over the UTF-8 bytes the predicted tokens cover. Training time is wall time
on {family['machine']} with {family['threads']} torch thread(s), on a machine shared with other jobs (indicative only).

## Data

The `.py` files of the Python {corpus['python']} standard library (`snnet.text.stdlib_sources`: tests,
`site-packages`, `lib2to3` and caches left out): {corpus['files']:,} files, {corpus['bytes']:,} bytes, fingerprint
`{corpus['fingerprint']}` (file names and sizes). Every Python install carries this text, so it needs no
download and no root; it is code, comments and docstrings written by many people under the PSF licence.
Split by file with `snnet.text.split_documents` (a hash of each file's path, {corpus['held_out_share']:g} held out):
{corpus['train_files']:,} training files ({corpus['train_bytes']:,} bytes, fingerprint `{corpus['train_fingerprint']}`) and
{corpus['held_out_files']:,} held-out files ({corpus['held_out_bytes']:,} bytes). Another Python version has other
files: the fingerprints say whether a machine reads the same text.

## Tokenizer

Byte-level BPE (HF `tokenizers` {family['tokenizers']}) with {family['tokenizer']['vocab_size']:,} tokens, trained on the
training files only: 256 byte tokens, `{EOS}` (id 0: BOS, EOS and padding; it ends every
document) and the merges. Fingerprint `{family['tokenizer']['fingerprint']}` (a hash of `tokenizer.json`); the
same files give the same tokenizer. Every member's folder holds a copy.

## Training (identical for all three)

Each member is trained by `snnet.train.train` (the loop every snnet network trains in) with the
`stdlib-lm` recipe (`snnet/recipes/stdlib-lm.yaml`): next-token cross-entropy, {recipe['schedule.max_steps']} steps
of {recipe['data.batch_size']} blocks of {recipe['data.block_size']} tokens ({small['tokens_trained']:,} tokens, about
{small['tokens_trained'] / corpus['train_tokens']:.0%} of an epoch of the {corpus['train_tokens']:,} training tokens), AdamW lr
{recipe['optim.lr']:g} (betas {tuple(recipe['optim.betas'])}, weight decay {recipe['optim.weight_decay']:g}, none on
norm weights), warm-up over {recipe['schedule.warmup_ratio']:g} of the steps then cosine decay to {recipe['schedule.min_lr']:g},
gradient clipping {recipe['optim.clip_grad']:g}, seed {recipe['run.seed']} (the same initial stream and data order for
every member). Weights stored in float16; `config.json` says `dtype: float32`, so `from_pretrained`
loads them into float32 parameters (held-out bits/byte before storing: {', '.join(f"{m['held_out_fp32']['bpb']:.4f}" for m in models.values())}).

The recipe's comments tell how it was chosen: a first learning rate (3e-3) left the larger members
behind the smallest, and 192-wide members stayed longer than the 128-wide one on the plateau of
single-token statistics within these 300 steps, so the family has no member wider than 128.

## Reproduce

```bash
{commands}
```

torch {family['torch']}, transformers {family['transformers']}, Python {corpus['python']}.

## Limitations

Tiny models trained for minutes on a fraction of an epoch of one kind of text (Python source):
they complete Python-looking text and nothing else. They exist to demonstrate and test stitching
of language models on a CPU, not to be used as language models.
"""
    atomic_write(out / "MODEL_CARD.md", lambda tmp: tmp.write_text(card), durable=False)


def corpus_record(root: Path, files: list[Path], train: list[Path], held: list[Path], held_out: float,
                  train_tokens: int) -> dict[str, Any]:
    """What family.json says of the text: the Python, files, bytes and fingerprints of each part."""
    size = lambda fs: sum(p.stat().st_size for p in fs)  # noqa: E731
    return {"python": platform.python_version(), "root": str(root), "files": len(files), "bytes": size(files),
            "fingerprint": corpus_fingerprint(files, root), "held_out_share": held_out, "train_files": len(train),
            "train_bytes": size(train), "train_fingerprint": corpus_fingerprint(train, root),
            "train_tokens": train_tokens, "held_out_files": len(held), "held_out_bytes": size(held),
            "held_out_fingerprint": corpus_fingerprint(held, root)}


def main(argv: list[str] | None = None) -> None:
    parsed = parse(sys.argv[1:] if argv is None else argv, "train_lm_family.py", extra={"family": LMFamilyOptions},
                   default_recipe="stdlib-lm",
                   flags={"--card-only": "Only regenerate MODEL_CARD.md from family.json.",
                          "--zoo": "Train the LM zoo instead (same recipe, data and steps; snnet.lm_family."
                                   "STDLIB_LM_ZOO_ARCHS) into --family.zoo_out and write zoo.json there."},
                   description=__doc__.split("\n\n")[0])
    config, options = parsed.config, parsed.extra["family"]
    if parsed.flags["--print-config"]:
        from snnet.commands.config_cli import dump_yaml

        print(dump_yaml(config, {"family": options}), end="")
        return
    zoo = parsed.flags["--zoo"]
    if zoo and parsed.flags["--card-only"]:
        raise snnet.SnnetError("the zoo has no model card (it is not shipped): --card-only is for the family")
    models = options.members(zoo)
    out = Path(options.zoo_out if zoo else options.out)
    out.mkdir(parents=True, exist_ok=True)
    if parsed.flags["--card-only"]:
        write_model_card(update_json(out / "family.json", lambda f: f), out)
        return
    if config.data.corpus != "stdlib":
        raise snnet.SnnetError("the stdlib-lm family is trained on the standard library: leave data.corpus at 'stdlib'")
    torch.set_num_threads(options.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-save and per-load bars would bury the script's own lines
    root, files = stdlib_root(), stdlib_sources()
    train_files, held = split_documents(files, root, config.data.held_out)
    tokenizer = train_tokenizer(train_files, options.vocab_size)
    eval_blocks = token_blocks(held, tokenizer, config.data.block_size, max_blocks=options.eval_blocks)
    train_tokens = len(token_blocks(train_files, tokenizer, config.data.block_size)) * (config.data.block_size + 1)
    shared = {"corpus": corpus_record(root, files, train_files, held, config.data.held_out, train_tokens),
              "tokenizer": {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer), "eos": EOS},
              "eval_blocks": len(eval_blocks), "eval_tokens": eval_blocks.tokens, "eval_bytes": int(eval_blocks.byte_counts.sum())}
    print(f"corpus {shared['corpus']['fingerprint']}: {len(train_files)} training files, {len(held)} held out; "
          f"tokenizer {shared['tokenizer']['fingerprint']} ({len(tokenizer)} tokens)", flush=True)
    run = {"command": command_line(), "threads": options.threads}
    if zoo:
        demo_blocks = token_blocks(held, tokenizer, config.data.block_size, max_blocks=options.demo_blocks)
        shared.update(demo_blocks=len(demo_blocks), demo_tokens=demo_blocks.tokens,
                      demo_bytes=int(demo_blocks.byte_counts.sum()))
    for name in models:
        member = config.override(out_dir=str(Path(options.runs) / name))
        row = train_lm_member(name, tokenizer, member, out, eval_blocks)
        # written after every model so an interrupted run keeps what it finished
        if zoo:
            update_zoo(out, name, dict(row, **run, held_out_demo=measure(out / name, demo_blocks)), config, shared,
                       demo_blocks)
        else:
            update_family(out, name, dict(row, **run), config, dict(shared, threads=options.threads))
    print(f"done -> {out}", flush=True)


def measure(folder: Path, blocks: Any) -> dict[str, Any]:
    """A saved member's held-out figures on ``blocks``, reloaded through ``from_pretrained`` as users load it."""
    from transformers import AutoModelForCausalLM

    return {k: round(v, 4) if isinstance(v, float) else v
            for k, v in score_lm(AutoModelForCausalLM.from_pretrained(str(folder)), blocks).items()}


def update_zoo(out: Path, name: str, result: dict[str, Any], config: Any, shared: dict[str, Any],
               demo_blocks: Any) -> None:
    """Record one zoo member in zoo.json, keeping the others trained with the same recipe, text and tokenizer.

    The shipped family's members are measured on the same blocks and listed beside them (``family``
    rows, their training figures from family.json): they are the zoo's members at xs, s and m."""
    recipe = result_settings(config)
    same = {"recipe": recipe, "corpus": shared["corpus"], "tokenizer": shared["tokenizer"]}
    family = json.loads((family_dir() / "family.json").read_text())

    def add(zoo_file: dict[str, Any]) -> dict[str, Any]:
        if any(zoo_file.get(k) != v for k, v in same.items()):
            zoo_file = {}
        zoo_file.update(same, **{k: v for k, v in shared.items() if k not in same}, torch=torch.__version__)
        models = dict(zoo_file.get("models", {}), **{name: dict(result, source="zoo")})
        # the shipped members, trained the same way: the same text and tokenizer, and every setting family.json
        # records equal (settings added to snnet since then are absent there and left at their defaults)
        if (family.get("corpus"), family.get("tokenizer")) == (same["corpus"], same["tokenizer"]) and all(
                recipe.get(k) == v for k, v in family.get("recipe", {}).items()):
            for member, row in family["models"].items():
                if member not in models:
                    folder = family_dir() / member
                    models[member] = dict(row, source="family", held_out_demo=measure(folder, demo_blocks))
        zoo_file["models"] = dict(sorted(models.items(), key=lambda kv: kv[1]["flops"]))
        return zoo_file

    update_json(out / "zoo.json", add)


def update_family(out: Path, name: str, result: dict[str, Any], config: Any, shared: dict[str, Any]) -> None:
    """Record one model in family.json (and re-render the card), keeping the other members.

    Members trained with other settings, text or tokenizer are dropped: the family shares them."""
    import tokenizers
    import transformers

    recipe = result_settings(config)
    same = {"recipe": recipe, "corpus": shared["corpus"], "tokenizer": shared["tokenizer"]}

    def add(family: dict[str, Any]) -> dict[str, Any]:
        if any(family.get(k) != v for k, v in same.items()):
            family = {}
        family.update(same, eval_blocks=shared["eval_blocks"], eval_tokens=shared["eval_tokens"],
                      eval_bytes=shared["eval_bytes"], threads=shared["threads"], torch=torch.__version__,
                      transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                      machine=f"{platform.machine()} CPU")
        models = family.setdefault("models", {})
        models[name] = result
        family["models"] = {n: models[n] for n in STDLIB_LM_ARCHS if n in models}  # size order
        return family

    family = update_json(out / "family.json", add)
    if len(family["models"]) == len(STDLIB_LM_ARCHS):
        write_model_card(family, out)


if __name__ == "__main__":
    try:
        main()
    except snnet.SnnetError as e:  # bad settings, a refused resume: one line, as snnet's commands say it
        sys.exit(f"error: {e}")
