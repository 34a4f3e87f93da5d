"""The language-model side of shared commands: ``snnet stitches --anchors pythia``, ``snnet eval``,
``snnet export`` and ``snnet generate`` on a saved stitched language model (a folder whose
``config.json`` says ``"format": "snnet-lm"``, e.g. the ``final/`` of a ``--task causal-lm`` run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import SnnetError

# the image default of `snnet eval --data`: for a language model it means "the corpus it was trained on"
_IMAGE_DEFAULT = "fashion-mnist"


def lm_space(names: list[str], img_size: int | None, select: str | None, context: int | None,
             space: dict[str, Any]) -> Any:
    """The stitch space of language-model anchors, built on the meta device (no weights, no download
    for the families snnet ships configs of), priced per generated token at ``context`` tokens (default: 1024 or
    the fewest positions an anchor knows, if fewer; a longer context is refused)."""
    from ..families.causal_lm import create_stitched_lm

    if img_size is not None:
        raise SnnetError("--img-size is for image models; a language model's FLOPs are per generated token at a "
                         "context length: use --context")
    if select is not None:
        raise SnnetError("--select klas scores image models on calibration images; list a language model's whole "
                         "space without it")
    space = dict(space)
    if space.pop("cut", "block") != "block":
        raise SnnetError("--cut sublayer cuts ViT blocks; a language model is stitched between its decoder layers")
    return create_stitched_lm(names, device="meta", context=context, **space)


def is_lm_folder(path: Path | None) -> bool:
    """Whether ``path`` holds a saved stitched language model (rather than an image network)."""
    from ..families.causal_lm import FORMAT

    if path is None or not (path / "config.json").is_file():
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False  # the image loader says what is wrong with the file


def load_lm(path: Path, device: str | None = None) -> Any:
    """The stitched language model saved in ``path``, on ``device`` (default: CUDA if there is one)."""
    from ..families.causal_lm import StitchedLM
    from ..train import default_device

    return StitchedLM.from_pretrained(path).to(default_device(device)).eval()


def text_settings(model: Path, corpus: str | None, block_size: int | None, split: str) -> Any:
    """The data settings of an evaluation: those of the run that trained ``model`` (its ``train_config.json``
    beside ``final/``) where not given, else the tree's defaults; the split in the corpus's terms."""
    import dataclasses

    from ..config import DataConfig

    data = DataConfig()
    run = model.resolve().parent
    if (run / "train_config.json").is_file():
        from ..train import load_run_config

        data = load_run_config(run).data
    changes: dict[str, Any] = {"split": "val" if split in ("test", "val", "held-out") else split}
    if corpus is not None and corpus != _IMAGE_DEFAULT:
        changes["corpus"] = corpus
    if block_size is not None:
        changes["block_size"] = block_size
    return dataclasses.replace(data, **changes)


def evaluate_lm_folder(model: Path, corpus: str | None, split: str, batch_size: int, block_size: int | None,
                       limit: int | None, stitches: list[str] | None, out: Path, device: str | None,
                       progress: bool) -> list[Path]:
    """``snnet eval --model LM``: perplexity, bits per byte and next-token accuracy of every chosen network on
    the held-out text, printed, written as results.json/csv, and the bits-per-byte frontier against FLOPs per
    token as frontier.html/png."""
    import dataclasses

    from ..families.causal_lm import net_positions
    from ..lm_eval import evaluate_lm
    from ..tasks import CausalLM
    from ..text import text_loader

    net = load_lm(model, device)
    chosen = [net.stitch(k) for k in stitches] if stitches is not None else None  # bad names fail before reading text
    data = text_settings(model, corpus, block_size, split)
    room = net_positions(net)
    if room is not None and data.block_size > room[0]:  # before the text is read
        given = "" if block_size is not None else " (the data.block_size of the run that wrote it, or the default)"
        raise SnnetError(f"blocks of {data.block_size} tokens{given} are longer than the {room[0]} positions {room[1]} "
                         f"knows: give --block-size {room[0]} or less")
    from .options import SUBSET_SEED

    blocks = CausalLM(data, net).dataset(data, seed=SUBSET_SEED, train=False, limit=limit)
    rows = evaluate_lm(net, text_loader(blocks, batch_size), chosen, progress=progress, context=data.block_size)
    # the fingerprint names the split's files, not which of them were read nor how much: with --limit, the seed of
    # the files' order (None: sorted, every file) and the blocks say it (rows of --limit 4 and --limit 8 looked alike)
    where = {"corpus": data.corpus, "split": data.split, "fingerprint": blocks.fingerprint, "blocks": len(blocks),
             "limit_seed": blocks.seed}
    return report_lm([dataclasses.replace(r, extra={**r.extra, **where}) for r in rows], out)


def report_lm(rows: list, out: Path) -> list[Path]:
    """A language model's results printed, written as results.json/csv, and their bits-per-byte frontier
    against FLOPs per token drawn as frontier.html/png (``snnet eval``, of a model or of ``--results``)."""
    from ..lm_eval import LM_FRONT, format_lm_results
    from ..plot import plot_pareto
    from ..results import write_results

    typer.echo(format_lm_results(rows))
    return [*write_results(rows, out), *plot_pareto(rows, out / "frontier.html", out / "frontier.png", y=LM_FRONT)]


def export_lm_folder(model: Path, stitch: str, out: Path) -> Path:
    """``snnet export --model LM --stitch S``: one network as a standalone transformers model folder (verified)."""
    from ..families.lm_hf import export_route

    net = load_lm(model, "cpu")
    s = net.stitch(stitch)
    path = export_route(net, s, out)
    typer.echo(f"exported {s.name} to {path} (verified: its logits match the stitched network's within 1e-5)")
    return path


def generate(
    model: Annotated[Path, typer.Option("--model", "-m", help="A saved stitched language model (e.g. a causal-lm "
                                        "run's final/ folder).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Text to continue (repeat for a batch).")],
    stitch: Annotated[Optional[str], typer.Option("--stitch", "-s", help="Stitch id or name (default: the largest "
                                                  "anchor); or --budget.")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="A network within a budget, e.g. 'flops<=400M' "
                                                  "(FLOPs per generated token): the lowest bits per byte in "
                                                  "--results, else the dearest within it.")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", "-r", help="results.json of `snnet eval` on this "
                                                    "network, for --budget.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to add.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sampling.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling's mass.")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop at this text (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of sampling (the same seed repeats a sample).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1... (default: cuda if available).")] = None,
) -> None:
    """Continue text with one network of a saved stitched language model (its own KV cache, greedy or sampled)."""
    from ..generate import GenerationOptions, generate as run

    if stitch is not None and budget is not None:
        raise SnnetError("give --stitch or --budget, not both")
    if results is not None and budget is None:  # else ignored: the largest anchor (or --stitch) ran, whatever it said
        raise SnnetError("--results ranks the networks within a --budget: give --budget too (or drop --results)")
    net = load_lm(model, device)
    if net.tokenizer is None:
        raise SnnetError(f"{model} holds no tokenizer: text cannot be encoded for it")
    if budget is not None:
        chosen = net.select(budget=budget, results=results)
    else:
        # not the saved active stitch: a trained network is saved on whichever stitch its last step sampled
        chosen = net.stitch(stitch) if stitch is not None else max(net.space.anchor_stitches(),
                                                                   key=lambda s: (net.costs()[s.id].flops, s.id))
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=tuple(stop or ()), seed=seed)
    outs = run(net, list(prompt), stitch=chosen, options=options)
    for p, o in zip(prompt, outs if isinstance(outs, list) else [outs]):
        typer.echo(p + o.text)
    typer.echo(f"({chosen.name}: {net.costs()[chosen.id].flops / 1e6:.2f}M FLOPs per token at a {net.context}-token "
               "context)", err=True)
