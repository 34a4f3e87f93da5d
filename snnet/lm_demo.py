"""``snnet demo --lm``: the SN-Net idea on the shipped language-model family, on a laptop CPU.

1. build one stitched language model from the three shipped ``stdlib-lm`` anchors
   (:mod:`snnet.lm_family`: Llama-style decoders trained here on the Python standard library's
   source, loaded through ``AutoModelForCausalLM.from_pretrained``) and measure each anchor alone
   on held-out text (files of the standard library none of them was trained on);
2. fit every stitching layer by least squares on the hidden states of training text, then train
   the whole network briefly through :func:`snnet.train.train` (``task: causal-lm``: one sampled
   stitch per step, token-level distillation from a frozen copy of the largest anchor);
3. evaluate every network's perplexity and bits per byte on the held-out text (shared prefixes),
   print the table with the bits-per-byte frontier against FLOPs per token, write
   ``results.json``/``results.csv``, ``pareto.html`` and ``pareto.png``;
4. say whether the stitches fill the FLOPs range between the anchors, and whether the anchors
   kept their bits per byte;
5. continue one prompt with the cheapest network, one in the middle of the frontier and the
   largest (greedy, so the text is the same on every run of the same network).

The training's settings are the ``lm-demo`` recipe (``snnet/recipes/lm-demo.yaml``: every value
with why it was chosen); :class:`LMDemoOptions` holds what the demo measures and shows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig
from .demo import FrontierRange
from .errors import ConfigError
from .io import atomic_write
from .recipes import recipe_config
from .report import human
from .results import Row, check_writable, write_results

__all__ = ["LMDemoOptions", "LMDemoResult", "Sample", "lm_demo_config", "run_lm_demo"]

RECIPE = "lm-demo"
PROMPT = "def "


@dataclass(frozen=True)
class LMDemoOptions:
    """What the language-model demo measures and shows, beside its training (the ``lm-demo`` recipe)."""

    eval_blocks: int = 64
    """Held-out blocks every network is measured on (the first N of the held-out files; data.block_size tokens each)."""
    eval_batch_size: int = 8
    """Blocks per evaluation batch."""
    prompt: str = PROMPT
    """The text the cheapest, a middle and the largest network continue."""
    sample_tokens: int = 48
    """Tokens each of them generates (greedily)."""

    def __post_init__(self) -> None:  # refuse bad settings before minutes of work, not after
        if self.eval_blocks < 1:
            raise ConfigError(f"demo.eval_blocks must be >= 1 block, got {self.eval_blocks}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"demo.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not self.prompt:
            raise ConfigError("demo.prompt must not be empty: the networks continue it")
        if self.sample_tokens < 1:
            raise ConfigError(f"demo.sample_tokens must be >= 1, got {self.sample_tokens}")


def lm_demo_config(**changes: Any) -> TrainConfig:
    """The language-model demo's training settings (the ``lm-demo`` recipe), with ``changes`` by name or path."""
    return recipe_config(RECIPE).override(changes)


@dataclass(frozen=True)
class Sample:
    """One network's continuation of the prompt."""

    role: str  # cheapest, middle, largest
    id: int
    name: str
    flops: int
    bpb: float
    text: str


@dataclass(frozen=True)
class LMDemoResult(FrontierRange):
    results: list[Row]
    anchors_before: dict[str, float]  # anchor name -> held-out bits per byte before stitching
    anchors_after: dict[str, float]
    frontier_size: int
    samples: list[Sample]
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # {"train": the TrainConfig, "demo": the LMDemoOptions}

    @property
    def anchors_not_hurt(self) -> bool:
        """No anchor lost more than 0.05 bits per byte (about 2-3 % of its value here)."""
        return all(self.anchors_after[k] - v <= 0.05 for k, v in self.anchors_before.items())


def check_lm_demo(config: TrainConfig) -> None:
    """What the demo needs beyond the settings' own checks, before any work."""
    from .train import default_device

    if config.task != "causal-lm":
        raise ConfigError(f"snnet demo --lm trains a language model (task causal-lm), not {config.task!r}")
    default_device(config.run.device)
    check_writable(config.run.out_dir)


