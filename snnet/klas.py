"""KLAS: choose which stitches to keep from the anchors' own similarity.

KLAS (Sanyal et al., "Using Similarity to Stitch Neural Networks for Improved
Accuracy-Efficiency Tradeoffs", ICLR 2026, arXiv 2605.29259) scores every candidate *binary*
stitch of a family — any ordered pair of anchors (small to large and large to small), any cut
of the first, any resume point of the second: O(k²n²) candidates for k anchors of depth n — by
the KL divergence between the two anchors' intermediate representations at the cut and the
resume point, and keeps the most promising. The kept stitches form an explicit space
(``SpaceConfig(routes=...)``) that trains, saves, loads and exports like any other.

What snnet computes (the paper's method section was not available to us, only its abstract;
these are snnet's choices, documented so they can be checked against the paper):

* **Representation → distribution.** The activations at the two points have different widths,
  so they are compared through the relations they induce between images: on a calibration
  batch, each activation (flattened per image, centred over the batch) gives every image a
  distribution over the *other* images of the batch, ``softmax(cosine similarity /
  temperature)``. Widths and token layouts need not match; the batch size must be >= 3 (with two
  images each one's distribution over the other is certain, and every candidate scores 0).
* **Score.** ``KL(P_target || P_source)`` averaged over the images of every calibration batch:
  how badly the source's view of the data at the cut explains the view the target expects
  at the resume point. Lower is more similar, a more promising stitch.
* **Keeping N.** ``spread=True`` (default) cuts the FLOPs range between the cheapest and the
  dearest anchor into N equal intervals and keeps the lowest-KL candidate of each (then fills
  slots of empty intervals with the lowest-KL candidates left), so the kept stitches cover
  the range; plain top-N by KL (``spread=False``) tends to crowd at similar costs.
  Candidates outside the anchors' FLOPs range are scored but never kept.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from .anchors import stitchable
from .errors import SnnetError
from .model import StitchedNet, calibration_images
from .space import Segment, SpaceConfig, route_name

__all__ = ["KlasResult", "KlasScore", "candidates", "klas", "klas_net", "klas_scores", "select_klas"]


@dataclass(frozen=True)
class KlasScore:
    """One candidate binary stitch and its score."""

    name: str
    src: int
    src_end: int  # source runs blocks 0 .. src_end-1
    dst: int
    dst_start: int  # target resumes at this block
    flops: int  # of the stitched network (multiply-accumulates, batch 1), its stitching layer included
    kl: float  # KL(target relations || source relations); lower: more similar
    kept: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KlasResult:
    """Every candidate with its score (in candidate order), and the names of the kept ones."""

    scores: tuple[KlasScore, ...]
    routes: tuple[str, ...]  # the kept stitches, by FLOPs
    images: int
    # the net's space.cut: what the routes' indices count (blocks or sublayers). Recorded in the JSON, so a
    # routes file read by `snnet train --routes` is not built with another cut, where the names mean other networks
    cut: str = "block"

    def to_dict(self) -> dict[str, Any]:
        return {"routes": list(self.routes), "cut": self.cut, "images": self.images,
                "candidates": [s.to_dict() for s in self.scores]}


def candidates(net: StitchedNet) -> list[tuple[int, int, int, int]]:
    """Every binary stitch ``(src, src_end, dst, dst_start)`` whose activations line up, any
    ordered pair of distinct anchors (both directions)."""
    infos = net.space.anchors
    out = []
    for a, A in enumerate(infos):
        for b, B in enumerate(infos):
            if a == b:
                continue
            out += [(a, e, b, st) for e in range(1, A.depth + 1) for st in range(B.depth)
                    if stitchable(A.specs[e], B.specs[st]) is None]
    return out


def _flops(net: StitchedNet, a: int, e: int, b: int, st: int, heads: dict[int, int]) -> int:
    """A candidate's FLOPs from part costs: source prefix, a plain stitching layer, target suffix, and
    the head a stitched route into ``b`` ends with (``heads[b]``: the reference route mode's may differ)."""
    pcs, spec = net.part_costs(), net.space.anchors[a].specs[e]
    layer = spec.positions * spec.channels * net.space.anchors[b].specs[st].channels  # a Linear/1x1 conv: MACs
    return (pcs[a].route(0, e, stem=True, head=False)[0] + layer
            + pcs[b].route(st, net.anchors[b].depth, stem=False, head=False)[0] + heads[b])


# the fewest images a batch needs for its relations to say anything: with two, each image's distribution
# over the other images is certain (one image), so every candidate's KL is 0
_MIN_BATCH = 3


def _log_relations(h: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i: log of image i's distribution over the other images of the batch (diagonal -inf)."""
    f = h.flatten(1).double()
    f = F.normalize(f - f.mean(0, keepdim=True), dim=1)
    sim = (f @ f.t()) / temperature
    sim.fill_diagonal_(float("-inf"))
    return torch.log_softmax(sim, dim=1)


def klas_scores(net: StitchedNet, batches: Iterable[Any], max_images: int = 256, temperature: float = 0.1,
                progress: bool = False) -> list[KlasScore]:
    """Score every candidate binary stitch of ``net``'s anchors on a few calibration batches.

    ``batches`` yields images (or ``(images, labels)``); batches of fewer than three images
    are skipped (one image has no relations; two have one each, the same for every candidate). Only the anchors run, once per batch.
    """
    return _score(net, batches, max_images, temperature, progress)[0]


@torch.no_grad()
def _score(net: StitchedNet, batches: Iterable[Any], max_images: int, temperature: float,
           progress: bool) -> tuple[list[KlasScore], int]:
    if temperature <= 0:
        raise SnnetError(f"the KLAS temperature must be > 0, got {temperature}")
    cands = candidates(net)
    if not cands:
        raise SnnetError("these anchors have no pair of positions whose activations line up: nothing to score")
    total = torch.zeros(len(cands), dtype=torch.float64)
    seen = 0
    for x in calibration_images(net, batches, max_images, "KLAS scores", progress, min_batch=_MIN_BATCH):
        rel = [[_log_relations(h, temperature) for h in net.activations(k, x)] for k in range(len(net.anchors))]
        off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        for i, (a, e, b, st) in enumerate(cands):
            p_src, p_dst = rel[a][e][off], rel[b][st][off]
            total[i] += float((p_dst.exp() * (p_dst - p_src)).sum())  # sum over images of KL(dst || src)
        seen += len(x)
    if seen == 0:
        raise SnnetError(f"KLAS needs calibration batches of at least {_MIN_BATCH} images; the loader gave none")
    labels, heads = net.labels, {b: net.stitched_head_costs(b)[0] for b in range(len(net.anchors))}
    return [KlasScore(route_name(labels, (Segment(a, 0, e), Segment(b, st, net.anchors[b].depth))), a, e, b, st,
                      _flops(net, a, e, b, st, heads), float(total[i]) / seen) for i, (a, e, b, st) in enumerate(cands)], seen


def select_klas(scores: Sequence[KlasScore], keep: int, lo: float, hi: float, spread: bool = True) -> list[KlasScore]:
    """The ``keep`` most promising candidates whose FLOPs lie strictly between ``lo`` and ``hi``
    (the cheapest and dearest anchor): per FLOPs interval with ``spread`` (see the module doc),
    else the lowest KL overall. Ties go to the earlier candidate, so the choice is deterministic."""
    if keep < 1:
        raise SnnetError(f"--keep must be >= 1, got {keep}")
    pool = sorted((s for s in scores if lo < s.flops < hi), key=lambda s: s.kl)  # stable: ties keep candidate order
    if not pool:
        raise SnnetError("no candidate stitch costs strictly between the cheapest and the dearest anchor: KLAS has "
                         "nothing to keep (anchors of equal cost?)")
    if len(pool) < keep:
        raise SnnetError(f"only {len(pool)} candidate stitches cost between the cheapest and the dearest anchor; "
                         f"ask for --keep {len(pool)} or fewer")
    chosen: list[KlasScore] = []
    if spread:
        width = (hi - lo) / keep
        for k in range(keep):
            best = next((s for s in pool if lo + k * width < s.flops <= lo + (k + 1) * width), None)
            if best is not None:
                chosen.append(best)
    chosen += [s for s in pool if s not in chosen][: keep - len(chosen)]
    return sorted(chosen, key=lambda s: (s.flops, s.name))


def klas(net: StitchedNet, batches: Iterable[Any], keep: int, *, max_images: int = 256, temperature: float = 0.1,
         spread: bool = True, progress: bool = False) -> KlasResult:
    """Score every candidate (:func:`klas_scores`) and keep ``keep`` of them (:func:`select_klas`)."""
    scores, images = _score(net, batches, max_images, temperature, progress)
    anchors = [c.flops for c in net.costs() if c.is_anchor]
    kept = select_klas(scores, keep, min(anchors), max(anchors), spread)
    names = {s.name for s in kept}
    return KlasResult(tuple(KlasScore(**{**asdict(s), "kept": s.name in names}) for s in scores),
                      tuple(s.name for s in kept), images, net.space.config.cut)


def klas_net(net: StitchedNet, routes: Sequence[str]) -> StitchedNet:
    """A new network of copies of ``net``'s anchors whose space is exactly ``routes`` (plus the
    anchors), with fresh stitching layers of ``net``'s rank and its route mode: fit them with ``init_stitching``."""
    space = SpaceConfig(routes=tuple(routes), cut=net.space.config.cut)  # the routes' indices count the same units
    return StitchedNet([copy.deepcopy(a) for a in net.anchors], net.labels, config=space,
                       input_size=net.input_size, specs=net.specs, lora_rank=net.lora_rank, lora_alpha=net.lora_alpha,
                       route_mode=net.route_mode)
