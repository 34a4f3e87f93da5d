"""Who may steer the server: endpoints that change it need the admin token.

``PUT /stitch`` (and anything else that changes how the server serves) answers only a request
that sends ``Authorization: Bearer <token>`` with the token the server was started with:
``--admin-token-file F`` (its first line) or ``$SNNET_ADMIN_TOKEN``. Without the right token: 401.
With no token configured, those endpoints are off: 403, saying how to turn them on. Pinning the
largest stitch breaks the SLO for everyone, so it is not left to whoever reaches the port.
``/predict``, ``/health``, ``/metrics`` and ``GET /stitch`` stay open.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from ...errors import ServeError
from .rejected import Rejected

__all__ = ["ADMIN_TOKEN_ENV", "MIN_TOKEN", "check_admin", "read_admin_token"]

ADMIN_TOKEN_ENV = "SNNET_ADMIN_TOKEN"
MIN_TOKEN = 16  # characters: a token short enough to guess is refused at start


def read_admin_token(path: str | None) -> str | None:
    """The admin token from ``path`` (its first line), else from ``$SNNET_ADMIN_TOKEN``, else None."""
    where = f"--admin-token-file {path}"
    if path is not None:
        try:
            # UTF-8 whatever the locale, and without the byte-order mark Windows editors write first: it is not
            # whitespace to strip(), and would be part of a token no client sends
            text = Path(path).read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ServeError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    else:
        text, where = os.environ.get(ADMIN_TOKEN_ENV, "").strip(), f"${ADMIN_TOKEN_ENV}"
        if not text:
            return None
    token = text.splitlines()[0].strip() if text else ""
    if len(token) < MIN_TOKEN:
        raise ServeError(f"{where} holds a token of {len(token)} characters: use at least {MIN_TOKEN}, "
                         "e.g. the output of `openssl rand -hex 32`")
    return token


def check_admin(token: str | None, authorization: str | None) -> None:
    """Nothing when ``authorization`` carries ``token``; else :class:`Rejected` 403 (no token
    configured: admin endpoints are off) or 401 (missing or wrong)."""
    if token is None:
        raise Rejected(403, f"changing the server is turned off: start snnet serve with --admin-token-file FILE or "
                            f"${ADMIN_TOKEN_ENV} set, then send `Authorization: Bearer <token>`", "forbidden")
    scheme, _, sent = (authorization or "").partition(" ")
    try:  # the bytes the client sent (the server decodes a header as Latin-1), against the token's UTF-8
        raw = sent.strip(" \t").encode("latin-1")  # only HTTP's own blanks: \xa0 may end a UTF-8 letter
    except UnicodeEncodeError:  # not a header as read off the wire
        raw = sent.strip().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(raw, token.encode()):
        raise Rejected(401, "this endpoint needs the admin token: send `Authorization: Bearer <token>`", "unauthorized",
                       {"WWW-Authenticate": 'Bearer realm="snnet"'})
