#!/usr/bin/env python
"""The sceptic's control: give zoo members the joint training's distillation, alone.

An SN-Net's stitches are compared with networks trained once (``fmnist_zoo.json``). But joint
training also distils from the largest anchor, and that alone lifts a small network: would a
zoo member fine-tuned the same way do as well as the stitches? This script fine-tunes each
chosen zoo member exactly as the demo fine-tuned its anchors when this was measured -- the
``demo-blocks`` recipe (``snnet/recipes/demo-blocks.yaml``) through snnet's training loop: AdamW at the anchors' rate (the
member is all anchor: ``optim.lr`` x ``optim.anchor_lr_scale``), weight decay on weights only,
warm-up then cosine to a hundredth, gradient clipping, label smoothing 0.1, soft distillation
(weight 0.9, temperature 1) from a frozen zoo member (``--teacher``, the demo family's largest
anchor), batch 64, no augmentation, the 50,000 training images outside the validation split --
for the demo's *whole* joint-training budget each (``--steps``, 3,500 steps: about 17 times what
one stitch of the 17-network space gets). It measures each on the validation split and writes a
zoo file of the same shape as ``fmnist_zoo.json`` (``image_steps`` and ``seconds`` include the
member's own training), so the comparison script reads it as a zoo:

    python scripts/train_fmnist_zoo.py --models fmnist_vit_w24_d3_p7 ...    # the members' weights, into runs/fmnist_zoo
    python scripts/distill_fmnist_zoo.py --lr 6e-3 --out runs/fmnist_zoo_distilled.json
    python scripts/fmnist_zoo_compare.py runs/demo-val --zoo runs/fmnist_zoo_distilled.json

By default the members are the zoo's validation frontier between the shipped family's
smallest and largest anchor, the teacher excluded (it is kept as it is, undistilled).
``--alpha 0`` is the control without a teacher: the same fine-tuning, cross-entropy only (the
teacher may then be fine-tuned too). ``--save-dir`` keeps the fine-tuned weights, named like the
zoo's, so that ``snnet demo --demo.weights`` can stitch them (with ``--recipe demo-blocks
--space.routes null``, the space and training these were measured with):

    python scripts/distill_fmnist_zoo.py --alpha 0 --members fmnist_vit_w24_d3_p7 ... fmnist_vit_w96_d3_p7 \\
        --save-dir runs/fmnist_zoo_ft --out runs/fmnist_zoo_ft.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

import snnet
from snnet.commands.config_cli import Legacy, dump_yaml, parse
from snnet.errors import SnnetError
from snnet.evaluate import evaluate_model
from snnet.io import atomic_write
from snnet.members import create_member
from snnet.pretrained import FMNIST_FAMILY, FmnistVitSpec
from snnet.results import frontier
from snnet.tasks import get_task
from snnet.train import train
from snnet.zoo import load_zoo

WEIGHTS = Path(snnet.__file__).parent / "weights"


@dataclass(frozen=True)
class DistillOptions:
    """Which zoo members to fine-tune, from which teacher, and where the results go."""

    zoo: str = str(WEIGHTS / "fmnist_zoo.json")
    """The zoo table the members come from."""
    weights_dir: str = "runs/fmnist_zoo"
    """Where the members' weights are (scripts/train_fmnist_zoo.py writes them)."""
    members: tuple[str, ...] | None = None
    """Zoo names (default: the validation frontier in the family's FLOPs range)."""
    teacher: str | None = None
    """Zoo name of the teacher (default: the family's largest anchor)."""
    out: str = "runs/fmnist_zoo_distilled.json"
    """The zoo file written."""
    save_dir: str | None = None
    """Also save each fine-tuned member as <name>.safetensors here (e.g. to use them as demo anchors)."""
    runs: str = "runs/fmnist_zoo_distilled"
    """Where each member's fine-tuning run goes (runs/<member>; replaced on each run)."""
    threads: int = 1
    """torch threads."""


LEGACY = {"--lr": Legacy("optim.lr"), "--steps": Legacy("schedule.max_steps"), "--alpha": Legacy("distill.alpha"),
          "--zoo": Legacy("distill_zoo.zoo"), "--weights-dir": Legacy("distill_zoo.weights_dir"),
          "--members": Legacy("distill_zoo.members", kind="words"), "--teacher": Legacy("distill_zoo.teacher"),
          "--threads": Legacy("distill_zoo.threads"), "--out": Legacy("distill_zoo.out"),
          "--save-dir": Legacy("distill_zoo.save_dir"), "--set": Legacy("", kind="set")}


