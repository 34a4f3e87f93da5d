"""``snnet serve``: one SN-Net over HTTP, switching stitches to hold a latency target."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ServeError

# What `snnet demo` leaves with its default --out: the trained network (train() saves it in
# <out>/train/final) and every stitch's measured accuracy.
DEMO_MODEL = Path("snnet-demo") / "train" / "final"
DEMO_RESULTS = Path("snnet-demo") / "results.json"


def _default_model(stack: contextlib.ExitStack) -> tuple[Path, Path | None, str]:
    """The network to serve when --model is not given: the demo's trained network when it is here,
    else the shipped family with its stitching layers fitted by least squares (saved to a temporary
    folder so that every worker process loads the same weights)."""
    if (DEMO_MODEL / "config.json").is_file():
        results = DEMO_RESULTS if DEMO_RESULTS.is_file() else None
        return DEMO_MODEL, results, f"the demo's trained network ({DEMO_MODEL})"
    from .deploy import _load

    net = _load(None, trained=True)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="snnet-serve-")))
    net.save_pretrained(folder / "model")
    return (folder / "model", None,
            f"the shipped Fashion-MNIST family, stitching layers fitted by least squares on 100 images (no {DEMO_MODEL} "
            "from `snnet demo` here; without measured accuracy, FLOPs rank the stitches)")


def serve(
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", help="A saved stitched network (save_pretrained folder). Default: snnet-demo/train/final "
                              "from `snnet demo` if present, else the shipped family with least-squares stitching layers.")] = None,
    results: Annotated[Optional[Path], typer.Option(
        "--results", "-r", help="results.json from `snnet eval` / `snnet profile --batch-sizes`: top-1 ranks the stitches, "
                                "latency_by_batch is the latency table (stitches without one are profiled at start).")] = None,
    host: Annotated[str, typer.Option(help="Bind address (uvicorn's --host).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (uvicorn's --port).")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (uvicorn's --workers), each with its own batcher and controller.")] = 1,
    slo_ms: Annotated[float, typer.Option(help="p95 end-to-end latency target in ms.")] = 50.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Images per model batch (also the most one request may carry).")] = 16,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits to fill after its first request.")] = 2.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Images waiting at most; past it requests get 503 with Retry-After.")] = 256,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MiB.")] = 4.0,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image (width x height) accepted, checked before decoding.")] = 4096 * 4096,
    resize: Annotated[bool, typer.Option("--resize/--no-resize", help="Resize and convert any image to the network's input "
                                         "(timm's eval transform), or refuse other sizes and channel counts with 422.")] = True,
    stitch: Annotated[Optional[str], typer.Option(help="Pin this stitch (id or name) from the start; PUT /stitch changes it.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads per worker process.")] = 1,
    up_after: Annotated[int, typer.Option(min=1, help="Batches in a row with room to spare before a more accurate stitch is taken.")] = 5,
    timeout_graceful_shutdown: Annotated[int, typer.Option(help="Seconds SIGTERM waits for requests in flight.")] = 30,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve the network over HTTP: POST /predict, GET /health, GET /metrics, GET/PUT /stitch.

    Requests are batched; before each batch a controller picks the most accurate Pareto-optimal
    stitch whose latency (from the profile table and the queue) keeps the p95 under --slo-ms.
    SIGTERM finishes the requests in flight, then exits.
    """
    try:
        import uvicorn

        from ..deploy.serve import ENV_CONFIG, ServeConfig, Service, create_app
    except ImportError as e:
        raise ServeError(f"snnet serve needs the `serve` extra ({e.name} is missing): pip install 'snnet[serve]'") from e

    with contextlib.ExitStack() as stack:
        # settings are checked before any network is built
        config = ServeConfig(model="", slo_ms=slo_ms, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_upload_bytes=int(max_upload_mb * 2 ** 20), max_pixels=max_pixels, resize=resize,
                             stitch=stitch, threads=threads, up_after=up_after)
        if model is None:
            model, default_results, what = _default_model(stack)
        else:
            what = str(model)
            default_results = None
        results = results or default_results
        typer.echo(f"serving {what}" + (f" with results {results}" if results else ""))
        config = replace(config, model=str(model), results=str(results) if results else None)
        service = Service.load(config, typer.echo)  # bad model/results fail here with one line; stitches without a table are profiled
        if workers == 1:
            uvicorn.run(create_app(service), host=host, port=port, timeout_graceful_shutdown=timeout_graceful_shutdown,
                        log_level=log_level)
            return
        # Worker processes import the app and load the network themselves. Give them the rows
        # with the latency table measured here, so they do not each profile (and disturb each other).
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="snnet-serve-")))
        (folder / "results.json").write_text(json.dumps(list(service.rows.values())))
        os.environ[ENV_CONFIG] = replace(config, results=str(folder / "results.json")).to_json()
        # one metrics folder for all workers, so /metrics reports the whole server whichever worker answers
        metrics_dir = folder / "prometheus"
        metrics_dir.mkdir()
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
        uvicorn.run("snnet.deploy.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    timeout_graceful_shutdown=timeout_graceful_shutdown, log_level=log_level)
