"""A request refused: the HTTP status, a one-line reason, and the metric label it counts under."""

from __future__ import annotations

__all__ = ["Rejected"]


class Rejected(Exception):
    """A request refused with an HTTP status and a one-line reason (``kind`` labels the metric)."""

    def __init__(self, status: int, reason: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.headers = status, reason, kind, headers or {}

