"""One server process's view of the served network.

A :class:`Service` holds what the model process said about the network (its stitches, input size
and data config), this process's :class:`~.batcher.Batcher` (input ring and connections),
the preprocessing, the metrics, the admin token and, where lone requests run here, the
latency path's copy of the network (:mod:`.inline`). :meth:`Service.load` starts a model process
of its own (:class:`~.engine.EngineProcess`); :meth:`Service.attach` joins one that another
process started (``snnet serve --workers N``: one model process, N server processes, one stitch
policy for all of them).
"""

from __future__ import annotations

from typing import Any, Callable

from .auth import read_admin_token
from .batcher import Batcher
from .config import ServeConfig, log
from .engine import CLOSE_S, EngineInfo, EngineProcess, connect, joining, tell_unanswered
from .images import Preprocess
from .inline import InlineModel
from .metrics import Metrics
from .upstream import StampedProtocol, Upstream

__all__ = ["Service"]


class Service:
    """The network as served by this process (see the module)."""

    def __init__(self, config: ServeConfig, info: EngineInfo, connect: Callable[..., Any],
                 engine: EngineProcess | None = None, address: str | None = None) -> None:
        self.config = config
        self.info = info
        self.engine = engine  # the model process, when this process started it (it closes it)
        self.address = address  # its socket, when another process started it (and closes it)
        self.admin_token = read_admin_token(config.admin_token_file)
        self.rows = {int(r.id): r for r in info.rows}  # type: ignore[arg-type]
        self.input_size = info.input_size
        self.preprocess = Preprocess(info.data_config, info.input_size, resize=config.resize, max_pixels=config.max_pixels)
        self.metrics = Metrics()
        self.batcher = Batcher(connect, info, config.max_queue, self.metrics.batch)
        self.inline = InlineModel.load(config, info)  # None: every request goes through the model process
        self.handling = 0  # /predict requests this process is handling now (the latency path runs only alone)
        # requests read and not yet in the ring, published to the model process (uvicorn's protocol admits them: .upstream)
        self.upstream = Upstream(self.batcher.state, stale_s=config.body_timeout_s + 5)

    @classmethod
    def load(cls, config: ServeConfig, say: Callable[[str], Any] = log.info) -> "Service":
        """Start a model process for ``config`` (it loads the network and profiles what needs it,
        saying so through ``say``) and connect to it. Bad input fails here, in one line."""
        read_admin_token(config.admin_token_file)  # a bad token file fails before the network loads
        engine = EngineProcess(config, say)
        try:
            return cls(config, engine.info, engine.connect, engine)
        except BaseException:
            engine.close()
            raise

    @classmethod
    def attach(cls, config: ServeConfig, address: str, authkey: bytes) -> "Service":
        """Join the model process listening at ``address`` (started by another process)."""
        def conn(kind: str, *args: Any) -> Any:
            return connect(address, authkey, kind, *args)

        probe = conn("control")
        try:
            with joining(probe, "asking for the network it serves"):
                probe.send(("info", None))
                ok, info = probe.recv()
        finally:
            probe.close()
        return cls(config, info, conn, address=address)

    def start(self) -> None:
        """Serve on the running event loop; requests read by :class:`~.upstream.StampedProtocol` in
        this process are admitted to this service's :attr:`upstream` (one service per server process)."""
        self.batcher.start()
        if StampedProtocol.upstream is None:
            StampedProtocol.upstream = self.upstream

    async def stop(self, timeout_s: float) -> None:
        """Answer every request already sent to the model (waiting up to ``timeout_s``: the server's graceful
        shutdown), then disconnect from it. Requests left unanswered are told to the process that closes the model
        process when it is another one (:func:`~.engine.tell_unanswered`): it kills it at once, as :meth:`close` does,
        unless the model process runs again before (it reads this disconnect then: told before it)."""
        if StampedProtocol.upstream is self.upstream:
            StampedProtocol.upstream = None
        address = self.address
        await self.batcher.close(timeout_s, None if address is None else lambda: tell_unanswered(address))

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """Stop the model process if this process started it (after :meth:`stop`), waiting up to ``timeout_s`` (the
        server's graceful shutdown) for it to finish what is queued: one that hangs is killed then. One that left
        requests unanswered at :meth:`stop` has had the whole graceful bound already, and what it holds has nobody
        to answer: it is killed at once (the shutdown took three times the bound)."""
        if self.engine is not None:
            self.engine.close(0 if self.batcher.unanswered else timeout_s)
