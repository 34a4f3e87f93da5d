"""Recipes, distillation, learning-rate schedule and regularisers: tests that a wrong recipe would fail.

Expected values come from outside snnet's code: the loss formulas written out here, timm's own
``CosineLRScheduler`` (the scheduler the reference code steps) for the rate curves, and the
reference's numbers (its configs and README commands) for the presets.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn

import snnet
from snnet.data import DatasetError, build_dataset
from snnet.distill import TeacherError, build_teacher
from snnet.config import TrainConfig
from snnet.recipes import RecipeError, recipe_config
from snnet.sampling import EpochSampler
from snnet.train import Trainer, train

from .conftest import TINY_VITS, Synthetic, cfg, _params, _image_folder


def tiny(classes: int = 10) -> snnet.StitchedNet:
    torch.manual_seed(0)
    return snnet.create_snnet(TINY_VITS[:2], num_classes=classes)


class Known(nn.Module):
    """A teacher with fixed logits that records the mode and grad state of every call."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.num_classes = logits.shape[1]
        self.weight = nn.Parameter(torch.ones(1))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.logits[: len(x)] * self.weight


# ------------------------------------------------------------------ distillation


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distillation_changes_the_loss_by_the_intended_amount(kind):
    net = tiny()
    x, y = Synthetic(8).tensors
    teacher_logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1)) * 3
    alpha, temp = 0.3, 2.0
    base_conf = TrainConfig().override(progress=False, label_smoothing=0.0)
    stitch = net.space[3]
    with torch.no_grad():
        net.select(stitch)
        out = net(x)
    ce = F.cross_entropy(out, y).item()
    if kind == "hard":  # cross-entropy on the teacher's top class
        kd = F.cross_entropy(out, teacher_logits.argmax(1)).item()
    else:  # KL(teacher || student) at temperature T, times T^2, averaged over the batch
        p_t = torch.softmax(teacher_logits / temp, 1)
        kd = (p_t * (p_t.log() - torch.log_softmax(out / temp, 1))).sum(1).mean().item() * temp ** 2
    plain = Trainer(net, base_conf, total_steps=1).backward(x, y, stitch)
    conf = base_conf.override(distill_type=kind, distill_alpha=alpha, distill_temperature=temp)
    with_teacher = Trainer(net, conf, total_steps=1, teacher=Known(teacher_logits)).backward(x, y, stitch)
    assert plain == pytest.approx(ce, rel=1e-5)
    assert with_teacher == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    assert with_teacher - plain == pytest.approx(alpha * (kd - ce), rel=1e-4, abs=1e-6)


def test_teacher_runs_in_eval_mode_without_gradients(tmp_path):
    teacher = Known(torch.randn(8, 10)).train()  # handed over in training mode on purpose
    net = tiny()
    train(net, Synthetic(16), cfg(tmp_path, max_steps=2, init_images=0, distill_type="hard"), teacher=teacher)
    assert len(teacher.calls) == 3 and set(teacher.calls) == {(False, False)}  # the check's probe, then a call a step
    assert not teacher.weight.requires_grad and teacher.weight.grad is None and teacher.weight.item() == 1.0


def test_a_teacher_that_cannot_teach_is_refused_before_any_work(tmp_path):
    net = tiny(classes=7)
    data = Synthetic(16, classes=7)
    with pytest.raises(TeacherError, match="predicts 10 classes but the network predicts 7"):
        train(net, data, cfg(tmp_path, max_steps=1), teacher=Known(torch.randn(8, 10)))
    with pytest.raises(TeacherError, match="shares weights"):
        train(net, data, cfg(tmp_path, max_steps=1), teacher=net.anchors[-1])
    assert not (tmp_path / "run").exists()
    # a timm teacher keeps its own head: a 10-class model is not silently given a random 7-class one
    import timm

    path = tmp_path / "teacher.pth"
    torch.save(timm.create_model("snnet_tiny_vit_b").state_dict(), path)
    with pytest.raises(TeacherError, match="teacher 'snnet_tiny_vit_b' predicts 10 classes but the network predicts 7"):
        build_teacher(net, "snnet_tiny_vit_b", file=str(path))
    assert build_teacher(tiny(), "snnet_tiny_vit_b", file=str(path)).num_classes == 10
    with pytest.raises(TeacherError, match="random weights"):
        build_teacher(net, "snnet_tiny_vit_b", pretrained=False)