def _quiet_transformers() -> None:
    """transformers' per-load progress bars would bury the demo's own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pick_samples(results: list[Row]) -> list[tuple[str, Row]]:
    """The cheapest network, the frontier network nearest the middle of the FLOPs range (in log
    FLOPs), and the largest anchor."""
    import math

    by_cost = sorted(results, key=lambda r: (r.flops, r.id))
    cheapest, largest = by_cost[0], max((r for r in results if r.is_anchor), key=lambda r: r.flops)
    front = [r for r in by_cost if r.pareto and r.id not in (cheapest.id, largest.id)] or by_cost[1:-1] or by_cost
    mid = math.sqrt(cheapest.flops * largest.flops)
    middle = min(front, key=lambda r: (abs(math.log(r.flops / mid)), r.id))
    return [("cheapest", cheapest), ("middle", middle), ("largest", largest)]


def _check_samples_fit(net: Any, options: LMDemoOptions) -> None:
    """Refuse a prompt and ``sample_tokens`` that together read more positions than an anchor knows."""
    from .families.causal_lm import net_positions

    known = net_positions(net)
    if known is None or getattr(net, "tokenizer", None) is None:  # no tokenizer: reading the text says so next
        return
    n = len(net.tokenizer(options.prompt, add_special_tokens=True)["input_ids"])
    if n + options.sample_tokens - 1 > known[0]:  # as snnet.generate counts: the last token is never read
        raise ConfigError(f"demo.sample_tokens {options.sample_tokens} after the {n}-token demo.prompt would read more than "
                          f"the {known[0]} positions {known[1]} knows: lower demo.sample_tokens to at most "
                          f"{max(known[0] + 1 - n, 1)} (or shorten demo.prompt)")


def run_lm_demo(config: TrainConfig | None = None, options: LMDemoOptions = LMDemoOptions(),
                echo: Callable[[str], Any] = print) -> LMDemoResult:
    """Run the language-model demo end to end and write its files into ``config.run.out_dir`` (its
    training run into ``OUT/train``). ``config``: its training settings (default: the ``lm-demo`` recipe)."""
    from . import lm
    from .plot import plot_pareto
    from .tasks import get_task
    from .train import train

    config = config if config is not None else lm_demo_config()
    t0 = time.perf_counter()
    check_lm_demo(config)
    out = check_writable(config.run.out_dir)
    _quiet_transformers()
    torch.manual_seed(config.run.seed)
    task = get_task(config.task, config.data)
    net = task.build_network(config)
    _check_samples_fit(net, options)  # before minutes of training, not at the samples after them
    task = get_task(config.task, config.data, net)  # reads the text with the anchors' shared tokenizer
    # seed None: the first blocks of the sorted files, not a seeded spread of them (what --data.limit reads in
    # `snnet train`): docs/lm-demo's results were measured so, and the zoo it is compared with (zoo.json,
    # scripts/train_lm_family.py --zoo) on the same first held-out blocks
    train_set = task.dataset(config.data, seed=None, split=config.data.split)
    eval_set = task.dataset(config.data, seed=None, split="val", train=False, limit=options.eval_blocks)
    loader = lm.text_loader(eval_set, options.eval_batch_size)
    costs = net.costs()
    echo(f"SN-Net from {', '.join(net.labels)}: {len(net.space)} networks, {human(min(c.flops for c in costs))}–"
         f"{human(max(c.flops for c in costs))} FLOPs per token at a {net.context}-token context, "
         f"{len(net.stitch_layers)} stitching layers; held out: {eval_set.tokens:,} tokens "
         f"({int(eval_set.byte_counts.sum()):,} bytes)")
    seconds: dict[str, float] = {"build": time.perf_counter() - t0}
    progress = config.run.progress

    t = time.perf_counter()
    anchors = [s.id for s in net.space.anchor_stitches()]
    before = {r.name: r.value("bpb") for r in lm.evaluate_lm(net, loader, anchors, progress=progress)}
    echo("anchors before stitching (bits/byte): " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    seconds["anchors_before"] = time.perf_counter() - t

    t = time.perf_counter()
    res = train(net, train_set, config.override(out_dir=str(out / "train")))
    echo(f"trained {res.step} steps in {res.seconds:.0f}s, last loss {res.loss:.3f}")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    results = lm.evaluate_lm(net, loader, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t
    echo("\n" + lm.format_lm_results(results))
    write_results(results, out)
    title = f"Stitched LM on the Python standard library: {len(results)} networks from {len(net.anchors)} anchors"
    plot_pareto(results, out / "pareto.html", out / "pareto.png", y="bpb", title=title)

    t = time.perf_counter()
    samples = []
    gen = lm.GenerationOptions(max_new_tokens=options.sample_tokens)
    for role, r in pick_samples(results):
        text = lm.generate(net, options.prompt, stitch=r.id, options=gen).text
        samples.append(Sample(role, r.id, r.name, r.flops, r.value("bpb"), text))
    seconds["samples"] = time.perf_counter() - t

    after = {r.name: r.value("bpb") for r in results if r.is_anchor}
    summary = LMDemoResult(results, before, after, sum(r.pareto for r in results), samples,
                           {**seconds, "total": time.perf_counter() - t0},
                           {"train": config.to_dict(), "demo": asdict(options)})
    _report(summary, options.prompt, out, echo)
    return summary


def _report(s: LMDemoResult, prompt: str, out: Path, echo: Callable[[str], Any]) -> None:
    echo("\nThe paper's claim at this scale:")
    echo(f"  stitches fill the range: {s.frontier_size} networks on the bits-per-byte frontier; {s.gap_text()}")
    kept = ", ".join(f"{k} {s.anchors_before[k]:.4f} -> {s.anchors_after[k]:.4f} "
                     f"({s.anchors_after[k] - s.anchors_before[k]:+.4f})" for k in s.anchors_before)
    echo(f"  anchors' bits/byte before -> after: {kept}")
    echo(f"    no anchor worse by more than 0.05 bits/byte: {'yes' if s.anchors_not_hurt else 'NO'}")
    echo(f"\nGreedy continuations of {prompt!r}:")
    for x in s.samples:
        echo(f"--- {x.role}: network {x.id} {x.name} ({human(x.flops)} FLOPs/token, {x.bpb:.4f} bits/byte)")
        echo(prompt + x.text)
    summary = {k: v for k, v in asdict(s).items() if k != "results"}
    summary |= {"max_frontier_gap": s.max_frontier_gap, "frontier_filled": s.frontier_filled,
                "widest_gap_between": [list(p) for p in s.widest_gap_between],
                "anchors_not_hurt": s.anchors_not_hurt}
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    echo(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'pareto.html'}, {out / 'pareto.png'}, "
         f"{out / 'summary.json'} in {s.seconds['total']:.0f}s")
