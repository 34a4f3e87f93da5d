"""The latency path: a lone small request runs in the server process, with no hand-off.

Batching in the model process (:mod:`.engine`) costs every request two hand-offs between
processes (server -> model process -> server), each a wake-up of a process sleeping on another
CPU: about 0.5 ms on this machine, twice what a bare endpoint on the same HTTP stack takes to
answer (docs/serving.md, "overhead"). Under load the hand-offs are shared by a batch and hidden
behind the model's work; for a request alone they are most of its overhead.

So a server process runs a request itself when all of these hold:

* it carries at most ``inline_max_images`` images (``--inline-max-images``; 0 turns the path off);
* nothing waits: the model process published nothing queued or running (from any server
  process: :class:`~.engine.RingState`), none of this process's requests waits for it, and no
  other request is being handled here (checked after one turn of the event loop, so requests that
  arrived meanwhile are counted: under concurrent load every request goes through the model
  process and its batches);
* the stitch the model process would serve now (its published pinned stitch or the policy's
  current rung, so the two never disagree) takes at most ``inline_max_ms`` for that many images
  by the latency table (``--inline-max-ms``, default 5 ms): the forward holds this process's
  event loop, so only short ones run here.

The forward runs on a copy of the network this process loads at start, with one torch thread;
it is loaded only when some stitch of the ladder is short enough to run inline, so a network whose
one-image forward takes hundreds of milliseconds (DeiT-B at 224x224) costs no second copy. A
stitch run here becomes a graph traced from its route after its first answer (:class:`RouteGraphs`): at one image a small
network's eager forward is mostly Python (module calls, dispatch: 0.58 ms for the shipped Ti
against 0.27 ms traced, ``benchmarks/bench_cold_forward.py``), and a request alone is where that
shows. Afterwards the model process is told (``("inline", ...)``): its policy sees the arrival and
the latency as a batch's, and decides as after a batch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..controller import Decision, LatencyTable, ladder
from .batcher import BatchResult, Batcher
from .config import ServeConfig, log
from .engine import BatchInfo, EngineInfo, probabilities

__all__ = ["InlineModel", "RouteGraphs"]

REASON = "inline: the model process had nothing to do, so the server process ran the request"


@dataclass(frozen=True)
class _Rung:
    name: str
    predicted_ms: float


class RouteGraphs:
    """The served forward of a network's stitches, each as a TorchScript graph traced from its route.

    Tracing runs the route once and records its tensor operations; calling the graph runs them
    without the modules' Python (``nn.Module`` calls, hooks, argument handling), which is most of a
    one-image forward of a small network. A graph shares the network's parameters (no copy).

    A stitch is traced after its first request has been answered (:meth:`trace_pending`, ~0.2 s for
    the shipped family's, holding this process's event loop: once per stitch, when the process was
    idle enough to run a lone request; tracing every stitch at start would add seconds to it);
    until then it runs eager. A stitch whose trace fails, or whose graph does not give the eager
    forward's probabilities (to 1e-5) at one and at ``max_images`` images, stays eager, as does one
    whose graph ever raises. TorchScript is deprecated in favour of ``torch.compile`` and
    ``torch.export``; neither serves here (compile needs a C++ toolchain and seconds per graph on a
    CPU; an exported module runs slower than eager at this size), and eager is the fallback wherever
    tracing stops working."""

    def __init__(self, net: Any, max_images: int = 1) -> None:
        import torch

        self.net = net
        self.graphs: dict[int, Any] = {}
        self.pending: list[int] = []  # stitches served eager, to trace once idle
        self.eager: set[int] = set()  # stitches that failed to trace, or whose graph failed
        shape = tuple(int(v) for v in net.input_size)
        self.checks = [torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)) for n in sorted({1, max_images})]

    def probabilities(self, stitch: int, x: Any) -> np.ndarray:
        """As :func:`~.engine.probabilities` (softmax, float32 numpy), through the stitch's graph if it has one."""
        graph = self.graphs.get(stitch)
        if graph is not None:
            try:
                return probabilities(self.net, stitch, x, graph)
            except Exception:  # noqa: BLE001 - a graph that fails once serves no more; eager answers
                log.exception("the traced graph of stitch %d failed; it runs eager from now on", stitch)
                del self.graphs[stitch]
                self.eager.add(stitch)
        elif stitch not in self.eager and stitch not in self.pending:
            self.pending.append(stitch)
        return probabilities(self.net, stitch, x)

    def trace_pending(self) -> None:
        """Trace the stitches served eager so far (see the class)."""
        pending, self.pending = self.pending, []
        self.trace(*pending)

    def trace(self, *stitches: int) -> None:
        """Trace these stitches now (a stitch that fails stays eager)."""
        for stitch in stitches:
            t0 = time.perf_counter()
            graph = self._trace(stitch)
            if graph is None:
                self.eager.add(stitch)
            else:
                self.graphs[stitch] = graph
                log.info("stitch %d traced for the latency path in %.0f ms", stitch, (time.perf_counter() - t0) * 1e3)

    def _trace(self, stitch: int) -> Any | None:
        import torch

        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice and tracer warnings: the check below decides
                self.net.select(stitch)
                graph = torch.jit.trace(self.net, self.checks[0], check_trace=False)
                same = all(np.allclose(probabilities(self.net, stitch, x, graph), probabilities(self.net, stitch, x), atol=1e-5)
                           for x in self.checks)
        except Exception as e:  # noqa: BLE001 - any failure to trace leaves the stitch eager
            log.info("stitch %d runs eager on the latency path: tracing failed (%s: %s)", stitch, type(e).__name__, e)
            return None
        if not same:
            log.info("stitch %d runs eager on the latency path: its traced graph differs from the eager forward", stitch)
            return None
        return graph


