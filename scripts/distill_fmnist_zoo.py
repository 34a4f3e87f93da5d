#!/usr/bin/env python
"""The sceptic's control: give zoo members the joint training's distillation, alone.

An SN-Net's stitches are compared with networks trained once (``fmnist_zoo.json``). But joint
training also distils from the largest anchor, and that alone lifts a small network: would a
zoo member fine-tuned the same way do as well as the stitches? This script fine-tunes each
chosen zoo member exactly as the demo fine-tunes its anchors — AdamW at the anchors' rate
(``--lr`` x the demo's ``anchor_lr_scale``), weight decay on weights only, warm-up then cosine
to a hundredth, gradient clipping, label smoothing 0.1, soft distillation (weight 0.9,
temperature 1) from a frozen zoo member (``--teacher``, the demo family's largest anchor),
batch 64, no augmentation, the 50,000 training images outside the validation split — for the
demo's *whole* joint-training budget each (``--steps``, 3,500 steps: about 17 times what one
stitch of the 17-network space gets). It measures each on the validation split and writes a
zoo file of the same shape as ``fmnist_zoo.json`` (``image_steps`` and ``seconds`` include the
member's own training), so the comparison script reads it as a zoo:

    python scripts/train_fmnist_zoo.py --models fmnist_vit_w24_d3_p7 ...    # the members' weights, into runs/fmnist_zoo
    python scripts/distill_fmnist_zoo.py --lr 6e-3 --out runs/fmnist_zoo_distilled.json
    python scripts/fmnist_zoo_compare.py runs/demo-val --zoo runs/fmnist_zoo_distilled.json

By default the members are the zoo's validation frontier between the shipped family's
smallest and largest anchor, the teacher excluded (it is kept as it is, undistilled).
``--alpha 0`` is the control without a teacher: the same fine-tuning, cross-entropy only (the
teacher may then be fine-tuned too). ``--save-dir`` keeps the fine-tuned weights, named like the
zoo's, so that ``snnet demo --weights`` can stitch them:

    python scripts/distill_fmnist_zoo.py --alpha 0 --members fmnist_vit_w24_d3_p7 ... fmnist_vit_w96_d3_p7 \
        --save-dir runs/fmnist_zoo_ft --out runs/fmnist_zoo_ft.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snnet.data import FashionMNIST, make_loader, set_epoch  # noqa: E402
from snnet.demo import DemoConfig  # noqa: E402
from snnet.distill import distill_loss, teacher_logits  # noqa: E402
from snnet.optim import build_optimizer, lr_factor  # noqa: E402
from snnet.pretrained import FMNIST_FAMILY, FmnistVitSpec  # noqa: E402
from snnet.report import progress  # noqa: E402
from snnet.results import frontier  # noqa: E402
from snnet.zoo import load_zoo  # noqa: E402


def load(name: str, weights_dir: Path) -> torch.nn.Module:
    """A zoo member from its weights file, through timm's pretrained path."""
    path = weights_dir / f"{name}.safetensors"
    if not path.is_file():
        sys.exit(f"error: {path} is missing: train it first (python scripts/train_fmnist_zoo.py --models {name})")
    return timm.create_model("fmnist_vit", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                             **FmnistVitSpec.parse(name).model_kwargs())


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(-1) == y).sum())
        total += int(y.numel())
    return 100 * right / total


