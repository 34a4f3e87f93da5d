"""Where the model process's time goes: its forward against the same forward back to back, side by side.

`bench_serve_overhead.py` finds the server bound by its model process at 16 small images a request:
the process spends more CPU per image than the model alone. This splits that extra time in two. In
each round the model alone runs back to back for a few seconds (as the overhead benchmark measures
it), then the server, pinned to the same stitch, answers closed-loop clients; the model process's
own forward time per batch comes from the server's ``snnet_batch_seconds`` histogram and its CPU
time from /proc. The forward's excess is the same work run slower beside the server process and the
client; the rest of the CPU excess is the batching loop around it.

    python benchmarks/bench_model_process.py                 # the smallest anchor, 16 images a request
    python benchmarks/bench_model_process.py --largest --images 64

To see the loop's pieces, profile the model process while it runs (``py-spy record -p PID``; its pid
is in ``GET /health`` as ``model_pid``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve_overhead import cpu_seconds, model_only, server  # noqa: E402


def histogram(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram on ``url``/metrics (prometheus_client's own parser)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples}
    if f"{name}_sum" not in samples or f"{name}_count" not in samples:
        raise SystemExit(f"{name} is not on {url}/metrics")
    return samples[f"{name}_sum"], samples[f"{name}_count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--largest", action="store_true", help="the largest anchor instead of the smallest")
    ap.add_argument("--images", type=int, default=16, help="images per request (and --max-batch)")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients in flight")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of each side per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    from snnet.commands.deploy import _load
    from snnet.deploy import loadgen, merge_profile, profile
    from snnet.model import StitchedNet
    from snnet.results import write_results

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="probe-model-process-")
    model = str(_load(None, trained=False).save_pretrained(Path(tmp.name) / "model"))
    net = StitchedNet.from_pretrained(model).eval()
    costs = net.costs()
    anchors = sorted((c for c in costs if c.is_anchor), key=lambda c: c.flops)
    stitch = anchors[-1] if args.largest else anchors[0]
    measured, _ = profile(net, batch_size=1, warmup=2, repeats=3, device="cpu", threads=1, stitches=[stitch.id], progress=False,
                          batch_sizes=sorted({1, args.images}))
    table = write_results(merge_profile(None, costs, measured), tmp.name, csv_file=False)[0]
    pngs = loadgen.fmnist_pngs(args.images * 8)
    bodies = [loadgen.make_body("/predict", files=pngs[k * args.images:(k + 1) * args.images]) for k in range(8)]
    print(f"{stitch.name}, {args.images} images a request and a batch, {args.clients} clients; per batch:")
    with server(model, str(table), args.images, stitch.id) as srv:
        port, engine = srv.port, int(srv.health()["model_pid"])
        url = f"http://127.0.0.1:{port}"
        loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, bodies, args.clients, 1.0, warmup=0.0))  # warm up
        for _ in range(args.rounds):
            _, alone_ms, alone_cpu_us = model_only(net, stitch.id, args.images, args.seconds)
            s0, n0 = histogram(url, "snnet_batch_seconds")
            c0 = cpu_seconds(engine)
            loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", port, bodies, args.clients, args.seconds, warmup=0.0))
            s1, n1 = histogram(url, "snnet_batch_seconds")
            c1 = cpu_seconds(engine)
            n = max(n1 - n0, 1)
            forward_us, process_us = (s1 - s0) / n * 1e6, (c1 - c0) / n * 1e6
            print(f"  model alone: forward p50 {alone_ms * 1e3:.0f} µs, CPU {alone_cpu_us:.0f} µs | model process ({n:.0f} batches): "
                  f"forward mean {forward_us:.0f} µs, CPU {process_us:.0f} µs; excess {process_us - alone_cpu_us:.0f} µs, "
                  f"of which the forward {forward_us - alone_ms * 1e3:.0f} µs and the loop {process_us - forward_us:.0f} µs")


if __name__ == "__main__":
    main()