class InlineModel:
    """The network in a server process, for lone requests (see the module)."""

    def __init__(self, net: Any, config: ServeConfig, rungs: dict[int, _Rung]) -> None:
        self.net = net
        self.max_images = config.inline_max_images
        self.rungs = rungs  # the stitches short enough to run inline, by id
        self.forwards = RouteGraphs(net, self.max_images)  # the forward of each stitch run here
        self.x = np.empty((self.max_images, *(int(v) for v in net.input_size)), np.float32)  # a request's decoded images

    @classmethod
    def load(cls, config: ServeConfig, info: EngineInfo) -> "InlineModel | None":
        """The latency path for ``config``, or None when it is off or no stitch of the network is
        short enough by the latency table (then no second copy of the network is loaded)."""
        if config.inline_max_images == 0:
            return None
        table = LatencyTable.from_rows(info.rows)
        names = {int(r.id): r.name for r in info.rows}  # type: ignore[arg-type]
        rungs = {s: _Rung(names[s], ms) for s in table.ms if (ms := table.predict(s, config.inline_max_images)) <= config.inline_max_ms}
        if not any(int(r.id) in rungs for r in ladder(info.rows)):  # type: ignore[arg-type]
            log.info("no stitch on the ladder runs %d image(s) within %g ms (--inline-max-ms): every request goes through "
                     "the model process", config.inline_max_images, config.inline_max_ms)
            return None
        import torch

        from ...model import StitchedNet

        torch.set_num_threads(1)  # this process's own work stays on one core; the model process has the other
        return cls(StitchedNet.from_pretrained(config.model).eval(), config, rungs)

    def choose(self, images: int, batcher: Batcher, handling: int) -> Decision | None:
        """The decision to run a request of ``images`` here now, or None (then it is batched).
        ``handling``: the requests this process is handling, this one included."""
        if images > self.max_images or handling > 1 or not batcher.idle:
            return None
        state = batcher.state
        rung = self.rungs.get(state.stitch)
        if rung is None:
            return None
        return Decision(state.stitch, rung.name, rung.predicted_ms, False, state.pinned, REASON)

    def run(self, x: np.ndarray, decision: Decision) -> BatchResult:
        """The probabilities of the images ``x`` (a view of :attr:`x`) on the decision's stitch."""
        import torch

        t0 = time.perf_counter()
        probs = self.forwards.probabilities(decision.stitch, torch.from_numpy(x))
        ms = (time.perf_counter() - t0) * 1e3
        return BatchResult(probs, BatchInfo(0, len(x), ms, decision, 0, 1.0, True))
