"""The reference's training recipes wired into snnet's one loop (docs/differences.md): each test fails without it.

LeViT's two heads learn from their own losses, ResNet's random erasing leaves the first half of a batch
clean, the reference's optimizer steps on parameters no route used, validation during training records
how it read its images, the SN-Netv2 recipe, per-anchor drop-path, and the route mode of a resumed run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snnet
from snnet.config import TrainConfig
from snnet.errors import CheckpointError
from snnet.recipes import recipe_config
from snnet.reference import IMAGENET_MEAN, IMAGENET_STD
from snnet.train import Trainer, train

from .conftest import TINY_VITS
from .conftest import Synthetic, _image_folder, cfg

LEVITS = ["snnet_tiny_levit_a", "snnet_tiny_levit_b"]


class FixedTeacher(nn.Module):
    """A teacher whose top class is ``classes[i]`` for image ``i`` of every batch."""

    def __init__(self, classes: list[int]) -> None:
        super().__init__()
        self.logits = F.one_hot(torch.tensor(classes), 10).float() * 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def _head_grads(labels: list[int], teacher: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a stitched LeViT's class head and distillation head after one training loss."""
    torch.manual_seed(0)
    net = snnet.create_snnet(LEVITS)
    config = TrainConfig().override(type="hard", alpha=0.5, label_smoothing=0.0, progress=False)
    trainer = Trainer(net, config, total_steps=1, teacher=FixedTeacher(teacher), device="cpu")
    assert trainer.two_heads
    stitch = next(s for s in net.space if not s.is_anchor)
    torch.manual_seed(1)
    trainer.backward(torch.randn(4, 3, 64, 64), torch.tensor(labels), stitch)
    head = net.head_of(stitch)
    return head.head.linear.weight.grad.clone(), head.head_dist.linear.weight.grad.clone()


def test_levit_class_head_learns_the_labels_and_distillation_head_the_teacher() -> None:
    """stitching_levit's DistillationLoss: labels reach only `head`, the teacher only `head_dist` (with the
    heads' average as the output, as timm's LeViT gives it, both would learn both)."""
    cls_a, dist_a = _head_grads([1, 2, 3, 4], [5, 6, 7, 8])
    cls_b, dist_b = _head_grads([0, 0, 9, 9], [5, 6, 7, 8])  # other labels, the same teacher
    cls_c, dist_c = _head_grads([1, 2, 3, 4], [0, 1, 0, 1])  # the same labels, another teacher
    torch.testing.assert_close(dist_a, dist_b)  # labels never reach the distillation head
    torch.testing.assert_close(cls_a, cls_c)  # the teacher never reaches the class head
    assert not torch.allclose(cls_a, cls_b) and not torch.allclose(dist_a, dist_c)


