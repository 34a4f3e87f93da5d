"""Does the server cost less than its model? `snnet serve` against the model alone, side by side.

For the smallest and the largest anchor of a network, and for requests of 16 and of 64
Fashion-MNIST PNGs (multipart), it measures in one run:

* **model only** — images/s of the pinned stitch's forward (and softmax) on a batch of that
  size, in this process, one thread: what the model can do;
* **server** — images/s that `snnet serve` (a subprocess: one server process, one model process
  with one thread, ``--max-batch`` = the images of one request, pinned to that stitch) answers to
  ``--clients`` closed-loop clients sending PNGs, HTTP, multipart parsing, decoding and JSON
  included; the ratio server / model only must be >= 0.8 (issue 20).
  The two alternate in ``--rounds`` rounds of a few seconds each (model alone, then the server):
  this machine's speed drifts by tens of per cent from one few-second window to the next (a
  virtual machine sharing its host), so each round's ratio compares two windows next to each
  other, and the figure is the median of the rounds (all are reported);
* **one image** — the p50 latency of a one-image request to the server (one client, one request
  at a time) minus the model's p50 for one image (the forward the request ran: on the latency
  path the stitch compiled (ONNX Runtime or TorchScript), through the model process the eager route), against the p50 of a bare endpoint on the same
  stack (uvicorn with httptools and uvloop, FastAPI, the same body limits and the same decoding)
  that only decodes the image: the server's own cost per request, which must be within 1.5x.
  A lone one-image request runs in the server process (the latency path, ``--inline-max-images``,
  default 1: docs/serving.md); the same is measured with ``--inline-max-images 0`` (every request
  through the model process) beside it, with both server processes' resident memory (the latency
  path's copy of the network). Like the rates, by rounds (``--one-image-rounds``: the bare
  endpoint, the model alone and the server back to back), the figure the rounds' median; with the
  CPU µs a request of each process, which a busy machine inflates much less than wall times.

Beside the rates it reports the CPU time per image of the server process, the model process, the
load generator and the model alone (from /proc): on a shared machine the rates move with
everyone else's load, and the CPU times say which process limits the server when each has a core.
From them it prints a bound: the highest ratio those CPU times allow on an idle machine (server and
model process each on at most one core, the three processes within the machine's cores, against
the model alone's CPU time per image); a ratio near its bound is limited by what each process
spends per image, not by the processes waiting for one another.

The load generator is :mod:`snnet.deploy.loadgen` (lean: raw HTTP/1.1 on keep-alive connections, uvloop), so
that the client takes as little as possible of the CPU the server and model share.

    python benchmarks/bench_serve_overhead.py --out docs/serve/overhead     # ~8 min (the one-image rounds ~3 of them)
    python benchmarks/bench_serve_overhead.py --only-one-image --out docs/serve/inline   # ~4 min

Without ``--model`` it serves the shipped Fashion-MNIST family (random stitching layers: the time
of a forward does not depend on the weights). It prints the load average before and after: run
it on a quiet machine, and again if the load was high.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from snnet.deploy import loadgen
from snnet.deploy.loadgen import ServerProcess
from snnet.devices import cpu_model

try:  # the bare endpoint's handler takes a Request by annotation, as FastAPI resolves it from this module
    from fastapi import Request
except ImportError:  # the serve extra is missing: `snnet serve` says so
    pass


def model_only(net: Any, stitch: int, batch: int, seconds: float, forward: Any = None, numpy: bool = False) -> tuple[float, float, float]:
    """Images/s of back-to-back served forwards (select, the route, softmax: ``forward(stitch, x)``,
    by default the model process's :func:`~snnet.deploy.serve.engine.probabilities`; ``numpy``: ``x``
    as a numpy array, as the latency path takes it, else a tensor) of a batch, the
    p50 ms of one forward, and the CPU µs of one forward (this process's CPU time over the forwards:
    unlike the wall time, it does not grow when other processes hold the CPUs)."""
    import torch

    from snnet.deploy.serve.engine import probabilities

    forward = forward or (lambda s, x: probabilities(net, s, x))
    x = torch.randn(batch, *net.input_size)
    x = x.numpy() if numpy else x
    times = []
    for _ in range(3):
        forward(stitch, x)
    end = time.perf_counter() + seconds
    cpu = time.process_time()
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        forward(stitch, x)
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu
    return batch * len(times) / sum(times), statistics.median(times) * 1e3, cpu / len(times) * 1e6


def cpu_bound(cpu: dict[str, float], cpus: int) -> float:
    """The most server / model-only ratio these CPU times allow on an otherwise idle machine: the
    model alone runs an image in ``model_only_us_per_image`` of one core, while the server needs
    the server process and the model process each on at most one core and the three processes
    (client included) within the machine's ``cpus``. A measured ratio near this bound is limited by
    what each process spends per image, not by waiting for one another or for the machine."""
    server, model, client = cpu["server_us_per_image"], cpu["model_process_us_per_image"], cpu["client_us_per_image"]
    return cpu["model_only_us_per_image"] / max(server, model, (server + model + client) / cpus, 1e-9)


def server(model: str, results: str, max_batch: int, stitch: int, *extra: str) -> ServerProcess:
    return ServerProcess(["--model", model, "--results", results, "--max-batch", str(max_batch), "--max-queue", str(8 * max_batch),
                          "--threads", "1", "--stitch", str(stitch), "--log-level", "warning", *extra])


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return round(int(line.split()[1]) / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_server(model: str, port: int) -> None:
    """The bare endpoint (run as ``--bare PORT``): the same stack and decoding, no model."""
    import numpy as np
    import orjson
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from snnet.deploy.serve import BodyLimits, Preprocess, ServeConfig
    from snnet.deploy.serve.app import body_limit
    from snnet.model import StitchedNet

    net = StitchedNet.from_pretrained(model)
    pre = Preprocess(dict(net.anchors[0].data_config), net.input_size)
    out = np.empty((1, *net.input_size), np.float32)
    config = ServeConfig(model)
    del net
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        pre.images([await request.body()], out)
        return Response(orjson.dumps({"class": int(out.argmax())}), media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(BodyLimits, limit=body_limit(config), timeout_s=config.body_timeout_s)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def one_image(port: int, body: loadgen.Body, seconds: float, pids: tuple[int, ...]) -> tuple[float, list[bytes], list[float]]:
    """The p50 ms of one-image requests sent one at a time, the answers' bodies, and the CPU µs per
    request of each process of ``pids`` (the server's: on a busy machine the wall times grow with
    everyone else's load, the CPU times much less)."""
    loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, [body], 1, min(1.0, seconds), warmup=0.0))  # warm up
    c0 = [cpu_seconds(p) for p in pids]
    results = loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, [body], 1, seconds, warmup=0.0))
    cpu = [round((cpu_seconds(p) - c) / max(1, len(results)) * 1e6, 1) for p, c in zip(pids, c0)]
    ok = [r for r in results if r.status == 200]
    if len(ok) < len(results) or not ok:
        raise SystemExit(f"one-image requests failed: {[r.status for r in results if r.status != 200][:5]}")
    return statistics.median(r.ms for r in ok), [r.body for r in ok], cpu


