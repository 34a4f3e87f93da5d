"""The authors' reference code: how it numbers the networks of an SN-Net, and what it published.

The reference is the SN-Net authors' code, `ziplab/SN-Net`_ (one folder per family:
``stitching_deit``, ``stitching_swin``, ``stitching_resnet_swin``, ``stitching_levit``) and
`ziplab/SN-Netv2`_ (``classification``). Each folder numbers the networks of its SN-Net by the
order its code lists them (its ``cfg_id``), and its ``results/`` folder holds the top-1 of every
network by that number. snnet lists the same networks (:mod:`snnet.space`), but not always in the
same order: the Swin code lists stage by stage, snnet anchor pair by anchor pair. So the two ids
are kept apart: a network keeps snnet's id, and :func:`reference_ids` gives the reference's id
of every network the reference lists (``ref_id`` in ``snnet stitches`` and in results).

:func:`reference_routes` re-derives each folder's enumeration from what its code does (read at
the commits in :data:`SOURCES`; no code copied) and writes every listed network as snnet
:class:`~snnet.space.Segment` s, so a reference id and an snnet id meet on the route itself —
the blocks each anchor runs — not on any numbering.

The rest of what snnet takes from the reference lives here too: the published per-network tables
(:data:`PUBLISHED`, shipped as ``snnet/data_files/reference/*.json``; :func:`published_rows`), how
each folder evaluates (:data:`PAPER_EVAL`, :func:`paper_data_config`), which folders end stitched
routes without the final norm (:data:`SKIPS_FINAL_NORM`, used by the reference route mode of
:class:`~snnet.model.StitchedNet`), and the reference's optimizer steps on parameters no route used
(:func:`stale_zero_grads`). ``docs/differences.md`` lists every difference from the reference.

.. _ziplab/SN-Net: https://github.com/ziplab/SN-Net
.. _ziplab/SN-Netv2: https://github.com/ziplab/SN-Netv2
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ResultsError
from .space import AnchorInfo, Segment, StitchSpace, paired_pairs

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LAYOUTS", "PAPER_EVAL", "PUBLISHED", "Published", "SKIPS_FINAL_NORM",
           "SOURCES", "Source", "eval_data_config", "layout_of", "net_reference_ids", "paper_data_config", "published_rows", "read_published",
           "reference_ids", "reference_routes", "stale_zero_grads", "table_name"]


@dataclass(frozen=True)
class Source:
    """One repository of the reference code, at the commit snnet was checked against."""

    repository: str
    commit: str
    license: str = "Apache-2.0"

    @property
    def url(self) -> str:
        return f"https://github.com/{self.repository}/tree/{self.commit}"


SOURCES = {
    "v1": Source("ziplab/SN-Net", "c2dcf306089dfe982080a4f43a7ecebffd66abc6"),
    "v2": Source("ziplab/SN-Netv2", "dd17607f350c704023b4969672ec07c28aa1c4e0"),
}

# layout -> (source, folder of the reference code that builds such an SN-Net)
LAYOUTS: dict[str, tuple[str, str]] = {
    "deit": ("v1", "stitching_deit"),  # plain ViTs of one depth, paired stitching in windows
    "swin": ("v1", "stitching_swin"),  # Swin, stages 0-2, stage by stage
    "resnet_swin": ("v1", "stitching_resnet_swin"),  # ResNet -> ResNet / Swin, stages 1-2
    "levit": ("v1", "stitching_levit"),  # LeViT (Facebook's code), stages 0-1
    "snnetv2": ("v2", "classification"),  # SN-Netv2: two plain ViTs, both ways and round trips
}
# timm's IMAGENET_DEFAULT_MEAN / _STD, which every reference folder normalises with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How each reference folder evaluates (its validation transform, at 224 x 224): resize the shorter
# side to int(224 / crop_pct), centre crop 224, bicubic, ImageNet mean/std. stitching_deit,
# stitching_levit and stitching_swin (TEST.CROP, DATA.INTERPOLATION) resize to int(256 / 224 * 224);
# stitching_resnet_swin resolves timm's data config on its SNNet wrapper, which has no default_cfg,
# so timm's defaults apply (crop_pct 0.875, bicubic); SN-Netv2's config sets eval_crop_ratio 1.0.
PAPER_EVAL: dict[str, dict[str, Any]] = {
    layout: {"crop_pct": crop_pct, "crop_mode": "center", "interpolation": "bicubic", "mean": IMAGENET_MEAN,
             "std": IMAGENET_STD}
    for layout, crop_pct in (("deit", 0.875), ("swin", 0.875), ("resnet_swin", 0.875), ("levit", 0.875),
                             ("snnetv2", 1.0))
}
# Layouts whose stitched routes end with the target's forward_head alone, skipping the final norm
# that the anchors run whole apply (stitching_deit's SNNet.forward; every other folder runs the
# target's own tail, norm included, and SN-Netv2 its forward_norm_head).
SKIPS_FINAL_NORM = frozenset({"deit"})
# the stages each hierarchical layout stitches (the reference loops over them in this order)
_STAGES = {"swin": (0, 1, 2), "resnet_swin": (1, 2), "levit": (0, 1)}

Route = tuple[Segment, ...]


def paper_data_config(kinds: set[str], two_way: bool, data_config: dict[str, Any]) -> dict[str, Any] | None:
    """``data_config`` with the reference's evaluation transform (:data:`PAPER_EVAL`: crop, interpolation,
    mean/std) for anchors of a family the paper trained, or None: no reference code builds an SN-Net of
    these kinds, or the anchors were trained with another normalisation than the reference's (then the
    paper's protocol is not theirs)."""
    layout = layout_of(kinds, two_way)
    if layout is None:
        return None
    paper = PAPER_EVAL[layout]
    for key in ("mean", "std"):
        own = tuple(data_config.get(key, ()))
        if len(own) != len(paper[key]) or not all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(own, paper[key])):
            return None
    return {**data_config, **paper}