def load(name: str, weights_dir: Path) -> torch.nn.Module:
    """A zoo member from its weights file, through timm's pretrained path."""
    path = weights_dir / f"{name}.safetensors"
    if not path.is_file():
        raise SnnetError(f"{path} is missing: train it first (python scripts/train_fmnist_zoo.py --models {name})")
    return create_member("fmnist_vit", FmnistVitSpec.parse(name).model_kwargs(), path)


def main(argv: list[str] | None = None) -> None:
    parsed = parse(sys.argv[1:] if argv is None else argv, "distill_fmnist_zoo.py", legacy=LEGACY,
                   extra={"distill_zoo": DistillOptions}, default_recipe="demo-blocks", description=__doc__.split("\n\n")[0])
    config, args = parsed.config, parsed.extra["distill_zoo"]
    if parsed.flags["--print-config"]:
        print(dump_yaml(config, {"distill_zoo": args}), end="")
        return
    torch.set_num_threads(args.threads)
    zoo = json.loads(Path(args.zoo).read_text())
    models = {m["name"]: m for m in zoo["models"]}
    family = [FMNIST_FAMILY[n].name for n in FMNIST_FAMILY]
    teacher_name = args.teacher or family[-1]
    lo, hi = models[family[0]]["flops"], models[family[-1]]["flops"]
    members = args.members
    if members is None:
        members = [r.name for r in frontier(load_zoo(args.zoo, "val")) if lo <= r.flops <= hi and r.name != teacher_name]
    alpha = config.distill.alpha
    teacher = load(teacher_name, Path(args.weights_dir)).eval() if alpha > 0 else None
    # alpha 0: the same fine-tuning without a teacher, a control
    config = config.override(teacher=None) if alpha == 0 else config
    # the teacher as it is, unless it is fine-tuned itself (possible without distillation)
    out_models = [] if teacher_name in members else [dict(models[teacher_name], distilled=False)]
    for name in members:
        torch.manual_seed(config.run.seed)
        student = load(name, Path(args.weights_dir))
        task = get_task(config.task, config.data, student)
        data_config = resolve_data_config(model=student)
        val = DataLoader(task.dataset(config.data, data_config, config.run.seed, split="val", train=False),
                         batch_size=1000)
        before = evaluate_model(student, val, progress=False, task=task).acc1
        run = config.override(out_dir=str(Path(args.runs) / name), overwrite=True)  # a scratch run, as the demo's
        result = train(student, task.dataset(config.data, data_config, config.run.seed), run, teacher=teacher)
        after = evaluate_model(student, val, progress=False, task=task).acc1
        steps, seconds = result.step, result.seconds
        print(f"{name}: val {before:.2f}% -> {after:.2f}% ({after - before:+.2f}) after {steps} steps "
              f"(distillation weight {alpha:g}) in {seconds:.0f}s", flush=True)
        if args.save_dir is not None:
            from safetensors.torch import save_file

            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
            atomic_write(Path(args.save_dir) / f"{name}.safetensors", lambda tmp: save_file(state, str(tmp)))
        m = models[name]
        rates = config.rates()
        out_models.append({**m, "val_acc1": round(after, 2), "test_acc1": None, "val_acc1_before": m["val_acc1"],
                           "val_acc1_measured_before": round(before, 2),
                           "image_steps": m["image_steps"] + steps * config.data.batch_size,
                           "seconds": round(m["seconds"] + seconds, 1), "distilled": alpha > 0,
                           "distill": {"teacher": teacher_name if alpha > 0 else None, "steps": steps,
                                       "batch_size": config.data.batch_size,
                                       "lr": rates.lr * config.optim.anchor_lr_scale, "alpha": alpha,
                                       "seconds": round(seconds, 1)}})
        result_file = {**{k: v for k, v in zoo.items() if k != "models"}, "models": out_models,
                       "note": "zoo members fine-tuned with the demo's anchor distillation (scripts/distill_fmnist_zoo.py); "
                               "test top-1 not measured"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result_file, indent=2) + "\n"
        atomic_write(args.out, lambda tmp: tmp.write_text(text))  # after every member: an interrupted run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except SnnetError as e:  # bad settings: one line, as snnet's commands say it
        sys.exit(f"error: {e}")
