"""Latency and peak memory of every stitch, measured on this device.

:func:`profile` times every stitch's forward (median and p90 after warm-up) and measures its peak
memory, as result rows (:class:`~snnet.results.Row`); :func:`merge_profile` adds the figures to rows
holding FLOPs, params and accuracy, so budgets in milliseconds or megabytes can be met (:mod:`snnet.budget`).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn

from ..budget import MB
from ..errors import SnnetError
from ..report import percentile
from ..report import progress as report_progress
from ..results import BatchLatency, Row, merge_rows, network_rows, read_rows
from ..space import Stitch
from .export import _route_view, route_bytes
from .memory import check_input

if TYPE_CHECKING:
    from ..model import StitchedNet

__all__ = ["BatchLatency", "ProfileResult", "ProfileSettings", "check_base", "merge_profile", "profile"]


# A profile's row: a :class:`~snnet.results.Row` with latency_ms (median), latency_p90_ms, peak_mem_mb
# and, when several batch sizes were asked for, latency_by_batch set, and the settings in extra["profile"].
# The name is kept for the public import ``snnet.deploy.ProfileResult``.
ProfileResult = Row


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile was measured; stored with every row so numbers are never read out of context."""

    device: str
    batch_size: int  # of latency_ms, latency_p90_ms and peak_mem_mb
    input_size: tuple[int, ...]
    threads: int | None
    warmup: int
    repeats: int
    memory: str  # how peak_mem_mb was measured
    batch_sizes: tuple[int, ...] = ()  # of latency_by_batch (empty: only batch_size was measured)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), input_size=list(self.input_size), batch_sizes=list(self.batch_sizes))