def eval_data_config(net: Any, source: str, asked: str | None = None,
                     option: str = "--eval-protocol") -> tuple[str, dict[str, Any]]:
    """(protocol, data config) to evaluate ``net`` on dataset ``source``: the paper's (:func:`paper_data_config`)
    for the families the paper trained unless ``asked`` is 'timm', the anchors' own timm config otherwise;
    Fashion-MNIST is read as stored ('native'). ``snnet eval`` and the validation of ``snnet train`` both
    choose here; ``option`` names the setting in the one-line refusals."""
    from .data import FASHION_MNIST_NAMES
    from .errors import SnnetError

    own = net.anchors[0].data_config
    if str(source).lower() in FASHION_MNIST_NAMES:
        if asked == "paper":
            raise SnnetError(f"{option} paper resizes and crops ImageNet-like images; Fashion-MNIST is read as "
                             "stored: drop the option")
        return "native", own
    paper = paper_data_config({p.kind for p in net.anchors}, net.space.config.two_way, own)
    if asked == "timm" or (asked is None and paper is None):
        return "timm", own
    if paper is None:
        raise SnnetError(f"{option} paper: the SN-Net authors evaluated no network of {', '.join(net.labels)} "
                         f"(or trained them with another normalisation); use {option} timm")
    return "paper", paper


@dataclass(frozen=True)
class Published:
    """One per-network results table the authors published, and the SN-Net it describes.

    ``anchors`` are the timm names (with pretrained tags) of the anchors the reference trained
    from, in the reference's order; ``two_way`` marks an SN-Netv2 space. snnet ships each table
    as ``snnet/data_files/reference/<name>.json`` (``scripts/build_reference_results.py``).
    """

    name: str
    source: str  # key of SOURCES
    path: str  # the results file in the repository
    anchors: tuple[str, ...]
    two_way: bool = False
    note: str = ""

    @property
    def layout(self) -> str:
        return next(k for k, (src, folder) in LAYOUTS.items() if src == self.source and self.path.startswith(folder + "/"))


_DEIT = ("deit_tiny_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k", "deit_base_patch16_224.fb_in1k")
# the Swin folder's config (configs/snnet/stitch_swin_ti_s_b.yaml) starts from Microsoft's ImageNet-22k -> 1k weights
_SWIN = ("swin_tiny_patch4_window7_224.ms_in22k_ft_in1k", "swin_small_patch4_window7_224.ms_in22k_ft_in1k",
         "swin_base_patch4_window7_224.ms_in22k_ft_in1k")