def one_image_rounds(args: argparse.Namespace, net: Any, anchor: Any, path: str, one: loadgen.Body, srv: ServerProcess, engine: int,
                     bare_port: int, bare_pid: int) -> dict[str, Any]:
    """One-image requests to the server against the model alone and the bare endpoint, in
    ``--one-image-rounds`` rounds of the three back to back (this machine's speed drifts between
    few-second windows: each round's ratio compares neighbours); the figures are the rounds' medians."""
    forward, runtime = None, "eager"  # the model process's forward (a batch of one)
    if path == "inline":  # the latency path's: the stitch compiled (ONNX Runtime where installed, else TorchScript), as the server process runs it (snnet.deploy.serve.inline)
        from snnet.deploy.serve.inline import RouteGraphs

        graphs = RouteGraphs(net)
        graphs.trace(anchor.id)
        forward, runtime = graphs.probabilities, graphs.runtime.get(anchor.id, "eager")
    rounds = []
    for _ in range(args.one_image_rounds):
        bare_p50, _, (bare_cpu,) = one_image(bare_port, one, args.seconds, (bare_pid,))
        _, model_p50, model_cpu = model_only(net, anchor.id, 1, args.model_seconds, forward, numpy=path == "inline")
        p50, answers, (server_cpu, engine_cpu) = one_image(srv.port, one, args.seconds, (srv.pid, engine))
        said = [json.loads(a) for a in answers]  # what the server measured itself: arrival to result, and the forward
        rounds.append({"server_p50_ms": p50, "model_p50_ms": model_p50, "bare_p50_ms": bare_p50, "ratio": (p50 - model_p50) / bare_p50,
                       "server_said_latency_p50_ms": statistics.median(a["latency_ms"] for a in said),
                       "server_said_compute_p50_ms": statistics.median(a["batch"]["compute_ms"] for a in said),
                       "ran_inline": sum(bool(a.get("inline")) for a in said) / len(said),
                       "cpu_server": server_cpu, "cpu_model_process": engine_cpu, "cpu_model_alone": model_cpu, "cpu_bare": bare_cpu,
                       "cpu_ratio": (server_cpu + engine_cpu - model_cpu) / bare_cpu})
    med = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    row = {"path": path, "stitch": anchor.name, "runtime": runtime, **{k: med[k] for k in ("server_p50_ms", "model_p50_ms", "bare_p50_ms")},
           "overhead_ms": round(med["server_p50_ms"] - med["model_p50_ms"], 3), "ratio": med["ratio"],
           "ratio_per_round": [round(r["ratio"], 3) for r in rounds],
           **{k: med[k] for k in ("server_said_latency_p50_ms", "server_said_compute_p50_ms", "ran_inline")},
           "server_rss_mb": rss_mb(srv.pid), "model_process_rss_mb": rss_mb(engine),
           "cpu_us": {"server_process": med["cpu_server"], "model_process": med["cpu_model_process"],
                      "model_alone": round(med["cpu_model_alone"], 1), "bare_endpoint": med["cpu_bare"]},
           "cpu_ratio": med["cpu_ratio"], "cpu_ratio_per_round": [round(r["cpu_ratio"], 3) for r in rounds],
           "load_average": round(os.getloadavg()[0], 2)}
    c = row["cpu_us"]
    print(f"{anchor.name:>14} one image ({path}, {runtime}): server p50 {row['server_p50_ms']:.3f} ms - model {row['model_p50_ms']:.3f} ms = "
          f"{row['overhead_ms']:.3f} ms; bare endpoint p50 {row['bare_p50_ms']:.3f} ms; ratio {row['ratio']:.2f} (median of "
          f"{len(rounds)} rounds: {min(row['ratio_per_round']):.2f}..{max(row['ratio_per_round']):.2f}); {row['ran_inline']:.0%} ran inline; "
          f"server process RSS {row['server_rss_mb']} MiB; CPU µs a request: server {c['server_process']:.0f} + model process "
          f"{c['model_process']:.0f} - model alone {c['model_alone']:.0f} against the bare endpoint's {c['bare_endpoint']:.0f}: "
          f"{row['cpu_ratio']:.2f}; load {row['load_average']}")
    return row


