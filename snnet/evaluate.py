"""Evaluate every network of a stitch space in one pass, and find its accuracy/cost frontier.

Stitches overlap a lot: all the stitches leaving anchor A run the same stem and the same first
blocks of A, and differ only in where they cut. So per batch each source anchor runs its stem and
blocks *once*, stopping at each cut point the selected stitches need; at a cut, every stitch that
leaves there gets the activation (mapped once per stitching layer) and runs only its own target
suffix and head. An anchor is free: it is the end of its own prefix run. Evaluating the whole
space then costs the anchors' forwards plus the suffixes, not ``len(space)`` full forwards
(``benchmarks/bench_eval.py`` measures the difference).

Routes of more than two segments (SN-Netv2's round trips, three-anchor routes) share the same
way, level by level: the routes form a trie over their segments, and every segment that starts
from the same activation (same anchor, same start, same stitching layer before it) is run once
up to each place where one of its routes leaves it.

Results are :class:`~snnet.results.Row` s, written as ``results.json`` (a list of objects that other
tools read back with :func:`load_results`) and ``results.csv``.
"""


from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import SnnetError
from .model import StitchedNet, check_has_weights
from .reference import net_reference_ids
from .report import progress as report_progress
from .results import (RESULTS_CSV, RESULTS_JSON, Row, StitchResult, check_writable, format_results, load_results,
                      mark_pareto, pareto_front, write_results)
from .space import Stitch
from .tasks import ImageClassification, Scores

__all__ = [
    "RESULTS_JSON", "RESULTS_CSV", "Row", "StitchResult", "check_writable", "evaluate", "evaluate_model", "format_results",
    "forward_stitches", "load_results", "mark_pareto", "pareto_front", "validation_scores", "write_results",
]

# ---------------------------------------------------------------------------------- evaluation


class _Node:
    """Routes that run one anchor from block ``start`` on the same input activation.

    ``cuts`` maps each place a route leaves the anchor to: the routes that end there (head), and
    per stitching layer, per (next anchor, its start), the node that continues them.
    """

    def __init__(self, anchor: int, start: int) -> None:
        self.anchor, self.start = anchor, start
        self.ends: dict[int, list[Stitch]] = defaultdict(list)
        self.hops: dict[int, dict[int, dict[tuple[int, int], _Node]]] = defaultdict(lambda: defaultdict(dict))

    def add(self, s: Stitch, k: int) -> None:
        seg = s.segments[k]
        if k == len(s.segments) - 1:
            self.ends[seg.stop].append(s)
            return
        nxt = s.segments[k + 1]
        children = self.hops[seg.stop][s.layers[k]]
        node = children.setdefault((nxt.anchor, nxt.start), _Node(nxt.anchor, nxt.start))
        node.add(s, k + 1)

    def run(self, net: StitchedNet, h: torch.Tensor) -> Iterator[tuple[Stitch, torch.Tensor]]:
        parts, done = net.anchors[self.anchor], self.start
        for cut in sorted(set(self.ends) | set(self.hops)):
            h, done = parts.run(h, done, cut), cut
            for s in self.ends.get(cut, ()):
                yield s, net.head_of(s)(h)
            for layer, children in self.hops.get(cut, {}).items():
                mapped = net.stitch_layers[layer](h)  # once per layer, whatever follows it
                for child in children.values():
                    yield from child.run(net, mapped)


def route_trie(stitches: Iterable[Stitch]) -> dict[int, _Node]:
    """The routes as a trie over their segments: one root per first anchor."""
    roots: dict[int, _Node] = {}
    for s in stitches:
        roots.setdefault(s.src, _Node(s.src, 0)).add(s, 0)
    return roots


def forward_stitches(net: StitchedNet, x: torch.Tensor, stitches: Iterable[Stitch]) -> Iterator[tuple[Stitch, torch.Tensor]]:
    """Yield ``(stitch, logits)`` for every stitch on one batch, sharing the work they have in common.

    Each first anchor runs its stem and blocks once, up to its deepest needed cut. At each cut,
    the routes leaving there take the activation; routes that also share the stitching layer
    share its output, and routes that then also resume at the same block share the next segment
    in the same way (:func:`route_trie`). Only one activation per trie level is alive at a time,
    so memory stays at one forward plus one suffix per level. The numbers equal
    ``net.select(s); net(x)`` exactly: the same modules run on the same tensors.
    """
    roots = route_trie(stitches)
    for a in sorted(roots):
        yield from roots[a].run(net, net.anchors[a].stem(x))


