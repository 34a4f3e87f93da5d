"""Single networks trained through snnet's own loop: the members of the shipped Fashion-MNIST family and of its zoo.

A member is a timm model trained from scratch with a recipe (``fmnist-family``: see
``snnet/recipes/fmnist-family.yaml``) by :func:`snnet.train.train` -- checkpoints, exact resume,
its validation top-1 at every epoch's end (``evals.jsonl``) -- then measured as users get it:
saved in float16 and reloaded through timm's pretrained path. ``scripts/train_fmnist_family.py``
and ``scripts/train_fmnist_zoo.py`` record what :func:`train_member` returns.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import TrainConfig
from .evaluate import evaluate_model
from .io import atomic_write
from .runlock import EVALS_NAME, METRICS_NAME
from .tasks import get_task

__all__ = ["command_line", "count_macs", "create_member", "train_member", "train_seconds"]


def create_member(name: str, kwargs: Mapping[str, Any], file: str | Path | None = None) -> nn.Module:
    """A timm model, randomly initialised or (``file``) loaded through timm's pretrained path."""
    import timm

    from . import pretrained  # noqa: F401  (registers snnet's families with timm)

    if file is None:
        return timm.create_model(name, **kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image, in snnet's (the paper's, fvcore's)
    convention: the counter ``snnet stitches`` uses, so the card and the CLI agree."""
    from .flops import count_macs as macs_of, unfused_attention

    with unfused_attention(model), torch.no_grad():
        return macs_of(model.eval(), torch.zeros(1, *input_size))[0]


def train_member(label: str, name: str, kwargs: Mapping[str, Any], config: TrainConfig, splits: tuple[str, ...],
                 out: str | Path) -> dict[str, Any]:
    """Train timm model ``name(**kwargs)`` from scratch with ``config`` in ``config.run.out_dir`` (an
    interrupted run is resumed; a finished one is measured again), save ``out/<label>.safetensors`` in
    float16, and measure it on every split in ``splits`` after reloading that file.

    Returns the member's row: params, MACs, top-1 per split (after the float16 round trip, and before
    it), epochs, steps, image-steps, training seconds, the file, and the validation curve (top-1 at each
    epoch's end, when ``"val"`` is among the splits)."""
    from torch.utils.data import DataLoader
    from timm.data import resolve_data_config

    from .train import train

    torch.manual_seed(config.run.seed)  # the same init stream for every model
    model = create_member(name, kwargs)
    data_config = resolve_data_config(model=model)
    task = get_task(config.task, config.data, model)
    seed = config.run.seed
    loaders = {s: DataLoader(task.dataset(config.data, data_config, seed, split=s, train=False), batch_size=1000)
               for s in splits}
    run = Path(config.run.out_dir)
    config = config if config.run.overwrite else config.override(resume="auto")
    result = train(model, task.dataset(config.data, data_config, seed), config,
                   val_data=loaders["val"].dataset if "val" in loaders else None)
    acc_fp32 = {s: evaluate_model(model, loader, progress=False, task=task).acc1 for s, loader in loaders.items()}
    path = Path(out) / f"{label}.safetensors"
    _save_fp16(fp16_state(model), path, label)

    reloaded = create_member(name, kwargs, path)  # what users get: the float16 file through timm's pretrained path
    acc = {s: evaluate_model(reloaded, loader, progress=False, task=task).acc1 for s, loader in loaders.items()}
    seconds = train_seconds(run / METRICS_NAME)
    epochs = config.schedule.epochs or 1
    row = {"params": sum(p.numel() for p in reloaded.parameters()), "macs": count_macs(reloaded, tuple(data_config["input_size"])),
           "acc": {k: round(v, 2) for k, v in acc.items()}, "acc_fp32": {k: round(v, 2) for k, v in acc_fp32.items()},
           "epochs": config.schedule.epochs, "steps": result.step, "image_steps": result.step * config.data.batch_size,
           "seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / epochs, 1), "file": path.name,
           "file_bytes": path.stat().st_size, "val_curve": _curve(run / EVALS_NAME)}
    print(f"{label}: top-1 " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items())
          + f" (fp32 {', '.join(f'{v:.2f}%' for v in acc_fp32.values())}), {row['params']:,} params, "
          f"{row['macs'] / 1e6:.2f} M MACs", flush=True)
    return row


def recipe_changes(recorded: Mapping[str, Any], recipe: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings (by path, ``ignore`` aside) on which two recipes as a zoo or family file records them
    (``snnet.train.result_settings``) differ; one missing from either side counts as the tree's default:
    a setting snnet did not have when the file was written changes nothing."""
    from .train import result_settings

    default = json.loads(json.dumps(result_settings(TrainConfig())))
    return sorted(k for k in (recorded.keys() | recipe.keys()) - set(ignore)
                  if recorded.get(k, default.get(k)) != recipe.get(k, default.get(k)))


def command_line() -> str:
    """The command that is running, as recorded next to its results."""
    return "python " + shlex.join([str(Path(sys.argv[0]))] + sys.argv[1:])


def fp16_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in float16, as a member ships; integer buffers (BatchNorm's num_batches_tracked, index
    tables) stay as they are: float16 holds integers exactly only up to 2048."""
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in model.state_dict().items()}


def _save_fp16(state: dict[str, torch.Tensor], path: Path, label: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic, and with the usual file mode: the file may ship in the wheel
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "arch": label,
                                                                         "dtype": "float16"}))


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_seconds(metrics: Path) -> float:
    """Wall seconds from the first training step to the last (metrics.jsonl; an interrupted run's idle time included)."""
    times = [r["time"] for r in _rows(metrics)]
    if len(times) < 2:
        return 0.0
    return (times[-1] - times[0]) * len(times) / (len(times) - 1)  # the first step's time: the mean step's


def _curve(evals: Path) -> list[float]:
    """Validation top-1 at each epoch's end (evals.jsonl), in order."""
    return [round(r["acc1"], 2) for r in _rows(evals) if "acc1" in r]