def test_a_teacher_for_other_images_is_refused_before_any_work(tmp_path):
    # a teacher with the network's classes but built for another image size failed inside the first step
    import timm

    teacher = timm.create_model("snnet_tiny_vit_b", img_size=64)
    assert teacher.num_classes == 10
    with pytest.raises(TeacherError, match=r"cannot run on the network's images of shape \(3, 32, 32\)"):
        train(tiny(), Synthetic(16), cfg(tmp_path, max_steps=1, init_images=0), teacher=teacher)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ learning rates


def timm_curve(lr: float, warmup_lr: float, min_lr: float, t_initial: int, warmup: int, prefix: bool, epochs: bool):
    """The rate at t (epoch or step) by timm's CosineLRScheduler, as the reference code builds it."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=t_initial, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
                              warmup_prefix=prefix, t_in_epochs=epochs, cycle_limit=1)
    return lambda t: sched._get_lr(t)[0]


def rates_by_step(recipe_name: str, world: int, steps_per_epoch: int, epochs: int):
    """Every step's (stitching-layer, anchor) rate from a real Trainer built with the recipe."""
    conf = recipe_config(recipe_name).override(epochs=epochs, progress=False)
    # the rule scales to the global batch of `world` processes: resolve there, train here on one
    rates = conf.rates(world)
    conf = conf.override(lr=rates.lr, min_lr=rates.min_lr, warmup_lr=rates.warmup_lr, lr_base_batch=None,
                         scale_lr_bounds=False)
    net = tiny()
    total = epochs * steps_per_epoch
    warm = conf.schedule.warmup(steps_per_epoch, total)
    trainer = Trainer(net, conf, total_steps=total, warmup_steps=warm, steps_per_epoch=steps_per_epoch)
    out = []
    for _ in range(total):
        groups = trainer.optimizer.param_groups
        out.append((next(g["lr"] for g in groups if not g["anchor"]), next(g["lr"] for g in groups if g["anchor"])))
        trainer.optimizer.step()  # no gradients: nothing moves, only the schedule advances
        trainer.scheduler.step()
    return rates, out


