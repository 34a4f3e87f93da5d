"""``snnet serve``: one SN-Net over HTTP, switching stitches to hold a latency target."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from ..errors import ServeError

# What `snnet demo` leaves with its default --out: the trained network (train() saves it in
# <out>/train/final) and every stitch's measured accuracy.
DEMO_MODEL = Path("snnet-demo") / "train" / "final"
DEMO_RESULTS = Path("snnet-demo") / "results.json"
# Seconds a uvicorn worker may take to answer its supervisor's health check. uvicorn's 5 s default counts the
# worker's start: importing torch before it can answer took longer on a busy 2-CPU machine, and uvicorn killed
# and restarted every worker, for ever, the server never ready (and nothing said at --log-level warning).
WORKER_HEALTHCHECK_S = 120


def _default_model(stack: contextlib.ExitStack) -> tuple[Path, Path | None, str]:
    """The network to serve when --model is not given: the demo's trained network when it is here,
    else the shipped family with its stitching layers fitted by least squares (saved to a temporary
    folder for the model process to load; the folder goes as soon as it has loaded, or with --workers, whose
    server processes load it too, when the server exits)."""
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


class _Stopped(BaseException):
    """SIGTERM or SIGHUP: unwinds ``snnet serve`` so that every temporary file and the model process go."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP while loading end ``snnet serve`` at once; while serving, uvicorn drains first
    and then raises the signal again. Either way the stack unwinds (temporary folders removed, the
    model process closed) before the process ends with that signal, as uvicorn would."""
    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except _Stopped as e:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.signal(e.signum, signal.SIG_DFL)
        signal.raise_signal(e.signum)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def serve(
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", help="A saved stitched network (save_pretrained folder). Default: snnet-demo/train/final "
                              "from `snnet demo` if present, else the shipped family with least-squares stitching layers.")] = None,
    results: Annotated[Optional[Path], typer.Option(
        "--results", "-r", help="results.json (or its folder) from `snnet eval` / `snnet profile --batch-sizes`: top-1 ranks the stitches, "
                                "latency_by_batch is the latency table (stitches without one are profiled at start).")] = None,
    host: Annotated[str, typer.Option(help="Bind address (uvicorn's --host).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (uvicorn's --port), 0 to 65535 (0: any free port).")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes (uvicorn's --workers) that read and decode requests; one model "
                                              "process serves them all, so PUT /stitch reaches every worker.")] = 1,
    slo_ms: Annotated[Optional[float], typer.Option(help="p95 end-to-end latency target in ms (default 50); for a language "
                                                         "model, the time-to-first-token target (default 1000).")] = None,
    tpot_ms: Annotated[Optional[float], typer.Option(help="Language models: time-per-output-token target in ms "
                                                          "(default: none).")] = None,
    max_batch: Annotated[int, typer.Option(help="Images per model batch (also the most one request may carry), at most 4096.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long an idle model waits for a batch to fill after its first request "
                                                    "(0: run at once; batches fill while the model is busy).")] = 0.0,
    max_queue: Annotated[int, typer.Option(help="Images held at most (decoded and waiting, or in the batch running); past it "
                                                "requests get 503 with Retry-After.")] = 256,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MiB.")] = 4.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image (width x height) accepted, checked before decoding.")] = 4096 * 4096,
    resize: Annotated[bool, typer.Option("--resize/--no-resize", help="Resize and convert any image to the network's input "
                                         "(timm's eval transform), or refuse other sizes and channel counts with 422.")] = True,
    stitch: Annotated[Optional[str], typer.Option(help="Pin this stitch (id or name) from the start; PUT /stitch changes it.")] = None,
    policy: Annotated[str, typer.Option(help="Who picks the stitch when none is pinned: controller (per batch, from the queue "
                                             "and the latency table) or last-second (once a second, from the last second's rate).")] = "controller",
    threads: Annotated[int, typer.Option(help="torch CPU threads of the model process.")] = 1,
    up_after: Annotated[int, typer.Option(help="Batches in a row a dearer stitch must fit before it is taken (1: at once).")] = 1,
    utilisation: Annotated[float, typer.Option(help="The most the controller may load a stitch at the arrivals' rate (rate x "
                                                    "its time per image): lower keeps a margin for bursts; 1 for a model whose own "
                                                    "time dominates the server's, as at DeiT scale (docs/serving.md).")] = 0.75,
    headroom: Annotated[float, typer.Option(help="The share of the SLO the controller plans every queued request to finish "
                                                 "within; the rest is the margin for time its latency table does not see (HTTP, "
                                                 "decoding, noise): closer to 1 where the model's time dominates (docs/serving.md).")] = 0.8,
    steady_cv2: Annotated[Optional[float], typer.Option(help="While the gaps between requests have a CV² at most this (Poisson: "
                                                              "1), the controller may load a stitch to 1.0 instead of --utilisation; "
                                                              "off by default (docs/serving.md).")] = None,
    inline_max_images: Annotated[int, typer.Option(help="A lone request of at most this many images, arriving while the model "
                                                        "process has nothing to do, runs in the server process (no hand-off; "
                                                        "0: never). From 0 to --max-batch.")] = 1,
    inline_max_ms: Annotated[float, typer.Option(help="... and only on a stitch whose forward of that many images takes at most "
                                                      "this many ms by the latency table (it holds the event loop meanwhile).")] = 5.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request body may take to arrive; then 408 and the connection "
                                                     "is closed (a slow upload holds no queue room meanwhile).")] = 20.0,
    admin_token_file: Annotated[Optional[Path], typer.Option(
        help="A file whose first line is the admin token that PUT /stitch needs (`Authorization: Bearer <token>`); "
             "else $SNNET_ADMIN_TOKEN; with neither, PUT /stitch answers 403.")] = None,
    docs: Annotated[bool, typer.Option("--docs/--no-docs", help="Serve the API docs at /docs, /redoc and /openapi.json.")] = False,
    ssl_certfile: Annotated[Optional[Path], typer.Option(help="TLS certificate (PEM), with --ssl-keyfile: serve HTTPS.")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option(help="TLS private key (PEM) of --ssl-certfile.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Serve as a Ray Serve application (the `ray` extra): --replicas model "
                                                    "processes, one stitch policy for all; Ray's HTTP proxy listens on --host/--port. "
                                                    "Joins the cluster at $RAY_ADDRESS if set, else starts Ray here.")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: replicas to start with.")] = 1,
    max_replicas: Annotated[Optional[int], typer.Option(help="With --ray: let Ray add replicas up to this many when each has "
                                                             "more than --target-ongoing requests in flight.")] = None,
    target_ongoing: Annotated[float, typer.Option(help="With --ray and --max-replicas: requests in flight per replica Ray "
                                                       "scales to.")] = 2.0,
    timeout_graceful_shutdown: Annotated[int, typer.Option(help="Seconds SIGTERM waits for requests in flight (>= 0).")] = 30,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level: critical, error, warning, info, debug or trace.")] = "info",
) -> None:
    """Serve the network over HTTP: POST /predict, GET /health, GET /metrics, GET/PUT /stitch.

    Requests are batched in a model process of their own; before each batch a controller picks
    the most accurate Pareto-optimal stitch whose latency (from the profile table and the queue)
    keeps the p95 under --slo-ms. SIGTERM finishes the requests in flight, then exits.
    A saved language model (--model DIR of a StitchedLM) is served with OpenAI's POST /v1/completions
    and /v1/chat/completions instead (docs/language-models.md, "Serving").
    """
    try:
        import uvicorn

        from ..deploy.serve import ENV_CONFIG, EngineProcess, Listen, ServeConfig, Service, create_app, read_admin_token
        from ..deploy.serve.app import ENV_ENGINE, ENV_GRACEFUL
    except ImportError as e:
        raise ServeError(f"snnet serve needs the `serve` extra ({e.name} is missing): pip install 'snnet[serve]'") from e

    from ..deploy.serve.lm_engine import is_lm_folder

    lm = model is not None and is_lm_folder(model)
    # Every setting is checked, and the port bound, before any network is built: one line, exit 2.
    # (A language model's --max-queue counts requests and has no --max-batch to be at least: LMServeConfig checks it.)
    config = ServeConfig.from_mb(max_upload_mb, model="", slo_ms=50.0 if slo_ms is None else slo_ms, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                 max_queue=max(max_queue, max_batch) if lm else max_queue, max_pixels=max_pixels, resize=resize, stitch=stitch, policy=policy,
                                 threads=threads, up_after=up_after, utilisation=utilisation, headroom=headroom, steady_cv2=steady_cv2, body_timeout_s=body_timeout,
                                 inline_max_images=inline_max_images, inline_max_ms=inline_max_ms,
                                 admin_token_file=str(admin_token_file) if admin_token_file else None, docs=docs)
    listen = Listen(host, port, workers, timeout_graceful_shutdown, log_level,
                    str(ssl_certfile) if ssl_certfile else None, str(ssl_keyfile) if ssl_keyfile else None)
    if model is not None and not (model / "config.json").is_file():
        raise ServeError(f"--model {model} is not a saved stitched network (no config.json): give a folder written by "
                         "save_pretrained or `snnet train`")
    if results is not None and results.is_dir():  # its folder, as `snnet select --results` and `snnet eval --results` take
        from ..results import RESULTS_JSON

        results = results / RESULTS_JSON
    if results is not None and not results.is_file():
        raise ServeError(f"--results {results} does not exist: give the results.json of `snnet eval` or `snnet profile`")
    read_admin_token(config.admin_token_file)
    if lm:
        from .serve_lm import serve_lm

        with _cleanup_on_signals():
            return serve_lm(replace(config, model=str(model), results=str(results) if results else None), listen,
                            slo_ms=slo_ms, tpot_ms=tpot_ms, ray=ray, max_queue=max_queue)
    if tpot_ms is not None:
        raise ServeError("--tpot-ms is for language models: give --model DIR, a folder written by StitchedLM.save_pretrained")
    if ray:
        return _serve_ray(config, listen, model, results, replicas, max_replicas, target_ongoing)
    from ..deploy.serve.upstream import StampedProtocol  # stamps each request's arrival, counts those not yet in the ring

    uv = dict(timeout_graceful_shutdown=listen.timeout_graceful_shutdown, log_level=listen.log_level,
              ssl_certfile=listen.ssl_certfile, ssl_keyfile=listen.ssl_keyfile, http=StampedProtocol)

    with _cleanup_on_signals(), contextlib.ExitStack() as stack:
        sock = stack.enter_context(listen.bind())
        with contextlib.ExitStack() as loading:
            if model is None:
                # one server process: its model process has loaded the network once `loading` ends, and the folder goes;
                # --workers: every worker loads it too (its latency path, .inline) after that, so it stays until the end
                model, default_results, what = _default_model(loading if workers == 1 else stack)
            else:
                what, default_results = str(model), None
            results = results or default_results
            typer.echo(f"serving {what}" + (f" with results {results}" if results else "") + f" on {listen.scheme}://"
                       f"{host}:{sock.getsockname()[1]}")
            config = replace(config, model=str(model), results=str(results) if results else None)
            if workers == 1:
                # its own registry: a $PROMETHEUS_MULTIPROC_DIR from the shell made /metrics sum the files of every
                # process that ever wrote there (an earlier server's counts, another server's)
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
                service = Service.load(config, typer.echo)  # bad model/results fail here in one line; stitches are profiled
                stack.callback(service.close, listen.timeout_graceful_shutdown)  # a model process that hangs: killed then
            else:
                engine = EngineProcess(config, typer.echo)
                stack.callback(engine.close, listen.timeout_graceful_shutdown)
        # the model is loaded: a temporary model folder is gone already (kept for the workers under --workers)
        if workers == 1:
            app = create_app(service, freeze=True, graceful_shutdown_s=listen.timeout_graceful_shutdown)
            uvicorn.Server(uvicorn.Config(app, **uv)).run(sockets=[sock])
            return
        # uvicorn's worker processes import the app, and each joins the one model process.
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="snnet-serve-")))
        os.environ[ENV_CONFIG] = config.to_json()
        os.environ[ENV_ENGINE] = f"{engine.address} {engine.authkey.hex()}"
        os.environ[ENV_GRACEFUL] = str(listen.timeout_graceful_shutdown)  # each worker's wait for the model process at shutdown
        metrics_dir = folder / "prometheus"  # one metrics folder: /metrics reports the whole server whichever worker answers
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # this run's alone, whatever the shell had set
        uvicorn.run("snnet.deploy.serve:app_from_env", factory=True, fd=sock.fileno(), workers=workers,
                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **uv)


def _serve_ray(config: Any, listen: Any, model: Path | None, results: Path | None, replicas: int, max_replicas: int | None,
               target_ongoing: float) -> None:
    """``snnet serve --ray``: the Ray Serve application until SIGTERM or Ctrl-C, then a drain."""
    try:
        import ray
        from ray import serve as ray_serve

        from ..deploy.ray import application
    except ImportError as e:
        raise ServeError(f"snnet serve --ray needs the `ray` extra ({e.name} is missing): pip install 'snnet[ray]'") from e
    if listen.workers != 1:
        raise ServeError("--workers is uvicorn's; with --ray, give --replicas (and --max-replicas to let Ray scale)")
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas) or not target_ongoing > 0:
        raise ServeError(f"need --replicas >= 1, --max-replicas >= --replicas and --target-ongoing > 0 "
                         f"(got {replicas}, {max_replicas}, {target_ongoing})")
    with listen.bind() as sock:  # a port in use or a bad host fails here, before Ray starts
        # --port 0: the free port found now, for Ray's proxy and the address said (Ray's proxy would take another
        # one of its own, said nowhere, and "serving on ...:0" was printed)
        listen = replace(listen, port=sock.getsockname()[1])
    # SIGTERM and Ctrl-C are blocked in every thread (Ray's too, which inherit the mask) and waited
    # for below: Ray's own handlers would otherwise abort the driver without draining
    stopping = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    with contextlib.ExitStack() as stack:
        stack.callback(signal.pthread_sigmask, signal.SIG_UNBLOCK, stopping)
        if model is None:  # every replica loads it, including those Ray adds later: kept until the end
            model, default_results, what = _default_model(stack)
            results = results or default_results
        # every replica reads these files on its own node, from its own working directory: absolute paths
        config = replace(config, model=str(Path(model).resolve()), results=str(Path(results).resolve()) if results else None,
                         admin_token_file=str(Path(config.admin_token_file).resolve()) if config.admin_token_file else None)
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
        stack.callback(ray.shutdown)
        # Ray's proxies read the TLS files from their own working directory too (a cluster's, with $RAY_ADDRESS)
        tls = {name: str(Path(path).resolve()) if path else None
               for name, path in (("ssl_certfile", listen.ssl_certfile), ("ssl_keyfile", listen.ssl_keyfile))}
        ray_serve.start(http_options={"host": listen.host, "port": listen.port, **tls})
        stack.callback(ray_serve.shutdown)
        ray_serve.run(application(config, replicas, max_replicas, target_ongoing, graceful_shutdown_s=listen.timeout_graceful_shutdown,
                                  log_level=listen.log_level),
                      name="snnet", route_prefix="/")
        typer.echo(f"serving {config.model} on Ray Serve at {listen.scheme}://{listen.host}:{listen.port} with {replicas} replica(s)"
                   + (f", up to {max_replicas}" if max_replicas and max_replicas > replicas else "") + "; Ctrl-C or SIGTERM stops it")
        got = signal.sigwait(stopping)
        typer.echo(f"{signal.Signals(got).name}: draining: requests in flight are answered, then the replicas stop")
        ray_serve.delete("snnet")
