"""Prometheus metrics of one server process (or of all worker processes, under ``--workers``)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Prometheus metrics of one server process.

    In a single process they live in this server's own registry. Under ``uvicorn --workers N``
    (``PROMETHEUS_MULTIPROC_DIR`` set, as ``snnet serve --workers`` does) every process writes
    its values to that folder and ``/metrics`` reports all of them, whichever worker answers:
    counters and histograms summed, gauges per process (``pid`` label) or summed (queue depth).
    """

    def __init__(self) -> None:
        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        reg: CollectorRegistry | None = self.registry
        if multiproc:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            reg = None  # values go to the shared folder; the collector reads them all
        seconds = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
        self.requests = Counter("snnet_requests", "Requests answered, by HTTP status", ["code"], registry=reg)
        self.rejected = Counter("snnet_rejected", "Requests refused, by reason", ["reason"], registry=reg)
        self.images = Counter("snnet_images", "Images classified, by the stitch that served them", ["stitch"], registry=reg)
        self.latency = Histogram("snnet_request_latency_seconds", "End-to-end latency of answered predictions (arrival to result)",
                                 buckets=seconds, registry=reg)
        self.batch_seconds = Histogram("snnet_batch_seconds", "Model time per batch", buckets=seconds, registry=reg)
        self.batch_size = Histogram("snnet_batch_size", "Images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        self.queue = Gauge("snnet_queue_depth", "Images waiting for a batch", registry=reg, multiprocess_mode="livesum")
        self.stitch = Gauge("snnet_stitch_id", "Id of the stitch that ran the last batch", registry=reg, multiprocess_mode="liveall")
        self.pinned = Gauge("snnet_stitch_pinned", "1 when the stitch is pinned, 0 when chosen automatically", registry=reg,
                            multiprocess_mode="liveall")
        self.switches = Counter("snnet_stitch_switches", "Batches served by another stitch than the batch before", registry=reg)
        self.slowdown = Gauge("snnet_latency_table_slowdown", "Measured batch time over the latency table's", registry=reg,
                              multiprocess_mode="liveall")

    def render(self) -> bytes:
        return generate_latest(self.registry)

