"""Core benchmarks: switching a stitch vs loading it from disk, and least-squares init time.

    python benchmarks/bench_core.py            # DeiT-Ti/S/B at 224 (random init, no download)
    python benchmarks/bench_core.py --quick    # the tiny test family, seconds

1. ``select`` vs load: the same stitch made active in the stitched network (``net.select``)
   and loaded as a standalone model from disk with ``snnet.deploy.load_stitch`` (build the
   route's modules, read the safetensors file into them) — measured side by side,
   interleaved, medians.
2. Least-squares initialisation of every stitching layer on 100 calibration images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import snnet

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
TINY = ["snnet_tiny_vit_ti", "snnet_tiny_vit_s", "snnet_tiny_vit_b"]


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny family instead of DeiT-Ti/S/B")
    ap.add_argument("--images", type=int, default=100, help="calibration images for least squares")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    names = TINY if args.quick else DEIT
    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = snnet.create_snnet(names).eval()
    print(f"built {len(names)} anchors, {len(net.space)} networks in {time.perf_counter() - t0:.1f}s "
          f"(torch threads: {torch.get_num_threads()})")

    # 1. switching vs loading, on the stitch whose standalone file is largest
    costs = net.costs()
    stitch = net.stitch(max((c for c in costs if not c.is_anchor), key=lambda c: c.params).id)
    from snnet.deploy import extract, load_stitch, save_stitch, stitch_config

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_stitch(extract(net, stitch), Path(tmp) / "stitch", stitch_config(net, stitch))
        other = net.space.stitches[0]

        def switch() -> None:
            net.select(other)
            net.select(stitch)

        def load() -> None:
            load_stitch(folder)

        select_s, load_s = [], []
        for _ in range(args.reps if args.quick else max(args.reps // 4, 3)):  # interleaved so both see the same machine state
            select_s.append(median_seconds(switch, 50) / 2)
            load_s.append(median_seconds(load, 1))
        sel, ld = statistics.median(select_s), statistics.median(load_s)
        size_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20
    print(f"\nstitch {stitch.name} ({size_mb:.1f} MB standalone)")
    print(f"  select():               {sel * 1e6:10.2f} us")
    print(f"  load from disk:         {ld * 1e6:10.2f} us")
    print(f"  ratio load / select:    {ld / sel:10.0f}x")

    # 2. least-squares initialisation on calibration images
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, *net.input_size, generator=gen)
               for _ in range((args.images + args.batch_size - 1) // args.batch_size)]
    report = net.init_stitching(batches, max_images=args.images, progress=True)
    finite = all(torch.isfinite(p).all() for p in net.stitch_layers.parameters())
    print(f"\nleast-squares init: {report.layers} stitching layers on {report.images} images "
          f"at {'x'.join(map(str, net.input_size[1:]))} in {report.seconds:.1f}s (all finite: {finite})")


if __name__ == "__main__":
    main()
