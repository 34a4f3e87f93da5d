"""The served network: its ladder of stitches, latency table and controller, the batcher and the metrics."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ...model import StitchedNet
from ...results import merge_rows, read_rows
from ..controller import ControllerConfig, LatencyTable, Rung, StitchController, ladder
from ..profiling import profile
from .batcher import Batcher
from .config import ServeConfig, log
from .images import Preprocess, decode_image
from .metrics import Metrics

__all__ = ["Service"]


class Service:
    """The network, its ladder, latency table and controller, the batcher and the metrics."""

    def __init__(self, config: ServeConfig, net: StitchedNet, rows: Sequence[dict[str, Any]]) -> None:
        self.config = config
        self.net = net.eval()
        self.rows = {int(r["id"]): r for r in rows}
        self.input_size = tuple(net.input_size)
        self.preprocess = Preprocess(net.anchors[0].data_config, self.input_size)
        table = LatencyTable.from_rows(rows)
        self.controller = StitchController(ladder(rows), table, ControllerConfig(config.slo_ms, config.max_batch, up_after=config.up_after))
        if config.stitch not in (None, "auto"):
            self.pin(config.stitch)
        self.metrics = Metrics()
        self.batcher = Batcher(self)

    @classmethod
    def load(cls, config: ServeConfig, say: Callable[[str], Any] = log.info) -> "Service":
        """Load the network and results; profile at start the stitches to serve that the results
        hold no latency table for (at batch sizes 1, 2, 4, ... up to ``max_batch``), saying so."""
        torch.set_num_threads(config.threads)
        net = StitchedNet.from_pretrained(config.model).eval()
        rows = [c.to_dict() for c in net.costs()]
        if config.results is not None:
            rows = merge_rows(rows, read_rows(config.results), "the results")
        table = LatencyTable.from_rows(rows)
        todo = [r.id for r in ladder(rows) if r.id not in table or len(table.batch_sizes(r.id)) < 2]
        if todo:
            sizes = sorted({min(2 ** k, config.max_batch) for k in range(int(math.log2(config.max_batch)) + 2)})
            say(f"profiling {len(todo)} stitches at batch sizes {sizes} ({config.threads} threads): "
                f"{config.results or 'no results file'} has no latency_by_batch for them (`snnet profile --batch-sizes` writes it)")
            measured, settings = profile(net, batch_size=1, warmup=3, repeats=config.profile_repeats, device="cpu",
                                         threads=config.threads, stitches=todo, progress=False, batch_sizes=sizes)
            extra = [dict(r.to_dict(), profile=settings.to_dict()) for r in measured]
            rows = merge_rows(rows, extra, "the profile")
        return cls(config, net, rows)

    def rung(self, key: int | str) -> Rung:
        """Any stitch of the network as a :class:`Rung` (raises StitchNotFoundError)."""
        s = self.net.stitch(int(key) if isinstance(key, str) and key.strip().isdigit() else key)
        r = self.rows[s.id]
        return Rung(s.id, s.name, int(r["flops"]), r.get("acc1"))

    def pin(self, key: int | str) -> None:
        self.controller.pin(self.rung(key))

    def forward(self, stitch: int, x: torch.Tensor) -> torch.Tensor:
        """Run one batch on one stitch (on the worker thread: the only place that selects)."""
        with torch.inference_mode():
            self.net.select(stitch)
            return self.net(x).float().softmax(-1)

    def decode(self, blobs: Sequence[bytes]) -> torch.Tensor:
        c = self.config
        return self.preprocess([decode_image(b, self.input_size, resize=c.resize, max_pixels=c.max_pixels) for b in blobs])