def fine_tune(student: torch.nn.Module, teacher: torch.nn.Module, train_set: FashionMNIST, cfg: DemoConfig,
              label: str) -> tuple[float, int]:
    """The demo's anchor fine-tuning (its TrainConfig/OptimConfig) on one model; seconds and steps."""
    tcfg, ocfg = cfg.train_configs()
    optimizer = build_optimizer(student, ocfg)  # every parameter is an "anchor" one: lr x anchor_lr_scale
    base = [g["lr"] for g in optimizer.param_groups]
    loader = make_loader(train_set, tcfg.batch_size, shuffle=True, seed=tcfg.seed, drop_last=True)
    student.train()
    step, t0 = 0, time.perf_counter()
    bar = progress(total=cfg.steps, desc=label, unit="step")
    epoch = 0
    while step < cfg.steps:
        for x, y in loader:
            if step >= cfg.steps:
                break
            f = lr_factor(step, ocfg, cfg.steps, ocfg.warmup_steps)
            for g, lr in zip(optimizer.param_groups, base):
                g["lr"] = lr * f
            out = student(x)
            ce = F.cross_entropy(out, y, label_smoothing=tcfg.label_smoothing)
            loss = ce
            if tcfg.distill_alpha > 0:  # alpha 0: the same fine-tuning without a teacher
                kd = distill_loss(out, teacher_logits(teacher, x), tcfg.distill_type, tcfg.distill_temperature)
                loss = (1 - tcfg.distill_alpha) * ce + tcfg.distill_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), ocfg.clip_grad)
            optimizer.step()
            step += 1
            bar.update(1)
        epoch += 1
        set_epoch(loader, epoch)
    bar.close()
    return time.perf_counter() - t0, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, default=REPO / "snnet" / "weights" / "fmnist_zoo.json")
    p.add_argument("--weights-dir", type=Path, default=REPO / "runs" / "fmnist_zoo")
    p.add_argument("--members", nargs="*", default=None, help="zoo names (default: the val frontier in the family's range)")
    p.add_argument("--teacher", default=None, help="zoo name of the teacher (default: the family's largest anchor)")
    p.add_argument("--lr", type=float, default=DemoConfig.lr, help="the demo's --lr (members train at lr x anchor_lr_scale)")
    p.add_argument("--steps", type=int, default=DemoConfig.steps)
    p.add_argument("--alpha", type=float, default=DemoConfig.distill_alpha,
                   help="weight of the distillation term (0: the same fine-tuning without a teacher, a control)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "fmnist_zoo_distilled.json")
    p.add_argument("--save-dir", type=Path, default=None,
                   help="also save each fine-tuned member as <name>.safetensors here (e.g. to use them as demo anchors)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    zoo = json.loads(args.zoo.read_text())
    models = {m["name"]: m for m in zoo["models"]}
    family = [FMNIST_FAMILY[n].name for n in FMNIST_FAMILY]
    teacher_name = args.teacher or family[-1]
    lo, hi = models[family[0]]["flops"], models[family[-1]]["flops"]
    if args.members is None:
        args.members = [r.name for r in frontier(load_zoo(args.zoo, "val")) if lo <= r.flops <= hi and r.name != teacher_name]
    cfg = DemoConfig(out="/tmp/unused", lr=args.lr, steps=args.steps, distill_alpha=args.alpha, progress=True)
    teacher = load(teacher_name, args.weights_dir).eval()
    data = dict(mean=(0.2860,), std=(0.3530,))
    train_set = FashionMNIST(split="train", **data)
    val = make_loader(FashionMNIST(split="val", **data), 1000, shuffle=False)
    # the teacher as it is, unless it is fine-tuned itself (possible without distillation)
    out_models = [] if teacher_name in args.members else [dict(models[teacher_name], distilled=False)]
    for name in args.members:
        torch.manual_seed(cfg.seed)
        student = load(name, args.weights_dir)
        before = accuracy(student, val)
        seconds, steps = fine_tune(student, teacher, train_set, cfg, name)
        after = accuracy(student, val)
        print(f"{name}: val {before:.2f}% -> {after:.2f}% ({after - before:+.2f}) after {steps} steps "
              f"(distillation weight {cfg.distill_alpha:g}) in {seconds:.0f}s", flush=True)
        if args.save_dir is not None:
            from safetensors.torch import save_file

            args.save_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()},
                      str(args.save_dir / f"{name}.safetensors"))
        m = models[name]
        out_models.append({**m, "val_acc1": round(after, 2), "test_acc1": None, "val_acc1_before": m["val_acc1"],
                           "val_acc1_measured_before": round(before, 2),
                           "image_steps": m["image_steps"] + steps * cfg.batch_size,
                           "seconds": round(m["seconds"] + seconds, 1), "distilled": cfg.distill_alpha > 0,
                           "distill": {"teacher": teacher_name if cfg.distill_alpha > 0 else None, "steps": steps, "batch_size": cfg.batch_size,
                                       "lr": cfg.lr * cfg.anchor_lr_scale, "alpha": cfg.distill_alpha,
                                       "seconds": round(seconds, 1)}})
        result = {**{k: v for k, v in zoo.items() if k != "models"}, "models": out_models,
                  "note": "zoo members fine-tuned with the demo's anchor distillation (scripts/distill_fmnist_zoo.py); "
                          "test top-1 not measured"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every member: an interrupted run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