class _LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the bytes of tensor storages created by ops and still alive, and their peak.

    Every op's outputs are recorded by storage (views share their base's storage, so they
    add nothing); a storage is released when the last tensor seen using it is garbage
    collected. Storages that existed before (weights, the input) are excluded. What this does
    not see: scratch memory inside a kernel (e.g. a fused attention's workspace) and the
    allocator's rounding and caching, so it is a lower bound of the process's real growth.
    """

    def __init__(self, exclude: Iterable[int]) -> None:
        super().__init__()
        self.exclude = set(exclude)
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude or st.nbytes() == 0:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)


def _peak_activation_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of intermediate tensors alive during one forward (beyond weights and input)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        net(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    exclude = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers()) + [x]}
    with _LiveTensors(exclude) as mode:
        net(x)
    return mode.peak


def _timed(net: nn.Module, x: torch.Tensor, warmup: int, repeats: int, sync: Any) -> list[float]:
    """Milliseconds of ``repeats`` forwards of ``x`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        net(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        net(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile(
    net: "StitchedNet",
    batch_size: int = 1,
    input_size: Sequence[int] | None = None,
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device | None = None,
    threads: int | None = None,
    stitches: Sequence[int | str | Stitch] | None = None,
    progress: bool = True,
    batch_sizes: Sequence[int] | None = None,
) -> tuple[list[Row], ProfileSettings]:
    """Measure latency and peak memory of every stitch (or of ``stitches``) on one device.

    Each stitch is selected and run ``warmup`` times, then timed over ``repeats`` forwards
    under ``torch.inference_mode`` on a random batch (CUDA is synchronised around each one).
    ``threads`` sets torch's CPU threads for the run. ``device`` moves the network there.
    ``batch_sizes`` also times every stitch at each of these batch sizes (and ``batch_size``),
    into each row's ``latency_by_batch``: a server batches requests, and a stitch's cost grows
    with the batch at a rate of its own (fixed per-call overhead dominates small batches).

    Peak memory (MiB) = the route's weight bytes + the input batch + the peak of intermediate
    tensors alive during one forward: on CUDA from the allocator's peak statistics (above
    what was allocated before the forward), on CPU by tracking every tensor ops create until
    it is freed (:class:`_LiveTensors`). It is what this stitch alone needs, not the whole
    stitched network (whose other anchors are resident too).
    """
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise SnnetError(f"need batch_size >= 1, warmup >= 0 and repeats >= 1 (got {batch_size}, {warmup}, {repeats})")
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cpus:
        raise SnnetError(f"--threads must be between 1 and this machine's {cpus} CPUs, got {threads}")
    if batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1):
        raise SnnetError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    sizes = tuple(sorted(set(batch_sizes) | {batch_size})) if batch_sizes is not None else ()
    chosen = sorted({net.space[k].id for k in stitches}) if stitches is not None else [s.id for s in net.space]
    size = tuple(input_size) if input_size is not None else tuple(net.input_size)
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    check_input(net, sizes or (batch_size,), size, chosen, dev)  # a size it cannot take, a batch too big: now
    net.to(dev)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, *size, generator=gen).to(dev) for b in sizes or (batch_size,)}
    x = inputs[batch_size]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    active, was_training, old_threads = net.active, net.training, torch.get_num_threads()
    settings = ProfileSettings(str(dev), batch_size, size, threads if threads is not None else old_threads, warmup, repeats,
                               "cuda allocator peak" if dev.type == "cuda" else "live tensor bytes (torch dispatch)", sizes)
    costs = net.costs(size)
    bar = report_progress(len(chosen), f"profile on {dev}", "stitch", progress)
    out = []
    net.eval()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            for k in chosen:
                s = net.select(k)
                by_batch = {b: _timed(net, xb, warmup, repeats, sync) for b, xb in inputs.items()}
                times = by_batch[batch_size]
                act = _peak_activation_bytes(net, x)
                mem = (route_bytes(_route_view(net, s)) + x.numel() * x.element_size() + act) / MB
                table = tuple(BatchLatency(b, percentile(t, 0.5), percentile(t, 0.9)) for b, t in by_batch.items()) if sizes else None
                out.append(Row(s.id, s.name, costs[s.id].flops, costs[s.id].params, is_anchor=s.is_anchor,
                               latency_ms=percentile(times, 0.5), latency_p90_ms=percentile(times, 0.9), peak_mem_mb=mem,
                               latency_by_batch=table, extra={"profile": settings.to_dict()}))
                bar.update(1)
    finally:
        torch.set_num_threads(old_threads)
        net.select(active)
        net.train(was_training)
        bar.close()
    return out, settings


def merge_profile(rows: Sequence[Any] | str | os.PathLike | None, costs: Sequence[Any],
                  measured: Sequence[Row]) -> list[Row]:
    """Result rows with the profile added: ``rows`` (e.g. from ``snnet eval``) when given, else
    ``costs`` rows (id/name/flops/params, accuracy unmeasured). Each profiled row gets ``latency_ms``,
    ``latency_p90_ms``, ``peak_mem_mb`` (``latency_by_batch``) and the ``profile`` settings."""
    base = read_rows(rows if rows is not None else costs)
    check_base(base, measured)
    return merge_rows(base, measured, "the results")


def check_base(rows: Sequence[Any] | str | os.PathLike | None, stitches: Iterable[Row | Stitch]) -> None:
    """Refuse results ``rows`` that a profile of ``stitches`` (rows or stitches: id and name) cannot be added to
    (:func:`merge_profile`), before any is measured: ``snnet profile`` checked only after timing every
    stitch, and so lost that time."""
    if rows is None:
        return
    base = {r.id: r for r in network_rows(read_rows(rows))}
    for s in stitches:
        if s.id not in base:
            held = ",".join(str(i) for i in sorted(base))
            raise SnnetError(f"the results hold {len(base)} stitches of this network but not {s.name!r} (id {s.id}): "
                             f"profile only the stitches they hold (--stitches {held}), or evaluate every stitch into them first")
        if base[s.id].name != s.name:
            raise SnnetError(f"the results do not belong to this network: stitch {s.id} is {s.name!r} here but "
                             f"{base[s.id].name!r} there. Use the results written for this network.")
