"""``snnet demo``: the README's main command.

Its options are generated like ``snnet train``'s (:mod:`snnet.commands.config_cli`): the training
settings start from the ``demo`` recipe (``snnet/recipes/demo.yaml``), and ``--demo.*`` are what it
measures and shows (:class:`snnet.demo.DemoOptions`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import typer

from .config_cli import TRAIN_LEGACY, Legacy, dump_yaml, parse

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
               "recipe (snnet/recipes/demo.yaml); --demo.* are what the demo measures and shows.")


def demo(ctx: typer.Context) -> None:
    """Build an SN-Net from the shipped Fashion-MNIST family, train it briefly, evaluate every stitch, plot the Pareto frontier and switch stitches by budget."""
    run_demo_command(ctx.args)


def run_demo_command(argv: Sequence[str]) -> None:
    from ..demo import DemoOptions, run_demo

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