def _select(net: StitchedNet, stitches: Sequence[int | str | Stitch] | None) -> list[Stitch]:
    if stitches is None:
        return list(net.space)
    chosen = {net.space[key].id: net.space[key] for key in stitches}  # raises StitchNotFoundError
    if not chosen:
        raise SnnetError("no stitches selected: pass ids or names, or None for all")
    return [chosen[k] for k in sorted(chosen)]


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    # bfloat16 is what CPU autocast supports; float16 is the usual choice on CUDA
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(
    net: StitchedNet,
    loader: Iterable[Any],
    stitches: Sequence[int | str | Stitch] | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    amp: bool = False,
    task: ImageClassification | None = None,
) -> list[Row]:
    """Top-1/top-5 accuracy (top-min(5, classes)) and mean cross-entropy of each selected stitch.

    ``loader`` yields ``(images, labels)`` batches; ``stitches`` are ids/names (default: the whole
    space). ``device`` moves the network there (default: where it is). The network's train/eval
    mode and active stitch are left as they were. Results come back in id order, with ``pareto``
    marking the top-1/FLOPs frontier of the evaluated set. ``task`` reads and scores the batches
    (default: image classification; :mod:`snnet.tasks`). A network the SN-Net authors' code also
    lists carries their id for it as ``ref_id`` (:mod:`snnet.reference`).
    """
    chosen = _select(net, stitches)  # bad ids fail here, before any work
    check_has_weights(net, "an evaluation")
    task = task or ImageClassification()
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.to(dev)
    tallies = {s.id: task.tally(dev) for s in chosen}
    input_size: tuple[int, ...] | None = None

    def run(batch: Any) -> int:
        nonlocal input_size
        x, y = task.check_batch(net, batch)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if input_size is None and tuple(x.shape[1:]) != tuple(net.input_size):
            # another resolution is fine where every chosen stitch takes it (a CNN); else a one-line refusal
            # naming the stitch, not an assertion from inside timm (a ViT's fixed patch grid)
            from .deploy.memory import check_input

            check_input(net, [len(x)], tuple(x.shape[1:]), [s.id for s in chosen], dev, what="the loader")
        if input_size is not None and tuple(x.shape[1:]) != input_size:
            # the rows are priced at one size, and a later batch of another size would reach timm's assertion on a ViT
            raise SnnetError(f"the loader gives {'x'.join(map(str, x.shape[1:]))} inputs after "
                             f"{'x'.join(map(str, input_size))} ones: every image must have the same size "
                             "(resize them to one size in the dataset's transform)")
        input_size = input_size or tuple(x.shape[1:])
        for s, logits in forward_stitches(net, x, chosen):
            tallies[s.id].update(logits, y)
        return len(y)

    seen = _each_batch(net, loader, run, f"eval {len(chosen)} networks", dev, progress, amp)
    costs = net.costs(input_size)
    ref = net_reference_ids(net)  # the authors' id of each network they list, to set a row beside their table
    out = []
    for s in chosen:
        t, c = tallies[s.id].scores(), costs[s.id]
        out.append(Row(s.id, s.name, c.flops, c.params, t.acc1, t.acc5, t.loss, seen, s.is_anchor,
                       extra={"ref_id": ref[s.id]} if s.id in ref else {}))
    return mark_pareto(out)


def evaluate_model(model: nn.Module, loader: Iterable[Any], *, device: str | torch.device | None = None,
                   progress: bool = True, amp: bool = False, task: ImageClassification | None = None) -> Scores:
    """The scores (top-1, top-5, mean cross-entropy) of one plain model, e.g. a zoo member or a family member.

    Like :func:`evaluate` for a single network: the model's train/eval mode is left as it was."""
    task = task or ImageClassification()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    tally = task.tally(dev)

    def run(batch: Any) -> int:
        x, y = task.check_batch(model, batch)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        tally.update(model(x), y)
        return len(y)

    _each_batch(model, loader, run, "eval", dev, progress, amp)
    return tally.scores()


def validation_scores(net: nn.Module, val_data: Any, batch_size: int, workers: int, device: torch.device,
                      task: ImageClassification) -> dict[str, Any]:
    """What a training run records at an epoch's end (``evals.jsonl``): every stitch's top-1 (their mean,
    and the anchors'), or a plain model's scores."""
    import dataclasses

    from .sampling import WorkerLoader

    loader = WorkerLoader(val_data, batch_size=max(batch_size, 256), num_workers=workers)
    if isinstance(net, StitchedNet):
        results = evaluate(net, loader, device=device, progress=False, task=task)
        return {"acc1_mean": sum(r.acc1 for r in results) / len(results), "images": results[0].images,
                "anchors": {r.name: r.acc1 for r in results if r.is_anchor}}
    return dataclasses.asdict(evaluate_model(net, loader, device=device, progress=False, task=task))


def _each_batch(net: nn.Module, loader: Iterable[Any], run: Any, desc: str, dev: torch.device, progress: bool,
                amp: bool) -> int:
    """Call ``run(batch)`` (which returns the batch's size) on every batch, in eval mode without gradients."""
    seen = 0
    total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
    bar = report_progress(total, desc, "img", progress)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(), _autocast(dev, amp):
            for batch in loader:
                n = run(batch)
                seen += n
                bar.update(n)
    finally:
        net.train(was_training)
        bar.close()
    if seen == 0:
        raise SnnetError("the loader yielded no images: nothing to evaluate (is the dataset or --limit empty?)")
    return seen
