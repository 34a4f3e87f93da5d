"""The stitched network: every anchor and stitching layer in one switchable nn.Module.

``StitchedNet.forward`` runs exactly one route — the active stitch — and the stitch is chosen
outside forward with :meth:`StitchedNet.select` (by a sampler during training, by a budget at
deployment). Switching only changes which modules the next forward calls: no weight is
copied or reloaded.

:meth:`StitchedNet.route` is the one definition of what a stitch runs (stem, each segment's
blocks, the stitching layer between segments, head); forward, costs, least-squares init,
training, evaluation, profiling and export all read a route from it or from the same
:class:`~snnet.space.Stitch` segments.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import adapters  # noqa: F401  (registers snnet's adapters: the command line imports the package without them)
from .anchors import (AnchorLike, AnchorParts, AnchorSpec, ActivationSpec, Route, anchor_label, as_rows, build_parts, create_anchor,
                      cut_parts, without_final_norm)
from .errors import CheckpointError, ConfigError, NotStitchableError, SnnetError, user_stacklevel
from .io import (atomic_write, in_saved_dtype, previous_of, read_object, record_checksum, recorded_checksums,
                 recorded_previous, replacing, sha256_file, verify_checksum)
from .report import progress as report_progress
from .flops import PartCosts, count_macs, layer_flops, num_params, part_costs
from .results import Row
from .config import ModelConfig
from .space import AnchorInfo, SpaceConfig, Stitch, StitchSpace
from .stitching import LeastSquares, StitchingLayer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# 1: SN-Net's spaces; 2: also two-way/chained/explicit routes and low-rank stitching layers;
# 3: also the reference route mode; 4: also anchors cut between sublayers (space.cut). A network is
# written with the lowest version that holds it.
FORMAT_VERSION = 4
# How stitched routes end (see StitchedNet): "snnet", with the target anchor's own tail; "reference",
# as the authors' code runs them (the DeiT code skips the final norm on stitched routes).
ROUTE_MODES = ("snnet", "reference")


# What :meth:`StitchedNet.costs` lists: a :class:`~snnet.results.Row` with id, name, flops, params and
# is_anchor set (the one row type). The name is kept for the public import ``snnet.StitchCost``;
# build rows with ``Row(id, name, flops=..., params=..., is_anchor=...)``.
StitchCost = Row


@dataclass(frozen=True)
class InitReport:
    """What the least-squares initialisation did."""

    images: int
    layers: int
    seconds: float


class StitchedBase(nn.Module):
    """What every stitched network does, whatever its anchors read (images, token ids).

    A subclass builds, in its ``__init__``: ``anchors`` (:class:`~snnet.anchors.AnchorParts` in
    order of cost), ``labels``, ``space`` (:class:`~snnet.space.StitchSpace`), ``stitch_layers``,
    ``lora_rank``/``lora_alpha``, the caches ``_routes`` and ``_costs`` and the ``_active`` stitch
    (:meth:`_init_space` does the common part), and defines ``forward`` and ``costs``. The verbs
    here (select, route, least-squares fitting, summing part costs, loading weights) are then
    one piece of code for :class:`StitchedNet` and for :class:`snnet.families.causal_lm.StitchedLM`.
    """

    def _init_space(self, infos: Sequence[AnchorInfo], config: SpaceConfig, lora_rank: int, lora_alpha: float) -> None:
        """The stitch space over ``infos``, a stitching layer per slot, the largest anchor active."""
        self.route_mode = "snnet"
        self._stitched_heads: dict[int, nn.Module] = {}  # anchor -> the head stitched routes into it end with
        self.space = StitchSpace(infos, config)
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.stitch_layers = nn.ModuleList([StitchingLayer(s.src_spec, s.dst_spec, lora_rank, lora_alpha)
                                            for s in self.space.layers])
        self._routes: dict[int, tuple[nn.Module, ...]] = {}  # stitch id -> Route.modules(), filled on first use
        self._active: Stitch = self.space.stitches[len(self.anchors) - 1]  # the largest anchor

    def train(self, mode: bool = True) -> "StitchedBase":
        """As :meth:`nn.Module.train`, the reference route mode's stitched heads included: they are not
        submodules (they share the anchors' head modules), and their model runs in their mode."""
        super().train(mode)
        for head in getattr(self, "_stitched_heads", {}).values():
            head.train(mode)
        return self

    # ------------------------------------------------------------------ switching
    @property
    def active(self) -> Stitch:
        return self._active

    @property
    def stitches(self) -> tuple[Stitch, ...]:
        return self.space.stitches

    def stitch(self, key: int | str | Stitch) -> Stitch:
        """Look a stitch up by id, name or value (raises with the valid range or close names)."""
        return self.space[key]

    def select(self, stitch: int | str | Stitch | None = None, *, budget: Any = None, results: Any = None) -> Stitch:
        """Make ``stitch`` the route the next forward runs, and return it. O(1); no weight moves.

        Or pass ``budget=`` (``"flops<=2G"``, ``"latency=30ms,memory=200MB"``, a
        :class:`snnet.budget.Budget`) to select the most accurate stitch within it — measured
        top-1 from ``results`` (rows or a ``results.json`` path) when given, else cost as the
        proxy. Either way the :class:`~snnet.space.Stitch` now active is returned; to learn why a
        budget chose it, :func:`snnet.budget.select_stitch` gives the :class:`~snnet.budget.Selection`
        (then ``net.select(selection.stitch)``).
        """
        if budget is not None:
            if stitch is not None:
                raise ValueError("select takes a stitch or a budget, not both")
            from .budget import select_stitch

            self._active = select_stitch(self, budget, results).stitch
            return self._active
        if stitch is None:
            raise TypeError("select needs a stitch (id, name or Stitch) or budget=...")
        self._active = self.space[stitch]
        return self._active

    def route(self, stitch: int | str | Stitch) -> Route:
        """The network's own modules (no copy) that the route of ``stitch`` runs: the first
        anchor's stem, each segment's blocks with the stitching layer between segments, the last
        anchor's head (:meth:`head_of`). It is what :meth:`forward` runs; training, profiling and
        export work from it."""
        s = self.space[stitch]
        return Route(self.anchors[s.src].stem,
                     tuple(tuple(self.anchors[seg.anchor].blocks[seg.start:seg.stop]) for seg in s.segments),
                     tuple(self.stitch_layers[k] for k in s.layers), self.head_of(s))

    def head_of(self, stitch: int | str | Stitch) -> nn.Module:
        """The head that ends the route of ``stitch``: its last anchor's own (norm, pooling, classifier),
        but in the reference route mode a stitched route into an anchor the reference ends without
        its final norm (DeiT) ends as the reference's does, sharing the anchor's modules."""
        s = self.space[stitch]
        last = s.anchors[-1]
        return self._stitched_heads[last] if not s.is_anchor and last in self._stitched_heads else self.anchors[last].head

    def set_lora_rank(self, rank: int, alpha: float = 1.0) -> None:
        """Make every stitching layer low-rank (``rank`` > 0) or plain (0), keeping the map it computes.

        A low-rank layer takes the current weight as its frozen base and starts a fresh update
        at zero; going to 0 merges the update in. Do it before building the optimizer.
        """
        self.stitch_layers = nn.ModuleList([layer.with_rank(rank, alpha) for layer in self.stitch_layers])
        self.lora_rank, self.lora_alpha = int(rank), float(alpha)
        self._routes.clear()  # routes hold the replaced layers
        self._costs.clear()

    # ------------------------------------------------------------------ costs
    def _route_costs(self, pcs: Sequence[PartCosts], lflops: Sequence[int], lparams: Sequence[int],
                     tied: Sequence[int] | None = None) -> list[Row]:
        """Every network's cost as the sum of its parts: the first anchor's stem, each segment's
        blocks, the last anchor's head, the stitching layers. ``tied[a]`` params that anchor ``a``'s
        head shares with its stem (a tied LM head) are counted once when a route starts and ends there."""
        out = []
        for s in self.space:
            last = len(s.segments) - 1
            flops = params = 0
            for k, seg in enumerate(s.segments):
                f, p = pcs[seg.anchor].route(seg.start, seg.stop, stem=k == 0, head=k == last)
                flops, params = flops + f, params + p
            if tied is not None and s.segments[0].anchor == s.segments[-1].anchor:
                params -= tied[s.src]
            flops += sum(lflops[k] for k in s.layers)
            params += sum(lparams[k] for k in s.layers)
            out.append(Row(s.id, s.name, flops, params, is_anchor=s.is_anchor))
        return out

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def activations(self, anchor: int, x: torch.Tensor) -> list[torch.Tensor]:
        """The input of every block of one anchor, then its last block's output."""
        parts = self.anchors[anchor]
        h = parts.stem(x)
        acts = [h]
        for blk in parts.blocks:
            h = blk(h)
            acts.append(h)
        return acts

    @torch.no_grad()
    def _fit_stitching(self, inputs: Iterable[torch.Tensor]) -> int:
        """Fit every stitching layer by least squares on the anchors' activations for ``inputs``
        (batches the stems take); returns how many items were seen (no fit when none).

        A layer maps what the source anchor outputs after its last block on the route onto what
        the target feeds its first block on the route, position by position; a layer shared by
        several block pairs gets one fit over all of them.
        """
        fits = [LeastSquares(s.src_spec.channels, s.dst_spec.channels) for s in self.space.layers]
        used = sorted({k for slot in self.space.layers for k in (slot.src, slot.dst)})
        seen = 0
        for x in inputs:
            acts = {k: self.activations(k, x) for k in used}
            for slot, fit in zip(self.space.layers, fits):
                src_layout, dst_layout = self.anchors[slot.src].layout, self.anchors[slot.dst].layout
                for e, st in slot.joins:
                    fit.update(as_rows(acts[slot.src][e], src_layout), as_rows(acts[slot.dst][st], dst_layout))
            seen += len(x)
        if seen:
            for layer, fit in zip(self.stitch_layers, fits):
                layer.set_affine(*fit.solve())
        return seen

    # ------------------------------------------------------------------ save / load
    _format: ClassVar[str] = "snnet"  # config.json's "format"
    _version: ClassVar[int] = FORMAT_VERSION  # the newest format version this class reads
    _what: ClassVar[str] = "stitched network"  # what error messages call it

    def save_pretrained(self, directory: str | os.PathLike, state: Mapping[str, torch.Tensor] | None = None,
                        extra: Mapping[str, Callable[[Path], object]] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (every anchor and stitching layer).

        Both files are written to temporary names and renamed into place, so an interrupted
        save never leaves a half-written network behind. ``config.json`` records the SHA-256 of
        ``model.safetensors``; :meth:`from_pretrained` refuses a weights file that does not match.
        Over a saved network, its weights stay (as ``model.safetensors.previous``) until the new
        ``config.json`` is in: a save interrupted between the two files leaves the network saved
        before it, which :meth:`from_pretrained` then loads; a save that fails with an error puts it back.
        ``state`` replaces the network's own state dict (a sharded network's gathered weights).
        ``extra`` names more files to write beside the weights (name -> a function writing it to the path
        it is given): written, recorded in ``config.json`` and kept over a save as the weights are. A file the
        save this one replaces recorded and this one does not write is removed once the new ``config.json`` is
        in, unless its bytes are no longer the recorded ones (the user's own, copied in since).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        state = state or self.state_dict()
        if any(v.is_meta for v in state.values()):  # torch's "Cannot copy out of meta tensor" from deep inside
            raise ConfigError(f"cannot save to {directory}: the {self._what} is on the meta device, which holds no "
                              "weights; build it without device='meta' (or load weights into it first)")
        _check_overwrite(directory, self._format, self._what)
        directory.mkdir(parents=True, exist_ok=True)
        state = _unshared({k: v.detach().contiguous().cpu() for k, v in state.items()})
        config = self.config_dict()

        def write_weights(p: Path) -> None:
            save_file(state, str(p), metadata={"format": "pt", **({} if self._format == "snnet" else {"snnet": self._format})})

        def recorded(name: str, write: Callable[[Path], object]) -> Callable[[Path], None]:
            def write_and_record(p: Path) -> None:
                write(p)
                record_checksum(config, name, p)  # of the very bytes renamed into place
            return write_and_record

        files = {**(extra or {}), WEIGHTS_NAME: write_weights}
        earlier = recorded_checksums(directory / CONFIG_NAME)  # what the save being replaced wrote
        with replacing([directory / name for name in files], directory / CONFIG_NAME):
            for name, write in files.items():
                atomic_write(directory / name, recorded(name, write))
            atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
        for name, digest in earlier.items():  # left beside the new network, they were taken for its own (a tokenizer)
            stale = directory / name
            if (name not in (*files, CONFIG_NAME) and Path(name).name == name and stale.is_file()
                    and sha256_file(stale) == digest):  # bytes changed since: the user's, never removed
                stale.unlink()
                previous_of(stale).unlink(missing_ok=True)
        return directory

    @classmethod
    def _read_saved(cls, directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
        """A saved network's config and weights path, checked: both files present, the config of
        this kind and version, the weights' checksum (before anything is built)."""
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise CheckpointError(_not_a_network(directory, what=cls._what))
        try:
            cfg = json.loads(cfg_path.read_text())
            if isinstance(cfg, dict) and cfg.get("format") not in (None, cls._format):
                raise CheckpointError(_not_a_network(directory, cfg["format"], what=cls._what))
            cfg["anchors"], cfg["space"]
            if cfg.get("format") != cls._format:
                raise KeyError("format")
            newer = int(cfg.get("version", 0)) > cls._version  # int(): a version written as text compared with >
        except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or not UTF-8 text at all
            raise CheckpointError(f"{cfg_path} is corrupt or not an {cls._format} config ({e})") from e
        if newer:
            raise CheckpointError(f"{cfg_path} was written by a newer snnet (format {cfg['version']}); upgrade snnet")
        # damaged weights fail before the anchors are built (files saved before checksums load unverified)
        fix = "restore it from a backup or save the network again"
        try:
            verify_checksum(w_path, cfg, cfg_path, fix, error=CheckpointError)
        except CheckpointError:
            previous = recorded_previous(w_path, cfg)  # a save interrupted between its files: the network before it
            if previous is None:
                raise
            import warnings

            warnings.warn(f"{directory}: a save was interrupted between its files (new ones in, config.json not yet); "
                          f"loading the network saved before it ({previous.name}). Save the network again to finish "
                          "the interrupted save",
                          stacklevel=user_stacklevel())
            w_path = previous
        return cfg, w_path

    def _load_saved(self, cfg: dict[str, Any], w_path: Path, map_location: str | torch.device) -> None:
        """Load the saved weights into this freshly built network and select the saved stitch."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .devices import default_device

        if [s.name for s in self.space] != cfg.get("stitches"):
            raise CheckpointError(f"{w_path.parent} was saved with a different stitch space than these anchors give")
        # a device this machine lacks is named as such: 'cuda' without a GPU was torch's driver traceback, a typo
        # or 'meta' called a sound weights file corrupt
        map_location = default_device(map_location)
        try:
            state = load_file(str(w_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{w_path} is corrupt or unreadable ({e}); re-save it or restore a backup") from e
        self.to(map_location)  # built on the CPU: the network goes where its weights were asked to be loaded
        self.load_weights(state, source=str(w_path))
        in_saved_dtype(self, state)
        self.select(cfg.get("active", self.active.name))

    # ------------------------------------------------------------------ weights
    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a full state dict, failing with a readable summary if it does not fit."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            def few(keys: list[str]) -> str:
                return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                     f"wrong shape {few(wrong)}" if wrong else ""]
            raise CheckpointError(f"{source} does not match this network: " + "; ".join(p for p in parts if p))
        self.load_state_dict(state)



class StitchedNet(StitchedBase):
    """Anchors ordered by cost, the stitching layers between them, and the stitch space."""

    def __init__(
        self,
        anchors: Sequence[AnchorParts],
        labels: Sequence[str],
        *,
        config: SpaceConfig = SpaceConfig(),
        input_size: Sequence[int] | None = None,
        specs: Sequence[AnchorSpec | None] | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
        route_mode: str = "snnet",
    ) -> None:
        super().__init__()
        if route_mode not in ROUTE_MODES:
            raise ConfigError(f"unknown route mode {route_mode!r}; expected one of {ROUTE_MODES}")
        if len(anchors) < 2:
            raise NotStitchableError(f"a family needs at least two anchors to stitch, got {len(anchors)}")
        if len(labels) != len(anchors):  # zip() below would drop the anchors without a label
            raise ConfigError(f"{len(labels)} labels for {len(anchors)} anchors: give one label per anchor")
        if route_mode == "reference" and config.cut != "block":
            raise ConfigError("route_mode='reference' runs the authors' networks, which cut between blocks: "
                              "use space cut='block' with it")
        anchors = [cut_parts(p, config.cut, lab) for p, lab in zip(anchors, labels)]  # a ViT's sublayers as units
        specs = list(specs) if specs is not None else [None] * len(anchors)
        self.input_size = tuple(input_size) if input_size is not None else _common_input_size(anchors, labels)
        probes = [_probe(p, lab, self.input_size) for p, lab in zip(anchors, labels)]
        for p in anchors:  # built at another size (img_size=...), an anchor's timm config still names its default, which
            p.data_config["input_size"] = list(self.input_size)  # the data pipelines read (images resized to it)
        outputs = {lab: n for lab, (_, n) in zip(labels, probes)}
        if len(set(outputs.values())) > 1:
            raise NotStitchableError(
                f"anchors' heads have different numbers of classes {outputs}: a stitch ends in another "
                "anchor's head, so all heads must predict the same classes (pass num_classes=...)")
        costs = [part_costs(p, self.input_size) for p in anchors]
        # anchors in order of cost: stitches go from the cheaper to the dearer neighbour
        order = sorted(range(len(anchors)), key=lambda k: (costs[k].total[0], costs[k].total[1]))
        self.anchors = nn.ModuleList([anchors[k] for k in order])
        self.labels = tuple(labels[k] for k in order)
        self.specs = tuple(specs[k] for k in order)
        self.num_classes = next(iter(outputs.values()))
        self._costs: dict[tuple[int, ...], list[Row]] = {}
        # per input size: every anchor's activation specs and part costs (filled by _measure)
        self._measured = {self.input_size: ([probes[k][0] for k in order], [costs[k] for k in order])}
        infos = [
            AnchorInfo(self.labels[i], p.stages, p.stitch_stages, tuple(probes[order[i]][0]), p.stitch_rule)
            for i, p in enumerate(self.anchors)
        ]
        self._init_space(infos, config, lora_rank, lora_alpha)
        self.route_mode = route_mode
        self._stitched_heads = self._reference_heads() if route_mode == "reference" else {}

    def _reference_heads(self) -> dict[int, nn.Module]:
        """Per anchor, the head the reference code ends stitched routes with, where it is not the anchor's own."""
        from .reference import SKIPS_FINAL_NORM, layout_of

        layout = layout_of({p.kind for p in self.anchors}, self.space.config.two_way)
        if layout is None:
            raise ConfigError(f"route_mode='reference': the authors' code builds no SN-Net of {', '.join(self.labels)} "
                              "(it has DeiT, Swin, ResNet, ResNet->Swin, LeViT and SN-Netv2 ViTs); use route_mode='snnet'")
        if layout not in SKIPS_FINAL_NORM:
            return {}
        heads = {k: without_final_norm(p.head) for k, p in enumerate(self.anchors)}
        return {k: h for k, h in heads.items() if h is not None}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._routes.get(self._active.id)
        if modules is None:  # once per stitch: the hot path only walks a cached tuple
            modules = self._routes[self._active.id] = self.route(self._active).modules()
        for m in modules:
            x = m(x)
        return x

    # ------------------------------------------------------------------ costs
    def _measure(self, size: tuple[int, ...]) -> tuple[list[list[ActivationSpec]], list[PartCosts]]:
        """Every anchor's activation specs and part costs at one input size (cached)."""
        if size not in self._measured:
            # probing first turns an input the anchors cannot take into a clear error
            specs = [_probe(p, lab, size)[0] for p, lab in zip(self.anchors, self.labels)]
            self._measured[size] = (specs, [part_costs(p, size) for p in self.anchors])
        return self._measured[size]

    def part_costs(self, input_size: Sequence[int] | None = None) -> list[PartCosts]:
        return self._measure(tuple(input_size) if input_size is not None else self.input_size)[1]

    def costs(self, input_size: Sequence[int] | None = None) -> list[Row]:
        """FLOPs (multiply-accumulates) and params of every stitch, summed from part costs."""
        size = tuple(input_size) if input_size is not None else self.input_size
        if size not in self._costs:
            specs, pcs = self._measure(size)
            # a low-rank layer is priced as what it deploys as: one plain layer (merged)
            plain = [layer.merged() for layer in self.stitch_layers]
            lflops = [layer_flops(layer, specs[slot.src][slot.joins[0][0]]) for slot, layer in zip(self.space.layers, plain)]
            lparams = [num_params(layer) for layer in plain]
            out = self._route_costs(pcs, lflops, lparams)
            for k, c in enumerate(out):
                s = self.space[c.id]
                if not s.is_anchor and s.anchors[-1] in self._stitched_heads:  # the reference's head, not the anchor's
                    a = s.anchors[-1]
                    f, p = self.stitched_head_costs(a, size)
                    out[k] = replace(c, flops=c.flops + f - pcs[a].head_flops, params=c.params + p - pcs[a].head_params)
            self._costs[size] = out
        return self._costs[size]

    @torch.no_grad()
    def stitched_head_costs(self, anchor: int, input_size: Sequence[int] | None = None) -> tuple[int, int]:
        """(MACs, params) of the head stitched routes into ``anchor`` end with: the anchor's own, or in the
        reference route mode the authors' (:meth:`head_of`), on its last block's output."""
        specs, pcs = self._measure(tuple(input_size) if input_size is not None else self.input_size)
        if anchor not in self._stitched_heads:
            return pcs[anchor].head_flops, pcs[anchor].head_params
        head, spec = self._stitched_heads[anchor], specs[anchor][-1]
        p = next(self.anchors[anchor].parameters())
        shape = (1, spec.channels, *spec.spatial) if spec.layout == "nchw" else (1, *spec.spatial, spec.channels)
        flops, _ = count_macs(head, torch.zeros(shape, device=p.device, dtype=p.dtype))
        return flops, num_params(head)

    @torch.no_grad()
    def init_stitching(self, batches: Iterable[Any], max_images: int = 100, progress: bool = False) -> InitReport:
        """Fit every stitching layer by least squares on a few calibration images.

        A layer maps what the source anchor outputs after its last block on the route onto
        what the target anchor feeds into its first block on the route (for the target's
        block 0 that is its stem output). A layer shared by several block pairs gets one fit
        over the features of all of them. Every layer is fitted, whichever direction it maps
        (SN-Netv2's large-to-small layers too); round trips reuse the layers of one-way joins.
        A low-rank layer takes the fit as its frozen base, its update restarting at zero.
        """
        if max_images < 1:  # else "the loader yielded nothing", of a loader that was never read
            raise ConfigError(f"init_stitching needs max_images >= 1 calibration images, got {max_images}")
        t0 = time.perf_counter()
        seen = self._fit_stitching(calibration_images(self, batches, max_images, "least-squares init", progress))
        if seen == 0:
            raise ValueError("no calibration images: the loader given to init_stitching yielded nothing")
        return InitReport(seen, len(self.stitch_layers), time.perf_counter() - t0)

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> dict[str, Any]:
        v1 = self.space.config.is_v1 and self.lora_rank == 0
        return {
            "format": "snnet",
            "version": FORMAT_VERSION if self.space.config.cut != "block" else 3 if self.route_mode != "snnet" else 1 if v1 else 2,
            "anchors": [
                {"label": lab, "kind": p.kind, "spec": spec.to_dict() if spec else None}
                for lab, p, spec in zip(self.labels, self.anchors, self.specs)
            ],
            "space": self.space.config.to_dict(),
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "stitches": [s.name for s in self.space],
            "active": self._active.name,
            **({} if self.lora_rank == 0 else {"stitching": {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}}),
            **({} if self.route_mode == "snnet" else {"route_mode": self.route_mode}),
        }

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, anchors: Sequence[nn.Module | AnchorParts] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "StitchedNet":
        """Rebuild a network saved by :meth:`save_pretrained`.

        Anchors built from model names are rebuilt from the config; anchors that were the
        user's own modules must be passed again (freshly constructed, in the saved order).
        """
        cfg, w_path = cls._read_saved(directory)
        try:  # every field read before anything is built: a damaged config.json fails here, in one line
            entries = cfg["anchors"]
            labels = [str(e["label"]) for e in entries]
            specs = [AnchorSpec.from_dict(e["spec"]) if e.get("spec") else None for e in entries]
            space = SpaceConfig.from_dict(cfg["space"])
            input_size = tuple(int(n) for n in cfg["input_size"])
            layers = cfg.get("stitching", {})
            lora_rank, lora_alpha = int(layers.get("lora_rank", 0)), float(layers.get("lora_alpha", 1.0))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{Path(directory) / CONFIG_NAME} is corrupt ({type(e).__name__}: {e}); "
                                  "restore it from a backup or save the network again") from e
        custom = [k for k, s in enumerate(specs) if s is None]
        if custom and anchors is None:
            raise CheckpointError(
                f"anchors {[entries[k]['label'] for k in custom]} were your own modules: pass them again "
                "with from_pretrained(directory, anchors=[...])")
        if anchors is not None and len(anchors) != len(entries):
            raise CheckpointError(f"the checkpoint holds {len(entries)} anchors, {len(anchors)} were given")
        parts = []
        for k, (entry, spec) in enumerate(zip(entries, specs)):
            if anchors is not None:
                module = anchors[k]
            else:  # random init: the weights come from the file below
                module = create_anchor(AnchorSpec(spec.name, False, None, spec.kwargs))
            parts.append(_split(module))
        net = cls(parts, labels, config=space, input_size=input_size, specs=specs, lora_rank=lora_rank,
                  lora_alpha=lora_alpha, route_mode=cfg.get("route_mode", "snnet"))
        net._load_saved(cfg, w_path, map_location)
        return net


# The keys every stitched network's config.json holds, whatever its kind (config_dict: an image network's, a language
# model's): what tells a network snnet saved from another program's config.json (a Hugging Face model's has none of
# them; one stitch exported alone has no space), without reading the weights beside it.
SAVED_NETWORK_KEYS = ("format", "anchors", "space", "stitches")


def is_saved_network(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds the config.json of a stitched network snnet saved (:data:`SAVED_NETWORK_KEYS`)."""
    cfg = read_object(Path(directory) / CONFIG_NAME)
    return cfg is not None and all(key in cfg for key in SAVED_NETWORK_KEYS)


def _check_overwrite(directory: Path, kind: str, what: str) -> None:
    """Refuse a folder whose config.json is not a saved network of this kind: a save replaces config.json and
    model.safetensors, which there are something else's (a Hugging Face model, an exported stitch, another
    kind of stitched network), and the user's files were overwritten without a word."""
    cfg = directory / CONFIG_NAME
    if not cfg.is_file():
        return
    found = (read_object(cfg) or {}).get("format")
    if found != kind:
        held = f"a {found!r} config" if isinstance(found, str) else f"a {CONFIG_NAME} that snnet did not write"
        raise CheckpointError(f"cannot save to {directory}: it holds {held}, not a saved {what}'s, which the save would "
                              f"overwrite (with its {WEIGHTS_NAME}); choose another folder, or delete them if they are "
                              "not needed")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (a tied LM head): give the repeats their own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _not_a_network(path: Path, kind: object = None, what: str = "stitched network") -> str:
    """Why ``path`` is not a folder written by :meth:`StitchedNet.save_pretrained`, and where its network is
    when it is something else snnet wrote (a run folder, a checkpoint, one exported stitch)."""
    from .checkpoint import CHECKPOINT_NAME
    from .deploy.export import STITCH_FORMAT

    start = f"{path} is not a saved {what}"
    needs = f"give a folder with {CONFIG_NAME} and {WEIGHTS_NAME} (save_pretrained; `snnet train` writes RUN/final)"
    if kind == STITCH_FORMAT:
        return (f"{start}: it holds one stitch exported alone (`snnet export`), which snnet.deploy.load_stitch loads; "
                "give the stitched network it was exported from")
    if kind is not None:
        return f"{start}: its {CONFIG_NAME} describes a {kind!r}; {needs}"
    if path.is_file():
        what = "a training checkpoint (its run's network is in the run's final/ folder)" \
            if path.name == CHECKPOINT_NAME else "a file"
        return f"{start} but {what}; {needs}"
    if (path / "final" / CONFIG_NAME).is_file():
        return f"{start} but a training run's folder: its network is {path / 'final'}"
    if (path / CHECKPOINT_NAME).is_file():
        return f"{start} but the folder of a training run that has not finished: resume it to get its network (final/)"
    if not path.exists():
        return f"{start}: it does not exist; {needs}"
    return f"{start}: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"


def check_has_weights(net: nn.Module, what: str) -> None:
    """Refuse to run a network built on the meta device (``create_snnet(device="meta")``: enough to list and price
    its space), which holds no weights: torch failed deep inside ("Cannot copy out of meta tensor", "Tensor.item()
    cannot be called on meta tensors")."""
    if any(p.is_meta for p in net.parameters()):
        raise ConfigError(f"cannot run {what}: the network is on the meta device, which holds no weights (it lists and "
                          "prices the space only); build it without device='meta', or load weights into it first")


def calibration_images(net: nn.Module, batches: Iterable[Any], max_images: int, desc: str, progress: bool = False,
                       min_batch: int = 1) -> Iterator[torch.Tensor]:
    """The images of ``batches`` (tensors or ``(images, labels)``) on the network's device and in its dtype, at
    most ``max_images`` in all, while the network is in eval mode (its mode is restored after);
    batches smaller than ``min_batch`` are skipped. Shows progress. Images that are no float tensors, or
    have another number of channels than the network takes, are refused in one line."""
    first = next(net.parameters())
    device, dtype = first.device, first.dtype
    channels = (getattr(net, "input_size", None) or (None,))[0]
    check_has_weights(net, desc)  # before the loader is read
    was_training = net.training
    net.eval()
    seen = 0
    bar = report_progress(max_images, desc, "img", progress)
    try:
        for batch in batches:
            if max_images - seen < max(min_batch, 1):  # what is left fits no batch: skipping them read the whole loader
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            # as evaluate reads them: float64 (numpy's default) images are cast, where they stopped at the first
            # layer with torch's "Input type (double) and bias type (float) should be the same"
            if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
                got = f"tensors of {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise SnnetError(f"{desc}: images must be float tensors, normalised as the network expects, but came "
                                 f"as {got}: convert them (e.g. torchvision's ToTensor and the anchors' Normalize)")
            if channels is not None and (x.ndim != 4 or x.shape[1] != channels):
                raise SnnetError(f"{desc}: images of shape {tuple(x.shape[1:])} do not fit this network, which takes "
                                 f"{tuple(net.input_size)} (channels, height, width): use the data it was trained on")
            x = x[: max_images - seen].to(device, dtype)
            if len(x) < max(min_batch, 1):
                continue
            yield x
            seen += len(x)
            bar.update(len(x))
    finally:
        net.train(was_training)
        bar.close()


def expand_family(name: str) -> list[str]:
    """A family name (``"swin"``) as its anchors' model names; a comma list as its names."""
    from .adapters import FAMILIES, family

    names = family(name)
    if names is not None:
        return names
    names = [n.strip() for n in name.split(",") if n.strip()]
    if len(names) < 2:
        raise NotStitchableError(
            f"{name!r} is neither a family ({', '.join(FAMILIES)}) nor a list of at least two model names")
    return names


def _split(module: nn.Module | AnchorParts) -> AnchorParts:
    from .anchors import split_model

    return split_model(module)


def _common_input_size(anchors: Sequence[AnchorParts], labels: Sequence[str]) -> tuple[int, ...]:
    sizes = {lab: tuple(p.data_config.get("input_size", ())) for p, lab in zip(anchors, labels)}
    known = {s for s in sizes.values() if s}
    if not known:
        raise NotStitchableError("the anchors do not say their input size: give create_snnet img_size=H (or StitchedNet "
                                 "input_size=(C, H, W))")
    if len(known) > 1:
        raise NotStitchableError(
            f"anchors expect different input sizes {sizes}; stitching needs one input for all: "
            "build them at one img_size (create_snnet's img_size=H, or StitchedNet's input_size=(C, H, W))")
    return known.pop()


def _probe(parts: AnchorParts, label: str, input_size: tuple[int, ...]) -> tuple[list[ActivationSpec], int]:
    try:
        return parts.probe(input_size)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise NotStitchableError(f"anchor {label!r} cannot take an input of size {tuple(input_size)}: {e}") from e


def create_snnet(
    anchors: Sequence[AnchorLike],
    *,
    pretrained: bool = False,
    files: Sequence[str | None] | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    labels: Sequence[str] | None = None,
    kernel_size: int = 2,
    stride: int = 1,
    nearest: bool = True,
    stages: Sequence[int] | None = None,
    rule: str | None = None,
    unpaired: str = "reference",
    two_way: bool = False,
    chains: bool = False,
    routes: Sequence[str] | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 1.0,
    route_mode: str = "snnet",
    cut: str = "block",
    device: str | torch.device | None = None,
) -> StitchedNet:
    """Stitch a family of anchors into one switchable network.

    ``anchors`` are timm model names (snnet's shipped ``fmnist-vit-*`` included), the name of
    a family in :data:`snnet.adapters.FAMILIES` (``"deit"``, ``"swin"``, ``"resnet"``, ...), or
    your own modules of a kind an adapter knows. Names get weights from the internet with
    ``pretrained=True``, from local files with ``files=[...]`` (one per anchor, through
    timm's pretrained path), or random init for planning. ``device="meta"`` builds the
    network without allocating weights: enough to enumerate and price the space instantly.

    SN-Netv2 and KLAS options (see :mod:`snnet.space`): ``two_way=True`` for SN-Netv2's space
    (S->L, L->S and the round trips), ``chains=True`` for three-anchor routes, ``routes=[...]``
    for an explicit list of stitches (e.g. :func:`snnet.klas.select_klas`'s), and
    ``lora_rank=r`` for low-rank stitching layers (0: full layers, SN-Net's). ``cut="sublayer"`` cuts
    ViT anchors between each block's attention and MLP too (twice the cut points; route indices then
    count sublayers, two a block).

    ``route_mode="reference"`` runs the stitched routes exactly as the authors' code does (its DeiT
    code ends them without the target's final LayerNorm; snnet's default, ``"snnet"``, ends every
    route with its last anchor's own tail): what ``snnet convert --from-reference`` sets, so a
    converted network's networks are the paper's.
    """
    for name, value in (("img_size", img_size), ("num_classes", num_classes)):
        if value is not None and value < 1:  # timm would build a headless or empty model, or fail deep inside
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if device is not None and torch.device(device).type == "meta":
        if pretrained or files:
            raise ValueError("a network on the meta device holds no weights: drop pretrained/files")
        with torch.device("meta"):
            return create_snnet(anchors, img_size=img_size, num_classes=num_classes, labels=labels,
                                kernel_size=kernel_size, stride=stride, nearest=nearest, stages=stages, rule=rule,
                                unpaired=unpaired, two_way=two_way, chains=chains, routes=routes, lora_rank=lora_rank,
                                lora_alpha=lora_alpha, route_mode=route_mode, cut=cut)
    if isinstance(anchors, str):
        anchors = expand_family(anchors)
    config = SpaceConfig(kernel_size, stride, nearest, stages, rule, unpaired, two_way, chains, routes, cut=cut)  # it makes lists tuples
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    parts, specs = build_parts(anchors, pretrained=pretrained, files=files, model_kwargs=kwargs)
    if labels is None:
        labels = [anchor_label(a, k) for k, a in enumerate(anchors)]
    input_size = None
    if img_size is not None:
        chans = parts[0].data_config.get("input_size", (3,))[0]
        input_size = (chans, img_size, img_size)
    net = StitchedNet(parts, labels, config=config, input_size=input_size, specs=specs, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, route_mode=route_mode)
    return net.to(device) if device is not None else net


def anchor_specs(names: Sequence[str], pretrained: bool | None = None, files: Sequence[str] | None = None,
                 kwargs: tuple[tuple[str, Any], ...] = (),
                 each: Sequence[tuple[tuple[str, Any], ...]] | None = None) -> list[AnchorSpec]:
    """One :class:`AnchorSpec` per model name: snnet's shipped fmnist weights load by default, timm's
    download with ``pretrained=True``, local ``files`` (one per name) load from disk. Every anchor is
    built with ``kwargs``, or anchor ``k`` with ``each[k]`` (e.g. a drop-path rate per anchor)."""
    from .pretrained import FMNIST_FAMILY, normalize_name

    specs = []
    for k, name in enumerate(names):
        shipped = normalize_name(name).partition(".")[0] in FMNIST_FAMILY
        want = pretrained if pretrained is not None else shipped
        specs.append(AnchorSpec(name, want and not files, files[k] if files else None,
                                each[k] if each is not None else kwargs))
    return specs


# the settings of SN-Net's rules a saved network's space was built with (SpaceConfig.to_dict keeps them)
_RULE_SETTINGS = ("kernel_size", "stride", "nearest", "stages", "rule", "unpaired")


def saved_network(cls: type[StitchedBase], folder: str, space: SpaceConfig) -> StitchedBase:
    """The network saved in ``folder`` (``model.init``), to train further: its stitch space is fixed, so
    space options are refused; a new stitching-layer rank keeps the saved layers' map (merged if 0)."""
    if space.two_way or space.routes is not None or space.chains or space.cut != "block":
        raise ConfigError("model.init starts from a saved network, whose stitch space is fixed: drop the "
                          "space options (two_way, chains, routes, cut)")
    net = cls.from_pretrained(folder)  # type: ignore[attr-defined]
    # SN-Net's own rules too: a setting the user changed (not the default) that the saved space was not built
    # with was dropped without a word (--space.stride 2 trained the saved stride-1 space, recorded as stride 2)
    default, saved = SpaceConfig(), net.space.config
    changed = [f"space.{k}={getattr(space, k)!r} (it was built with {getattr(saved, k)!r})" for k in _RULE_SETTINGS
               if getattr(space, k) != getattr(default, k) and getattr(space, k) != getattr(saved, k)]
    if changed:
        raise ConfigError(f"model.init starts from a saved network, whose stitch space is fixed: drop {', '.join(changed)}")
    if space.lora_rank is not None and (space.lora_rank, space.lora_alpha) != (net.lora_rank, net.lora_alpha):
        net.set_lora_rank(space.lora_rank, space.lora_alpha)
    return net


def network_from_config(model: ModelConfig, space: SpaceConfig) -> StitchedNet:
    """The stitched network a training configuration names: its ``model.init`` folder, or its anchors
    (with their weights, heads and drop-path) stitched into ``space``.

    Anchors that snnet cannot split fail before anything is downloaded."""
    if model.init is not None:
        # a new head asked for was dropped without a word (a 5-class dataset then trained the saved 10-class head);
        # model.weights beside model.init is refused by ModelConfig itself
        net = saved_network(StitchedNet, model.init, space)
        if model.num_classes is not None and model.num_classes != net.num_classes:
            raise ConfigError(f"model.num_classes={model.num_classes} gives anchors built by name a new head; the network "
                              f"of model.init predicts {net.num_classes} classes and keeps its heads: drop one of them")
        return net  # type: ignore[return-value]
    names = expand_family(model.anchors)
    files = list(model.weights) if model.weights else None
    if files is not None and len(files) != len(names):
        raise ConfigError(f"model.weights gives {len(files)} files for {len(names)} anchors; give one per anchor")
    each = [model.anchor_kwargs(k, len(names)) for k in range(len(names))]  # a drop-path rate per anchor, or one
    specs = anchor_specs(names, model.pretrained, files, each=each)
    if any(s.pretrained for s in specs):  # anchors snnet cannot split fail here, before any download
        create_snnet([s.name for s in specs], num_classes=model.num_classes, device="meta")
    return create_snnet(specs, **space_options(space))


def space_options(space: SpaceConfig) -> dict[str, Any]:
    """:func:`create_snnet`'s keyword arguments for the stitch space (and stitching layers) ``space`` names."""
    return {"kernel_size": space.kernel_size, "stride": space.stride, "nearest": space.nearest, "stages": space.stages,
            "rule": space.rule, "unpaired": space.unpaired, "two_way": space.two_way, "chains": space.chains,
            "routes": space.routes, "lora_rank": space.lora_rank or 0, "lora_alpha": space.lora_alpha, "cut": space.cut}
