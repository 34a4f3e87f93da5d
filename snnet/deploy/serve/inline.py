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

The forward is the model process's (``net.select``, forward, softmax under
``torch.inference_mode``) on a copy of the network this process loads at start, with one torch
thread; it is loaded only when some stitch of the ladder is short enough to run inline, so a
network whose one-image forward takes hundreds of milliseconds (DeiT-B at 224x224) costs no second
copy. Afterwards the model process is told (``("inline", ...)``): its policy sees the arrival and
the latency as a batch's, and decides as after a batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..controller import Decision, LatencyTable, ladder
from .batcher import BatchResult, Batcher
from .config import ServeConfig, log
from .engine import BatchInfo, EngineInfo, probabilities

__all__ = ["InlineModel"]

REASON = "inline: the model process had nothing to do, so the server process ran the request"


@dataclass(frozen=True)
class _Rung:
    name: str
    predicted_ms: float


class InlineModel:
    """The network in a server process, for lone requests (see the module)."""

    def __init__(self, net: Any, config: ServeConfig, rungs: dict[int, _Rung]) -> None:
        self.net = net
        self.max_images = config.inline_max_images
        self.rungs = rungs  # the stitches short enough to run inline, by id
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
        probs = probabilities(self.net, decision.stitch, torch.from_numpy(x))
        ms = (time.perf_counter() - t0) * 1e3
        return BatchResult(probs, BatchInfo(0, len(x), ms, decision, 0, 1.0, True))
