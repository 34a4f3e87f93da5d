"""A request refused: the HTTP status, a one-line reason, and the metric label it counts under."""

from __future__ import annotations

from typing import Any

__all__ = ["Rejected", "count_refusal"]


class Rejected(Exception):
    """A request refused with an HTTP status and a one-line reason (``kind`` labels the metric)."""

    def __init__(self, status: int, reason: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}



def count_refusal(e: Rejected, metrics: Any) -> None:
    """A refusal in /metrics (image or language-model server: each has ``rejected`` and ``requests`` counters)."""
    metrics.rejected.labels(e.kind).inc()
    metrics.requests.labels(str(e.status)).inc()