PUBLISHED: dict[str, Published] = {p.name: p for p in (
    Published("deit", "v1", "stitching_deit/results/stitches_res.txt", _DEIT),
    Published("swin", "v1", "stitching_swin/results/stitches_res.txt", _SWIN),
    Published("resnet", "v1", "stitching_resnet_swin/results/stitches_res_resnet_18_50.txt",
              ("resnet18.tv_in1k", "resnet50.a1_in1k"),
              note="the reference's timm 0.6 gives `resnet50` the RSB A1 weights (resnet50_a1_0-14fe96d1.pth, "
                   "timm's resnet50.a1_in1k) and `resnet18` torchvision's"),
    Published("resnet18-swin_t", "v1", "stitching_resnet_swin/results/stitches_res_resnet_18_swin_ti.txt",
              ("resnet18.tv_in1k", "swin_tiny_patch4_window7_224.ms_in1k")),
    Published("levit", "v1", "stitching_levit/results/stitches_res.txt",
              ("levit_192.fb_dist_in1k", "levit_256.fb_dist_in1k"),
              note="the reference builds LeViT with Facebook's own code (levit.py); timm's levit_192/levit_256 are "
                   "the same networks with the same weights"),
    Published("snnetv2-deit3-s-l", "v2", "classification/results/stitches_res_s_l.txt",
              ("deit3_small_patch16_224.fb_in22k_ft_in1k", "deit3_large_patch16_224.fb_in22k_ft_in1k"), two_way=True,
              note="SN-Netv2 (Pan et al., ECCV 2024) on DeiT3-S and DeiT3-L (ImageNet-21k pretrained, 1k fine-tuned), "
                   "low-rank stitching layers (rank 64); the reference lists 135 networks and evaluates 134 (not its "
                   "id 13, the small->large stitch after the small anchor's last block)"),
)}


def layout_of(kinds: set[str], two_way: bool = False) -> str | None:
    """Which reference code builds an SN-Net of anchors of these adapter ``kinds`` (None: none does)."""
    if kinds == {"vit"}:
        return "snnetv2" if two_way else "deit"
    if two_way:
        return None
    if kinds == {"swin"}:
        return "swin"
    if "resnet" in kinds and kinds <= {"resnet", "swin"}:
        return "resnet_swin"
    if kinds == {"levit"}:
        return "levit"
    return None


