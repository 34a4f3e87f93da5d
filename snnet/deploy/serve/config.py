"""What ``snnet serve`` runs: the settings of one server, each checked when the settings are made.

:class:`ServeConfig` is what every server process needs (the network, the SLO, batching, the
limits on input); :class:`Listen` is where and how uvicorn listens. Both are checked before any
network is loaded, so a bad option costs one line and no waiting (``snnet serve`` prints it and
exits 2), and :meth:`Listen.bind` binds the socket before loading too, so a port in use or a
host that does not exist fails the same way.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ...errors import ServeError
from ..controller import ControllerConfig

__all__ = ["ENV_CONFIG", "LOG_LEVELS", "Listen", "MAX_BATCH", "MAX_QUEUE", "POLICIES", "ServeConfig", "log"]

ENV_CONFIG = "SNNET_SERVE_CONFIG"  # the config, as JSON, for worker processes that import the app
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream, one format

MAX_BATCH = 4096  # images per model batch at most: beyond, one batch's input alone is gigabytes at 224x224
MAX_QUEUE = 65536  # images held at most (the shared input ring is sized by it)
POLICIES = ("controller", "last-second")  # who picks the stitch when none is pinned (see snnet.deploy.controller)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _finite(value: float, name: str, low: float, *, inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        raise ServeError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")


def _count(value: int, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ServeError(f"{name} must be a whole number from {low} to {high}, got {value}")


@dataclass(frozen=True)
class ServeConfig:
    """What every server process runs: the network, the SLO, batching and the limits on input."""

    model: str  # a folder written by StitchedNet.save_pretrained
    results: str | None = None  # results.json: top-1 (ranks the ladder) and latency_by_batch (the table)
    slo_ms: float = 50.0  # p95 end-to-end latency target
    max_batch: int = 16  # images per model batch; also the most images one request may carry
    max_wait_ms: float = 0.0  # how long an idle model waits for a batch to fill after its first request (0: run at once)
    max_queue: int = 256  # images held at most (decoded and waiting, or being decoded); past it, 503
    max_upload_bytes: int = 4 * 2 ** 20
    max_pixels: int = 4096 * 4096  # per image, checked from the header before decoding
    resize: bool = True  # resize/convert any image to the network's input (False: refuse other sizes)
    stitch: str | None = None  # pin this stitch (id or name) from the start; None: automatic
    policy: str = "controller"  # who picks the stitch when none is pinned: one of POLICIES
    threads: int = 1  # torch CPU threads of the model process
    up_after: int = 1  # decisions in a row a dearer stitch must fit before it is taken (1: at once; see ControllerConfig)
    # the most the controller may load a stitch at the arrivals' rate (ControllerConfig.utilisation, its default defined there)
    utilisation: float = ControllerConfig.utilisation
    # the share of the SLO the controller plans every queued request to finish within (ControllerConfig.headroom): the rest
    # is the margin for time its latency table does not see (HTTP, decoding, noise)
    headroom: float = ControllerConfig.headroom
    steady_cv2: float | None = None  # arrivals whose gaps' CV² is at most this may load a rung to 1.0 (ControllerConfig.steady); None: off
    profile_repeats: int = 10  # timed forwards per stitch and batch size when profiling at start
    body_timeout_s: float = 20.0  # a request body must arrive within this (else 408): slow uploads hold nothing for long
    admin_token_file: str | None = None  # a file holding the admin token (else $SNNET_ADMIN_TOKEN; neither: admin endpoints off)
    docs: bool = False  # serve /docs, /redoc and /openapi.json
    # the latency path (snnet.deploy.serve.inline): a lone request of at most this many images runs in the
    # server process while the model process has nothing to do (0: every request goes through the model process)
    inline_max_images: int = 1
    inline_max_ms: float = 5.0  # ... on a stitch whose forward of that many images takes at most this (the latency table)

    def __post_init__(self) -> None:
        _finite(self.slo_ms, "--slo-ms", 0)
        _count(self.max_batch, "--max-batch", 1, MAX_BATCH)
        _finite(self.max_wait_ms, "--max-wait-ms", 0, inclusive=True)
        _count(self.max_queue, "--max-queue", 1, MAX_QUEUE)
        if self.max_queue < self.max_batch:
            raise ServeError(f"--max-queue must be at least --max-batch ({self.max_batch}), got {self.max_queue}")
        _count(self.max_upload_bytes, "--max-upload-mb (in bytes)", 1, 2 ** 40)
        _count(self.max_pixels, "--max-pixels", 1, 2 ** 40)
        if self.policy not in POLICIES:
            raise ServeError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        _count(self.threads, "--threads", 1, 1024)
        _count(self.up_after, "--up-after", 1, 10 ** 6)
        for flag, share in (("--utilisation", self.utilisation), ("--headroom", self.headroom)):
            if not (isinstance(share, (int, float)) and 0 < share <= 1):
                raise ServeError(f"{flag} must be a number above 0 and at most 1, got {share}")
        if self.steady_cv2 is not None:
            _finite(self.steady_cv2, "--steady-cv2", 0, inclusive=True)
        _count(self.profile_repeats, "profile_repeats", 1, 10 ** 6)
        _finite(self.body_timeout_s, "--body-timeout", 0)
        _count(self.inline_max_images, "--inline-max-images", 0, self.max_batch)
        _finite(self.inline_max_ms, "--inline-max-ms", 0)

    @classmethod
    def from_mb(cls, max_upload_mb: float, **kw: object) -> "ServeConfig":
        """A config with the upload limit given in MiB (what the command line takes), checked first."""
        _finite(max_upload_mb, "--max-upload-mb", 0)
        if max_upload_mb * 2 ** 20 > 2 ** 40:
            raise ServeError(f"--max-upload-mb must be at most {2 ** 20:g} (1 TiB), got {max_upload_mb}")
        return cls(max_upload_bytes=max(1, int(max_upload_mb * 2 ** 20)), **kw)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class Listen:
    """Where and how uvicorn listens: address, worker processes, shutdown, logging, TLS."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    timeout_graceful_shutdown: int = 30
    log_level: str = "info"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        _count(self.port, "--port", 0, 65535)
        _count(self.workers, "--workers", 1, 1024)
        _count(self.timeout_graceful_shutdown, "--timeout-graceful-shutdown", 0, 10 ** 6)
        if self.log_level not in LOG_LEVELS:
            raise ServeError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ServeError("TLS needs both --ssl-certfile and --ssl-keyfile (a PEM certificate and its private key)")
        if self.ssl_certfile is not None:
            for name, path in (("--ssl-certfile", self.ssl_certfile), ("--ssl-keyfile", self.ssl_keyfile)):
                if not Path(str(path)).is_file():
                    raise ServeError(f"{name} {path} is not a file")
            try:  # what uvicorn will do, now: a key that does not match its certificate fails here
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            except (ssl.SSLError, OSError) as e:
                raise ServeError(f"cannot load the TLS certificate {self.ssl_certfile} with key {self.ssl_keyfile} "
                                 f"({e.__class__.__name__}: {e}); give a PEM certificate and its matching key") from e

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"

    def bind(self) -> socket.socket:
        """The listening socket, bound now (uvicorn serves on it): a port in use, a port this user may
        not bind or a host that is not an address of this machine fail here, in one line."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as e:
            raise ServeError(f"--host {self.host!r} is not an address or a host name this machine resolves ({e}); "
                             "use e.g. 127.0.0.1 or 0.0.0.0") from e
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(True)  # uvicorn's worker processes serve on it too
        except OSError as e:
            sock.close()
            why = {98: "the port is in use (another server?): choose another --port or stop that server",
                   13: "permission denied: ports below 1024 need privileges; choose --port 1024 or above",
                   99: "that address is not one of this machine's: use e.g. 127.0.0.1 or 0.0.0.0"}
            raise ServeError(f"cannot listen on {self.host}:{self.port}: {why.get(e.errno, e.strerror or str(e))}") from e
        return sock
