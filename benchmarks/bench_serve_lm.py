"""Serving a stitched language model under rising load: TTFT and TPOT p50/p95 and the stitch mix.

Starts ``snnet serve --model DIR`` (a subprocess: its own interpreter, as in production), reads the
token timings it measured at start (GET /stitch), and offers open-loop Poisson arrivals of
streamed completions at multiples of the most capable rung's capacity by those timings (one
generation at a time: 1 / (first-token time + (max_tokens - 1) x time per token)). Each load runs
twice: with the stitch chosen by the controller (``--slo-ms`` TTFT target), and pinned to the
most capable stitch (``PUT /stitch``), which is what a server without stitching would do. Per run:
requests answered, TTFT p50/p95 from the client's side (arrival to the first streamed text),
TPOT p50/p95 (the time between the first and the last chunk over the tokens between), the share
of requests within the TTFT target, and the stitches that served them.

Without ``--model`` it serves a random-init two-anchor GPT-2 family built here
(:func:`snnet.families.lm_tiny.tiny_lm`, widths 64 and 256): the text is noise, the timings are
real.

    python benchmarks/bench_serve_lm.py --loads 0.5,1,2,4 --duration 20 --out results/bench_serve_lm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from snnet.report import percentile

PROMPT = "def fibonacci(n):\n    "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"snnet serve exited: {proc.communicate()[0]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("snnet serve did not start")


async def _one(client: httpx.AsyncClient, body: dict[str, Any], delay: float, t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    out: dict[str, Any] = {"sent": sent - t0}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if event.get("choices"):  # text, or the last chunk of a completion that ended at once
                    first = first or now
                    last = now if event["choices"][0]["text"] else last
                if "usage" in event:
                    out["tokens"] = event["usage"]["completion_tokens"]
                if "snnet" in event:
                    out["stitch"], out["server_ttft_ms"] = event["snnet"]["stitch"], event["snnet"]["ttft_ms"]
    except httpx.HTTPError as e:
        out["status"], out["error"] = 0, type(e).__name__
    if first is not None:
        out["ttft_ms"] = (first - sent) * 1e3
        n = out.get("tokens", 0)
        if n > 1 and last is not None and last > first:  # between the first and the last piece of text
            out["tpot_ms"] = (last - first) * 1e3 / (n - 1)
    return out


async def _run(url: str, rate: float, duration: float, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, size=int(rate * duration * 2) + 10)
    times = np.cumsum(gaps)
    times = times[times < duration]
    body = {"model": "", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        body["model"] = (await client.get("/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter() + 0.2
        return list(await asyncio.gather(*(_one(client, {**body, "seed": k}, float(d), t0) for k, d in enumerate(times))))


def _summary(results: list[dict[str, Any]], slo_ms: float) -> dict[str, Any]:
    ok = [r for r in results if r.get("status") == 200 and "ttft_ms" in r]
    ttft = [r["ttft_ms"] for r in ok]
    tpot = [r["tpot_ms"] for r in ok if "tpot_ms" in r]
    mix = Counter(r.get("stitch", "?") for r in ok)
    return {"offered": len(results), "answered": len(ok), "refused": sum(r.get("status") not in (200,) for r in results),
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p95_ms": percentile(ttft, 0.95),
            "server_ttft_p50_ms": percentile([r.get("server_ttft_ms", np.nan) for r in ok], 0.5),
            "tpot_p50_ms": percentile(tpot, 0.5), "tpot_p95_ms": percentile(tpot, 0.95),
            "within_slo": sum(r["ttft_ms"] <= slo_ms for r in ok) / max(len(results), 1),  # refused: missed
            "tokens_mean": float(np.mean([r.get("tokens", 0) for r in ok])) if ok else 0.0,
            "mix": dict(mix.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a saved StitchedLM folder (default: a random-init GPT-2 pair built here)")
    ap.add_argument("--loads", default="0.5,1,2,4", help="offered loads, as multiples of the top rung's capacity")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slo-ms", type=float, default=None,
                    help="TTFT target (default: half the time the top rung takes for a whole request, by its timings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write every run's summary here (JSON)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-lm-") as tmp:
        model = args.model
        if model is None:
            from snnet.families.lm_tiny import tiny_lm

            model = str(Path(tmp) / "random-gpt2-pair")
            tiny_lm(((64, 2), (256, 8)), positions=256).save_pretrained(model)
        token = Path(tmp) / "token"
        token.write_text(secrets.token_hex(16))
        auth = {"Authorization": f"Bearer {token.read_text()}"}

        def start(slo_ms: float) -> tuple[subprocess.Popen, str]:
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "snnet", "serve", "--model", model, "--port", str(port), "--slo-ms",
                                     str(slo_ms), "--threads", str(args.threads), "--admin-token-file", str(token),
                                     "--log-level", "warning", "--max-queue", "4096"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            url = f"http://127.0.0.1:{port}"
            _wait(url, proc)
            return proc, url

        proc, url = start(args.slo_ms or 1000.0)
        try:
            policy = httpx.get(url + "/stitch").json()
            top = policy["ladder"][-1]
            slo = args.slo_ms or round((top["first_ms"][0][1] + (args.max_tokens - 1) * top["tpot_ms"]) / 2, 1)
            if args.slo_ms is None:  # restart with the target derived from this machine's timings
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                proc, url = start(slo)
                policy = httpx.get(url + "/stitch").json()
                top = policy["ladder"][-1]
            service_ms = top["first_ms"][0][1] + (args.max_tokens - 1) * top["tpot_ms"]
            capacity = 1e3 / service_ms
            print(f"model {model}; ladder {[r['name'] for r in policy['ladder']]}")
            print(f"top rung {top['name']}: first token {top['first_ms'][0][1]:.2f} ms, {top['tpot_ms']:.2f} ms/token -> "
                  f"{capacity:.2f} requests/s of {args.max_tokens} tokens; TTFT target {slo} ms; "
                  f"load average {os.getloadavg()[0]:.2f}")
            rows = []
            for load in [float(x) for x in args.loads.split(",")]:
                for mode in ("auto", "pinned-top"):
                    key = "auto" if mode == "auto" else top["name"]
                    httpx.put(url + "/stitch", json={"stitch": key}, headers=auth).raise_for_status()
                    rate = load * capacity
                    results = asyncio.run(_run(url, rate, args.duration, args.max_tokens, seed=int(load * 1000)))
                    row = {"load": load, "rate": rate, "mode": mode, "load_average": os.getloadavg()[0],
                           **_summary(results, slo)}
                    row["controller"] = {k: v for k, v in httpx.get(url + "/stitch").json().items()
                                         if k in ("slowdown", "rate", "generations")}
                    rows.append(row)
                    print(f"load {load:4.1f}x ({rate:6.2f}/s) {mode:10s}: {row['answered']:4d}/{row['offered']:4d} answered, "
                          f"TTFT p50 {row['ttft_p50_ms']:8.1f} (server {row['server_ttft_p50_ms']:8.1f}) p95 {row['ttft_p95_ms']:8.1f} ms, TPOT p50 {row['tpot_p50_ms']:6.2f} "
                          f"p95 {row['tpot_p95_ms']:6.2f} ms, within target {100 * row['within_slo']:5.1f} %, mix {row['mix']}, "
                          f"{row['controller']}",
                          flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"model": model if args.model else "random GPT-2 pair (64x2, 256x8)",
                                                  "slo_ms": slo, "max_tokens": args.max_tokens, "timings": policy["ladder"],
                                                  "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
