"""Load test of `snnet serve`: does switching stitches hold a latency SLO that the largest anchor breaks?

Three fresh server subprocesses, one after another, on the same network, latency table and load:
(a) the largest anchor pinned, (b) the smallest anchor pinned, (c) the adaptive controller. A bounded
open-loop load generator (asyncio + httpx, Poisson arrivals) ramps the offered load up and down in
stages; every request carries ``--images-per-request`` Fashion-MNIST test images as a batch
(multipart), so that the model, not HTTP, is most of each request's cost. For each server it
reports throughput, p50/p95/p99 latency, 503s and errors, and the mean top-1 of the stitches that
served (weighted by images, from the results file's measured accuracies); it writes
``bench_serve.json`` and one figure (``bench_serve.png`` and interactive ``bench_serve.html``) of
latency, offered load and the stitch in use over time.

The offered load and the SLO are set from what is measured here first, so the test means the
same on a faster or busier machine: the SLO is ``--slo-x`` times the largest anchor's time for a
full batch in the latency table (measured at the server's batch sizes, one thread), and the
stages are fractions of the requests per second the largest-anchor server answers end to end
(HTTP and decoding included) in a closed-loop probe before its run. Past 1.0 the largest anchor
cannot keep up and must queue and refuse; a cheaper stitch can.

    nice -n 10 python benchmarks/bench_serve.py                  # see --model and --results
    nice -n 10 python benchmarks/bench_serve.py --model DIR --results DIR/results.json --out bench/

Without --model it serves the demo's trained network (snnet-demo/train/final, with
snnet-demo/results.json) when `snnet demo` has been run here; otherwise the shipped family with its
stitching layers fitted by least squares (the demo's starting point, in a temporary folder), with the
top-1 of each stitch taken from docs/demo/results.json: what the demo measured for the same
architecture after training. Latency does not depend on the weights, so the load test is the same;
the accuracies are those a deployment of the demo's trained network would serve.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent (s from the start), how it went, and what served it."""

    t: float
    stage: int
    ms: float
    status: int  # HTTP status; 0 = transport error
    stitch: int | None
    images: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` Fashion-MNIST test images as PNG bytes (what a client would upload)."""
    from PIL import Image

    from snnet.data import FashionMNIST

    raw = FashionMNIST(split="test").images[:, 0]  # uint8 (N, 28, 28)
    rng = random.Random(seed)
    out = []
    for k in rng.sample(range(len(raw)), n):
        buf = io.BytesIO()
        Image.fromarray(raw[k].numpy()).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def profile_table(model: str, results: str, batch_sizes: list[int], out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Profile the stitches the server may use (the ladder, and the anchors) at the server's batch
    sizes with one thread, and write results rows with accuracy and latency_by_batch."""
    import torch

    from snnet.deploy import merge_profile, profile, read_rows
    from snnet.deploy.controller import ladder
    from snnet.model import StitchedNet

    net = StitchedNet.from_pretrained(model).eval()
    rows = merge_rows_with_costs(net, read_rows(results))
    ids = sorted({r.id for r in ladder(rows)} | {s.id for s in net.space.anchor_stitches()})
    torch.set_num_threads(1)
    measured, settings = profile(net, batch_size=1, warmup=3, repeats=15, device="cpu", threads=1, stitches=ids,
                                 progress=False, batch_sizes=batch_sizes)
    rows = merge_profile(rows, [], measured, settings)
    path = out / "bench_serve_results.json"
    path.write_text(json.dumps(rows, indent=1))
    return path, rows


def merge_rows_with_costs(net: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from snnet.results import merge_rows

    return merge_rows([c.to_dict() for c in net.costs()], rows, "the results")


def request_bodies(images: list[bytes], per_request: int, count: int = 32) -> list[tuple[bytes, str]]:
    """``count`` multipart bodies of ``per_request`` images each, encoded once (by httpx, as a
    client would send them), so the load generator spends next to nothing per request."""
    import httpx

    bodies = []
    for k in range(count):
        files = [("file", (f"{j}.png", images[(k * per_request + j) % len(images)], "image/png")) for j in range(per_request)]
        req = httpx.Request("POST", "http://x/predict", files=files)
        bodies.append((req.read(), req.headers["content-type"]))
    return bodies


async def post(client: Any, body: tuple[bytes, str]) -> Any:
    return await client.post("/predict", content=body[0], headers={"content-type": body[1]})


async def drive(url: str, bodies: list[tuple[bytes, str]], per_request: int, stages: list[float], stage_s: float,
                max_in_flight: int, seed: int) -> list[Sample]:
    """Open-loop Poisson arrivals at each stage's rate (requests/s); at most ``max_in_flight`` at once
    (an arrival beyond that is recorded as a client-side drop, status -1)."""
    import httpx

    rng = random.Random(seed)
    samples: list[Sample] = []
    in_flight = 0
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(stage: int, k: int) -> None:
            nonlocal in_flight
            sent = time.perf_counter()
            status, stitch = 0, None
            try:
                r = await post(client, bodies[k % len(bodies)])
                status = r.status_code
                if status == 200:
                    stitch = r.json()["stitch"]["id"]
            except httpx.HTTPError:
                pass
            finally:
                in_flight -= 1
            samples.append(Sample(sent - t0, stage, (time.perf_counter() - sent) * 1e3, status, stitch, per_request))

        tasks, k = [], 0
        next_t = 0.0
        for stage, rate in enumerate(stages):
            end = (stage + 1) * stage_s
            while True:
                next_t += rng.expovariate(rate)
                if next_t >= end:
                    next_t = end
                    break
                await asyncio.sleep(max(0.0, next_t - (time.perf_counter() - t0)))
                if in_flight >= max_in_flight:
                    samples.append(Sample(time.perf_counter() - t0, stage, 0.0, -1, None, per_request))
                    continue
                in_flight += 1
                tasks.append(asyncio.create_task(one(stage, k)))
                k += 1
        await asyncio.gather(*tasks)
    return sorted(samples, key=lambda s: s.t)


async def closed_loop(url: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> float:
    """Requests per second answered (200) by ``clients`` clients that each send the next request
    as soon as the last is answered: the server's capacity (after one second of warm-up)."""
    import httpx

    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        t0 = time.perf_counter()

        async def loop(c: int) -> None:
            nonlocal done
            k = c
            while time.perf_counter() - t0 < seconds:
                r = await post(client, bodies[k % len(bodies)])
                if r.status_code == 200 and time.perf_counter() - t0 > 1.0:
                    done += 1
                k += clients

        await asyncio.gather(*(loop(c) for c in range(clients)))
    return done / (seconds - 1.0)


def start_server(args: argparse.Namespace, results: Path, port: int, pin: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snnet", "serve", "--model", args.model, "--results", str(results), "--port", str(port),
           "--slo-ms", f"{args.slo_ms:.3f}", "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
           "--max-wait-ms", str(args.max_wait_ms), "--threads", "1", "--log-level", "warning"]
    if pin is not None:
        cmd += ["--stitch", pin]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def summarise(samples: list[Sample], duration: float, acc: dict[int, float], slo_ms: float, stages: list[float]) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    lat = [s.ms for s in ok]
    served = sum(s.images for s in ok)
    per_stage = []
    for k, rate in enumerate(stages):
        st = [s for s in samples if s.stage == k]
        st_ok = [s.ms for s in st if s.status == 200]
        per_stage.append({"offered_rps": rate, "sent": len(st), "ok": len(st_ok), "p95_ms": pct(st_ok, 0.95),
                          "rejected_503": sum(s.status == 503 for s in st),
                          "mean_top1": _mean_top1([s for s in st if s.status == 200], acc)})
    return {
        "requests": len(samples), "ok": len(ok), "throughput_rps": len(ok) / duration, "throughput_img_s": served / duration,
        "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95), "p99_ms": pct(lat, 0.99),
        "rejected_503": sum(s.status == 503 for s in samples),
        "errors": sum(s.status not in (200, 503, -1) for s in samples),
        "client_dropped": sum(s.status == -1 for s in samples),  # the generator's own bound (--max-in-flight) was hit
        "mean_top1": _mean_top1(ok, acc), "stitches": sorted({s.stitch for s in ok if s.stitch is not None}),
        "stages_within_slo": sum(1 for p in per_stage if p["p95_ms"] <= slo_ms), "per_stage": per_stage,
    }


def _mean_top1(ok: list[Sample], acc: dict[int, float]) -> float:
    n = sum(s.images for s in ok)
    return sum(acc[s.stitch] * s.images for s in ok if s.stitch is not None) / n if n else math.nan


def plot(runs: dict[str, dict[str, Any]], stages: list[float], stage_s: float, slo_ms: float, acc: dict[int, float],
         out: Path) -> list[Path]:
    """One figure, a column per server: latency (each request, rolling p95, SLO), offered and
    achieved load, and the top-1 of the stitch that served each request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(runs)
    steps_t = [k * stage_s for k in range(len(stages) + 1)]
    steps_r = stages + [stages[-1]]
    fig, axes = plt.subplots(3, len(names), figsize=(5 * len(names), 9), sharex=True, sharey="row", squeeze=False)
    pfig = make_subplots(rows=3, cols=len(names), shared_xaxes=True, shared_yaxes=True, subplot_titles=names,
                         vertical_spacing=0.06)
    for col, name in enumerate(names):
        samples = [Sample(**s) for s in runs[name]["samples"]]
        ok = [s for s in samples if s.status == 200]
        bad = [s for s in samples if s.status != 200]
        t = [s.t for s in ok]
        ms = [s.ms for s in ok]
        roll_t, roll_p95, done = [], [], []
        for k in range(int(math.ceil(len(stages) * stage_s))):  # p95 of each second
            window = [s.ms for s in ok if k <= s.t < k + 1]
            if window:
                roll_t.append(k + 0.5)
                roll_p95.append(pct(window, 0.95))
            done.append(sum(1 for s in ok if k <= s.t < k + 1))
        top1 = [acc.get(s.stitch, math.nan) for s in ok]
        ax = axes[0][col]
        ax.scatter(t, ms, s=3, alpha=0.35, label="request")
        ax.plot(roll_t, roll_p95, color="black", lw=1.5, label="p95 per second")
        ax.axhline(slo_ms, color="red", ls="--", label=f"SLO {slo_ms:.0f} ms")
        ax.set_yscale("log")
        ax.set_title(name)
        axes[1][col].step(steps_t, steps_r, where="post", color="gray", label="offered")
        axes[1][col].plot([k + 0.5 for k in range(len(done))], done, color="green", lw=1, label="answered (200)")
        if bad:
            axes[1][col].scatter([s.t for s in bad], [0] * len(bad), marker="|", color="red", s=30, label="503 / error")
        axes[2][col].scatter(t, top1, s=4, color="purple")
        axes[2][col].set_xlabel("time (s)")
        r = runs[name]["summary"]
        axes[2][col].set_title(f"mean top-1 {r['mean_top1']:.2f} %, p95 {r['p95_ms']:.0f} ms", fontsize=9)
        c = col + 1
        pfig.add_trace(go.Scattergl(x=t, y=ms, mode="markers", marker=dict(size=3, opacity=0.4), name=f"{name}: request",
                                    hovertext=[f"stitch {s.stitch}" for s in ok]), row=1, col=c)
        pfig.add_trace(go.Scatter(x=roll_t, y=roll_p95, line=dict(color="black"), name=f"{name}: p95 per second"), row=1, col=c)
        pfig.add_hline(y=slo_ms, line=dict(color="red", dash="dash"), row=1, col=c)
        pfig.add_trace(go.Scatter(x=steps_t, y=steps_r, line=dict(shape="hv", color="gray"), name="offered req/s"), row=2, col=c)
        pfig.add_trace(go.Scatter(x=[k + 0.5 for k in range(len(done))], y=done, line=dict(color="green"),
                                  name=f"{name}: answered req/s"), row=2, col=c)
        pfig.add_trace(go.Scattergl(x=t, y=top1, mode="markers", marker=dict(size=3, color="purple"), name=f"{name}: top-1 of stitch",
                                    hovertext=[f"stitch {s.stitch}" for s in ok]), row=3, col=c)
    axes[0][0].set_ylabel("latency (ms, log)")
    axes[1][0].set_ylabel("requests / s")
    axes[2][0].set_ylabel("top-1 % of the stitch serving")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle("snnet serve under a load ramp: latency, load and the stitch in use")
    fig.tight_layout()
    png, html = out / "bench_serve.png", out / "bench_serve.html"
    fig.savefig(png, dpi=110)
    pfig.update_yaxes(type="log", row=1, col=1)
    pfig.update_layout(title="snnet serve under a load ramp: latency (ms), offered/answered load (req/s), top-1 of the stitch serving",
                       height=900, showlegend=False)
    pfig.write_html(html, include_plotlyjs=True)  # self-contained, like the Pareto plots
    return [png, html]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="saved network (default: see above)")
    ap.add_argument("--results", default=None, help="results.json with measured top-1 (default: see above)")
    ap.add_argument("--out", default="bench-serve", help="folder for the JSON and the figure")
    ap.add_argument("--images-per-request", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--stages", default="0.3,0.6,1.0,1.5,1.0,0.6,0.3",
                    help="offered load per stage, as fractions of the largest anchor's measured capacity (req/s)")
    ap.add_argument("--stage-seconds", type=float, default=8.0)
    ap.add_argument("--slo-x", type=float, default=4.0, help="SLO = this x the largest anchor's full-batch time")
    ap.add_argument("--slo-ms", type=float, default=None, help="an explicit SLO instead of --slo-x")
    ap.add_argument("--max-in-flight", type=int, default=128)
    ap.add_argument("--modes", default="largest,smallest,adaptive")
    ap.add_argument("--table", default=None, help="results rows already profiled by this script (skip profiling)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        demo = Path("snnet-demo")
        if (demo / "train" / "final" / "config.json").is_file() and (demo / "results.json").is_file():
            args.model, args.results = str(demo / "train" / "final"), args.results or str(demo / "results.json")
        else:
            from snnet.commands.deploy import _load

            tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")  # removed at exit
            args.model = str(_load(None, trained=True).save_pretrained(Path(tmp.name) / "model"))
            args.results = args.results or str(ROOT / "docs" / "demo" / "results.json")
            print(f"no snnet-demo/ here: serving the shipped family with least-squares stitching layers ({args.model}); "
                  f"top-1 per stitch from {args.results}")
    if args.results is None or not Path(args.results).exists():
        raise SystemExit(f"--results {args.results} is missing: give a results.json with measured top-1 (`snnet eval`)")

    sizes = sorted({min(2 ** k, args.max_batch) for k in range(int(math.log2(args.max_batch)) + 1)} | {args.max_batch})
    t = time.perf_counter()
    if args.table:
        results, rows = Path(args.table), json.loads(Path(args.table).read_text())
    else:
        results, rows = profile_table(args.model, args.results, sizes, out)
    by_id = {int(r["id"]): r for r in rows}
    anchors = sorted((r for r in rows if r["is_anchor"]), key=lambda r: r["flops"])
    small, large = anchors[0], anchors[-1]

    def full_batch_ms(r: dict[str, Any]) -> float:
        return next(p["latency_ms"] for p in r["latency_by_batch"] if p["batch_size"] == args.max_batch)

    if args.slo_ms is None:
        args.slo_ms = args.slo_x * full_batch_ms(large)
    acc = {k: float(r["acc1"]) for k, r in by_id.items() if r.get("acc1") is not None}
    print(f"profiled in {time.perf_counter() - t:.0f}s: full batch ({args.max_batch}) {small['name']} {full_batch_ms(small):.1f} ms, "
          f"{large['name']} {full_batch_ms(large):.1f} ms; SLO {args.slo_ms:.1f} ms (p95) = {args.slo_x:g} x the latter; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    bodies = request_bodies(test_images(512), args.images_per_request)
    pins = {"largest": str(large["id"]), "smallest": str(small["id"]), "adaptive": None}
    modes = args.modes.split(",")
    if modes[0] != "largest":
        raise SystemExit("--modes must start with largest: its measured capacity sets the offered load")
    runs: dict[str, dict[str, Any]] = {}
    stages: list[float] = []
    capacity = math.nan
    for mode in modes:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, results, port, pins[mode])
        try:
            wait_ready(url, proc)
            if not stages:
                # the largest anchor's end-to-end capacity, HTTP and decoding included, as the machine is now
                capacity = asyncio.run(closed_loop(url, bodies, 2 * args.max_batch // args.images_per_request, 6.0))
                stages = [round(float(f) * capacity, 1) for f in args.stages.split(",")]
                print(f"{large['name']} pinned answers at most {capacity:.1f} req/s of {args.images_per_request} images "
                      f"(closed loop); offered load per {args.stage_seconds:g}s stage (req/s): {stages}")
            else:
                asyncio.run(closed_loop(url, bodies, 2, 2.0))  # the same warm-up for every server
            load0 = os.getloadavg()[0]
            samples = asyncio.run(drive(url, bodies, args.images_per_request, stages, args.stage_seconds, args.max_in_flight, 0))
            import httpx

            metrics = httpx.get(url + "/metrics", timeout=10).text
        finally:
            proc.terminate()
            proc.wait(60)
        summary = summarise(samples, len(stages) * args.stage_seconds, acc, args.slo_ms, stages)
        summary["switches"] = _metric(metrics, "snnet_stitch_switches_total")
        summary["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        runs[mode] = {"summary": summary, "samples": [asdict(s) for s in samples]}
        print(f"{mode:>9}: {summary['throughput_rps']:.1f} req/s ({summary['throughput_img_s']:.0f} img/s), "
              f"p50/p95/p99 {summary['p50_ms']:.1f}/{summary['p95_ms']:.1f}/{summary['p99_ms']:.1f} ms, "
              f"503s {summary['rejected_503']}, errors {summary['errors']}, mean top-1 {summary['mean_top1']:.2f} %, "
              f"stages with p95 <= SLO {summary['stages_within_slo']}/{len(stages)}, switches {summary['switches']:.0f}")

    header = "| server | throughput (req/s, img/s) | p50 / p95 / p99 ms | 503s | errors | mean top-1 % | stages p95 <= SLO |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for mode, run in runs.items():
        s = run["summary"]
        lines.append(f"| {mode} | {s['throughput_rps']:.1f}, {s['throughput_img_s']:.0f} | {s['p50_ms']:.1f} / {s['p95_ms']:.1f} / "
                     f"{s['p99_ms']:.1f} | {s['rejected_503']} of {s['requests']} | {s['errors']} | {s['mean_top1']:.2f} | "
                     f"{s['stages_within_slo']}/{len(stages)} |")
    print("\n" + "\n".join(lines))
    settings = {k: v for k, v in vars(args).items()}
    (out / "bench_serve.json").write_text(json.dumps({
        "settings": settings, "stages_rps": stages, "largest_capacity_rps": capacity, "results_file": str(results),
        "accuracy_from": args.results,
        "largest": large["name"], "smallest": small["name"], "cpus": os.cpu_count(),
        "summaries": {mode: run["summary"] for mode, run in runs.items()}}, indent=1) + "\n")
    (out / "bench_serve_samples.json").write_text(json.dumps({mode: run["samples"] for mode, run in runs.items()}))
    paths = plot(runs, stages, args.stage_seconds, args.slo_ms, acc, out)
    print("wrote " + ", ".join(str(p) for p in [out / "bench_serve.json", out / "bench_serve_samples.json", *paths]))


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return math.nan


if __name__ == "__main__":
    main()
