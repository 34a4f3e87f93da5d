"""The embedded language-model family ``stdlib-lm``: three small decoder LMs trained here on this Python's own source.

The family is snnet's default set of language-model anchors, as ``fmnist_vit_ti/s/b`` are the
vision ones: three Llama-style decoders (``transformers.LlamaConfig``: RMSNorm, rotary positions,
a gated MLP, tied embeddings) of one design at three sizes (:data:`STDLIB_LM_ARCHS`), about 10x
apart in FLOPs per token, sharing one byte-level BPE tokenizer of :data:`VOCAB_SIZE` tokens.
Text and tokenizer both come from the Python standard library's source (:mod:`snnet.text`), which
every Python install carries: nothing is downloaded.

Each member is trained from scratch by :func:`snnet.train.train` (the one loop, ``task:
causal-lm``, the ``stdlib-lm`` recipe) and saved in float16 with ``save_pretrained``, beside its
tokenizer, in ``snnet/weights/lm/<member>/``. snnet names them like the hub families
(``snnet/data_files/lm/families.json``), so ``stdlib-lm-s`` loads through transformers' real
``AutoModelForCausalLM.from_pretrained`` of that folder. ``scripts/train_lm_family.py`` runs
all of it and writes ``family.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn

from .errors import SnnetError

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["CONTEXT", "EOS", "LMArch", "LogitsOnly", "STDLIB_LM", "STDLIB_LM_ARCHS", "STDLIB_LM_ZOO_ARCHS", "VOCAB_SIZE",
           "family_dir", "llama_config", "lm_arch", "member_dir", "save_member", "score_lm", "train_lm_member", "train_tokenizer", "tokenizer_fingerprint"]

STDLIB_LM = "stdlib-lm"  # the family's name (snnet/data_files/lm/families.json)
VOCAB_SIZE = 2048  # byte-level BPE: 256 bytes, one special token, 1,791 merges
CONTEXT = 256  # tokens a training block predicts; the positions the members know; FLOPs are stated at it
EOS = "<|endoftext|>"  # separates documents; BOS, EOS and padding (id 0)


@dataclass(frozen=True)
class LMArch:
    """One member's shape (MLP ~8/3 of the width as in Llama, rounded to 16)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


# Sizes chosen so the three span about an order of magnitude in FLOPs per token and each trains in minutes
# on a CPU core, one depth for all. There is no "l": 192-wide members (6 and 4 layers deep) stayed on the
# plateau of single-token statistics longer than m in the family's short run, so the family grew downwards
# instead (snnet/recipes/stdlib-lm.yaml tells the history).
STDLIB_LM_ARCHS: dict[str, LMArch] = {
    "stdlib-lm-xs": LMArch(24, 4, 2, 64),
    "stdlib-lm-s": LMArch(48, 4, 3, 128),
    "stdlib-lm-m": LMArch(128, 4, 4, 352),
}

# The LM zoo (issue 21 item 8): members of the same design trained alone with the same recipe, data and steps
# (scripts/train_lm_family.py --zoo), at widths whose FLOPs per token fall between and around the stitched
# networks' (w32 and w40 between xs and s; w64, w80, w96 and w112 between s and m, w64 in the frontier's widest
# hole; w160 beyond m). MLP 8/3 of the width rounded up to 16 as in the family; heads of 16 or 20 wide (32 for w96
# and w160, as m). They are measured, not shipped: their weights stay in the run's folder (runs/lm_zoo).
STDLIB_LM_ZOO_ARCHS: dict[str, LMArch] = {
    "stdlib-lm-w32": LMArch(32, 4, 2, 96),
    "stdlib-lm-w40": LMArch(40, 4, 2, 112),
    "stdlib-lm-w64": LMArch(64, 4, 4, 176),
    "stdlib-lm-w80": LMArch(80, 4, 5, 224),
    "stdlib-lm-w96": LMArch(96, 4, 3, 256),
    "stdlib-lm-w112": LMArch(112, 4, 7, 304),
    "stdlib-lm-w160": LMArch(160, 4, 5, 432),
}


def lm_arch(name: str) -> LMArch:
    """The shape of a family or zoo member, by name."""
    arch = STDLIB_LM_ARCHS.get(name) or STDLIB_LM_ZOO_ARCHS.get(name)
    if arch is None:
        raise SnnetError(f"unknown stdlib-lm member {name!r}; the family is {', '.join(STDLIB_LM_ARCHS)}, "
                         f"the zoo {', '.join(STDLIB_LM_ZOO_ARCHS)}")
    return arch


def family_dir() -> Path:
    """Where the shipped family lives: ``snnet/weights/lm``."""
    return Path(__file__).parent / "weights" / "lm"


def member_dir(name: str, root: str | Path | None = None) -> Path:
    """The folder of one member (``config.json``, ``model.safetensors``, the tokenizer) under ``root``
    (default: the shipped family's folder)."""
    return Path(root if root is not None else family_dir()) / name


# ------------------------------------------------------------------ the tokenizer


def _texts(files: Iterable[Path]) -> Iterable[str]:
    for p in files:
        try:
            yield p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # snnet.text skips the same files


