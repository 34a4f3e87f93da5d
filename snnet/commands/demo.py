"""``snnet demo``: the README's main command.

Its options are generated like ``snnet train``'s (:mod:`snnet.commands.config_cli`): the training
settings start from the ``demo`` recipe (``snnet/recipes/demo.yaml``), and ``--demo.*`` are what it
measures and shows (:class:`snnet.demo.DemoOptions`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import typer

from .config_cli import TRAIN_LEGACY, Legacy, dump_yaml, given_task, parse

# `snnet demo`'s options before the configuration tree -> the settings they set (`--data` now names the
# dataset everywhere: the folder of the IDX files is --data.root)
DEMO_LEGACY: dict[str, Legacy] = {
    **{k: v for k, v in TRAIN_LEGACY.items() if k in (
        "--out", "-o", "--batch-size", "-b", "--lr", "--anchor-lr-scale", "--augment", "--no-augment", "--sampler",
        "--two-way", "--lora-rank", "--data", "--seed", "--device", "--progress", "--no-progress")},
    "--steps": Legacy("schedule.max_steps"), "--train-limit": Legacy("data.limit"),
    "--download": Legacy("data.download", "true"),
    "--distill": Legacy("distill.teacher", "largest"), "--no-distill": Legacy("distill.teacher", "null"),
    "--distill-alpha": Legacy("distill.alpha"),
    "--weights": Legacy("demo.weights", kind="list"), "--eval-split": Legacy("demo.eval_split"),
    "--eval-limit": Legacy("demo.eval_limit"), "--zoo": Legacy("demo.zoo", "true"),
    "--no-zoo": Legacy("demo.zoo", "false"),
}
QUICK = {"max_steps": 20, "limit": 5000, "eval_limit": 1000}  # --quick: a smoke run in seconds

DESCRIPTION = ("Build an SN-Net from the shipped Fashion-MNIST family, train it briefly, evaluate every stitch, plot "
               "the Pareto frontier and switch stitches by budget. The training's settings start from the demo "
               "recipe (snnet/recipes/demo.yaml); --demo.* are what the demo measures and shows. snnet demo --lm (or "
               "--task causal-lm) runs the language-model demo instead: snnet demo --lm --help.")


def demo(ctx: typer.Context) -> None:
    """Build an SN-Net from the shipped Fashion-MNIST family, train it briefly, evaluate every stitch, plot the Pareto frontier and switch stitches by budget."""
    run_demo_command(ctx.args)


LM_FLAG = "--lm"
LM_QUICK = {"max_steps": 4, "limit": 64, "eval_blocks": 8, "sample_tokens": 8}  # --lm --quick
LM_DESCRIPTION = ("Build a stitched language model from the shipped stdlib-lm family (three small decoders trained on "
                  "the Python standard library's source), train it briefly, evaluate every network's perplexity and "
                  "bits per byte on held-out files, plot the frontier and continue a prompt with the cheapest, a "
                  "middle and the largest network. The training's settings start from the lm-demo recipe "
                  "(snnet/recipes/lm-demo.yaml); --demo.* are what the demo measures and shows.")


def wants_lm(argv: Sequence[str]) -> bool:
    """``--lm``, or the tree's spelling ``task: causal-lm`` in any layer (``--task causal-lm``, ``--set task=...``,
    a ``--config`` file such as ``snnet demo --lm --print-config`` writes, ``--recipe lm-demo``), asks for the
    language-model demo (the image demo refused that file: "unknown setting demo.eval_blocks")."""
    return LM_FLAG in argv or given_task([a for a in argv if a != LM_FLAG], DEMO_LEGACY) == "causal-lm"


def run_demo_command(argv: Sequence[str]) -> None:
    from ..demo import DemoOptions, run_demo

    if wants_lm(argv):
        run_lm_demo_command([a for a in argv if a != LM_FLAG])
        return
    parsed = parse(argv, "snnet demo", legacy=DEMO_LEGACY, extra={"demo": DemoOptions}, default_recipe="demo",
                   flags={"--quick": f"A smoke run in seconds: at most {QUICK['max_steps']} steps, the first "
                                     f"{QUICK['limit']:,} training and {QUICK['eval_limit']:,} evaluation images "
                                     "(unless given)."},
                   description=DESCRIPTION)
    config, options = parsed.config, parsed.extra["demo"]
    if parsed.flags["--quick"]:
        config = config.override(max_steps=min(config.schedule.max_steps or QUICK["max_steps"], QUICK["max_steps"]),
                                 limit=config.data.limit or QUICK["limit"])
        options = dataclasses.replace(options, eval_limit=options.eval_limit or QUICK["eval_limit"])
    if parsed.flags["--print-config"]:
        typer.echo(dump_yaml(config, {"demo": options}), nl=False)
        return
    run_demo(config, options, echo=typer.echo)


def run_lm_demo_command(argv: Sequence[str]) -> None:
    """``snnet demo --lm``: the same option machinery, the ``lm-demo`` recipe and :class:`snnet.lm_demo.LMDemoOptions`."""
    from ..errors import SnnetError

    try:
        from ..lm_demo import LMDemoOptions, run_lm_demo
    except ImportError as e:
        raise SnnetError(f"snnet demo --lm needs the lm extra (transformers, tokenizers): pip install 'snnet[lm]' ({e})")
    parsed = parse(argv, "snnet demo --lm", legacy={k: v for k, v in DEMO_LEGACY.items() if v.path.split(".")[0] != "demo"},
                   extra={"demo": LMDemoOptions}, default_recipe="lm-demo",
                   # caps, not defaults: the recipe sets the limit, so a value given cannot be told from its own
                   flags={"--quick": f"A smoke run in seconds: at most {LM_QUICK['max_steps']} steps, "
                                     f"{LM_QUICK['limit']} training blocks, {LM_QUICK['eval_blocks']} held-out blocks and "
                                     f"{LM_QUICK['sample_tokens']} sampled tokens (fewer if given; more are lowered)."},
                   description=LM_DESCRIPTION)
    config, options = parsed.config, parsed.extra["demo"]
    if parsed.flags["--quick"]:
        config = config.override(max_steps=min(config.schedule.max_steps or LM_QUICK["max_steps"], LM_QUICK["max_steps"]),
                                 limit=config.data.limit if config.data.limit is not None and config.data.limit < LM_QUICK["limit"]
                                 else LM_QUICK["limit"])
        options = dataclasses.replace(options, eval_blocks=min(options.eval_blocks, LM_QUICK["eval_blocks"]),
                                      sample_tokens=min(options.sample_tokens, LM_QUICK["sample_tokens"]))
    if parsed.flags["--print-config"]:
        typer.echo(dump_yaml(config, {"demo": options}), nl=False)
        return
    run_lm_demo(config, options, echo=typer.echo)
