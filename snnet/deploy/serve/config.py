"""What ``snnet serve`` runs: the settings of one server, checked when they are made."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields

from ...errors import ServeError

__all__ = ["ENV_CONFIG", "ServeConfig", "log"]

ENV_CONFIG = "SNNET_SERVE_CONFIG"  # the config, as JSON, for worker processes that import the app
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream, one format


@dataclass(frozen=True)
class ServeConfig:
    """What ``snnet serve`` runs: the network, the SLO, batching and the limits on input."""

    model: str  # a folder written by StitchedNet.save_pretrained
    results: str | None = None  # results.json: top-1 (ranks the ladder) and latency_by_batch (the table)
    slo_ms: float = 50.0  # p95 end-to-end latency target
    max_batch: int = 16  # images per model batch; also the most images one request may carry
    max_wait_ms: float = 2.0  # how long a batch waits to fill after its first request arrived
    max_queue: int = 256  # images held at most (queued, being decoded, requests being read as one each); past it, 503
    max_upload_bytes: int = 4 * 2 ** 20
    max_pixels: int = 4096 * 4096  # per image, checked from the header before decoding
    resize: bool = True  # resize/convert any image to the network's input (False: refuse other sizes)
    stitch: str | None = None  # pin this stitch (id or name) from the start; None: automatic
    threads: int = 1  # torch CPU threads of this process
    up_after: int = 5  # decisions in a row with room to spare before a more accurate stitch is taken
    profile_repeats: int = 10  # timed forwards per stitch and batch size when profiling at start

    def __post_init__(self) -> None:
        checks = [(self.slo_ms > 0, "--slo-ms must be > 0"), (self.max_batch >= 1, "--max-batch must be >= 1"),
                  (self.max_wait_ms >= 0, "--max-wait-ms must be >= 0"),
                  (self.max_queue >= self.max_batch, "--max-queue must be at least --max-batch"),
                  (self.max_upload_bytes >= 1, "--max-upload-mb must be > 0"), (self.max_pixels >= 1, "--max-pixels must be >= 1"),
                  (self.threads >= 1, "--threads must be >= 1"), (self.up_after >= 1, "--up-after must be >= 1"),
                  (self.profile_repeats >= 1, "profile_repeats must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ServeError(message)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