def server_cpu_parts(net: Any, pngs: list[bytes], size: int, repeats: int = 200) -> dict[str, float]:
    """CPU µs per image, in this process, of what the server process does for the images of a
    request: decoding and normalising them (:class:`Preprocess`) and parsing their multipart body."""
    import numpy as np

    from snnet.deploy.serve import Preprocess
    pre = Preprocess(dict(net.anchors[0].data_config), net.input_size)
    out = np.empty((size, *net.input_size), np.float32)
    raw = loadgen.make_body("/predict", files=pngs[:size]).raw
    head, body = raw.split(b"\r\n\r\n", 1)
    ctype = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-type:"))

    def per_image(work: Any) -> float:
        work()
        t = time.process_time()
        for _ in range(repeats):
            work()
        return round((time.process_time() - t) / repeats / size * 1e6, 1)

    return {"decode_normalise_us_per_image": per_image(lambda: pre.images(pngs[:size], out)),
            "multipart_us_per_image": per_image(lambda: parse(ctype.decode(), body, size))}


def parse(content_type: str, body: bytes, size: int) -> list[bytes]:
    """A multipart body's images, as the server parses them (whole, not in socket-sized chunks)."""
    from snnet.deploy.serve.app import MultipartImages

    images = MultipartImages(content_type, size)
    images.write(body)
    return images.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="saved network (default: the shipped family, random stitching layers)")
    ap.add_argument("--out", default="bench-serve-overhead")
    ap.add_argument("--sizes", default="16,64", help="images per request")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients (connections) in flight")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds of the server per round")
    ap.add_argument("--model-seconds", type=float, default=2.0, help="seconds of the model alone per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of (model alone, server) per stitch and request size")
    ap.add_argument("--one-image-rounds", type=int, default=5, help="rounds of (bare endpoint, model alone, server) per one-image row")
    ap.add_argument("--only-one-image", action="store_true", help="measure only the one-image requests (no throughput rounds)")
    ap.add_argument("--bare", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare is not None:
        return bare_server(args.model, args.bare)

    import torch

    from snnet.deploy import merge_profile, profile
    from snnet.results import write_results
    from snnet.deploy.controller import ladder
    from snnet.model import StitchedNet

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-overhead-")
    if args.model is None:
        from snnet.commands.deploy import _load

        args.model = str(_load(None, trained=False).save_pretrained(Path(tmp.name) / "model"))
    net = StitchedNet.from_pretrained(args.model).eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    costs = net.costs()
    anchors = sorted((c for c in costs if c.is_anchor), key=lambda c: c.flops)
    small, large = anchors[0], anchors[-1]
    ids = sorted({r.id for r in ladder(costs)} | {small.id, large.id})
    t = time.perf_counter()
    measured, _ = profile(net, batch_size=1, warmup=2, repeats=3, device="cpu", threads=1, stitches=ids, progress=False,
                                 batch_sizes=sorted(set(sizes) | {1}))
    table = write_results(merge_profile(None, costs, measured), tmp.name, csv_file=False)[0]
    load = [os.getloadavg()[0]]
    print(f"latency table of {len(ids)} stitches in {time.perf_counter() - t:.0f} s; load average {load[0]:.2f} on {os.cpu_count()} CPUs")

    pngs = loadgen.fmnist_pngs(max(sizes) * 8)
    rows_out: list[dict[str, Any]] = []
    for size in [] if args.only_one_image else sizes:
        bodies = [loadgen.make_body("/predict", files=pngs[k * size:(k + 1) * size]) for k in range(8)]
        with server(args.model, str(table), size, large.id) as srv:
            port, engine = srv.port, int(srv.health()["model_pid"])
            for anchor in (small, large):
                srv.put_stitch({"stitch": anchor.id})
                loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, bodies, args.clients, 1.0, warmup=0.0))  # warm up
                # Rounds of (model alone, then the server), back to back: this machine's speed drifts by
                # tens of per cent over seconds (other tenants of its host), so a ratio is taken within
                # each round, where both saw the same machine, and the rounds' median is the figure.
                models, serveds, model_cpu_s, model_images, served_images = [], [], 0.0, 0.0, 0
                for _ in range(args.rounds):
                    c0 = time.process_time()
                    rate = model_only(net, anchor.id, size, args.model_seconds)[0]
                    model_cpu_s += time.process_time() - c0
                    model_images += rate * args.model_seconds
                    s0 = [cpu_seconds(srv.pid), cpu_seconds(engine), time.process_time()]
                    results = loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, bodies, args.clients, args.seconds, warmup=0.0))
                    s1 = [cpu_seconds(srv.pid), cpu_seconds(engine), time.process_time()]
                    ok = [r for r in results if r.status == 200]
                    k = sum(r.images for r in ok)
                    served_images += k
                    serveds.append((k / args.seconds, [b - a for a, b in zip(s0, s1)], len(results) - len(ok)))
                    models.append(rate)
                ratios = [sv[0] / m for sv, m in zip(serveds, models)]
                n = max(1, served_images)
                cpu = {"server_us_per_image": round(sum(sv[1][0] for sv in serveds) / n * 1e6, 1),
                       "model_process_us_per_image": round(sum(sv[1][1] for sv in serveds) / n * 1e6, 1),
                       "client_us_per_image": round(sum(sv[1][2] for sv in serveds) / n * 1e6, 1),
                       "model_only_us_per_image": round(model_cpu_s / max(model_images, 1) * 1e6, 1)}
                bound = cpu_bound(cpu, os.cpu_count() or 1)  # a ratio
                ratio = statistics.median(ratios)
                row = {"stitch": anchor.name, "images_per_request": size, "model_img_s": round(statistics.median(models), 1),
                       "server_img_s": round(statistics.median(sv[0] for sv in serveds), 1),
                       "ratio": round(ratio, 3), "ratio_per_round": [round(r, 3) for r in ratios],
                       "model_img_s_per_round": [round(m, 1) for m in models], "server_img_s_per_round": [round(sv[0], 1) for sv in serveds],
                       "non_200": sum(sv[2] for sv in serveds), "clients": args.clients, "load_average": round(os.getloadavg()[0], 2),
                       "cpu": cpu, "cpu_bound_ratio": round(bound, 3)}
                rows_out.append(row)
                print(f"{anchor.name:>14} x{size:<3} model only {row['model_img_s']:8.0f} img/s   server {row['server_img_s']:8.0f} img/s   "
                      f"ratio {ratio:.3f} (median of {args.rounds} rounds: {min(ratios):.2f}..{max(ratios):.2f}; bound by CPU times {bound:.2f})   "
                      f"({row['non_200']} not 200; load {row['load_average']})")

    # one image: the server's p50 minus the model's, against a bare endpoint that only decodes
    one = loadgen.make_body("/predict", raw=pngs[0])
    single: list[dict[str, Any]] = []
    bare_port = loadgen.free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare", str(bare_port), "--model", args.model])
    try:
        loadgen.wait_ready(f"http://127.0.0.1:{bare_port}", bare, 300)
        for path, extra in (("inline", ()), ("batched", ("--inline-max-images", "0"))):
            with server(args.model, str(table), max(sizes), small.id, *extra) as srv:
                engine = int(srv.health()["model_pid"])
                for anchor in (small, large):
                    srv.put_stitch({"stitch": anchor.id})
                    single.append(one_image_rounds(args, net, anchor, path, one, srv, engine, bare_port, bare.pid))
    finally:
        loadgen.stop(bare)
    parts = {} if args.only_one_image else {size: server_cpu_parts(net, pngs, size) for size in sizes}
    if parts:
        print(f"server-side work measured alone, CPU µs per image: {parts}")
    load.append(os.getloadavg()[0])
    print(f"load average {load[0]:.2f} before, {load[1]:.2f} after")

    lines: list[str] = []
    if rows_out:
        lines += ["| stitch | images per request | model only (img/s) | server (img/s) | server / model | bound by CPU times | "
             "CPU µs per image: server process / model process / client / model alone |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['stitch']} | {r['images_per_request']} | {r['model_img_s']:.0f} | {r['server_img_s']:.0f} | {r['ratio']:.2f} | "
              f"{r['cpu_bound_ratio']:.2f} | "
              f"{r['cpu']['server_us_per_image']:.0f} / {r['cpu']['model_process_us_per_image']:.0f} / {r['cpu']['client_us_per_image']:.0f}"
              f" / {r['cpu']['model_only_us_per_image']:.0f} |" for r in rows_out]
    if parts:
        lines += ["", "| images per request | decoding and normalising, alone (CPU µs per image) | multipart parsing, alone (CPU µs per image) |",
                  "|---|---|---|"]
        lines += [f"| {size} | {p['decode_normalise_us_per_image']:.0f} | {p['multipart_us_per_image']:.0f} |" for size, p in parts.items()]
    lines += ["", "| path | stitch | server p50 (ms) | model p50 (ms) | overhead (ms) | bare endpoint p50 (ms) | overhead / bare (median of rounds) | "
              "the server's own p50: latency / forward (ms) | ran inline | RSS (MiB): server process / model process | "
              "CPU µs a request: server process + model process - model alone (bare endpoint) | CPU overhead / bare |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} ({r.get('runtime', 'eager')}) | {r['stitch']} | {r['server_p50_ms']:.3f} | {r['model_p50_ms']:.3f} | {r['overhead_ms']:.3f} | "
              f"{r['bare_p50_ms']:.3f} | {r['ratio']:.2f} | {r['server_said_latency_p50_ms']:.3f} / {r['server_said_compute_p50_ms']:.3f} | "
              f"{r['ran_inline']:.0%} | {r['server_rss_mb']:.0f} / {r['model_process_rss_mb']:.0f} | "
              f"{r['cpu_us']['server_process']:.0f} + {r['cpu_us']['model_process']:.0f} - {r['cpu_us']['model_alone']:.0f} "
              f"({r['cpu_us']['bare_endpoint']:.0f}) | {r['cpu_ratio']:.2f} |" for r in single]
    print("\n" + "\n".join(lines))
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    (out / "overhead.json").write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k != "bare"}, "cpus": os.cpu_count(), "cpu": cpu_model(), "load_average": load,
        "throughput": rows_out, "one_image": single, "server_work_alone": parts, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1) + "\n")
    print(f"wrote {out / 'overhead.json'} and {out / 'overhead.md'}")
    print("SUMMARY overhead: server/model img/s " + ", ".join(f"{r['stitch']} x{r['images_per_request']} {r['ratio']:.2f}" for r in rows_out)
          + " (goal >= 0.8); one image overhead/bare " + ", ".join(f"{r['stitch']} ({r['path']}) {r['ratio']:.2f}" for r in single)
          + f" (goal <= 1.5); load average {load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M %Z')}")


if __name__ == "__main__":
    main()
