"""The stitch space: which networks a family of anchors yields, by the paper's rules.

A :class:`Stitch` runs the first ``src_end`` blocks of anchor ``src``, a stitching layer, then
anchor ``dst`` from block ``dst_start`` to its head. The rules (SN-Net, Sec. 3):

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from .anchors import ActivationSpec, stitchable
from .errors import ConfigError, NotStitchableError, StitchNotFoundError

# How block pairs are enumerated inside a stage (see the module docstring).
RULES = ("window", "forward")
# How plain (window-rule) anchors of different depths are stitched (see the module doc).
UNPAIRED = ("reference", "progress")


@dataclass(frozen=True)
class SpaceConfig:
    """Options of the stitch space (the paper's defaults)."""

    kernel_size: int = 2
    stride: int = 1
    nearest: bool = True  # stitch each anchor only to the next one in cost
    stages: tuple[int, ...] | None = None  # stages that may be stitched; None: each adapter's default
    rule: str | None = None  # "window" | "forward" (see the module doc); None: each adapter's default
    unpaired: str = "reference"  # "reference" (the authors') | "progress" (snnet's earlier rule)

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.stride < 1:
            raise ConfigError(f"kernel_size and stride must be >= 1, got {self.kernel_size}, {self.stride}")
        if self.rule is not None and self.rule not in RULES:
            raise ConfigError(f"unknown stitching rule {self.rule!r}; expected one of {RULES}")
        if self.unpaired not in UNPAIRED:
            raise ConfigError(f"unknown unpaired rule {self.unpaired!r}; expected one of {UNPAIRED}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpaceConfig":
        stages = d.get("stages")
        # a config saved before the unpaired option existed was built with the "progress" rule
        return cls(int(d["kernel_size"]), int(d["stride"]), bool(d["nearest"]), tuple(stages) if stages is not None else None,
                   d.get("rule"), d.get("unpaired", "progress"))


@dataclass(frozen=True)
class Stitch:
    """One network of the space: an anchor alone (``dst is None``) or a stitched route."""

    id: int
    name: str
    src: int
    src_end: int
    dst: int | None = None
    dst_start: int = 0
    layer: int | None = None

    @property
    def is_anchor(self) -> bool:
        return self.dst is None

    @property
    def anchors(self) -> tuple[int, ...]:
        return (self.src,) if self.dst is None else (self.src, self.dst)


@dataclass(frozen=True)
class LayerSlot:
    """One stitching layer: which anchors it joins, the shapes it maps, the stitches it serves."""

    index: int
    src: int
    dst: int
    src_spec: ActivationSpec
    dst_spec: ActivationSpec


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
    :func:`forward_unpaired_pairs`: 23 stitches for 12→24 blocks.
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
        stitches = [Stitch(k, a.label, k, a.depth) for k, a in enumerate(anchors)]
        layers: list[LayerSlot] = []
        pairs = [(a, a + 1) for a in range(len(anchors) - 1)] if config.nearest else [
            (a, b) for a in range(len(anchors)) for b in range(a + 1, len(anchors))]
        for a, b in pairs:
            found = self._stitch_pair(a, b, stitches, layers)
            if not found:
                raise NotStitchableError(self._why_not(a, b))
        self.stitches: tuple[Stitch, ...] = tuple(stitches)
        self.layers: tuple[LayerSlot, ...] = tuple(layers)
        self._by_name = {s.name: s for s in stitches}
        if len(self._by_name) != len(stitches):
            raise NotStitchableError("two anchors have the same name; give each anchor a distinct label")

    # -- enumeration
    def _stages(self, a: AnchorInfo, b: AnchorInfo) -> list[int]:
        if self.config.stages is not None:
            return [s for s in self.config.stages if s < len(a.stages) and s < len(b.stages)]
        return [s for s in a.stitch_stages if s in b.stitch_stages and s < len(b.stages)]

    def _rule(self, a: AnchorInfo, b: AnchorInfo) -> str:
        if self.config.rule is not None:
            return self.config.rule
        return a.rule if a.rule == b.rule else "window"  # kinds that disagree: the paper's general rule

    def _groups(self, na: int, nb: int, rule: str) -> list[list[tuple[int, int]]]:
        """Block pairs (i, j) of one stage, grouped by shared layer: source through i, target from j."""
        if na != nb:
            return unpaired_pairs(na, nb, self.config.unpaired) if rule == "window" else forward_unpaired_pairs(na, nb)
        groups = paired_pairs(na, self.config.kernel_size, self.config.stride)
        if rule == "forward":
            groups = [g for g in ([(i, j) for i, j in g if j > i] for g in groups) if g]
        return groups

    def _stitch_pair(self, a: int, b: int, stitches: list[Stitch], layers: list[LayerSlot]) -> int:
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
                    slot = LayerSlot(len(layers), a, b, A.specs[cut_group[0][0]], B.specs[cut_group[0][1]])
                    layers.append(slot)
                    for e, st in cut_group:
                        name = f"{A.label}[:{e}]+{B.label}[{st}:]"
                        stitches.append(Stitch(len(stitches), name, a, e, b, st, slot.index))
                        found += 1
        return found

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
        detail = "; ".join(reasons[:4]) if stages else f"they share no stitchable stage (stages {A.stitch_stages} vs {B.stitch_stages})"
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
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
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
        return [s for s in self.stitches if s.layer == layer]