def test_levit_without_a_teacher_trains_the_average_and_evaluates_the_average(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = snnet.create_snnet(LEVITS)
    assert not Trainer(net, TrainConfig().override(progress=False), total_steps=1, device="cpu").two_heads
    data = Synthetic(16, size=(3, 64, 64))
    result = train(net, data, cfg(tmp_path, max_steps=2, epochs=None, init_images=8, batch_size=8),
                   teacher=FixedTeacher([1] * 8), val_data=data)
    assert result.finished and result.evals  # evaluation ran in eval mode: one averaged output per network
    assert isinstance(net.eval()(torch.zeros(1, 3, 64, 64)), torch.Tensor)


def _seen_batch(config: TrainConfig, x: torch.Tensor) -> torch.Tensor:
    """What a plain model sees of batch ``x`` in one training step."""
    seen = []

    class Record(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            seen.append(inputs.detach().clone())
            return inputs

    model = nn.Sequential(Record(), nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    Trainer(model, config, total_steps=1, steps_per_epoch=1, device="cpu").step(x, torch.arange(len(x)))
    return seen[0]


def test_split_batch_erasing_erases_only_the_second_half_of_each_batch() -> None:
    """The reference ResNet runs (--resplit): the first half of each batch clean, the rest erased at re_prob."""
    config = recipe_config("resnet").override(re_prob=1.0, amp="off", progress=False)
    assert config.data.re_splits == 2
    assert "re_prob" not in config.data.transform_options()  # not in the per-image transform any more
    x = torch.zeros(8, 3, 16, 16)
    seen = _seen_batch(config, x)
    erased = [bool((img != 0).any()) for img in seen]
    assert erased == [False] * 4 + [True] * 4 and not x.any()  # the loader's batch is left as it was
    per_image = config.override(re_splits=1)
    assert per_image.data.transform_options()["re_prob"] == 1.0  # one split: timm's transform erases every image
    assert not _seen_batch(per_image, x).any()  # and the step erases nothing more


def _moved(unused_updates: str) -> bool:
    """Whether a step on the largest anchor's route moves the smallest anchor, which an earlier step used."""
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS)
    config = TrainConfig().override(unused_updates=unused_updates, lr=1e-3, lr_base_batch=None, weight_decay=0.05,
                                    progress=False)
    trainer = Trainer(net, config, total_steps=10, device="cpu")
    anchors = [s.id for s in net.space if s.is_anchor]
    order = iter([anchors[0], anchors[-1]])
    trainer.sampler.sample = lambda: next(order)  # the smallest anchor, then the largest
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    trainer.step(x, y)
    weight = net.anchors[0].blocks[0].attn.qkv.weight
    before = weight.detach().clone()
    _, stitch = trainer.step(x, y)
    assert stitch.id == anchors[-1] and (weight.grad is None or not weight.grad.any())
    return not torch.equal(weight, before)


def test_unused_parameters_move_only_with_the_reference_updates() -> None:
    """optim.unused_updates: 'skip' (snnet's default) leaves what the route did not use; 'reference' decays it
    and moves it on its momentum, as the reference's steps on PyTorch < 2.0 do."""
    assert not _moved("skip")
    assert _moved("reference")
    assert recipe_config("deit").optim.unused_updates == "reference"
    assert recipe_config("snnetv2").optim.unused_updates == "skip"  # SN-Netv2 trains on PyTorch 2.1


def _evals(tmp_path: Path, net: snnet.StitchedNet, **settings) -> list[dict]:
    data = _image_folder(tmp_path / "imgs", per_class=1)
    config = cfg(tmp_path, source=str(data), val_split="val", epochs=1, batch_size=5, init_images=5, augment=False,
                 **settings)
    from snnet.tasks import get_task

    dataset = get_task(config.task, config.data, net).dataset(config.data, net.anchors[0].data_config, 0)
    train(net, dataset, config)
    return [json.loads(line) for line in (Path(config.run.out_dir) / "evals.jsonl").read_text().splitlines()]


def test_validation_during_training_records_its_protocol_and_transform(tmp_path: Path) -> None:
    """data.val_split reads the split as `snnet eval` does: the paper's resize and crop for a family the paper
    trained (here tiny DeiT3 stand-ins normalised as ImageNet, two ways: SN-Netv2's crop 1.0), timm's otherwise."""
    torch.manual_seed(0)
    rows = _evals(tmp_path / "a", snnet.create_snnet(TINY_VITS[:2]))
    assert rows[0]["eval_protocol"] == "timm"  # tiny ViTs normalise with 0.5: not as the paper's anchors
    assert rows[0]["eval_transform"].startswith("resize shorter side to 32 (bilinear), centre crop 32x32")
    torch.manual_seed(0)
    v2 = snnet.create_snnet(["snnet_tiny_deit3_s", "snnet_tiny_deit3_l"], two_way=True)
    for anchor in v2.anchors:
        anchor.data_config.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    rows = _evals(tmp_path / "b", v2)
    assert rows[0]["eval_protocol"] == "paper"
    assert rows[0]["eval_transform"] == ("resize shorter side to 32 (bicubic), centre crop 32x32, "
                                         "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)")
    rows = _evals(tmp_path / "c", v2, eval_protocol="timm")
    assert rows[0]["eval_protocol"] == "timm" and "(bilinear)" in rows[0]["eval_transform"]


def test_validation_given_by_the_caller_is_recorded_as_given(tmp_path: Path) -> None:
    data = Synthetic(16)
    result = train(snnet.create_snnet(TINY_VITS[:2]), data, cfg(tmp_path, max_steps=2, epochs=None), val_data=data)
    assert result.evals[0]["eval_protocol"] == "as given" and result.evals[0]["eval_transform"] == "none"


def test_the_snnetv2_recipe_prints_round_trips_and_builds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """deit_stitching_snnetv2_s_l.json's values, `--print-config` taken back by `--config`, LAMB, 3-Augment."""
    import yaml
    from timm.optim import Lamb
    from torchvision import transforms as T

    from snnet.cli import main
    from snnet.data import build_dataset

    main(["train", "--recipe", "snnetv2", "--print-config"])
    printed = capsys.readouterr().out
    (tmp_path / "v2.yaml").write_text(printed)
    main(["train", "--config", str(tmp_path / "v2.yaml"), "--print-config"])
    assert capsys.readouterr().out == printed
    v2 = TrainConfig().merged(yaml.safe_load(printed))
    assert v2 == recipe_config("snnetv2")
    assert (v2.space.two_way, v2.space.lora_rank, v2.optim.optimizer, v2.optim.lr, v2.optim.lr_base_batch) == (
        True, 64, "lamb", 3e-5, None)
    assert (v2.model.drop_path, v2.data.mixup, v2.data.cutmix, v2.data.three_augment, v2.data.repeated_aug,
            v2.sampling.sampler, v2.distill.teacher) == ((0.05, 0.4), 0.0, 1.0, True, 1, "ros", None)
    net = snnet.create_snnet(["snnet_tiny_deit3_s", "snnet_tiny_deit3_l"], two_way=True, lora_rank=2)
    assert isinstance(Trainer(net, v2.override(progress=False), total_steps=2, steps_per_epoch=1, device="cpu").optimizer, Lamb)
    ds = build_dataset(_image_folder(tmp_path / "imgs"), "train", {"input_size": (3, 32, 32)}, augment=True,
                       transform_options=v2.data.transform_options())
    steps = ds.transform.transforms
    crop = next(t for t in steps if isinstance(t, T.RandomCrop))
    assert (crop.padding, crop.padding_mode) == (4, "reflect") and any(isinstance(t, T.RandomChoice) for t in steps)
    assert next(t for t in steps if isinstance(t, T.ColorJitter)).brightness == (0.7, 1.3)
    assert ds[0][0].shape == (3, 32, 32)


def test_drop_path_per_anchor_reaches_each_anchor(tmp_path: Path) -> None:
    """resnet-swin shows Swin-T's drop-path as the 0.1 it trains with; SN-Netv2's anchors get one rate each."""
    from snnet.errors import ConfigError
    from snnet.model import network_from_config

    config = recipe_config("resnet-swin")
    assert config.model.drop_path == (0.0, 0.1)
    model = config.override(anchors="snnet_tiny_resnet18,snnet_tiny_swin_t", pretrained=False).model
    net = network_from_config(model, config.space)
    assert [dict(s.kwargs) for s in net.specs] == [{}, {"drop_path_rate": 0.1}]
    v2 = recipe_config("snnetv2").override(anchors="snnet_tiny_deit3_s,snnet_tiny_deit3_l", lora_rank=2)
    net = network_from_config(v2.model, v2.space)
    assert [a.blocks[-1].drop_path1.drop_prob for a in net.anchors] == pytest.approx([0.05, 0.4])
    with pytest.raises(ConfigError, match="gives 2 rates for 3 anchors"):
        network_from_config(TrainConfig().override(anchors=",".join(TINY_VITS), drop_path=[0.1, 0.2]).model,
                            TrainConfig().space)


def test_a_run_from_a_reference_mode_network_keeps_its_route_mode(tmp_path: Path) -> None:
    """A converted checkpoint runs its routes as the reference does; training it keeps that in the training
    checkpoint and the final network, and a resume with a network in the other mode is refused."""
    torch.manual_seed(0)
    snnet.create_snnet(LEVITS, route_mode="reference").save_pretrained(tmp_path / "converted")
    from snnet.model import network_from_config

    config = cfg(tmp_path, init=str(tmp_path / "converted"), max_steps=2, epochs=None, init_images=0)
    net = network_from_config(config.model, config.space)
    data = Synthetic(16, size=(3, 64, 64))
    result = train(net, data, config, stop_after=1)
    assert torch.load(result.checkpoint, weights_only=False)["route_mode"] == "reference"
    with pytest.raises(CheckpointError, match="route mode 'reference'"):
        train(snnet.create_snnet(LEVITS), data, config.override(resume="auto"))
    result = train(net, data, config.override(resume="auto"))
    assert json.loads((result.final_dir / "config.json").read_text())["route_mode"] == "reference"


@pytest.mark.parametrize("settings, message", [
    ({"unused_updates": "always"}, "unknown optim.unused_updates 'always'; use one of skip, reference"),
    ({"re_splits": 0}, "data.re_splits must be >= 1"),
    ({"three_augment": True, "auto_augment": "rand-m9-mstd0.5-inc1"}, "data.three_augment replaces timm's"),
    ({"eval_protocol": "imagenet"}, "unknown data.eval_protocol 'imagenet'; use one of paper, timm"),
    ({"drop_path": [0.1, 1.0]}, "model.drop_path must be in [0, 1)"),
    ({"optimizer": "lion"}, "use one of adamw, sgd, lamb"),
])
def test_the_new_settings_refuse_bad_values_in_one_line(settings: dict, message: str) -> None:
    from snnet.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        TrainConfig().override(**settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_paper_protocol_for_training_validation_of_fashion_mnist_is_refused(tmp_path: Path) -> None:
    from snnet.errors import SnnetError

    config = cfg(tmp_path, val_split="val", eval_protocol="paper")
    with pytest.raises(SnnetError, match="--data.eval_protocol paper resizes and crops ImageNet-like images"):
        train(snnet.create_snnet(TINY_VITS[:2]), Synthetic(16), config)
    assert not (tmp_path / "run").exists()  # refused before the run's folder was touched