def train_tokenizer(files: Sequence[Path], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer (HF ``tokenizers``) trained on ``files``, as a transformers fast tokenizer.

    Byte-level: every byte has a token, so any text encodes (no unknown token). ``<|endoftext|>``
    (id 0) is BOS, EOS and padding. The trainer is deterministic: the same files in the same order
    give the same ``tokenizer.json`` (:func:`tokenizer_fingerprint`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise SnnetError(f"a byte-level BPE vocabulary needs more than 257 tokens (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(files), trainer)
    # model_max_length stays unset: whole files are encoded and cut into blocks (snnet.text.token_blocks)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and merges (two equal tokenizers agree)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the members


def llama_config(arch: LMArch, tokenizer: Any, context: int = CONTEXT) -> Any:
    """The transformers ``LlamaConfig`` of one member, its special tokens the tokenizer's."""
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                       num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.heads,
                       max_position_embeddings=context, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


class LogitsOnly(nn.Module):
    """A transformers causal LM as the training loop takes a plain model: token ids in, logits out.

    Also carries what :class:`snnet.tasks.CausalLM` reads off a network (its tokenizer and
    vocabulary). Its state dict is the model's under ``model.``; the model itself is what is saved.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits[..., : self.vocab_size]


@torch.inference_mode()
def score_lm(model: nn.Module, blocks: Any, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss (nats), perplexity, bits per byte and top-1 (%) of a plain causal LM
    on :class:`snnet.text.TokenBlocks` (the bytes the predicted tokens cover, as ``evaluate_lm``)."""
    from .tasks import Tally
    from .text import text_loader

    model.eval()
    tally = Tally(torch.device("cpu"))
    tokens = nbytes = 0
    for batch in text_loader(blocks, batch_size):
        ids = batch["input_ids"]
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        tally.update(logits.flatten(0, 1), ids[:, 1:].flatten())
        tokens += ids[:, 1:].numel()
        nbytes += int(batch["bytes"].sum())
    nll = tally.loss.item()
    return {"loss": nll / tokens, "ppl": math.exp(nll / tokens), "bpb": nll / math.log(2) / nbytes,
            "acc1": 100.0 * tally.hits1.item() / tokens, "tokens": tokens, "bytes": nbytes}


def _load_as_float32(config_json: Path) -> None:
    """Stored in float16, loaded in float32: ``from_pretrained`` (whose default is the config's dtype)
    then gives float32 parameters, what a CPU computes in and what stitching layers are made in."""
    config = json.loads(config_json.read_text())
    config["dtype"] = "float32"
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_member(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """Write a member's folder atomically: ``save_pretrained`` in float16 (config, safetensors) and the
    tokenizer, under a temporary name renamed into place (an existing folder is replaced whole)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        # a float16 copy: casting the model itself and back would leave the caller's weights rounded to float16
        copy.deepcopy(model).to(torch.float16).save_pretrained(str(tmp))
        _load_as_float32(tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            f.chmod(0o644)  # the usual file mode (some writers make private files): the folder ships in the wheel
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        folder.chmod(0o755)  # mkdtemp makes folders private; the folder may ship in the wheel
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def train_lm_member(name: str, tokenizer: Any, config: "TrainConfig", out: str | Path, held_out: Any) -> dict[str, Any]:
    """Train member ``name`` from scratch with ``config`` (``task: causal-lm``) through :func:`snnet.train.train`
    in ``config.run.out_dir`` (an interrupted run is resumed), save it in ``out/<name>`` (float16) and
    measure it on the ``held_out`` blocks after reloading that folder through ``from_pretrained``.

    Returns the member's row: architecture, params, FLOPs per token at the block length, held-out
    loss/ppl/bpb/top-1 (after the float16 round trip, and before it), steps, tokens trained on,
    training seconds and the files' sizes."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from .families.causal_lm import lm_part_costs
    from .members import train_seconds
    from .runlock import METRICS_NAME
    from .tasks import get_task
    from .train import train

    if config.task != "causal-lm":
        raise SnnetError(f"the stdlib-lm family trains with task causal-lm, not {config.task!r}")
    arch = lm_arch(name)
    torch.manual_seed(config.run.seed)  # the same init stream for every member
    model = LlamaForCausalLM(llama_config(arch, tokenizer, config.data.block_size))
    net = LogitsOnly(model, tokenizer)
    data = get_task(config.task, config.data, net).dataset(config.data, seed=config.run.seed, split=config.data.split)
    config = config if config.run.overwrite else config.override(resume="auto")
    result = train(net, data, config)
    before = score_lm(model, held_out)
    folder = save_member(model, tokenizer, Path(out) / name)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))  # what users get: the shipped folder
    after = score_lm(reloaded, held_out)
    costs, _ = lm_part_costs(reloaded.config, config.data.block_size)
    flops = costs.total[0]
    row = {"arch": asdict(arch), "params": sum(p.numel() for p in reloaded.parameters()), "flops": flops,
           "context": config.data.block_size, "held_out": {k: round(v, 4) if isinstance(v, float) else v
                                                            for k, v in after.items()},
           "held_out_fp32": {k: round(before[k], 4) for k in ("loss", "ppl", "bpb")}, "steps": result.step,
           "tokens_trained": result.step * config.data.batch_size * config.data.block_size,
           "train_blocks": len(data), "seconds": round(train_seconds(Path(config.run.out_dir) / METRICS_NAME), 1),
           "folder": folder.name, "bytes": sum(p.stat().st_size for p in folder.iterdir())}
    print(f"{name}: held-out {after['bpb']:.4f} bits/byte, ppl {after['ppl']:.2f} (fp32 {before['bpb']:.4f}), "
          f"{row['params']:,} params, {flops / 1e6:.2f} M FLOPs/token, {row['seconds']:.0f} s", flush=True)
    return row
