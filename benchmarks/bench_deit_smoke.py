"""Real-size smoke run: DeiT-Ti/S/B at 224 with the DeiT preset, checkpoint and resume, on this CPU.

Builds the paper's DeiT family at 224x224 with random weights (nothing is downloaded), generates
a small ImageFolder, and trains the SN-Net with ``snnet.recipes`` ``deit``: AdamW, the per-epoch
warm-up, RandAugment + random erasing, mixup/CutMix, repeated augmentation, drop-path 0.1 and hard
distillation from a RegNetY-160 teacher (random weights here, same cost). The run stops after
``--steps`` steps with a checkpoint, then a new process resumes it for ``--steps`` more. A plain
DeiT-B training step with the same recipe parts (mixup targets, the same teacher, AdamW) is timed
in another process of the same run, and so are, after the resumed run, steps of the SN-Net on
its DeiT-B route (the same work inside the stitched network). Each part runs in its own process,
so each peak resident memory is that part's own.

The batch is the preset's 128 cut to ``--batch-size`` and the least-squares init uses
``--init-images`` images (the preset's 100 would take minutes here); both are printed.

    nice -n 10 .venv/bin/python benchmarks/bench_deit_smoke.py            # batch 8, 3 + 3 steps
    nice -n 10 .venv/bin/python benchmarks/bench_deit_smoke.py --steps 2 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

CLASSES = 4
TEACHER = "regnety_160"  # the preset's regnety_160.deit_in1k, without its weights


def make_folder(root: Path, per_class: int) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (256, 256, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def recipe(args):
    from snnet.recipes import recipe_config

    return recipe_config("deit").override(batch_size=args.batch_size, init_images=args.init_images,
                                          num_classes=CLASSES)


def teacher():
    import timm

    torch.manual_seed(1)
    return timm.create_model(TEACHER, num_classes=CLASSES)


def snnet_part(args, data: str, out: str, resume: bool, queue) -> None:
    """Train the SN-Net to --steps (first call) or resume it to 2 x --steps (second call)."""
    from torch.utils.data import DataLoader

    import snnet
    from snnet.data import build_dataset
    from snnet.model import expand_family
    from snnet.train import train

    torch.set_num_threads(args.threads)
    rec = recipe(args)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    kwargs = rec.model.anchor_kwargs()
    net = snnet.create_snnet([snnet.AnchorSpec(n, False, None, kwargs) for n in expand_family("deit")])
    build = time.perf_counter() - t0
    dataset = build_dataset(data, "train", net.anchors[0].data_config, augment=True, seed=0,
                            transform_options=rec.data.transform_options())
    conf = rec.override(max_steps=2 * args.steps, out_dir=out, progress=False, tensorboard=False,
                        resume="auto" if resume else None, init_images=0 if resume else rec.model.init_images)
    t1 = time.perf_counter()
    tea = teacher()
    result = train(net, dataset, conf, teacher=tea, stop_after=None if resume else args.steps)
    train_s = time.perf_counter() - t1
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    largest = []
    if resume:  # the dearest route, DeiT-B itself, trained inside the SN-Net: the same work as the plain step
        from snnet.train import Trainer

        trainer = Trainer(net, conf.override(resume=None), total_steps=args.steps + 1, steps_per_epoch=args.steps + 1,
                          teacher=tea)
        trainer.sampler = _Always(len(net.anchors) - 1)
        x, y = next(iter(DataLoader(dataset, batch_size=args.batch_size, generator=torch.Generator().manual_seed(1))))
        for step in range(args.steps + 1):  # the first step allocates the optimizer state: not timed
            t0 = time.perf_counter()
            trainer.step(x, y)
            if step:
                largest.append(time.perf_counter() - t0)
    queue.put({"part": "resume" if resume else "start", "build_s": build, "train_call_s": train_s,
               "steps": result.step, "finished": result.finished, "peak_mb": peak_mb(),
               "rows": [r for r in rows if r["step"] > (args.steps if resume else 0)], "largest_s": largest,
               "networks": len(net.space), "params": sum(p.numel() for p in net.parameters()),
               "lr": conf.rates(1).lr})


class _Always:
    """A stitch 'sampler' that always picks one stitch."""

    def __init__(self, stitch: int) -> None:
        self.stitch = stitch

    def sample(self) -> int:
        return self.stitch


def plain_part(args, data: str, queue) -> None:
    """DeiT-B alone: the same transform, mixup targets, teacher and AdamW, timed step by step."""
    import timm
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from torch.utils.data import DataLoader

    from snnet.data import build_dataset
    from snnet.distill import distill_loss, teacher_logits

    torch.set_num_threads(args.threads)
    rec = recipe(args)
    torch.manual_seed(0)
    model = timm.create_model("deit_base_patch16_224", num_classes=CLASSES, drop_path_rate=rec.model.drop_path)
    dataset = build_dataset(data, "train", model.pretrained_cfg, augment=True, seed=0,
                            transform_options=rec.data.transform_options())
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    mix = Mixup(mixup_alpha=rec.data.mixup, cutmix_alpha=rec.data.cutmix, label_smoothing=rec.data.label_smoothing,
                num_classes=CLASSES)
    crit, tea = SoftTargetCrossEntropy(), teacher().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=rec.optim.weight_decay)
    times = []
    batches = iter(loader)
    for step in range(args.steps + 1):  # the first step warms up allocators and is not timed
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        t0 = time.perf_counter()
        x, y = mix(x, y)
        out = model(x)
        loss = (1 - rec.distill.alpha) * crit(out, y) + rec.distill.alpha * distill_loss(out, teacher_logits(tea, x), "hard")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    queue.put({"part": "plain", "step_s": times, "peak_mb": peak_mb(),
               "params": sum(p.numel() for p in model.parameters())})


def run(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    while True:  # a part that dies puts nothing in the queue: do not wait for it forever
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty
            if not p.is_alive():
                raise SystemExit(f"{target.__name__} failed with exit code {p.exitcode}") from None
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="steps before the checkpoint, and again after the resume")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--init-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = str(make_folder(Path(tmp) / "images", per_class=max(args.batch_size, 8)))
        out = str(Path(tmp) / "run")
        plain = run(plain_part, args, data)
        start = run(snnet_part, args, data, out, False)
        resumed = run(snnet_part, args, data, out, True)
    rows = start["rows"] + resumed["rows"]
    step_s = [args.batch_size / r["img_per_s"] for r in rows]
    plain_s = statistics.median(plain["step_s"])
    peak = max(start["peak_mb"], resumed["peak_mb"])
    print(f"DeiT-Ti/S/B at 224, random weights, {len(step_s)} steps of batch {args.batch_size} ({CLASSES}-class "
          f"generated ImageFolder), preset 'deit' (lr {start['lr']:.3g} at this batch, hard distillation from a "
          f"random {TEACHER}), {args.init_images} least-squares images, {args.threads} threads")
    print(f"SN-Net: {start['networks']} networks, {start['params'] / 1e6:.1f}M params; stopped at step "
          f"{start['steps']} with a checkpoint, resumed to step {resumed['steps']} (finished: {resumed['finished']})")
    print(f"{'':<28}{'s/step (median)':>16}{'s/step (mean)':>15}{'peak RSS MB':>13}")
    print(f"{'plain DeiT-B step':<28}{plain_s:>16.2f}{statistics.mean(plain['step_s']):>15.2f}{plain['peak_mb']:>13.0f}")
    largest = resumed["largest_s"]
    print(f"{'SN-Net step (any stitch)':<28}{statistics.median(step_s):>16.2f}{statistics.mean(step_s):>15.2f}{peak:>13.0f}")
    print(f"{'SN-Net step (DeiT-B route)':<28}{statistics.median(largest):>16.2f}{statistics.mean(largest):>15.2f}")
    print(f"{'ratio any stitch / DeiT-B':<28}{statistics.median(step_s) / plain_s:>16.2f}"
          f"{statistics.mean(step_s) / statistics.mean(plain['step_s']):>15.2f}{peak / plain['peak_mb']:>13.2f}")
    print(f"{'ratio DeiT-B route / DeiT-B':<28}{statistics.median(largest) / plain_s:>16.2f}"
          f"{statistics.mean(largest) / statistics.mean(plain['step_s']):>15.2f}")
    print("steps: " + ", ".join(f"{r['stitch_name']} {args.batch_size / r['img_per_s']:.1f}s" for r in rows))
    print(f"build 3 anchors {start['build_s']:.0f}s; first call (init + {args.steps} steps + checkpoint) "
          f"{start['train_call_s']:.0f}s; resumed call {resumed['train_call_s']:.0f}s")


if __name__ == "__main__":
    main()
