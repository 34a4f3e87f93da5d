"""A request refused: the HTTP status, a one-line reason, and the metric label it counts under."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Iterator

__all__ = ["GRACEFUL_CANCEL", "Rejected", "count_refusal", "refused_at_shutdown", "unanswered_at_shutdown"]

# what uvicorn cancels a request's task with when its graceful shutdown (--timeout-graceful-shutdown) is over
GRACEFUL_CANCEL = "timeout graceful shutdown exceeded"


class Rejected(Exception):
    """A request refused with an HTTP status and a one-line reason (``kind`` labels the metric)."""

    def __init__(self, status: int, reason: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}



def count_refusal(e: Rejected, metrics: Any) -> None:
    """A refusal in /metrics (image or language-model server: each has ``rejected`` and ``requests`` counters)."""
    metrics.rejected.labels(e.kind).inc()
    metrics.requests.labels(str(e.status)).inc()


def unanswered_at_shutdown(e: asyncio.CancelledError, what: str, log: logging.Logger,
                           answered: str = "answered 503") -> Rejected | None:
    """The refusal for a request whose handler uvicorn cancelled (``e``) because the server's graceful shutdown
    ended before the model answered it, or None for a cancellation from anything else (Ray Serve's, a test's: it
    goes on as it came). A cancelled handler was logged with a traceback and answered 500, though the server knows
    why: one warning line instead, and a 503 saying so to a client still connected. The cancellation is taken back,
    so that the handler answers and ends as any other. ``answered``: how, in the log line (a stream whose status
    was sent already ends with the refusal's reason as an error event instead)."""
    if not any(GRACEFUL_CANCEL in str(arg) for arg in e.args):
        return None
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    log.warning("%s: the model did not answer it within --timeout-graceful-shutdown; %s", what, answered)
    return Rejected(503, "the server is shutting down and the model did not answer this request within its graceful "
                         "shutdown bound (--timeout-graceful-shutdown): send it again to a running server", "shutdown")


@contextlib.contextmanager
def refused_at_shutdown(what: str, log: logging.Logger) -> Iterator[None]:
    """Around a handler's wait for the model: uvicorn's cancellation at the graceful bound raised as the
    :class:`Rejected` of :func:`unanswered_at_shutdown` (a 503 through the handler's own refusals), any other
    cancellation as it came."""
    try:
        yield
    except asyncio.CancelledError as e:
        refusal = unanswered_at_shutdown(e, what, log)
        if refusal is None:
            raise
        raise refusal from None