def _nearest_map(shallow: int, deep: int) -> list[int]:
    """Nearest interpolation of ``shallow`` block indices onto ``deep`` positions, as the reference
    computes its block map (``torch.nn.functional.interpolate``, mode nearest): ``floor(k * shallow / deep)``."""
    return [k * shallow // deep for k in range(deep)]


def _forward_pairs(na: int, nb: int) -> list[tuple[int, int]]:
    """(last source block, first target block) of one stage in the hierarchical reference code:
    equal depths, the window-2 pairs that move forward in depth; else every block of the deeper
    anchor but the first, resumed from the block the map gives it."""
    if na == nb:
        return [(i, j) for group in paired_pairs(na) for i, j in group if j > i]
    mapped = _nearest_map(na, nb)
    return [(mapped[k], k) for k in range(1, nb)]


def reference_routes(anchors: Sequence[AnchorInfo], layout: str, *, kernel_size: int = 2, stride: int = 1,
                     nearest: bool = True, order: Sequence[int] | None = None) -> list[Route | None] | None:
    """Every network the reference code of ``layout`` lists, in the order it numbers them, as snnet segments.

    Position ``r`` of the list is the reference's id ``r``; ``None`` marks a network the reference
    lists but never trains or evaluates (SN-Netv2's small->large stitch after the small anchor's
    last block), which snnet does not list. ``order[r]`` is snnet's index of the reference's anchor
    ``r`` (default: the same order, which is the paper's: cheapest first). Returns None when the
    reference code cannot build an SN-Net of these anchors (e.g. its DeiT code takes three anchors
    of one depth; its SN-Netv2 code, two whose depths are equal or one twice the other).
    ``kernel_size``/``stride``/``nearest`` are the DeiT code's options; the other folders fix them
    (window 2, stride 1, neighbours only).
    """
    order = list(order) if order is not None else list(range(len(anchors)))
    infos = [anchors[k] for k in order]  # in the reference's order
    if layout == "deit":
        return _deit(infos, order, kernel_size, stride, nearest)
    if layout in _STAGES:
        return _hierarchical(infos, order, _STAGES[layout])
    if layout == "snnetv2":
        return _two_way(infos, order)
    raise ValueError(f"unknown reference layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _deit(infos: list[AnchorInfo], order: list[int], kernel_size: int, stride: int,
          nearest: bool) -> list[Route | None] | None:
    """``stitching_deit``: the anchors alone, then every combination of anchors — pairs with one
    stitch in a window-paired position, triples through two — in ``itertools.combinations`` order;
    with nearest stitching (its default) the code drops the Ti-B pair and the triple, which it can
    only do for three anchors."""
    depth = infos[0].depth
    if any(a.depth != depth or len(a.stages) != 1 for a in infos) or len(infos) > 3 or (nearest and len(infos) != 3):
        return None
    cuts = [pair for group in paired_pairs(depth, kernel_size, stride) for pair in group]
    combos = [c for n in range(1, len(infos) + 1) for c in itertools.combinations(range(len(infos)), n)]
    if nearest:
        combos = [c for c in combos if c not in ((0, 2), (0, 1, 2))]
    routes: list[Route | None] = []
    for combo in combos:
        a = [order[r] for r in combo]
        if len(combo) == 1:
            routes.append((Segment(a[0], 0, depth),))
        elif len(combo) == 2:
            routes += [(Segment(a[0], 0, i + 1), Segment(a[1], j, depth)) for i, j in cuts]
        else:  # a second stitch that leaves the middle anchor at or after the block where the first entered it
            routes += [(Segment(a[0], 0, i1 + 1), Segment(a[1], j1, i2 + 1), Segment(a[2], j2, depth))
                       for i1, j1 in cuts for i2, j2 in cuts if i2 >= j1]
    return routes


def _hierarchical(infos: list[AnchorInfo], order: list[int], stages: tuple[int, ...]) -> list[Route | None] | None:
    """``stitching_swin``, ``stitching_resnet_swin``, ``stitching_levit``: the anchors alone, then
    stage by stage, each neighbouring pair of anchors in turn (the code pairs anchors by their
    position among the stage depths sorted, so it needs the anchors listed shallowest first)."""
    if any(len(a.stages) <= max(stages) for a in infos):
        return None
    routes: list[Route | None] = [(Segment(order[r], 0, a.depth),) for r, a in enumerate(infos)]
    for s in stages:
        depths = [a.stages[s] for a in infos]
        if depths != sorted(depths):
            return None
        for r in range(1, len(infos)):
            A, B = infos[r - 1], infos[r]
            a0, b0 = sum(A.stages[:s]), sum(B.stages[:s])
            routes += [(Segment(order[r - 1], 0, a0 + i + 1), Segment(order[r], b0 + j, B.depth))
                       for i, j in _forward_pairs(A.stages[s], B.stages[s])]
    return routes


def _two_way(infos: list[AnchorInfo], order: list[int]) -> list[Route | None] | None:
    """``classification`` (SN-Netv2): the two anchors, then small->large at each matched position
    (the last one, after the small anchor's final block, listed but never used), large->small,
    large->small->large and small->large->small."""
    if len(infos) != 2 or any(len(a.stages) != 1 for a in infos):
        return None
    d, D = infos[0].depth, infos[1].depth
    if D not in (d, 2 * d):  # the code's large->small rule (every other block) holds for these ratios only
        return None
    S, L = order
    r = D // d
    # small->large: the small anchor runs k blocks, the large resumes after k * r; k = d lists nothing to resume
    up = [(k, k * r) for k in range(1, d + 1)]
    mapped = _nearest_map(d, D)
    down = [(i + 1, mapped[i] + 1) for i in range(D - 1) if D == d or i % 2 == 1]  # (large blocks run, small resume)
    routes: list[Route | None] = [(Segment(S, 0, d),), (Segment(L, 0, D),)]
    routes += [(Segment(S, 0, ks), Segment(L, kl, D)) if kl < D else None for ks, kl in up]
    routes += [(Segment(L, 0, kl), Segment(S, ks, d)) for kl, ks in down]
    routes += [(Segment(L, 0, kl1), Segment(S, ks1, ks2), Segment(L, kl2, D))
               for kl1, ks1 in down for ks2, kl2 in up if kl2 < D and ks2 > ks1]
    routes += [(Segment(S, 0, ks1), Segment(L, kl1, kl2), Segment(S, ks2, d))
               for ks1, kl1 in up for kl2, ks2 in down if kl2 > kl1]
    return routes


def reference_ids(space: StitchSpace, kinds: set[str], order: Sequence[int] | None = None) -> dict[int, int]:
    """snnet's id -> the reference's id, for every network of ``space`` that the reference code
    lists (an SN-Net of these anchors built with the reference's code and options; ``kinds`` are
    the anchors' adapter kinds, ``order`` as in :func:`reference_routes`). Empty when no
    reference code builds such an SN-Net (or the anchors are cut between sublayers, which it never does)."""
    cfg = space.config
    layout = layout_of(kinds, cfg.two_way)
    if layout is None or cfg.cut != "block":
        return {}
    routes = reference_routes(space.anchors, layout, kernel_size=cfg.kernel_size, stride=cfg.stride,
                              nearest=cfg.nearest, order=order)
    if routes is None:
        return {}
    by_route = {s.segments: s.id for s in space}
    return {by_route[route]: r for r, route in enumerate(routes) if route is not None and route in by_route}


def net_reference_ids(net: Any, order: Sequence[int] | None = None) -> dict[int, int]:
    """:func:`reference_ids` of a :class:`~snnet.model.StitchedNet` (its space and anchors' kinds)."""
    return reference_ids(net.space, {p.kind for p in net.anchors}, order)


# ------------------------------------------------------------------ the published tables, as results rows

_TABLES = Path(__file__).resolve().parent / "data_files" / "reference"
PREFIX = "reference:"


def table_name(text: str) -> str | None:
    """The table a ``reference:<name>`` argument names (``reference:deit`` -> ``deit``), or None for anything else."""
    return text[len(PREFIX):] if text.startswith(PREFIX) else None


def read_published(name: str) -> dict[str, Any]:
    """A shipped table (``snnet/data_files/reference/<name>.json``) by name: ``deit``, ``swin``, ...;
    an unknown name raises with the names there are."""
    name = table_name(name) or name
    if name not in PUBLISHED:
        raise ResultsError(f"no reference table {name!r}: snnet ships "
                           + ", ".join(PREFIX + n for n in PUBLISHED) + " (the SN-Net authors' published results)")
    path = _TABLES / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResultsError(f"the reference table {path} is missing or damaged ({e}); reinstall snnet") from e


def published_rows(name: str, kind: str = "network") -> list[Any]:
    """A shipped table as results rows (:class:`~snnet.results.Row`): FLOPs, top-1 and what
    else the authors published, under snnet's id and name of each network, with the reference's id
    (``ref_id``) and the table (``source``) in ``extra``. ``kind="network"`` gives anchor and stitch
    rows (the table is the network plotted: the paper's figure); ``kind="reference"`` gives rows of
    kind "reference", drawn beside a run of snnet. Where the authors published no parameter count,
    snnet's own count of the network stands in (``params_from: snnet``)."""
    from .results import Row, mark_pareto

    if kind not in ("network", "reference"):
        raise ValueError(f"kind must be 'network' or 'reference', not {kind!r}")
    data = read_published(name)
    rows = []
    for r in data["rows"]:
        extra = {"ref_id": r["ref_id"], "source": data["name"]}
        if "params" not in r:
            extra["params_from"] = "snnet"
        row_kind = ("anchor" if r["is_anchor"] else "stitch") if kind == "network" else "reference"
        rows.append(Row(r["id"], r["name"], r["flops"], r.get("params", r["snnet_params"]), r["acc1"],
                        r.get("acc5", math.nan), r.get("loss", math.nan), data["images"], r["is_anchor"],
                        kind=row_kind, extra=extra))
    return mark_pareto(rows)


# ------------------------------------------------------------------ the reference's optimizer steps


def stale_zero_grads(optimizer: Any) -> int:
    """Give every parameter that the optimizer has stepped before but that has no gradient now (no route
    used it in this step) a zero gradient, so the coming step updates it — as the reference's steps do.

    The reference code runs on PyTorch before 2.0, whose ``optimizer.zero_grad()`` fills gradients with zeros
    rather than dropping them (``set_to_none=False`` was the default until 2.0), and its DDP leaves the
    gradient of a parameter no process used untouched. So once a stitching layer or block has been on a
    route, every later step updates it: AdamW decays it and moves it on its momentum, SGD adds its L2
    weight decay and momentum. snnet drops those gradients (``set_to_none=True``, and the same after
    DDP's all-reduce), so a step moves only what its route used. Call this between the backward pass
    and ``optimizer.step()`` to train as the reference does. Returns how many parameters it gave a zero
    gradient.
    """
    import torch

    # SGD without momentum keeps no state for a parameter it stepped: the parameters that had a gradient at an
    # earlier call are remembered here (by id; the optimizer holds them), so their weight decay still applies
    had_grad: set[int] = optimizer.__dict__.setdefault("_snnet_had_grad", set())
    filled = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                had_grad.add(id(p))
            elif optimizer.state.get(p) or id(p) in had_grad:
                p.grad = torch.zeros_like(p)
                filled += 1
    return filled
