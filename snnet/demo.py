"""The demo: the whole SN-Net idea on the shipped Fashion-MNIST family, on a laptop CPU.

One network, many budgets, switched instantly:

1. build the SN-Net from the three shipped anchors (``fmnist_vit_ti/s/b``; or anchors of the same
   design from ``--demo.weights``) and measure each anchor alone on the evaluation split (the test
   set; ``--demo.eval_split val`` for research runs that choose settings);
2. initialise every stitching layer by least squares on 100 training images, then train the
   whole network briefly on the 50,000 training images outside the validation split, sampling
   one stitch per step (the recipe's draw: uniform but for the S->B stitches, three times as
   likely; the anchors cut after every attention and every MLP) and distilling from a frozen
   copy of the largest anchor;
3. evaluate every stitch on the evaluation split (shared prefixes), print the table with the
   Pareto frontier, write ``results.json``, ``pareto.html`` and ``pareto.png``;
4. check the paper's claim at this scale: the stitches fill the FLOPs range between the
   anchors with accuracy rising with cost, and the anchors keep their accuracy;
5. set the stitches beside the *zoo* (``snnet/weights/fmnist_zoo.json``: ViTs of the same design
   trained one by one with the anchors' recipe) and say how the two frontiers compare at matched
   FLOPs over the anchors' range, with what each side cost to train;
6. for a few FLOPs budgets, select the best stitch and time the switch.

The training's settings are the ``demo`` recipe (``snnet/recipes/demo.yaml``: every value with
why it was chosen); :class:`DemoOptions` holds what the demo measures and shows.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .anchors import AnchorSpec
from .config import TrainConfig
from .errors import ConfigError, SnnetError
from .evaluate import evaluate
from .io import atomic_write
from .recipes import recipe_config
from .results import (FrontComparison, Row, check_writable, compare_fronts, format_results, frontier, mark_pareto,
                      network_rows, write_results)
from .model import StitchedNet, create_snnet, network_from_config, space_options
from .report import human, table
from .sampling import seed_everything
from .tasks import get_task
from .train import stitch_weights, train

FAMILY = "fmnist"
EVAL_SPLITS = ("test", "val")  # snnet.data's Fashion-MNIST splits the demo may measure on
MAX_FRONTIER_GAP = 0.2  # the range is filled when no two neighbouring Pareto-optimal networks are further apart


def anchor_specs(weights: tuple[str, ...]) -> list[tuple[str, AnchorSpec]]:
    """(label, spec) of each anchor whose weights are given: one folder (its ``*.safetensors``) or
    files, each named after its architecture as the family and zoo scripts write them
    (``fmnist_vit_s.safetensors``, ``fmnist_vit_w24_d6_p7.safetensors``)."""
    from .pretrained import FMNIST_FAMILY, FmnistVitSpec

    paths = [Path(w).expanduser() for w in weights]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(paths[0].glob("*.safetensors"))
        if len(paths) < 2:
            raise SnnetError(f"--weights {weights[0]}: the folder holds {len(paths)} .safetensors file(s); "
                             "an SN-Net needs at least two anchors")
    out = []
    for path in paths:
        if not path.is_file():
            raise SnnetError(f"--weights: {path} is not a file (give a folder of .safetensors files or the files)")
        try:
            spec = FmnistVitSpec.parse(path.stem)
        except SnnetError as e:
            raise SnnetError(f"--weights: cannot tell the architecture of {path}: {e}") from None
        if path.stem in FMNIST_FAMILY:  # the shipped names rebuild as themselves
            out.append((path.stem, AnchorSpec(path.stem, file=str(path))))
        else:
            out.append((spec.name, AnchorSpec("fmnist_vit", file=str(path), kwargs=tuple(sorted(spec.model_kwargs().items())))))
    if len(out) < 2:
        raise SnnetError(f"--weights gives {len(out)} anchor(s); an SN-Net needs at least two")
    return out


def check_names(labels: list[str], config: TrainConfig) -> None:
    """Explicit routes and weighted stitches name their anchors: the recipe's (the shipped family's)
    are not those of other anchors."""
    from .space import route_anchors

    named = [("space.routes", config.space.routes or (), "--space.routes null for SN-Net's own space"),
             ("sampling.weighted_stitches", [n for n in config.sampling.weighted_stitches or () if isinstance(n, str)]
              if config.sampling.sampler == "weighted" else (), "--sampling.sampler uniform for the paper's draw")]
    for setting, names, instead in named:
        unknown = [a for name in names for a in route_anchors(name) if a not in labels]
        if unknown:
            raise ConfigError(f"{setting} names {', '.join(dict.fromkeys(unknown))}, not among the anchors of "
                              f"--demo.weights ({', '.join(labels)}): give names of those anchors, or {instead}")


@dataclass(frozen=True)
class DemoOptions:
    """What the demo measures and shows, beside its training (whose settings are the ``demo`` recipe)."""

    weights: tuple[str, ...] | None = None
    """The anchors' weights instead of the shipped family: a folder of .safetensors files or the files, each named after its architecture (fmnist_vit_s, fmnist_vit_w24_d6_p7, ...)."""
    eval_split: str = "test"
    """Where stitches are measured: test, or val (the 10,000 validation images carved from the training set; make choices there)."""
    eval_limit: int | None = None
    """Evaluate on the first N images of the split (default: all 10,000)."""
    eval_batch_size: int = 500
    """Images per evaluation batch."""
    zoo: bool = True
    """Compare with the Fashion-MNIST zoo (ViTs of the same design trained alone): rows, plot and verdict."""
    budgets: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    """FLOPs budgets to switch to, as fractions of the largest anchor's."""

    def __post_init__(self) -> None:  # refuse bad settings before minutes of work, not after
        for name in ("weights", "budgets"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.eval_split not in EVAL_SPLITS:
            raise ConfigError(f"unknown evaluation split {self.eval_split!r}; use {' or '.join(EVAL_SPLITS)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"demo.eval_limit must be >= 1 image, got {self.eval_limit}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"demo.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not all(math.isfinite(b) and b > 0 for b in self.budgets):
            raise ConfigError(f"demo.budgets must be fractions > 0 of the largest anchor's FLOPs, got {self.budgets}")


def demo_config(**changes: Any) -> TrainConfig:
    """The demo's training settings (the ``demo`` recipe), with ``changes`` by setting name or path."""
    return recipe_config("demo").override(changes)


def check_demo(config: TrainConfig, options: DemoOptions) -> None:
    """What the demo needs beyond the settings' own checks, before any work: Fashion-MNIST and its
    files, anchor weights that exist and name an architecture, an output folder it can write."""
    from .data import FASHION_MNIST_NAMES, check_source
    from .train import default_device

    if config.data.source.lower() not in FASHION_MNIST_NAMES:
        raise ConfigError(f"the demo runs on Fashion-MNIST (its anchors and its zoo are trained on it), not "
                          f"{config.data.source!r}: give the folder of its IDX files as --data.root DIR")
    default_device(config.run.device)
    # the demo's accuracies are of images it never trained on (docs/demo.md): a training split that holds the
    # measured one (train+val or val itself, measured on val; test measured on test) reported training accuracy
    from .data import _fashion_mnist_split

    trained = _fashion_mnist_split(config.data.split)
    if options.eval_split == trained or (trained == "train+val" and options.eval_split == "val"):
        raise ConfigError(f"data.split {config.data.split!r} trains on the {options.eval_split} images the demo "
                          f"measures on (demo.eval_split {options.eval_split}): its accuracies would be of images it "
                          "trained on; train on 'train' (the default), or measure on another split")
    if options.weights:  # files exist and name an architecture; explicit routes name these anchors
        check_names([label for label, _ in anchor_specs(options.weights)], config)
    check_writable(config.run.out_dir)
    if not config.data.download:  # missing data fails before the network is built
        for split in (config.data.split, options.eval_split):
            check_source(config.data.source, split, config.data.root)


@dataclass(frozen=True)
class Switch:
    """One budget, the stitch it selects, and how long switching to it takes."""

    budget_flops: int
    id: int
    name: str
    flops: int
    acc1: float
    select_us: float


def noise(se: float | None) -> float:
    """Two standard errors of a difference of two accuracies, each with binomial standard error ``se``."""
    return 2 * math.sqrt(2) * (se or 0.0)


def verdict_word(mean: float, se: float | None) -> str:
    """A mean gap at matched FLOPs in words: within the noise it is no lead either way."""
    if abs(mean) <= noise(se):
        return "on par with"
    return "ahead of" if mean > 0 else "behind"


@dataclass(frozen=True)
class ZooVerdict:
    """The stitches' frontier against the zoo's, at matched FLOPs over the anchors' range, and
    what each side cost to train (image-steps: images seen, steps x batch)."""

    comparison: FrontComparison
    zoo_models: int  # zoo members compared (all of the zoo's rows)
    zoo_front: tuple[str, ...]  # the zoo's frontier members inside the anchors' range
    zoo_front_image_steps: int  # what training those alone cost
    zoo_front_seconds: float
    joint_image_steps: int  # the SN-Net's joint training (its anchors are zoo members, trained once)
    joint_seconds: float
    eval_images: int  # the stitches' evaluation images (the zoo's are the split's 10,000)

    @property
    def noise(self) -> float:
        """Two standard errors of a difference of two accuracies: smaller gaps are not evidence."""
        return noise(self.comparison.se)

    def verdict(self) -> str:
        return verdict_word(self.comparison.mean, self.comparison.se)

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        def step(s: Any) -> dict[str, Any]:
            return {"from_flops": s.start, "to_flops": s.end, "stitch": s.ours, "stitch_acc1": s.ours_y,
                    "zoo": s.theirs, "zoo_acc1": s.theirs_y, "diff": round(s.diff, 4)}
        return {"verdict": self.verdict(), "flops_range": [c.lo, c.hi], "mean_diff": round(c.mean, 4),
                "worst": step(c.worst), "best": step(c.best), "stitches_ahead_share": round(c.ahead, 4),
                "binomial_se": c.se, "noise_2se_of_diff": round(self.noise, 4), "zoo_models": self.zoo_models,
                "zoo_front_in_range": list(self.zoo_front), "zoo_front_image_steps": self.zoo_front_image_steps,
                "zoo_front_seconds": self.zoo_front_seconds, "joint_image_steps": self.joint_image_steps,
                "joint_seconds": round(self.joint_seconds, 1), "eval_images": self.eval_images}


class FrontierRange:
    """The check both demos (images and ``--lm``) make of their frontier: does it fill the anchors' FLOPs range?"""

    results: list[Row]

    @property
    def max_frontier_gap(self) -> float:
        """The widest gap between consecutive frontier points, as a share of the anchors' FLOPs range."""
        return gap_ends(self.results)[2]

    @property
    def frontier_filled(self) -> bool:
        return self.max_frontier_gap <= MAX_FRONTIER_GAP

    @property
    def widest_gap_between(self) -> tuple[tuple[str, float], tuple[str, float]]:
        """The two Pareto-optimal networks (or ends of the anchors' range) around the widest gap, by name and FLOPs."""
        a, b, _ = gap_ends(self.results)
        return a, b

    def gap_text(self) -> str:
        """'widest FLOPs gap between them X% of the anchors' range, A (FLOPs) to B (FLOPs) (needs <= 20%): yes' (or NO)."""
        (a, fa), (b, fb), gap = gap_ends(self.results)
        return (f"widest FLOPs gap between them {gap:.1%} of the anchors' range, {a} ({human(fa)}) "
                f"to {b} ({human(fb)}) (needs <= {MAX_FRONTIER_GAP:.0%}): {'yes' if gap <= MAX_FRONTIER_GAP else 'NO'}")


@dataclass(frozen=True)
class DemoResult(FrontierRange):
    results: list[Row]
    anchors_before: dict[str, float]  # anchor name -> top-1 before stitching
    anchors_after: dict[str, float]
    frontier_size: int
    switches: list[Switch]
    seconds: dict[str, float] = field(default_factory=dict)
    eval_split: str = "test"  # the Fashion-MNIST split every accuracy was measured on
    config: dict[str, Any] = field(default_factory=dict)  # what ran: {"train": the TrainConfig, "demo": the DemoOptions}
    zoo: ZooVerdict | None = None  # the stitches against the zoo (None: run without it)

    @property
    def anchors_kept(self) -> bool:
        """Every anchor within one point of its accuracy before stitching (either way)."""
        return all(abs(self.anchors_after[k] - v) <= 1.0 for k, v in self.anchors_before.items())

    @property
    def anchors_not_hurt(self) -> bool:
        """No anchor lost more than one point: stitching did not cost the anchors accuracy."""
        return all(self.anchors_after[k] - v >= -1.0 for k, v in self.anchors_before.items())


def frontier_gap(results: list[Row]) -> float:
    """Widest FLOPs gap between consecutive Pareto-frontier points inside the anchors' range,
    as a fraction of that range (cheapest to dearest anchor)."""
    return gap_ends(results)[2]


def gap_ends(results: list[Row]) -> tuple[tuple[str, float], tuple[str, float], float]:
    """The two Pareto-optimal networks (or ends of the anchors' range) around the widest FLOPs gap inside
    the anchors' range, by name and FLOPs, and that gap as a fraction of the range. Zoo and reference rows
    (a results file holds them, marked on their own frontiers) are left aside: the gap is the network's."""
    results = network_rows(results)
    anchors = sorted((r.flops, r.name) for r in results if r.is_anchor)
    (lo, lo_name), (hi, hi_name) = anchors[0], anchors[-1]
    names = {lo: lo_name, hi: hi_name} | {r.flops: r.name for r in results if r.pareto}
    a, b = widest_pair(names, lo, hi)
    return (names[a], a), (names[b], b), _share(a, b, lo, hi)


def widest_gap(front_flops: Iterable[float], lo: float, hi: float) -> float:
    """Widest gap between consecutive frontier points (FLOPs) inside ``[lo, hi]``, both ends counted
    as points, as a fraction of ``hi - lo``."""
    return _share(*widest_pair(front_flops, lo, hi), lo, hi)


def _share(a: float, b: float, lo: float, hi: float) -> float:
    """The gap from ``a`` to ``b`` as a fraction of the range ``lo``..``hi`` (0 for anchors of one cost: no range)."""
    return (b - a) / (hi - lo) if hi > lo else 0.0


def widest_pair(front_flops: Iterable[float], lo: float, hi: float) -> tuple[float, float]:
    """The two consecutive frontier points (FLOPs) inside ``[lo, hi]``, both ends counted as points,
    with the widest gap between them."""
    xs = sorted({lo, hi} | {f for f in front_flops if lo <= f <= hi})
    return max(zip(xs, xs[1:]), key=lambda ab: ab[1] - ab[0]) if len(xs) > 1 else (lo, hi)


def compare_with_zoo(results: list[Row], zoo: list[Row], joint_image_steps: int,
                     joint_seconds: float) -> ZooVerdict | None:
    """The stitched network's frontier against the zoo's over the anchors' FLOPs range (from the
    zoo's cheapest model, if that is dearer); None if the zoo has nothing that cheap."""
    anchors = [r.flops for r in results if r.is_anchor]
    lo, hi = min(anchors), max(anchors)
    if not zoo or min(z.flops for z in zoo) > hi:
        return None
    front = [z for z in frontier(zoo) if lo <= z.flops <= hi]
    return ZooVerdict(compare_fronts(results, zoo, lo=lo, hi=hi), len(zoo), tuple(z.name for z in front),
                      sum(int(z.extra.get("image_steps", 0)) for z in front),
                      sum(float(z.extra.get("seconds", 0.0)) for z in front),
                      joint_image_steps, joint_seconds, max(r.images for r in results))


def time_switch(net: StitchedNet, stitch_id: int, reps: int = 1000) -> float:
    """Median microseconds of ``net.select`` to a stitch (from another stitch)."""
    other = 0 if stitch_id != 0 else 1
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            net.select(other)
            net.select(stitch_id)
        samples.append((time.perf_counter() - t0) / (2 * reps) * 1e6)
    return statistics.median(samples)


def run_demo(config: TrainConfig | None = None, options: DemoOptions = DemoOptions(),
             echo: Callable[[str], Any] = print) -> DemoResult:
    """Run the demo end to end and write its files into ``config.run.out_dir`` (its training run into
    ``OUT/train``). ``config``: the demo's training settings (default: the ``demo`` recipe)."""
    from torch.utils.data import DataLoader

    config = config if config is not None else demo_config()
    t0 = time.perf_counter()
    check_demo(config, options)  # before any work: a run must not fail at its end
    out = check_writable(config.run.out_dir)
    seed_everything(config.run.seed)
    if options.weights:  # weights through timm's pretrained path, as for the shipped family
        labels, specs = zip(*anchor_specs(options.weights))
        net = create_snnet(list(specs), labels=list(labels), **space_options(config.space))
    else:
        net = network_from_config(config.model, config.space)  # the shipped weights
    if config.sampling.sampler == "weighted":  # stitches this space lacks: refused before the anchors are measured
        stitch_weights(net, config.sampling)
    task = get_task(config.task, config.data, net)
    data_config, seed = net.anchors[0].data_config, config.run.seed
    eval_set = task.dataset(config.data, data_config, seed, split=options.eval_split, train=False,
                            limit=options.eval_limit)
    # "train" leaves the validation split out, so a run measured on "val" never trained on it.
    train_set = task.dataset(config.data, data_config, seed)
    eval_loader = DataLoader(eval_set, batch_size=options.eval_batch_size)
    costs = net.costs()
    echo(f"SN-Net from {', '.join(net.labels)}: {len(net.space)} networks, "
         f"{human(min(c.flops for c in costs))}–{human(max(c.flops for c in costs))} FLOPs, "
         f"{len(net.stitch_layers)} stitching layers")
    seconds: dict[str, float] = {"build": time.perf_counter() - t0}
    device, progress = config.run.device, config.run.progress

    t = time.perf_counter()
    anchors = [s.id for s in net.space.anchor_stitches()]
    before = {r.name: r.acc1 for r in evaluate(net, eval_loader, anchors, device=device, progress=progress)}
    echo("anchors before stitching: " + ", ".join(f"{k} {v:.2f}%" for k, v in before.items()))
    seconds["anchors_before"] = time.perf_counter() - t

    t = time.perf_counter()
    res = train(net, train_set, config.override(out_dir=str(out / "train")))
    echo(f"trained {res.step} steps in {res.seconds:.0f}s ({res.images_per_second:.0f} img/s), last loss {res.loss:.3f}")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    results = evaluate(net, eval_loader, device=device, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t
    echo("\n" + format_results(results))
    zoo_rows: list[Row] = []
    verdict = None
    if options.zoo:
        from .zoo import load_zoo

        zoo_rows = load_zoo("fmnist", split=options.eval_split)
        verdict = compare_with_zoo(results, zoo_rows, res.step * config.data.batch_size, seconds["train"])
        if verdict is None:
            echo("(the zoo's models all cost more than the largest anchor: no comparison)")
    rows = mark_pareto(results + zoo_rows)  # each kind on its own frontier
    write_results(rows, out)

    from .plot import plot_pareto

    title = f"SN-Net on Fashion-MNIST: {len(results)} networks from {len(net.anchors)} anchors"
    plot_pareto(rows, out / "pareto.html", out / "pareto.png",
                title=title + (f", beside {len(zoo_rows)} ViTs trained alone" if zoo_rows else ""))

    after = {r.name: r.acc1 for r in results if r.is_anchor}
    switches = []
    largest = max(r.flops for r in results if r.is_anchor)
    for frac in options.budgets:
        bound = int(frac * largest)
        if bound < min(r.flops for r in results):
            continue
        sel = net.select(budget=f"flops<={bound}", results=results)
        row = next(r for r in results if r.id == sel.id)
        switches.append(Switch(bound, sel.id, sel.name, row.flops, row.acc1, time_switch(net, sel.id)))
    settings = {"train": config.to_dict(), "demo": _plain(asdict(options))}
    summary = DemoResult(results, before, after, sum(r.pareto for r in results), switches,
                         {**seconds, "total": time.perf_counter() - t0}, options.eval_split, settings, verdict)
    _report(summary, out, echo)
    return summary


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _report(s: DemoResult, out: Path, echo: Callable[[str], Any]) -> None:
    echo("\nThe paper's claim at this scale:")
    echo(f"  stitches fill the range: {s.frontier_size} Pareto-optimal networks; {s.gap_text()}")
    kept = ", ".join(f"{k} {s.anchors_before[k]:.2f}% -> {s.anchors_after[k]:.2f}% "
                     f"({s.anchors_after[k] - s.anchors_before[k]:+.2f})" for k in s.anchors_before)
    echo(f"  anchors before -> after: {kept}")
    echo(f"    no anchor loses more than 1 point: {'yes' if s.anchors_not_hurt else 'NO'}; "
         f"every anchor within 1 point either way: {'yes' if s.anchors_kept else 'NO'}")
    # Differences below ~2 standard errors are noise: say how large that is on this evaluation set.
    best = max(s.results, key=lambda r: r.acc1)
    p, n = best.acc1 / 100, best.images
    echo(f"  (one top-1 on {n:,} {s.eval_split} images has a binomial standard error of "
         f"{100 * math.sqrt(p * (1 - p) / n):.2f} points)")
    if s.zoo is not None:
        _report_zoo(s.zoo, s.eval_split, echo)
    echo("\nVerdict:")
    for line in verdict_lines(s):
        echo(f"  {line}")
    echo("\nRun-time switching: the most accurate stitch within each FLOPs budget")
    rows = [{"budget": human(w.budget_flops), "id": w.id, "name": w.name, "flops": human(w.flops), "acc1": w.acc1,
             "us": f"{w.select_us:.2f}"} for w in s.switches]
    echo(table(rows, [("budget", "budget"), ("id", "id"), ("name", "stitch"), ("flops", "FLOPs"),
                      ("acc1", "top-1 %"), ("us", "switch (us)")]))
    summary = {k: v for k, v in asdict(s).items() if k not in ("results", "zoo")}
    summary["zoo"] = s.zoo.to_dict() if s.zoo is not None else None
    summary |= {"max_frontier_gap": s.max_frontier_gap, "anchors_kept": s.anchors_kept,
                "anchors_not_hurt": s.anchors_not_hurt, "frontier_filled": s.frontier_filled,
                "widest_gap_between": [list(p) for p in s.widest_gap_between], "verdict": verdict_lines(s)}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda p: p.write_text(text))  # as every other file of the run: never half written
    echo(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'pareto.html'}, {out / 'pareto.png'}, "
         f"{out / 'summary.json'} in {s.seconds['total']:.0f}s")


# The stitches from anchors trained until validation accuracy stops rising, against a zoo trained as far
# (docs/zoo.md, "Towards a converged recipe"): the best run's comparison, as
# `scripts/fmnist_zoo_compare.py RUN --zoo docs/zoo/fmnist_zoo_converged.json --verdict F` writes it.
CONVERGED_FILE = Path(__file__).parent / "weights" / "fmnist_converged.json"


def converged_verdict(path: Path = CONVERGED_FILE) -> str:
    """The verdict's line on the converged comparison, from the file the comparison script wrote (a
    measurement too long for the demo to repeat: 13 networks trained for 24 epochs)."""
    try:
        v = json.loads(path.read_text())
        w, st = v["worst"], v["setting"]
        return (f"{verdict_word(v['mean_diff'], v['se'])} it ({v['split']} top-1, {v['zoo_in_range']} zoo members in the range), "
                f"{v['mean_diff']:+.2f} points on average at matched FLOPs, worst {w['diff']:+.2f} at {human(w['from_flops'])}; "
                f"{st['steps']:,} joint steps ({human(v['joint_image_steps'])} image-steps against "
                f"{human(v['zoo_in_range_image_steps'])} for those members); {v['on_frontier']} of its {v['networks']} "
                "networks on its frontier (docs/zoo.md)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"not available ({path.name}: {type(e).__name__}; docs/zoo.md, \"Towards a converged recipe\")"


def verdict_lines(s: DemoResult) -> list[str]:
    """The demo's answer in one line each: the range filled, the lead against the zoo as trained, and
    against a converged zoo."""
    lines = [f"one network for many budgets: {'yes' if s.frontier_filled else 'NO'} ({len(s.results)} networks, "
             f"{s.frontier_size} Pareto-optimal, widest FLOPs gap {s.max_frontier_gap:.1%} of the anchors' range; "
             f"needs <= {MAX_FRONTIER_GAP:.0%})"]
    if s.zoo is not None:
        c = s.zoo.comparison
        lines.append(f"against the zoo as trained (the anchors' recipe, {s.eval_split} top-1): {s.zoo.verdict()} it, "
                     f"{c.mean:+.2f} points on average at matched FLOPs, worst {c.worst.diff:+.2f}")
    elif s.config.get("demo", {}).get("zoo"):  # asked for, but compare_with_zoo found nothing as cheap
        lines.append("against the zoo as trained: not compared (the zoo's models all cost more than the largest anchor)")
    else:
        lines.append("against the zoo as trained: not compared (--no-zoo)")
    lines.append("against a converged zoo, from converged anchors: " + converged_verdict())
    return lines


def _report_zoo(z: ZooVerdict, split: str, echo: Callable[[str], Any]) -> None:
    c = z.comparison
    echo(f"\nAgainst the zoo ({z.zoo_models} ViTs of the same design, each trained alone with the anchors' recipe; "
         f"{split} top-1):")
    echo(f"  over the anchors' FLOPs range {human(c.lo)}-{human(c.hi)}, the stitches' frontier is {z.verdict()} "
         f"the zoo's: {c.mean:+.2f} points on average at matched FLOPs (ahead on {c.ahead:.0%} of the range)")
    worst, best = c.worst, c.best
    echo(f"  worst {worst.diff:+.2f} at {human(worst.start)} FLOPs ({worst.ours} {worst.ours_y:.2f} vs "
         f"{worst.theirs} {worst.theirs_y:.2f}); best {best.diff:+.2f} at {human(best.start)} FLOPs "
         f"({best.ours} {best.ours_y:.2f} vs {best.theirs} {best.theirs_y:.2f})")
    if c.se is not None:
        echo(f"  noise: one top-1 has a binomial standard error of {c.se:.2f} points, a difference of two "
             f"{math.sqrt(2) * c.se:.2f}; gaps under {z.noise:.2f} (two of those) are not evidence either way")
    if z.eval_images != 10_000:
        echo(f"  (the stitches were measured on {z.eval_images:,} images, the zoo on all 10,000: a smoke run, "
             "not a comparison)")
    echo(f"  training: the joint training saw {human(z.joint_image_steps)} image-steps in {z.joint_seconds:.0f} s "
         f"on top of the anchors; the {len(z.zoo_front)} zoo networks on its frontier in this range took "
         f"{human(z.zoo_front_image_steps)} image-steps, {z.zoo_front_seconds:.0f} s as recorded in the zoo table")
