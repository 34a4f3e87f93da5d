"""Prometheus metrics of one server process, or of all of them under ``--workers``.

Requests, refusals and latencies are counted where the request is answered (the server
process). What a batch did (its size, model time, the stitch, switches) happens in the model
process and is recorded here from each batch's ``done`` message: by every server process for its
own images, and once per batch (by the process that had the batch's first request) for the
batch's own figures, so that sums over server processes count each batch once.

In one process the metrics live in this server's own registry. Under ``uvicorn --workers N``
(``PROMETHEUS_MULTIPROC_DIR`` set, as ``snnet serve --workers`` does) every process writes its
values to that folder and ``/metrics`` reports all of them, whichever worker answers: counters
and histograms summed, the images held summed, the stitch in use as the most recent value.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import BatchInfo

__all__ = ["Metrics"]

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Prometheus metrics of one server process (see the module)."""

    def __init__(self) -> None:
        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        reg: CollectorRegistry | None = self.registry
        if multiproc:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            reg = None  # values go to the shared folder; the collector reads them all
        self.requests = Counter("snnet_requests", "Requests answered, by HTTP status", ["code"], registry=reg)
        self.rejected = Counter("snnet_rejected", "Requests refused, by reason", ["reason"], registry=reg)
        self.images = Counter("snnet_images", "Images classified, by the stitch that served them", ["stitch"], registry=reg)
        self.latency = Histogram("snnet_request_latency_seconds", "End-to-end latency of answered predictions (arrival to result)",
                                 buckets=_SECONDS, registry=reg)
        self.before_ring = Histogram("snnet_before_ring_seconds", "Arrival (first bytes read) to the input ring of requests the "
                                     "model process ran: reading, parsing, decoding and the wait for this process's event loop",
                                     buckets=_SECONDS, registry=reg)
        self.batch_seconds = Histogram("snnet_batch_seconds", "Model time per batch", buckets=_SECONDS, registry=reg)
        self.batch_size = Histogram("snnet_batch_size", "Images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                                    registry=reg)
        self.queue = Gauge("snnet_queue_depth", "Images held: decoded and waiting for their batch, or in it",
                           registry=reg, multiprocess_mode="livesum")
        self.stitch = Gauge("snnet_stitch_id", "Id of the stitch that ran the last batch", registry=reg,
                            multiprocess_mode="livemostrecent")
        self.pinned = Gauge("snnet_stitch_pinned", "1 when the stitch is pinned, 0 when chosen automatically", registry=reg,
                            multiprocess_mode="livemostrecent")
        self.switches = Counter("snnet_stitch_switches", "Batches served by another stitch than the batch before", registry=reg)
        self.inline = Counter("snnet_inline_requests", "Requests the server process ran itself, the model process being idle "
                              "(the latency path; also counted in snnet_images)", registry=reg)
        self.inline_seconds = Histogram("snnet_inline_seconds", "Model time of requests run in the server process",
                                        buckets=_SECONDS, registry=reg)
        self.slowdown = Gauge("snnet_latency_table_slowdown", "Measured batch time over the latency table's", registry=reg,
                              multiprocess_mode="livemostrecent")

    def batch(self, info: BatchInfo, images: int) -> None:
        """A batch that served ``images`` of this process's images (see the module for who counts what)."""
        self._served(info, images)
        self.slowdown.set(info.slowdown)
        if info.lead:
            self.batch_seconds.observe(info.compute_ms / 1e3)
            self.batch_size.observe(info.size)
            self.switches.inc(info.decision.switched)

    def ran_inline(self, info: BatchInfo) -> None:
        """A request this process ran itself (:mod:`.inline`)."""
        self._served(info, info.size)
        self.inline.inc()
        self.inline_seconds.observe(info.compute_ms / 1e3)

    def _served(self, info: BatchInfo, images: int) -> None:
        d = info.decision
        self.images.labels(d.name).inc(images)
        self.stitch.set(d.stitch)
        self.pinned.set(1 if d.pinned else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