def test_deit_rates_follow_the_reference_curve_on_8x128():
    spe, epochs = 3, 50
    oconf, rates = rates_by_step("deit", world=8, steps_per_epoch=spe, epochs=epochs)
    assert oconf.lr == pytest.approx(1e-4)  # 5e-5 x (128 x 8) / 512, as the reference's main.py
    ref = timm_curve(1e-4, 1e-7, 1e-6, t_initial=epochs, warmup=5, prefix=False, epochs=True)
    for k, (stitch_lr, anchor_lr) in enumerate(rates):
        assert stitch_lr == pytest.approx(ref(k // spe), rel=1e-9), k  # constant through each epoch
        assert anchor_lr == stitch_lr  # one rate for the whole network
    assert rates[0][0] == pytest.approx(1e-7) and rates[5 * spe][0] == pytest.approx(ref(5))
    assert max(r for r, _ in rates) < 1e-4 and rates[-1][0] < 2e-6


def test_swin_rates_and_anchor_groups_at_every_step():
    spe, epochs = 2, 10
    oconf, rates = rates_by_step("swin", world=8, steps_per_epoch=spe, epochs=epochs)
    total, warm = spe * epochs, 5 * spe
    # the Swin code scales peak, warm-up and minimum rates alike: 5e-4, 5e-7, 5e-6 x 1024 / 512
    assert (oconf.lr, oconf.warmup_lr, oconf.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
    ref = timm_curve(1e-3, 1e-6, 1e-5, t_initial=total - warm, warmup=warm, prefix=True, epochs=False)
    for k, (stitch_lr, anchor_lr) in enumerate(rates):
        assert stitch_lr == pytest.approx(ref(k), rel=1e-9), k
        assert anchor_lr == pytest.approx(0.1 * ref(k), rel=1e-9), k  # BASE_LR_SCALE 0.1


def test_param_groups_hold_the_stitching_layers_and_the_anchors():
    net = tiny()
    conf = TrainConfig().override(progress=False, lr=1e-3, lr_base_batch=None, anchor_lr_scale=0.1)
    trainer = Trainer(net, conf, total_steps=4)
    where = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in net.named_parameters():
        g = where[id(p)]
        assert g["anchor"] == (not name.startswith("stitch_layers.")), name
        assert g["lr"] == pytest.approx(1e-4 if g["anchor"] else 1e-3)
        no_decay = p.ndim == 1 or name.endswith(("pos_embed", "cls_token"))
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert len(where) == sum(1 for _ in net.parameters())


def test_resnet_recipe_is_sgd_at_the_reference_rate():
    conf = recipe_config("resnet")
    optim, schedule, rates = conf.optim, conf.schedule, conf.rates(world_size=8)
    assert rates.lr == pytest.approx(0.05)  # the README's --lr 0.05 on 8 x 128
    assert (optim.optimizer, optim.momentum, optim.nesterov, optim.weight_decay) == ("sgd", 0.9, True, 2e-5)
    assert (schedule.epochs, schedule.warmup_epochs, rates.warmup_lr, rates.min_lr) == (30, 5, 1e-5, 0.0)
    trainer = Trainer(tiny(), conf.override(progress=False), total_steps=2, steps_per_epoch=1)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in trainer.optimizer.param_groups)


PAPER = ("deit", "swin", "resnet", "resnet-swin", "levit")  # the recipes of the paper's code


def test_presets_hold_the_reference_values():
    from snnet.recipes import recipe_path

    deit, swin, resnet = (recipe_config(n) for n in ("deit", "swin", "resnet"))
    assert (deit.schedule.epochs, deit.data.batch_size, deit.optim.lr, deit.schedule.warmup_epochs,
            deit.model.drop_path) == (50, 128, 5e-5, 5, 0.1)
    assert (deit.distill.type, deit.distill.alpha, deit.data.repeated_aug, deit.data.mixup,
            deit.data.cutmix) == ("hard", 0.5, 3, 0.8, 1.0)
    assert (swin.optim.anchor_lr_scale, swin.model.drop_path, swin.optim.clip_grad, swin.data.repeated_aug) == (
        0.1, 0.2, 5.0, 1)
    assert all(".ms_in22k_ft_in1k" in n for n in swin.model.anchors.split(","))  # the paper's ImageNet-22k->1k weights
    assert resnet.model.anchors == "resnet18.tv_in1k,resnet50.a1_in1k"  # timm 0.7's default weights in the reference
    assert all(recipe_config(n).distill.teacher == "regnety_160.deit_in1k" for n in PAPER)  # DeiT's RegNetY-160 teacher
    assert all("ziplab/SN-Net@c2dcf30" in recipe_path(n).read_text() for n in PAPER)  # every recipe says its source


# ------------------------------------------------------------------ the command line


def test_defaults_are_what_train_did_without_a_recipe():
    conf = TrainConfig()
    assert conf.rates(1).lr == pytest.approx(5e-5)  # 4e-4 at 512 = 5e-5 at the default batch of 64
    assert (conf.model.anchors, conf.schedule.epochs, conf.data.batch_size, conf.optim.clip_grad) == ("fmnist", 1, 64, 5.0)


def test_print_config_resolves_overrides_and_rates(monkeypatch, capsys):
    import yaml

    from snnet.cli import main

    monkeypatch.setenv("WORLD_SIZE", "8")
    main(["train", "--recipe", "deit", "--print-config", "--set", "mixup=0", "--epochs", "30", "--set", "warmup_lr=none"])
    out = capsys.readouterr().out
    settings = yaml.safe_load(out)
    assert (settings["schedule"]["epochs"], settings["data"]["mixup"], settings["schedule"]["warmup_lr"]) == (30, 0, None)
    assert "base 5e-05 at batch 512 -> 0.0001 at global batch 1024 (128 x 8 processes)" in out
    assert "deit_tiny_patch16_224.fb_in1k" in out  # the family's members, as a comment
    main(["train", "--recipe", "deit", "--print-recipe"])
    shown = capsys.readouterr().out
    assert "not reproduced" in shown.lower() and "ziplab/SN-Net@c2dcf30" in shown


@pytest.mark.parametrize("args, message", [
    (["--recipe", "vit"], "unknown recipe 'vit'"),
    (["--recipe", "deit", "--set", "mixupp=1"], "unknown setting 'mixupp'"),
    (["--recipe", "deit", "--set", "mixup"], "FIELD=VALUE"),
    (["--recipe", "deit", "--set", "drop_path=high"], "--model.drop_path: expected a number or a list, got 'high'"),
    (["--recipe", "deit", "--model.drop_path", "high"], "--model.drop_path: expected a number or a list, got 'high'"),
    (["--recipe", "deit", "--set", "drop_path=1.5"], "drop_path must be in"),
    (["--recipe", "deit", "-b", "7"], "even batch size"),
    (["--recipe", "swin", "--distill-type", "medium"], "unknown distill.type 'medium'"),
    (["--recipe", "resnet", "--set", "optimizer=lion"], "unknown optimizer 'lion'"),
])
def test_bad_recipe_options_are_one_line_errors(tmp_path, capsys, args, message):
    from snnet.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_recipe_trains_with_mixup_erasing_drop_path_and_a_new_head(tmp_path, capsys):
    from snnet.cli import main

    data = _image_folder(tmp_path / "imgs", classes=4, per_class=5)
    out = tmp_path / "out"
    main(["train", "--recipe", "deit", "--anchors", ",".join(TINY_VITS[:2]), "--num-classes", "4", "--data", str(data), "-b", "4",
          "--max-steps", "2", "--init-images", "8", "--distill", "largest", "--set", "repeated_aug=2",
          "--out", str(out), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "deit: learning rate: base 5e-05 at batch 512 -> 3.906e-07" in printed
    config = json.loads((out / "train_config.json").read_text())["segments"][0]["config"]
    assert (config["data"]["mixup"], config["distill"]["type"], config["data"]["repeated_aug"]) == (0.8, "hard", 2)
    assert config["schedule"]["warmup_lr"] == 1e-7 and config["schedule"]["unit"] == "epoch"
    saved = json.loads((out / "final" / "config.json").read_text())
    assert all(a["spec"]["kwargs"] == {"drop_path_rate": 0.1, "num_classes": 4} for a in saved["anchors"])
    assert saved["num_classes"] == 4


# ------------------------------------------------------------------ regularisers


def test_drop_path_reaches_the_anchors():
    from snnet.model import anchor_specs

    net = snnet.create_snnet(anchor_specs(TINY_VITS[:2], None, None, recipe_config("swin").model.anchor_kwargs()))
    last = net.anchors[0].blocks[-1]
    assert last.drop_path1.drop_prob == pytest.approx(0.2)  # timm's stochastic depth rule: 0 .. rate over depth


def test_recipe_transform_is_timms_randaugment_and_erasing(tmp_path):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    data = _image_folder(tmp_path / "imgs")
    options = recipe_config("deit").data.transform_options()
    ds = build_dataset(data, "train", {"input_size": (3, 32, 32)}, augment=True, transform_options=options)
    kinds = {type(t) for t in ds.transform.transforms}
    assert RandAugment in kinds and RandomErasing in kinds
    erase = next(t for t in ds.transform.transforms if isinstance(t, RandomErasing))
    assert erase.probability == 0.25 and erase.mode == "pixel"
    with pytest.raises(DatasetError, match="Fashion-MNIST is augmented by its own"):
        build_dataset("fashion-mnist", "train", augment=True, transform_options=options)


def test_mixup_trainer_uses_timm_soft_targets():
    from timm.loss import SoftTargetCrossEntropy

    trainer = Trainer(tiny(), TrainConfig().override(progress=False, mixup=0.8, cutmix=1.0, batch_size=8), total_steps=1)
    assert isinstance(trainer.task.criterion, SoftTargetCrossEntropy) and trainer.task.mixup.mixup_alpha == 0.8
    x, y = Synthetic(8).tensors
    assert math.isfinite(trainer.backward(x, y, 0))


def test_repeated_augmentation_puts_copies_on_different_ranks():
    shards = [list(EpochSampler(12, seed=1, rank=r, world_size=3, repeats=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # an epoch keeps its length in images
    assert all(shards[0][k] == shards[1][k] == shards[2][k] for k in range(4))  # each image on every rank
    one = EpochSampler(12, seed=1, repeats=3)
    assert len(list(one)) == 12 and len(set(one)) == 4
    resumed = EpochSampler(12, seed=1, rank=1, world_size=3, repeats=3)
    resumed.start = 2
    assert list(resumed) == shards[1][2:]


class _RecordsAugmentation(Synthetic):
    """Each fetch adds a random "augmentation" (a draw from torch's generator, as timm's transforms make) and
    records (image, draw)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.fetched: list[tuple[int, float]] = []

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        shift = float(torch.rand(()))
        self.fetched.append((int(i), shift))
        return x + shift, y


def test_repeated_augmentation_augments_each_copy_differently(tmp_path):
    """DeiT's repeated augmentation: the copies of an image are augmented independently (the same draw for
    each copy would only repeat the image). The augmentation stays a pure function of the seed."""
    draws = []
    for run in ("a", "b"):
        data = _RecordsAugmentation(16)
        train(tiny(), data, cfg(tmp_path / run, repeated_aug=3, init_images=0, max_steps=2))
        draws.append(data.fetched)
    assert draws[0] == draws[1]  # reproducible
    by_image: dict[int, list[float]] = {}
    for i, shift in draws[0]:
        assert 0 <= i < 16
        by_image.setdefault(i, []).append(shift)
    repeated = [s for s in by_image.values() if len(s) > 1]
    assert repeated and all(len(set(s)) == len(s) for s in repeated), by_image


def test_resume_is_exact_with_mixup_repeated_aug_and_hard_distillation(tmp_path):
    data = Synthetic(40)
    conf = dict(epochs=3, ckpt_every=4, mixup=0.8, cutmix=1.0, repeated_aug=3, distill="largest",
                distill_type="hard", lr=1e-3, warmup_epochs=1, warmup_lr=1e-5, warmup_prefix=False, schedule_unit="epoch")
    # timm's Mixup draws from numpy's global generator: both runs start from the same state (the
    # checkpoint holds it, so the resumed run continues it)
    np.random.seed(0)
    a = tiny()
    full = train(a, data, cfg(tmp_path / "a", **conf))
    np.random.seed(0)
    b = tiny()
    train(b, data, cfg(tmp_path / "b", **conf), stop_after=7)
    np.random.seed(123)  # whatever it is now, the checkpoint's state wins
    c = tiny()
    rest = train(c, data, cfg(tmp_path / "b", resume="auto", **conf))
    assert rest.finished and rest.step == full.step
    pa, pc = _params(a), _params(c)
    assert all(torch.equal(pa[k], pc[k]) for k in pa)


def test_recipe_overrides_are_checked():
    deit = recipe_config("DeiT")
    assert deit.override(epochs=3).schedule.epochs == 3 and deit.schedule.epochs == 50
    with pytest.raises(snnet.SnnetError, match="unknown setting 'epoch' \\(did you mean epochs"):
        deit.override(epoch=3)
    assert deit.override(warmup_lr=None, clip_grad=1, nesterov=False).schedule.warmup_lr is None
    assert deit.override(betas=[0.9, 0.95]).optim.betas == (0.9, 0.95)
    with pytest.raises(RecipeError, match="unknown recipe 'vit'"):
        recipe_config("vit")


def test_checkpoints_from_before_repeated_aug_still_resume(tmp_path):
    from snnet.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

    conf = cfg(tmp_path, epochs=2, init_images=0)
    train(tiny(), Synthetic(16), conf, stop_after=1)
    path = tmp_path / "run" / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    del ckpt["config"]["data"]["repeated_aug"]  # written by a version without the field
    save_checkpoint(path, ckpt)
    assert train(tiny(), Synthetic(16), conf.override(resume="auto")).finished
    with pytest.raises(snnet.SnnetError, match="data.repeated_aug: 1 -> 2"):
        train(tiny(), Synthetic(16), conf.override(resume=str(path), repeated_aug=2))
