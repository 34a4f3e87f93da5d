"""The stitch space: which networks a family of anchors yields, by the paper's rules.

A :class:`Stitch` is a *route*: a list of :class:`Segment` s — (anchor, block range) — joined
by stitching layers. An anchor alone is one segment (``deit_small``); SN-Net's stitches are two
(``deit_tiny[:4]+deit_small[3:]``: DeiT-Ti's stem and blocks 0–3, a stitching layer, then DeiT-S
from block 3 to its head); SN-Netv2's round trips and the v1 reference's three-anchor routes
are three (``deit3_small[:4]+deit3_large[8:16]+deit3_small[8:]``). The rules (SN-Net, Sec. 3):

* anchors are ordered by cost and each is stitched to its nearest neighbour (Ti→S, S→B);
* within a stage where both anchors have the same number of blocks, *paired stitching*: a
  window of ``kernel_size`` blocks slides with ``stride``; every (i, j) pair of blocks in a
  window is a stitch (source up to and including block i, target from block j), and all the
  new pairs of one window share one stitching layer;
* where the depths differ (e.g. 12 and 24 blocks), *unpaired stitching*: nearest interpolation
  maps every block ``k`` of the deeper anchor to block ``floor(k * shallow / deep)`` of the
  shallower, and every block of the deeper anchor but the first is a stitch (source through
  the block mapped to it, target from it), each with its own layer: the authors' rule
  (``unpaired_stitching`` in their code), 23 stitches for 12→24 blocks;
* only positions whose activations line up (same tokens or the same H×W) are kept.

With the defaults, DeiT-Ti/S/B gives 3 anchors + 2 × 34 stitches = 71 networks.

Those are the rules of the official DeiT code (``rule="window"``). The official code for the
hierarchical families (Swin, ResNet) stitches only *forward* in depth (``rule="forward"``):
within a window only the pairs whose target block comes after the source block (depth 2:
source through block 0, target from block 1); where depths differ both rules use the authors'
unpaired mapping above. Each adapter says which rule its kind of model uses
(``AnchorParts.stitch_rule``); with them Swin-T/S/B gives 41 networks and ResNet-18/50 10, as
in the paper.

``SpaceConfig(unpaired="progress")`` selects snnet's earlier unpaired rule for plain ViTs
instead (a source cut after block ``i`` resumes the deeper target where it has done the same
share of its depth: 11 stitches for 12→24); networks saved before the option existed load
with it.

Options beyond SN-Net (``SpaceConfig``):

* ``two_way=True`` — SN-Netv2's space (Pan et al., ECCV 2024) in place of the rules above:
  for each stitched pair of anchors (small S, large L), the *matched positions* ``k = 1 ..
  d-1`` of the shallower depth ``d`` (cut S after ``k`` blocks, L after ``k·D/d``); at each, a
  one-way stitch S→L and L→S, each direction with its own stitching layer per position; and
  the round trips S→L→S and L→S→L through any two positions ``k1 < k2``, which reuse those
  layers. DeiT3-S/L (12 and 24 blocks): 2 + 11 + 11 + 55 + 55 = 134 networks, as the paper.
* ``chains=True`` — the SN-Net reference's three-anchor routes (Ti→S→B, two stitching
  layers): a Ti→S stitch followed by an S→B stitch whose cut comes after the S resume.
* ``routes=(...)`` — an explicit list of route names (e.g. the stitches KLAS chose,
  :mod:`snnet.klas`) replaces the rules; every distinct join gets its own layer. Because the
  names are saved with the network, save/load/export rebuild exactly that space.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from .anchors import ActivationSpec, stitchable
from .config import RULES, UNPAIRED, SpaceConfig  # noqa: F401  (SpaceConfig: re-exported, its home before config.py)
from .errors import NotStitchableError, StitchNotFoundError

@dataclass(frozen=True)
class Segment:
    """Blocks ``start .. stop-1`` of one anchor, run in a row."""

    anchor: int
    start: int
    stop: int


@dataclass(frozen=True)
class Stitch:
    """One network of the space: a route of segments joined by stitching layers.

    ``layers[k]`` joins ``segments[k]`` to ``segments[k+1]``; an anchor is one segment and no
    layer. The first segment starts with its anchor's stem, the last ends with its head.
    ``src``/``src_end``/``dst``/``dst_start``/``layer`` are SN-Net's view of a route: where it
    leaves its first anchor, and where (and through which layer) it enters its last.
    """

    id: int
    name: str
    segments: tuple[Segment, ...]
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.segments) - 1:
            raise ValueError(f"a route of {len(self.segments)} segments needs {len(self.segments) - 1} layers, got {self.layers}")

    @property
    def is_anchor(self) -> bool:
        return len(self.segments) == 1

    @property
    def src(self) -> int:
        return self.segments[0].anchor

    @property
    def src_end(self) -> int:
        return self.segments[0].stop

    @property
    def dst(self) -> int | None:
        return None if self.is_anchor else self.segments[-1].anchor

    @property
    def dst_start(self) -> int:
        return 0 if self.is_anchor else self.segments[-1].start

    @property
    def layer(self) -> int | None:
        """The first stitching layer (a two-segment stitch's only one); None for an anchor."""
        return self.layers[0] if self.layers else None

    @property
    def anchors(self) -> tuple[int, ...]:
        """The anchor of every segment, in route order (a round trip names one twice)."""
        return tuple(seg.anchor for seg in self.segments)

    def joins(self) -> Iterator[tuple[Segment, int, Segment]]:
        """(segment before, layer, segment after) for every stitching layer on the route."""
        for k, layer in enumerate(self.layers):
            yield self.segments[k], layer, self.segments[k + 1]


@dataclass(frozen=True)
class LayerSlot:
    """One stitching layer: which anchors it joins, the shapes it maps, the cuts it serves.

    ``joins`` are the (source cut, target resume) block pairs the layer serves — several when
    a window shares one layer — and what its least-squares fit is computed on.
    """

    index: int
    src: int
    dst: int
    src_spec: ActivationSpec
    dst_spec: ActivationSpec
    joins: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class AnchorInfo:
    """What enumeration needs to know of an anchor."""

    label: str
    stages: tuple[int, ...]
    stitch_stages: tuple[int, ...]
    specs: tuple[ActivationSpec, ...]  # input of each block, then the final output
    rule: str = "window"  # the adapter's stitching rule (AnchorParts.stitch_rule)

    @property
    def depth(self) -> int:
        return len(self.specs) - 1


def route_name(labels: Sequence[str], segments: Sequence[Segment]) -> str:
    """A route's readable name: ``a[:4]+b[8:16]+a[8:]`` (an anchor alone: its label)."""
    if len(segments) == 1:
        return labels[segments[0].anchor]
    parts = []
    for k, seg in enumerate(segments):
        lo = "" if k == 0 else str(seg.start)
        hi = "" if k == len(segments) - 1 else str(seg.stop)
        parts.append(f"{labels[seg.anchor]}[{lo}:{hi}]")
    return "+".join(parts)


_PART = re.compile(r"(.+?)\[(\d*):(\d*)\]")


def route_anchors(name: str) -> tuple[str, ...]:
    """The anchor labels a route name mentions, in order (unchecked: :func:`parse_route` checks)."""
    return tuple(m.group(1).lstrip("+") for m in _PART.finditer(name)) or (name,)


def parse_route(name: str, labels: Sequence[str], depths: Sequence[int]) -> tuple[Segment, ...]:
    """The segments a route name describes (the inverse of :func:`route_name`), checked."""
    if name in labels:
        k = list(labels).index(name)
        return (Segment(k, 0, depths[k]),)
    parts, pos = [], 0
    while pos < len(name):
        m = _PART.match(name, pos)
        if m is None or m.group(1) not in labels:
            raise StitchNotFoundError(
                f"cannot read route {name!r}: expected anchor[:i]+anchor[j:k]+...+anchor[l:] with anchors "
                f"from {', '.join(labels)} (e.g. {labels[0]}[:2]+{labels[-1]}[2:])")
        parts.append(m.groups())
        pos = m.end()
        if pos < len(name):
            if name[pos] != "+":
                raise StitchNotFoundError(f"cannot read route {name!r}: segments are joined by '+'")
            pos += 1
    segments = []
    for k, (label, lo, hi) in enumerate(parts):
        a = list(labels).index(label)
        first, last = k == 0, k == len(parts) - 1
        if (lo != "") == first or (hi != "") == last:
            raise StitchNotFoundError(
                f"route {name!r}: the first segment reads [:stop], the last [start:], the ones between [start:stop]")
        start, stop = (0 if first else int(lo)), (depths[a] if last else int(hi))
        if not 0 <= start < stop <= depths[a]:
            raise StitchNotFoundError(f"route {name!r}: {label}[{lo}:{hi}] is not a non-empty block range of its "
                                      f"{depths[a]} blocks")
        segments.append(Segment(a, start, stop))
    if len(segments) < 2:
        raise StitchNotFoundError(f"route {name!r} has one segment: name the anchor alone ({parts[0][0]})")
    return tuple(segments)


def two_way_positions(na: int, nb: int) -> list[tuple[int, int]]:
    """SN-Netv2's matched positions of one stage: (blocks of A, blocks of B) at the same share of depth.

    With ``d`` the shallower depth, position ``k = 1 .. d-1`` cuts the shallower anchor after
    ``k`` blocks and the deeper after ``k * D // d`` (12 and 24 blocks: (1, 2), (2, 4) ...
    (11, 22); equal depths: (k, k)). A route may leave either anchor at a position and enter the
    other at the same one, so both directions and the round trips share one set of cut points.
    """
    d = min(na, nb)
    return [(k * na // d, k * nb // d) for k in range(1, d)]


def paired_pairs(depth: int, kernel_size: int = 2, stride: int = 1) -> list[list[tuple[int, int]]]:
    """Block pairs (i, j) of paired stitching, grouped by the layer that serves them.

    Window ``w`` covers blocks ``w*stride .. w*stride+kernel_size-1``; its pairs not already
    claimed by an earlier window share one layer. Depth 12, kernel 2, stride 1 gives 34 pairs
    in 11 groups.
    """
    seen: set[tuple[int, int]] = set()
    groups = []
    for start in range(0, depth, stride):
        ids = range(start, min(start + kernel_size, depth))
        new = [(i, j) for i in ids for j in ids if (i, j) not in seen]
        seen.update(new)
        if new:
            groups.append(new)
    return groups


def unpaired_pairs(src_depth: int, dst_depth: int, mapping: str = "reference") -> list[list[tuple[int, int]]]:
    """Block pairs of unpaired stitching (anchors of different depths), one layer each.

    ``mapping="reference"``: the authors' rule (their ``unpaired_stitching``), the same as
    :func:`forward_unpaired_pairs`: 23 stitches for 12→24 blocks. Provenance, for plain ViTs:
    SN-Net's code (ziplab/SN-Net) calls ``unpaired_stitching`` only in its Swin, ResNet and LeViT
    folders; its DeiT folder defines it but stitches anchors of one depth only. The one reference
    code that stitches plain ViTs of different depths is SN-Netv2's (ziplab/SN-Netv2,
    ``classification/snnet.py``): its SN-Net baseline (``get_stitch_configs_general_unequal``) makes
    one small->large stitch per block of the small anchor at the matched positions (12 for 12→24,
    13 networks with the large anchor), and SN-Netv2 itself the two-way space (``two_way=True``).
    So this rule is SN-Net's hierarchical rule applied to plain ViTs, not a configuration the
    authors trained.
    ``mapping="progress"``: snnet's earlier rule. Nearest interpolation maps every block of the
    deeper anchor to a block of the shallower; a source cut after block ``i`` resumes the
    target at the first block not mapped to ``0..i`` (the anchors' relative progress through
    depth kept): 11 stitches for 12→24.
    """
    if mapping == "reference":
        return forward_unpaired_pairs(src_depth, dst_depth)
    if mapping != "progress":
        raise ValueError(f"unknown unpaired rule {mapping!r}; expected one of {UNPAIRED}")
    groups = []
    if src_depth <= dst_depth:
        # target block k plays source block floor(k * src/dst)
        mapped = [k * src_depth // dst_depth for k in range(dst_depth)]
        for i in range(src_depth):
            j = next((k for k, m in enumerate(mapped) if m > i), dst_depth)
            if j < dst_depth:
                groups.append([(i, j)])
    else:
        # source block k plays target block floor(k * dst/src)
        mapped = [k * dst_depth // src_depth for k in range(src_depth)]
        for i in range(src_depth):
            j = mapped[i] + 1
            if j < dst_depth:
                groups.append([(i, j)])
    return groups


def forward_unpaired_pairs(src_depth: int, dst_depth: int) -> list[list[tuple[int, int]]]:
    """Block pairs of unpaired stitching under the ``forward`` rule, one layer each.

    Nearest interpolation maps every block ``k`` of the deeper anchor to block
    ``floor(k * shallow / deep)`` of the shallower. Every block of the deeper anchor but the
    first is one stitch: shallow→deep, the source runs through the block mapped to target
    block ``k`` and the target resumes at ``k`` (the official Swin/ResNet code: depths 6 and
    18 give 17 stitches); deep→shallow, the same relation transposed (the source runs
    through block ``k - 1``, the target resumes after the block mapped to ``k``).
    """
    shallow, deep = sorted((src_depth, dst_depth))
    mapped = [k * shallow // deep for k in range(deep)]
    if src_depth <= dst_depth:
        return [[(mapped[k], k)] for k in range(1, deep)]
    return [[(k - 1, mapped[k] + 1)] for k in range(1, deep) if mapped[k] + 1 < shallow]


class StitchSpace:
    """The anchors, every stitch between them, and the stitching layers those stitches use."""

    def __init__(self, anchors: Sequence[AnchorInfo], config: SpaceConfig = SpaceConfig()) -> None:
        if len(anchors) < 2:
            raise NotStitchableError(f"a family needs at least two anchors to stitch, got {len(anchors)}")
        self.anchors = tuple(anchors)
        self.config = config
        labels = [a.label for a in anchors]
        if len(set(labels)) != len(labels):
            raise NotStitchableError("two anchors have the same name; give each anchor a distinct label")
        empty = next((a.label for a in anchors if a.depth == 0), None)
        if empty is not None:
            raise NotStitchableError(f"anchor {empty!r} has no blocks: a stitch cuts anchors between their blocks, "
                                     "so every anchor needs at least one")
        self._stitches = [Stitch(k, a.label, (Segment(k, 0, a.depth),)) for k, a in enumerate(anchors)]
        self._layers: list[LayerSlot] = []
        self._join_layer: dict[tuple[int, int, int, int], int] = {}  # (src, cut, dst, resume) -> layer
        if config.routes is not None:
            self._explicit(config.routes)
        else:
            pairs = [(a, a + 1) for a in range(len(anchors) - 1)] if config.nearest else [
                (a, b) for a in range(len(anchors)) for b in range(a + 1, len(anchors))]
            for a, b in pairs:
                found = self._two_way_pair(a, b) if config.two_way else self._stitch_pair(a, b)
                if not found:
                    raise NotStitchableError(self._why_not(a, b))
            if config.chains:
                self._chains(pairs)
        self.stitches: tuple[Stitch, ...] = tuple(self._stitches)
        self.layers: tuple[LayerSlot, ...] = tuple(self._layers)
        self._by_name = {s.name: s for s in self.stitches}
        if len(self._by_name) != len(self.stitches):
            dup = next(s.name for s in self.stitches if sum(t.name == s.name for t in self.stitches) > 1)
            raise NotStitchableError(f"the route {dup!r} is listed twice; name each stitch once")

    # -- building blocks: one definition of a layer and of a route
    def _add_layer(self, a: int, b: int, joins: Sequence[tuple[int, int]]) -> int:
        """A new stitching layer from anchor ``a`` to ``b`` serving the (cut, resume) pairs ``joins``."""
        A, B = self.anchors[a], self.anchors[b]
        slot = LayerSlot(len(self._layers), a, b, A.specs[joins[0][0]], B.specs[joins[0][1]], tuple(joins))
        self._layers.append(slot)
        for e, st in joins:
            self._join_layer[(a, e, b, st)] = slot.index
        return slot.index

    def _add_route(self, segments: Sequence[Segment], layers: Sequence[int]) -> Stitch:
        labels = [a.label for a in self.anchors]
        s = Stitch(len(self._stitches), route_name(labels, segments), tuple(segments), tuple(layers))
        self._stitches.append(s)
        return s

    # -- SN-Net's rules
    def _stages(self, a: AnchorInfo, b: AnchorInfo) -> list[int]:
        if self.config.stages is not None:
            # A negative stage counts from each anchor's end, as a Python index (what networks saved with one
            # were built with); one beyond either end is dropped like a too large one (it raised an IndexError),
            # and one that names a stage already listed ([2, -2] of four stages) once only (its stitches twice).
            out, seen = [], set()
            for s in self.config.stages:
                if -len(a.stages) <= s < len(a.stages) and -len(b.stages) <= s < len(b.stages):
                    key = (s % len(a.stages), s % len(b.stages))
                    if key not in seen:
                        seen.add(key)
                        out.append(s)
            return out
        return [s for s in a.stitch_stages if s in b.stitch_stages and s < len(b.stages)]

    def _rule(self, a: AnchorInfo, b: AnchorInfo) -> str:
        if self.config.rule is not None:
            return self.config.rule
        return a.rule if a.rule == b.rule else "window"  # kinds that disagree: the paper's general rule

    def _groups(self, na: int, nb: int, rule: str) -> list[list[tuple[int, int]]]:
        """Block pairs (i, j) of one stage, grouped by shared layer: source through i, target from j."""
        if not na or not nb:  # a stage without blocks has no cut point
            return []
        if na != nb:
            return unpaired_pairs(na, nb, self.config.unpaired) if rule == "window" else forward_unpaired_pairs(na, nb)
        groups = paired_pairs(na, self.config.kernel_size, self.config.stride)
        if rule == "forward":
            groups = [g for g in ([(i, j) for i, j in g if j > i] for g in groups) if g]
        return groups

    def _stitch_pair(self, a: int, b: int) -> int:
        A, B = self.anchors[a], self.anchors[b]
        found = 0
        rule = self._rule(A, B)
        for s in self._stages(A, B):
            a0, b0 = sum(A.stages[:s]), sum(B.stages[:s])
            na, nb = A.stages[s], B.stages[s]
            groups = self._groups(na, nb, rule)
            for group in groups:
                # global indices: source runs blocks 0..a0+i, target starts at block b0+j
                cuts = [(a0 + i + 1, b0 + j) for i, j in group]
                cuts = [(e, st) for e, st in cuts if stitchable(A.specs[e], B.specs[st]) is None]
                if not cuts:
                    continue
                src_spec, dst_spec = A.specs[cuts[0][0]], B.specs[cuts[0][1]]
                if any(A.specs[e] != src_spec or B.specs[st] != dst_spec for e, st in cuts):
                    # one layer cannot serve activations of different shapes: split the group
                    groups_of = [[c] for c in cuts]
                else:
                    groups_of = [cuts]
                for cut_group in groups_of:
                    layer = self._add_layer(a, b, cut_group)
                    for e, st in cut_group:
                        self._add_route((Segment(a, 0, e), Segment(b, st, B.depth)), (layer,))
                        found += 1
        return found

    # -- SN-Netv2's two-way space
    def _two_way_pair(self, a: int, b: int) -> int:
        """S->L and L->S at every matched position, then L->S->L and S->L->S through two of them.

        The order (and the layer banks: every S->L layer, then every L->S one) follows the
        authors' code, so stitch ids line up with theirs but for the S->L stitch at the last
        block, which they list and never use and snnet does not list.
        """
        A, B = self.anchors[a], self.anchors[b]
        positions: list[tuple[int, int]] = []
        for s in self._stages(A, B):
            a0, b0 = sum(A.stages[:s]), sum(B.stages[:s])
            positions += [(a0 + ka, b0 + kb) for ka, kb in two_way_positions(A.stages[s], B.stages[s])]
        up = {k: self._add_layer(a, b, [(ea, eb)]) for k, (ea, eb) in enumerate(positions)
              if stitchable(A.specs[ea], B.specs[eb]) is None}
        down = {k: self._add_layer(b, a, [(eb, ea)]) for k, (ea, eb) in enumerate(positions)
                if stitchable(B.specs[eb], A.specs[ea]) is None}
        before = len(self._stitches)
        for k, layer in up.items():  # S -> L
            ea, eb = positions[k]
            self._add_route((Segment(a, 0, ea), Segment(b, eb, B.depth)), (layer,))
        for k, layer in down.items():  # L -> S
            ea, eb = positions[k]
            self._add_route((Segment(b, 0, eb), Segment(a, ea, A.depth)), (layer,))

        def later(k1: int, k2: int) -> bool:
            """Position k2 comes after k1 in both anchors. Not k2 > k1: the positions follow the order the
            stages are listed in (stages=[2, 1]), and a round trip back through an earlier one ran no block."""
            return all(p2 > p1 for p1, p2 in zip(positions[k1], positions[k2]))


        for k1, l1 in down.items():  # L -> S -> L: leave L at k1, come back at a later k2
            for k2, l2 in up.items():
                if later(k1, k2):
                    (ea1, eb1), (ea2, eb2) = positions[k1], positions[k2]
                    self._add_route((Segment(b, 0, eb1), Segment(a, ea1, ea2), Segment(b, eb2, B.depth)), (l1, l2))
        for k1, l1 in up.items():  # S -> L -> S
            for k2, l2 in down.items():
                if later(k1, k2):
                    (ea1, eb1), (ea2, eb2) = positions[k1], positions[k2]
                    self._add_route((Segment(a, 0, ea1), Segment(b, eb1, eb2), Segment(a, ea2, A.depth)), (l1, l2))
        return len(self._stitches) - before

    # -- the v1 reference's three-anchor routes
    def _chains(self, pairs: Sequence[tuple[int, int]]) -> None:
        """A->B->C for stitched pairs (A, B) and (B, C): an A->B stitch, then a B->C stitch that
        leaves B after it was entered (at least one block of B), through both stitches' layers."""
        by_pair: dict[tuple[int, int], list[Stitch]] = {}
        for s in self._stitches:
            if len(s.segments) == 2:
                by_pair.setdefault((s.src, s.dst), []).append(s)  # type: ignore[arg-type]
        for a, b in pairs:
            for b2, c in pairs:
                if b2 != b:
                    continue
                for s1 in by_pair.get((a, b), []):
                    for s2 in by_pair.get((b, c), []):
                        if s2.src_end > s1.dst_start:
                            self._add_route((s1.segments[0], Segment(b, s1.dst_start, s2.src_end), s2.segments[1]),
                                            (s1.layers[0], s2.layers[0]))

    # -- an explicit list of routes
    def _explicit(self, routes: Sequence[str]) -> None:
        labels = [a.label for a in self.anchors]
        depths = [a.depth for a in self.anchors]
        for name in routes:
            segments = parse_route(name, labels, depths)
            if len(segments) == 1:
                continue  # an anchor: always in the space
            layers = []
            for s1, s2 in zip(segments, segments[1:]):
                A, B = self.anchors[s1.anchor], self.anchors[s2.anchor]
                if s1.anchor == s2.anchor:
                    raise NotStitchableError(f"route {name!r} stitches {A.label} to itself; a join must change anchor")
                why = stitchable(A.specs[s1.stop], B.specs[s2.start])
                if why is not None:
                    raise NotStitchableError(f"route {name!r} cannot join {A.label} after block {s1.stop} to "
                                             f"{B.label} at block {s2.start}: {why}")
                key = (s1.anchor, s1.stop, s2.anchor, s2.start)
                if key not in self._join_layer:
                    self._add_layer(s1.anchor, s2.anchor, [(s1.stop, s2.start)])
                layers.append(self._join_layer[key])
            self._add_route(segments, layers)

    def _why_not(self, a: int, b: int) -> str:
        A, B = self.anchors[a], self.anchors[b]
        stages = self._stages(A, B)
        reasons: list[str] = []
        for s in stages:  # the positions inside each stage that may be stitched
            a0, b0 = sum(A.stages[:s]), sum(B.stages[:s])
            found = sorted({stitchable(A.specs[e], B.specs[st]) or "" for e in range(a0 + 1, a0 + A.stages[s] + 1)
                            for st in range(b0, b0 + B.stages[s])} - {""})
            where = f"in stage {s}, " if len(A.stages) > 1 or len(B.stages) > 1 else ""
            reasons += [where + r for r in found[:2]]
        if stages and not reasons and self.config.two_way:  # two-way ignores the rule: it cuts at matched positions
            reasons = [f"the two-way space cuts at the matched positions 1 .. d-1 of a stage's shallower depth d, and "
                       f"stage(s) {', '.join(map(str, stages))} have none ({A.label} has "
                       f"{', '.join(str(A.stages[s]) for s in stages)} block(s) there, "
                       f"{B.label} {', '.join(str(B.stages[s]) for s in stages)})"]
        if stages and not reasons:  # every position lines up, but the rule pairs none of them
            reasons = [f"the {self._rule(A, B)!r} rule pairs no blocks of stage(s) {', '.join(map(str, stages))} "
                       f"({A.label} has {', '.join(str(A.stages[s]) for s in stages)} block(s) there, "
                       f"{B.label} {', '.join(str(B.stages[s]) for s in stages)})"]
        detail = "; ".join(reasons[:4]) if stages else f"they share no stitchable stage (stages {A.stitch_stages} vs {B.stitch_stages})"
        if not stages and self.config.stages is not None:  # the stages asked for, not the adapters' defaults
            detail = (f"stages={list(self.config.stages)} names no stage both have ({A.label} has {len(A.stages)}, "
                      f"{B.label} {len(B.stages)}, numbered from 0)")
        return (f"anchors {A.label!r} and {B.label!r} cannot be stitched anywhere: {detail}. "
                "Stitching maps activations position by position, so both anchors need the same "
                "token count (same patch size and input size) or the same feature-map size somewhere.")

    # -- lookup
    def __len__(self) -> int:
        return len(self.stitches)

    def __iter__(self) -> Iterator[Stitch]:
        return iter(self.stitches)

    def __getitem__(self, key: int | str | Stitch) -> Stitch:
        if isinstance(key, Stitch):
            if key.id < len(self.stitches) and self.stitches[key.id] == key:
                return key
            raise StitchNotFoundError(f"stitch {key.name!r} is not in this stitch space")
        if isinstance(key, str) and key.strip().lstrip("-").isdecimal():
            key = int(key)
        if not isinstance(key, (int, str)) and hasattr(key, "__index__"):  # numpy's and torch's integers
            key = operator.index(key)
        if isinstance(key, int) and not isinstance(key, bool):
            if 0 <= key < len(self.stitches):
                return self.stitches[key]
            raise StitchNotFoundError(f"stitch id {key} is out of range: this space has ids 0..{len(self.stitches) - 1}")
        if isinstance(key, str):
            if key in self._by_name:
                return self._by_name[key]
            import difflib

            close = difflib.get_close_matches(key, list(self._by_name), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else " `snnet stitches` lists the names."
            raise StitchNotFoundError(f"no stitch named {key!r}.{hint}")
        raise StitchNotFoundError(f"a stitch is given by id, name or Stitch, not {type(key).__name__}")

    def anchor_stitches(self) -> list[Stitch]:
        return [s for s in self.stitches if s.is_anchor]

    def layer_stitches(self, layer: int) -> list[Stitch]:
        """The stitches whose route passes through stitching layer ``layer``."""
        return [s for s in self.stitches if layer in s.layers]
