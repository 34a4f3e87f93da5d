"""``snnet serve --model DIR`` when DIR holds a stitched language model: OpenAI-compatible completions."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import typer

from ..errors import ServeError

__all__ = ["serve_lm"]

DEFAULT_TTFT_MS = 1000.0
# image-server settings with no meaning for a language model: changing one is refused, not ignored
_IMAGE_ONLY = {"max_batch": "--max-batch", "max_wait_ms": "--max-wait-ms", "max_pixels": "--max-pixels", "resize": "--no-resize",
               "policy": "--policy", "up_after": "--up-after", "utilisation": "--utilisation",
               "headroom": "--headroom", "steady_cv2": "--steady-cv2",
               "inline_max_images": "--inline-max-images", "inline_max_ms": "--inline-max-ms"}


def serve_lm(config: Any, listen: Any, *, slo_ms: float | None, tpot_ms: float | None, ray: bool, max_queue: int | None = None) -> None:
    """Serve the language model of ``config.model`` on ``listen``. ``config`` is the image server's
    :class:`ServeConfig` as the command line made it (checked): the settings that mean the same are
    taken from it, those for images alone must be left at their defaults. ``max_queue``: the requests
    waiting at most as given (the config's own is held to at least --max-batch, an image setting)."""
    import uvicorn

    from ..deploy.heap import freeze_heap
    from ..deploy.serve import ServeConfig
    from ..deploy.serve.lm_app import create_lm_app
    from ..deploy.serve.lm_engine import LMEngine, LMServeConfig

    defaults = {f.name: f.default for f in fields(ServeConfig)}
    changed = [flag for name, flag in _IMAGE_ONLY.items() if getattr(config, name) != defaults[name]]
    if listen.workers != 1:
        changed.append("--workers")
    if ray:
        changed.append("--ray")
    if changed:
        raise ServeError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for image networks; a language model "
                         "is served by one process with one generation worker: drop "
                         f"{'it' if len(changed) == 1 else 'them'}")
    lm = LMServeConfig(model=config.model, results=config.results, slo_ms=DEFAULT_TTFT_MS if slo_ms is None else slo_ms,
                       tpot_ms=tpot_ms, max_queue=config.max_queue if max_queue is None else max_queue, max_upload_bytes=config.max_upload_bytes,
                       stitch=config.stitch, threads=config.threads, body_timeout_s=config.body_timeout_s,
                       admin_token_file=config.admin_token_file, docs=config.docs)
    uv = dict(timeout_graceful_shutdown=listen.timeout_graceful_shutdown, log_level=listen.log_level,
              ssl_certfile=listen.ssl_certfile, ssl_keyfile=listen.ssl_keyfile)
    with listen.bind() as sock:  # (snnet serve's signal handling is around this call)
        typer.echo(f"serving the language model {lm.model} as {lm.served_name!r} on {listen.scheme}://{listen.host}:"
                   f"{sock.getsockname()[1]}")
        engine = LMEngine.load(lm, typer.echo)  # a bad model or results fail here in one line; the ladder is timed
        freeze_heap()  # this process only serves: no full collection of torch and the model between two tokens
        app = create_lm_app(engine, graceful_shutdown_s=listen.timeout_graceful_shutdown)  # the worker's stop: bounded as uvicorn's wait
        uvicorn.Server(uvicorn.Config(app, **uv)).run(sockets=[sock])
