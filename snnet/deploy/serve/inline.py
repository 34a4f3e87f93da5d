"""The latency path: a lone small request runs in the server process, with no hand-off.

Batching in the model process (:mod:`.engine`) costs every request two hand-offs between
processes (server -> model process -> server), each a wake-up of a process sleeping on another
CPU: about 0.5 ms on this machine, twice what a bare endpoint on the same HTTP stack takes to
answer (docs/serving.md, "overhead"). Under load the hand-offs are shared by a batch and hidden
behind the model's work; for a request alone they are most of its overhead.

So a server process runs a request itself when all of these hold:

* it carries at most ``inline_max_images`` images (``--inline-max-images``; 0 turns the path off);
* nothing waits: the model process published nothing queued or running (from any server
  process: :class:`~.engine.RingState`), none of this process's requests waits for it, no other
  request is being handled here and none other has been read whole (:class:`~.upstream.Upstream`:
  uvicorn's protocol counts a request as soon as its body is in, before its handler starts), so
  under concurrent load every request goes through the model process and its batches. A request
  whose bytes are still in the kernel's buffers is not seen: it waits for this one forward (a
  few tenths of a millisecond; ``--inline-max-ms`` bounds it). A request that did not come
  through the stamping protocol (Ray Serve's proxy, the app under another server) has no such
  count, and takes one turn of the event loop first (~10 µs), after which the requests read
  meanwhile have started and count as handled;
* the stitch the model process would serve now (its published pinned stitch or the policy's
  current rung, so the two never disagree) takes at most ``inline_max_ms`` for that many images
  by the latency table (``--inline-max-ms``, default 5 ms): the forward holds this process's
  event loop, so only short ones run here.

The forward runs on a copy of the network this process loads at start, with one thread;
it is loaded only when some stitch of the ladder is short enough to run inline, so a network whose
one-image forward takes hundreds of milliseconds (DeiT-B at 224x224) costs no second copy. A
stitch run here is compiled from its route after its first answer (:class:`RouteGraphs`): an ONNX
Runtime session where onnxruntime is installed (``snnet[export]``), else a TorchScript graph. At one
image a small network's eager forward is mostly Python and dispatch (the shipped Ti: 0.58 ms eager,
0.27 ms as a TorchScript graph, 0.09 ms in ONNX Runtime; ``benchmarks/bench_cold_forward.py``), and
a request alone is where that shows. Afterwards the model process is told (``("inline", ...)``):
its policy sees the arrival and the latency as a batch's, and decides as after a batch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..controller import Decision, LatencyTable, ladder
from ..heap import refreeze
from .batcher import BatchResult, Batcher
from .config import ServeConfig, log
from .engine import BatchInfo, EngineInfo, probabilities

__all__ = ["RUNTIMES", "InlineModel", "OrtGraph", "RouteGraphs"]

REASON = "inline: the model process had nothing to do, so the server process ran the request"


@dataclass(frozen=True)
class _Rung:
    name: str
    predicted_ms: float


RUNTIMES = ("onnxruntime", "torchscript")  # what RouteGraphs compiles a stitch's route for, first choice first


class OrtGraph:
    """A stitch's route as an ONNX Runtime session on the CPU: a float32 array of images in, the
    served probabilities out. The softmax is in the graph and each array is bound once (below): no
    numpy or torch op on this path, whose dispatch is a good part of a one-image forward that
    follows HTTP work (``benchmarks/bench_cold_forward.py``, the shipped Ti after 0.4 ms asleep:
    0.080 ms this way, 0.105 with ``session.run`` and the softmax in numpy; B 0.236 against 0.276).
    The session holds its own copy of the stitch's
    weights (a TorchScript graph shares the network's): only stitches short enough to run inline
    get one."""

    MAX_BINDINGS = 16  # arrays bound at once; past that the oldest binding is dropped

    def __init__(self, model: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # this process's work stays on one core
        options.log_severity_level = 3  # errors only: a failed session raises, and RouteGraphs logs why
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input, self.output = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name
        self.classes = int(self.session.get_outputs()[0].shape[-1])
        # The server process decodes a request into the same buffer each time (InlineModel.x), so an
        # I/O binding made for that memory (its address and shape) and an output array of its own
        # serves every later request of that size: ``session.run``'s checks, dict and allocations are
        # the rest of a forward this small.
        self.bindings: dict[tuple[int, tuple[int, ...]], tuple[Any, np.ndarray]] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        key = (x.ctypes.data, x.shape)
        bound = self.bindings.get(key)
        if bound is None:
            if len(self.bindings) >= self.MAX_BINDINGS:
                del self.bindings[next(iter(self.bindings))]
            binding, out = self.session.io_binding(), np.empty((len(x), self.classes), np.float32)
            binding.bind_cpu_input(self.input, x)
            binding.bind_output(self.output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            bound = self.bindings[key] = (binding, out)
        # the binding reads whatever the array's memory holds at this run: the key says that memory is ``x``'s
        self.session.run_with_iobinding(bound[0])
        return bound[1].copy()  # the next run of this size overwrites the bound output


def _onnx(net: Any, example: Any) -> OrtGraph:
    """The network's selected route and the served softmax after it (:func:`~.engine.probabilities`)
    as an ONNX Runtime session, any number of images.

    torch's TorchScript-based exporter (``dynamo=False``) traces and writes it in ~0.1 s; the
    dynamo exporter that ``snnet export --format onnx`` uses takes 1.5-3 s a stitch, which here
    would hold the event loop. Deprecated upstream like TorchScript itself: if it goes, the export
    raises and the stitch runs as its TorchScript graph."""
    import io

    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).float().softmax(-1)

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(Probabilities(), (example,), buffer, dynamo=False, input_names=["x"], output_names=["probs"],
                          dynamic_axes={"x": {0: "images"}, "probs": {0: "images"}})
    return OrtGraph(buffer.getvalue())


class RouteGraphs:
    """The served forward of a network's stitches, each compiled from its route.

    Tracing runs the route once and records its tensor operations as a TorchScript graph; calling
    the graph runs them without the modules' Python (``nn.Module`` calls, hooks, argument
    handling), which is most of a one-image forward of a small network. Where onnxruntime is
    installed the graph is exported to ONNX and run by an ONNX Runtime session, whose per-operator
    cost is a fraction of TorchScript's (the shipped Ti at one image: 0.09 against 0.27 ms). The
    first of ``runtimes`` that works serves the stitch (:attr:`runtime` says which).

    A stitch is compiled after its first request has been answered (:meth:`trace_pending`, ~0.3 s
    for the shipped family's, the first ~1 s with the exporter's start-up, holding this process's event loop: once per stitch, when the process
    was idle enough to run a lone request; compiling every stitch at start would add seconds to
    it); until then it runs eager. A stitch whose compilation fails, or whose graph does not give
    the eager forward's probabilities (to 1e-5) at one and at ``max_images`` images, falls to the
    next runtime and at last stays eager, as does one whose graph ever raises. TorchScript is
    deprecated in favour of ``torch.compile`` and ``torch.export``; neither serves here (compile
    takes seconds per graph on a CPU; an exported program runs slower than eager at this size), and
    eager is the fallback wherever compiling stops working."""

    def __init__(self, net: Any, max_images: int = 1, runtimes: Sequence[str] = RUNTIMES) -> None:
        import torch

        unknown = set(runtimes) - set(RUNTIMES)
        if unknown:
            raise ValueError(f"unknown runtime(s) {sorted(unknown)}: use some of {RUNTIMES}")
        self.net = net
        self.runtimes = tuple(runtimes)
        self.graphs: dict[int, Callable[[np.ndarray], np.ndarray]] = {}  # stitch -> its compiled forward, images to probabilities
        self.runtime: dict[int, str] = {}  # the runtime of each stitch's graph
        self.pending: list[int] = []  # stitches served eager, to compile once idle
        self.eager: set[int] = set()  # stitches that failed to compile, or whose graph failed
        shape = tuple(int(v) for v in net.input_size)
        self.checks = [torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).numpy() for n in sorted({1, max_images})]

    def probabilities(self, stitch: int, x: np.ndarray) -> np.ndarray:
        """As :func:`~.engine.probabilities` (softmax, float32 numpy) of the float32 images ``x`` (numpy, as the server
        process decodes them: an ONNX Runtime graph takes them as they are), through the stitch's graph if it has one."""
        graph = self.graphs.get(stitch)
        if graph is not None:
            try:
                return graph(x)
            except Exception:  # noqa: BLE001 - a graph that fails once serves no more; eager answers
                log.exception("the %s graph of stitch %d failed; it runs eager from now on", self.runtime.get(stitch), stitch)
                del self.graphs[stitch]
                self.eager.add(stitch)
        elif stitch not in self.eager and stitch not in self.pending:
            self.pending.append(stitch)
        return self._eager(stitch, x)

    def _eager(self, stitch: int, x: np.ndarray, graph: Any = None) -> np.ndarray:
        import torch

        return probabilities(self.net, stitch, torch.from_numpy(x), graph)

    def trace_pending(self) -> None:
        """Compile the stitches served eager so far (see the class)."""
        pending, self.pending = self.pending, []
        self.trace(*pending)

    def trace(self, *stitches: int) -> None:
        """Compile these stitches now (a stitch that fails in every runtime stays eager)."""
        for stitch in stitches:
            t0 = time.perf_counter()
            compiled = self._compile(stitch)
            if compiled is None:
                self.eager.add(stitch)
            else:
                self.graphs[stitch], self.runtime[stitch] = compiled
                refreeze()  # the new graph and session out of full collections too, where the process froze its heap
                log.info("stitch %d compiled for the latency path (%s) in %.0f ms", stitch, compiled[1], (time.perf_counter() - t0) * 1e3)

    def _compile(self, stitch: int) -> tuple[Any, str] | None:
        import torch

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's and the exporter's deprecation notices, tracer warnings: the check decides
            example = torch.from_numpy(self.checks[0])
            for runtime in self.runtimes:
                try:  # a graph here is the stitch's served forward: images in, probabilities out
                    self.net.select(stitch)
                    if runtime == "torchscript":
                        graph = partial(self._eager, stitch, graph=torch.jit.trace(self.net, example, check_trace=False))
                    else:
                        graph = _onnx(self.net, example)
                    same = all(np.allclose(graph(x), self._eager(stitch, x), atol=1e-5) for x in self.checks)
                except Exception as e:  # noqa: BLE001 - a route that cannot be traced, onnxruntime missing, an operator it lacks: the next runtime
                    log.info("stitch %d: no %s graph for the latency path (%s: %s)", stitch, runtime, type(e).__name__, e)
                    continue
                if same:
                    return graph, runtime
                log.info("stitch %d: its %s graph differs from the eager forward; not used", stitch, runtime)
        log.info("stitch %d runs eager on the latency path", stitch)
        return None


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

    def choose(self, images: int, batcher: Batcher, handling: int, read: int = 1) -> Decision | None:
        """The decision to run a request of ``images`` here now, or None (then it is batched).
        ``handling``: the requests this process is handling, this one included; ``read``: those
        read whole and not yet in the ring or answered, this one included (:class:`~.upstream.Upstream`)."""
        if images > self.max_images or handling > 1 or read > 1 or not batcher.idle:
            return None
        state = batcher.state
        rung = self.rungs.get(state.stitch)
        if rung is None:
            return None
        return Decision(state.stitch, rung.name, rung.predicted_ms, False, state.pinned, REASON)

    def run(self, x: np.ndarray, decision: Decision) -> BatchResult:
        """The probabilities of the images ``x`` (a view of :attr:`x`) on the decision's stitch."""
        t0 = time.perf_counter()
        probs = self.forwards.probabilities(decision.stitch, x)
        ms = (time.perf_counter() - t0) * 1e3
        return BatchResult(probs, BatchInfo(0, len(x), ms, decision, 0, 1.0, True))
