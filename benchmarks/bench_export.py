"""Exported stitch vs the same stitch inside the stitched network: latency and file size.

    python benchmarks/bench_export.py            # DeiT-Ti/S/B at 224 (random init, no download)
    python benchmarks/bench_export.py --quick    # the tiny test family, seconds

1. Latency: the stitch run by the stitched network (``net.select(s); net(x)``) and by its
   standalone export (:func:`snnet.deploy.extract`, the module ``load_stitch`` rebuilds), timed
   interleaved (A, B, A, B, ...) under ``torch.inference_mode`` after warm-up; medians and
   their ratio. Both run the same modules, so the ratio should be 1 within noise.
2. File size: the stitch's ``model.safetensors`` (:func:`snnet.deploy.save_stitch`) vs the whole
   stitched network's (``save_pretrained``).

Weights are random: neither latency nor size depends on their values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import snnet
from snnet import deploy
from snnet.report import human, table

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
TINY = ["snnet_tiny_vit_ti", "snnet_tiny_vit_s", "snnet_tiny_vit_b"]


def interleaved_medians(fns: list, reps: int, warmup: int) -> list[float]:
    """Median seconds of each function, run in turn so that drifts in machine load hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + reps):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny family instead of DeiT-Ti/S/B")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 15, 50 with --quick)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    names = TINY if args.quick else DEIT
    reps = args.reps or (50 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = snnet.create_snnet(names).eval()
    stitched = [s for s in net.space if not s.is_anchor]
    # the smallest anchor, a mid stitch of each pair of anchors, the largest anchor
    pairs = sorted({s.src for s in stitched})
    chosen = [net.space[0]] + [[s for s in stitched if s.src == a][len([s for s in stitched if s.src == a]) // 2]
                               for a in pairs] + [net.space[len(net.anchors) - 1]]
    x = torch.randn(args.batch_size, *net.input_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(net.save_pretrained(Path(tmp) / "net")) / "model.safetensors"
        whole_bytes = whole.stat().st_size
        for s in chosen:
            route = deploy.extract(net, s)
            out = deploy.save_stitch(route, Path(tmp) / str(s.id), deploy.stitch_config(net, s))
            size = (out / deploy.STITCH_WEIGHTS).stat().st_size

            def in_network() -> torch.Tensor:
                net.select(s)
                return net(x)

            with torch.inference_mode():
                assert (route(x) - in_network()).abs().max() <= 1e-5  # the same numbers, before timing them
                t_net, t_route = interleaved_medians([in_network, lambda: route(x)], reps, warmup=3)
            rows.append({"name": s.name, "flops": net.costs()[s.id].flops, "net_ms": 1e3 * t_net, "route_ms": 1e3 * t_route,
                         "ratio": t_route / t_net, "file": size, "size_ratio": size / whole_bytes})
    print(f"{'tiny' if args.quick else 'DeiT-Ti/S/B'} family, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{reps} interleaved runs (median); whole stitched network file {whole_bytes / 2**20:.2f} MiB")
    print(table(rows, [("name", "stitch"), ("flops", "FLOPs"), ("net_ms", "in network ms"), ("route_ms", "exported ms"),
                       ("ratio", "latency ratio"), ("file", "file"), ("size_ratio", "of whole file")],
                {"flops": human, "net_ms": lambda v: f"{v:.3f}", "route_ms": lambda v: f"{v:.3f}",
                 "ratio": lambda v: f"{v:.3f}", "file": lambda v: f"{v / 2**20:.2f} MiB", "size_ratio": lambda v: f"{v:.1%}"}))


if __name__ == "__main__":
    main()
