"""Training a stitched network (or one plain model): the SN-Net recipe, resumable to the bit, on one or many processes.

Every step samples one stitch (``net.select`` happens *outside* forward), runs that route on a
batch, and updates only the parameters on the route: the anchors' blocks it passes through and
the stitching layers between them. Over many steps every network of the space gets trained, which is
what makes all of them usable at once. A plain model (a zoo member, a family member) trains the
same way without the stitch: one loop for both.

    from snnet.config import TrainConfig
    from snnet.train import train
    result = train(net, dataset, TrainConfig().override(epochs=5, lr=4e-4, out_dir="runs/x"))

What a run does, top to bottom (:func:`train`): check the data and the teacher, check the device,
lock the output folder, resume or seed (:func:`resume_from`, :func:`~snnet.checkpoint.seed_everything`),
fit the stitching layers, then a plain loop over steps that logs, checkpoints
(:func:`checkpoint_state` is everything a checkpoint holds), evaluates at each epoch's end when
given validation data, and stops early, with a checkpoint, on Ctrl-C or SIGTERM.

Checkpoints hold everything that decides the future of a run (weights, optimizer, schedule,
scaler, stitch sampler, data position, every RNG), so a run resumed from one ends with exactly
the weights an uninterrupted run would have. A resume whose settings would change the result is
refused, naming each changed setting, unless asked for (``run.resume_with_changes``); then
``train_config.json`` keeps every segment's settings.

Many processes (``torchrun --nproc_per_node N -m snnet train ...``): every rank samples its own
stitch per step, as in the paper. DistributedDataParallel averages gradients over all N ranks,
so a parameter on the route of k of the N ranks gets the sum of those k gradients divided by N:
exactly the gradient one process would compute on the global batch, each rank's share through
its own stitch (the mean loss over the N (stitch, batch) pairs). That is the default
(``ddp_grads='mean'``, what the reference code does); with the linear scaling rule, SGD then moves
every parameter, to first order, as N single-process steps on the same images would. A parameter on no
rank's route gets no gradient at all (DDP leaves it None; snnet makes sure), so AdamW leaves it
and its moments untouched, as in single-process training (``optim.unused_updates='reference'``
steps it on a zero gradient instead, once it has been stepped, as the reference's PyTorch did).

``ddp_grads='users'`` rescales each gradient by N/k to the mean over the ranks that used it.
That is not a fix for "slow" stitching layers: AdamW's update does not change when a gradient
is multiplied by a constant, and where k varies from step to step the rescale re-weights steps
and distorts the balance between often- and rarely-used parameters; with SGD (and its L2 weight
decay) it makes a parameter used by one of N ranks step N times further than one process would
on the same images. ``benchmarks/bench_ddp_grads.py`` measures both against single-process runs.
``stitch_sync='shared'`` instead makes all ranks use one stitch per step (same sampler seed
everywhere), at the price of fewer stitches visited per step.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, checkpoint_config, load_checkpoint, resolve_resume, state_digest,
                         rng_state, run_folder, save_checkpoint, seed_everything, set_rng_state)
from .config import OptimConfig, SamplingConfig, TrainConfig, flatten  # noqa: F401  (OptimConfig, TrainConfig: public here)
from .distill import set_two_head_training, teacher_logits, two_head_loss
from .devices import default_device
from .errors import CheckpointError, ConfigError, RunFolderError, SnnetError, StitchNotFoundError, TrainingError, TrainingInterrupted
from .io import atomic_write, remove_stale_temps
from .model import CONFIG_NAME, WEIGHTS_NAME, StitchedBase, StitchedNet
from .optim import build_optimizer, lr_factor
from .reference import stale_zero_grads
from .report import progress as report_progress
from .runlock import (EVALS_NAME, FINAL_NAME, METRICS_NAME, RESUMED_FROM, RUN_ENTRIES, TB_NAME, TRAIN_CONFIG_NAME,
                      RunLock, StopSignals, claim_run_folder)
from .sampling import EpochSampler, SeededItems, StitchSampler, WorkerLoader, make_stitch_sampler, mix_seed, seed_worker
from .space import Stitch
from .tasks import CausalLM, Task, get_task

__all__ = ["NOT_RESULT_SETTINGS", "OptimConfig", "Position", "TrainConfig", "TrainResult", "Trainer", "Validation",
           "checkpoint_state", "check_changes", "check_resume", "default_device", "load_run_config", "result_settings",
           "resume_from", "route_modules", "train", "validation_set"]

# How long the other processes wait for rank 0's evaluation at an epoch's end (every stitch on the validation split)
EVAL_WAIT = timedelta(hours=24)

# Settings that do not change what a run computes (where it writes, how it reports, where its files come
# from before the checkpoint replaces them): a resume may change them freely. Every other one is compared.
NOT_RESULT_SETTINGS = frozenset({
    "run.out_dir", "run.resume", "run.overwrite", "run.resume_with_changes", "run.progress", "run.log_every",
    "run.tensorboard", "run.ckpt_every", "run.keep_checkpoints", "run.device", "data.workers", "data.root",
    "data.download", "model.weights", "model.pretrained", "model.init", "model.init_images",
    # folded into the learning rates used, which are compared instead (optim.lr, schedule.min_lr/warmup_lr)
    "optim.lr_base_batch", "optim.scale_lr_bounds", "schedule.min_lr_ratio",
})


@dataclass(frozen=True)
class TrainResult:
    """How a call to :func:`train` ended."""

    step: int  # global steps done (including those before a resume)
    total_steps: int
    finished: bool  # False when stopped early by ``stop_after``
    loss: float  # mean loss of the last logged window
    seconds: float
    images_per_second: float
    out_dir: Path
    checkpoint: Path | None
    final_dir: Path | None
    stitches: tuple[int, ...] = field(default=(), repr=False)  # stitch id of every step this call ran (this rank)
    evals: tuple[dict[str, Any], ...] = field(default=(), repr=False)  # the evaluations this call made (val_data)


@dataclass(frozen=True)
class Position:
    """Where a run is: global steps done, and the epoch and the batch within it that come next."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0

    def after_step(self, steps_per_epoch: int) -> "Position":
        """The position one step later (an epoch that is done moves on to the next one)."""
        if self.epoch_step + 1 == steps_per_epoch:
            return Position(self.step + 1, self.epoch + 1, 0)
        return Position(self.step + 1, self.epoch, self.epoch_step + 1)


@dataclass(frozen=True)
class Plan:
    """The run's length, known once the data is: steps per epoch (per process), total steps, warm-up steps."""

    steps_per_epoch: int
    total: int
    warmup: int
    offset: int = 0  # steps done minus the steps of the epochs done at this batch size (0 unless the batch size changed)


@dataclass(frozen=True)
class Resumed:
    """A checkpoint that a run continues from, checked (:func:`resume_from`)."""

    path: Path
    state: dict[str, Any]
    position: Position
    history: list[dict[str, Any]]  # the settings of every segment of the run so far (train_config.json)
    changes: list[str]  # the settings this segment changes, "path: old -> new" ([] when none)
    settings: dict[str, Any] = field(default_factory=dict)  # what the checkpoint was written with (checkpoint_config)


# ---------------------------------------------------------------------------- the run


def train(net: StitchedBase | nn.Module, train_data: Dataset, config: TrainConfig = TrainConfig(),
          optim: OptimConfig | None = None, *, teacher: nn.Module | None = None, stop_after: int | None = None,
          val_data: Dataset | None = None) -> TrainResult:
    """Train every network of the space at once (or a plain model) on ``train_data``; see the module docstring.

    Fits the stitching layers by least squares first (unless resuming or ``model.init_images=0``),
    then runs ``schedule.epochs`` epochs (or ``schedule.max_steps`` steps), checkpointing every
    ``run.ckpt_every`` steps and at the end, and saves the final network to ``out_dir/final``.
    ``optim`` replaces ``config.optim`` (the earlier call form). ``stop_after`` ends the call
    after that global step with a checkpoint, without changing the schedule (a planned
    interruption; resume with ``run.resume='auto'``). Ctrl-C (SIGINT) or SIGTERM does the same
    after the step in progress, then raises :class:`TrainingInterrupted`. ``val_data`` is
    evaluated at the end of every epoch (``out_dir/evals.jsonl``; without it, ``data.val_split`` names a split
    read with ``data.eval_protocol``'s transform: :func:`validation_set`). Under ``torch.distributed``
    (e.g. torchrun) it trains with DDP.

    The run holds a lock on ``out_dir`` while it lasts; a folder holding another run, live or
    not, is refused unless resumed or overwritten (:mod:`snnet.runlock`).
    """
    if optim is not None:
        config = dataclasses.replace(config, optim=optim)
    task = get_task(config.task, config.data, net)
    n = task.check_dataset(net, train_data, config.data.batch_size)  # before the folder is touched
    if config.run.fsdp and val_data is not None and _dist()[1] > 1:
        raise ConfigError("validation while training runs on one process, and a network sharded with run.fsdp "
                          "needs all of them: evaluate the saved network afterwards (snnet eval)")
    if teacher is not None:
        task.check_teacher(teacher, net)  # a teacher that cannot teach must not cost a run, nor touch its folder
    validation = validation_set(net, config, task, val_data)  # a missing split fails before the folder is touched
    device = default_device(config.run.device)  # the hardware is checked when a run starts
    lock = _claim_run_folder(config)
    try:
        return _train(net, train_data, n, config, task, teacher, device, stop_after, validation)
    except BaseException:
        if lock is not None:  # no writer is left: nothing a failed write left behind can be in use
            remove_stale_temps(config.run.out_dir, RUN_ENTRIES)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(net: StitchedBase | nn.Module, train_data: Dataset, n: int, config: TrainConfig, task: Task,
           teacher: nn.Module | None, device: torch.device, stop_after: int | None,
           validation: "Validation | None") -> TrainResult:
    t_start = time.perf_counter()
    rank, world = _dist()
    out = Path(config.run.out_dir)
    stitched = isinstance(net, StitchedBase)

    # where the run starts: a checkpoint, or a fresh run whose every random draw follows the seed
    resumed = resume_from(config, out, net, world)
    if resumed is None:
        seed_everything(config.run.seed + rank)
    data = SeededItems.wrap(train_data, config.run.seed)
    # each copy its own augmentation: SeededItems seeds each, Fashion-MNIST (drawn per epoch) draws one per copy
    order = EpochSampler(n, config.run.seed, rank, world, repeats=config.data.repeated_aug,
                         distinct_copies=getattr(data, "distinct_copies", False))
    plan = _plan(config, order, world)
    position = Position()
    # the resume ended the checkpoint's epoch (no batch of a new size left in it, or fewer images: _carried_position),
    # where no step ends it: its evaluation is made before the first step (or, the run then over, before it ends).
    # Not a finished run's: it ended mid-epoch as its schedule had it, and with no step to train it is held as it ended
    ended_epoch = False
    if resumed is not None:
        position = _carried_position(resumed, config, plan)
        plan = _resumed_plan(plan, position, config)
        ended_epoch = validation is not None and position.epoch > resumed.position.epoch
        if position.step >= plan.total and (not ended_epoch or _finished(resumed.state)):
            return _already_finished(net, resumed, plan, out, rank, config, world)

    # the network, its teacher, the optimizer: as they were at the checkpoint, or fresh
    if teacher is None and config.distill.teacher is not None:
        teacher = task.build_teacher(net, config.distill.teacher)  # before any work: a wrong one must not cost a run
    net.to(device)
    if resumed is None and stitched and config.model.init_images > 0 and rank == 0:
        task.fit_stitching(net, data, config)  # rank 0 fits; DDP (or FSDP) broadcasts rank 0's weights
    if resumed is not None:  # before the trainer: FSDP shards the weights it finds
        _load_weights(net, resumed.state["model"], str(resumed.path))
    # the schedule runs on the epoch grid of this run's batch size (plan.offset: see _resumed_plan)
    trainer = Trainer(net, config, total_steps=plan.total - plan.offset, warmup_steps=plan.warmup, teacher=teacher,
                      device=device, steps_per_epoch=plan.steps_per_epoch, task=task)
    if resumed is not None:
        _check_teacher(resumed, trainer.teacher_digest, config)
    if resumed is not None:
        saved = resumed.state["trainer"]
        trainer.load_state_dict({**saved, "scheduler": {**saved["scheduler"], "last_epoch": position.step - plan.offset}})
        if trainer.sampler is not None:
            _load_sampler(trainer.sampler, resumed, config, rank)
        set_rng_state(resumed.state["rng"][rank])
    if rank == 0:
        _write_history(out, config, world, position.step, resumed)
        if resumed is not None and (source := _resumed_from_elsewhere(resumed, out)) is not None:
            _carry_logs(source, out, resumed.position.step)
    log = _Log(out, rank == 0, position.step, config.run.tensorboard)
    # pruned on a resume with validation or without: the rows after the checkpoint's step are of steps about to be redone
    evals = _Log(out, rank == 0, position.step, False, EVALS_NAME, create=validation is not None)

    def save() -> Path:
        state = checkpoint_state(trainer, position, config, world, plan.total)
        return _save(out / CHECKPOINT_NAME, state, config.run.keep_checkpoints, rank)

    # the loop: one step per batch, until the plan's last step, a planned stop or a signal
    bar = report_progress(plan.total, "train", "step", config.run.progress and rank == 0, initial=position.step)
    last_ckpt: Path | None = resumed.path if resumed is not None else None
    history: list[int] = []
    window: list[float] = []
    done_evals: list[dict[str, Any]] = []
    images, t_loop = 0, time.perf_counter()
    net.train()
    # rank 0 evaluates alone at an epoch's end: the others wait for it in a group of their own, whose timeout an
    # evaluation of every stitch does not outlast (in the next step's collective they timed out: 30 min with gloo)
    eval_wait = torch.distributed.new_group(backend="gloo", timeout=EVAL_WAIT) if world > 1 and validation is not None else None

    def epoch_end() -> None:  # rank 0 evaluates the network as the epoch ended it (with validation), the others wait
        if validation is not None and rank == 0:
            done_evals.append(_evaluate(net, validation, config, task, position, device))
            evals.write(done_evals[-1])
        if eval_wait is not None:
            torch.distributed.barrier(group=eval_wait)

    stops = StopSignals().start()  # Ctrl-C: finish the step, checkpoint, then stop
    batches = _batches(data, order, config, position, plan)
    try:
        if ended_epoch:
            epoch_end()
        for batch in batches:
            if stop_after is not None and position.step >= stop_after:
                break  # resumed at or past it: no step (the check after each step comes one step late here)
            t0 = time.perf_counter()
            x, y = task.inputs(batch)
            loss, stitch = trainer.step(x, y)
            if not math.isfinite(loss):
                where = f" (stitch {stitch.name})" if stitch is not None else ""
                clip = "" if config.optim.clip_grad is not None else " or enable gradient clipping"
                raise TrainingError(f"the loss became {loss} at step {position.step + 1}{where}; lower --optim.lr{clip}. "
                                    "The last checkpoint is kept.")
            position = position.after_step(plan.steps_per_epoch)
            images += len(x) * world
            if stitch is not None:
                history.append(stitch.id)
            window = (window + [loss])[-config.run.log_every:]
            lr = trainer.scheduler.get_last_lr()[0]
            log.write({"step": position.step, "epoch": position.epoch - (position.epoch_step == 0), "loss": loss,
                       "lr": lr, **({"stitch": stitch.id, "stitch_name": stitch.name} if stitch is not None else {}),
                       "img_per_s": len(x) * world / (time.perf_counter() - t0), "time": time.time()})
            bar.update(1)
            if config.run.progress and (position.step % config.run.log_every == 0 or position.step == plan.total):
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lr:.2e}",
                                **({"stitch": stitch.id} if stitch is not None else {}),
                                img_s=f"{images / (time.perf_counter() - t_loop):.0f}")
            if position.epoch_step == 0:
                epoch_end()
            if (stop_after is not None and position.step >= stop_after) or _stop_requested(stops, world, device):
                break
            if config.run.ckpt_every and position.step % config.run.ckpt_every == 0 and position.step < plan.total:
                last_ckpt = save()
    except _DataFailed as failed:  # between two steps everything is consistent: keep them before stopping
        if world == 1:  # (under DDP the other ranks wait in a collective: the last checkpoint stays)
            last_ckpt = save()
            if stops.received is not None:  # the stop also reached the loader's workers: the stop is what happened
                raise TrainingInterrupted(position.step, plan.total, last_ckpt, stops.received) from None
        raise failed.__cause__ from None  # type: ignore[misc]
    finally:
        batches.close()  # its loader's workers stop now, not when (or if) the generator is collected
        if eval_wait is not None:
            torch.distributed.destroy_process_group(eval_wait)
        stops.stop()
        bar.close()
        log.close()
        evals.close()
    last_ckpt = save()
    if stops.received is not None and position.step < plan.total:
        raise TrainingInterrupted(position.step, plan.total, last_ckpt, stops.received)
    finished = position.step >= plan.total
    gathered = trainer.model_state() if finished and trainer.fsdp else None  # collective: every rank gathers
    final_dir = _save_final_or_say(net, out / FINAL_NAME, gathered, last_ckpt) if finished and rank == 0 else None
    seconds = time.perf_counter() - t_start
    return TrainResult(position.step, plan.total, finished, sum(window) / len(window) if window else float("nan"),
                       seconds, images / max(time.perf_counter() - t_loop, 1e-9), out, last_ckpt, final_dir,
                       tuple(history), tuple(done_evals))


def _check_teacher(resumed: Resumed, digest: str | None, config: TrainConfig) -> None:
    """A resume is taught by the teacher its run was (checkpoints record its digest; older ones do not, and
    pass): a copy of the largest anchor is taken from the network as built, before the checkpoint's weights
    are loaded, so a network built from other weights or another seed would teach something else, with no
    setting changed. Refused in one line, or with ``run.resume_with_changes`` recorded as a change."""
    saved = resumed.state.get("teacher_sha256", digest)
    if saved is None or saved == digest:
        return
    what = "no teacher" if digest is None else "another teacher"
    if not config.run.resume_with_changes:
        raise CheckpointError(f"cannot resume {resumed.path} with {what}: its run was distilled from a teacher this one "
                              f"is not (distill.teacher {config.distill.teacher or 'given to train()'}; 'largest' copies the "
                              "largest anchor as the network is built): build the network as the run did (the same "
                              "--model.weights, --model.pretrained or --model.init, the same seed), or add --resume-with-changes")
    if not any(c.startswith("distill.teacher:") for c in resumed.changes):
        resumed.changes.append(f"the teacher: {what} (weights sha256 {saved[:12]} -> {(digest or 'none')[:12]})")


# the settings that make the stitch sampler (make_stitch_sampler's); the other two say how processes share it
_SAMPLER_SETTINGS = frozenset(f.name for f in dataclasses.fields(SamplingConfig)) - {"stitch_sync", "ddp_grads"}


def _load_sampler(sampler: StitchSampler, resumed: Resumed, config: TrainConfig, rank: int) -> None:
    """The checkpoint's stitch sampler of this rank (only its random stream when the resume changed the
    sampler, ``run.resume_with_changes``), unless the resume changed ``sampling.stitch_sync``: then every rank
    goes on with rank 0's stream (now 'shared': one stitch for all, as :meth:`Trainer._sync_grads` then takes
    for granted), or rank 0 goes on with the stream all shared and each other rank draws its own from here (now
    'per_rank'), seeded by the seed, its rank and the step."""
    saved = resumed.state["sampler"]
    now = config.sampling.stitch_sync
    settings = resumed.settings.get("sampling", {})
    before = settings.get("stitch_sync", now)
    state = saved[0] if before != now and now == "shared" else saved[rank]
    if any(settings.get(k, v) != v for k, v in config.to_dict()["sampling"].items() if k in _SAMPLER_SETTINGS):
        # another sampler, or the same one grouping or weighting the stitches otherwise (a change the resume asked
        # for: check_changes refuses it otherwise): the new one draws from here on with the saved random stream
        sampler.generator.set_state(state["generator"])
    else:
        sampler.load_state_dict(state)
    if before != now and now == "per_rank" and rank > 0:
        sampler.generator.manual_seed(mix_seed(config.run.seed + rank + 7919, resumed.position.step))


def _carried_position(resumed: Resumed, config: TrainConfig, plan: Plan) -> Position:
    """Where a resumed run goes on in its epoch: the saved position, unless the resume changed the batch
    size (``run.resume_with_changes``, as a batch that does not fit in memory asks for); then the epoch goes
    on from the first batch of the new size that holds no image seen in it (rounded up: none twice), or with
    the next epoch when none is left, as when the data shrank (``data.limit``, another dataset): its epochs never
    ended again otherwise. The epoch's order does not depend on the batch size."""
    p = resumed.position
    saved = resumed.settings.get("data", {}).get("batch_size", config.data.batch_size)
    k = p.epoch_step if saved == config.data.batch_size else -(-p.epoch_step * saved // config.data.batch_size)
    if k == p.epoch_step and k < plan.steps_per_epoch:
        return p
    return Position(p.step, p.epoch + 1, 0) if k >= plan.steps_per_epoch else Position(p.step, p.epoch, k)


def _resumed_plan(plan: Plan, position: Position, config: TrainConfig) -> Plan:
    """The plan of a run resumed at ``position`` (:func:`_carried_position`). After a change of batch size the
    steps done are not the epoch grid's of the new size: the run still ends after ``schedule.epochs`` epochs (not
    after as many steps of the new size, which cut the last epochs short, or ended a run with epochs left at once),
    and its rate schedule goes on where those epochs are; ``max_steps`` still caps the steps done."""
    offset = position.step - (position.epoch * plan.steps_per_epoch + position.epoch_step)
    if offset == 0:
        return plan
    s = config.schedule
    total = s.epochs * plan.steps_per_epoch + offset if s.epochs is not None else s.max_steps
    total = min(total, s.max_steps) if s.max_steps is not None else total  # type: ignore[type-var]
    return Plan(plan.steps_per_epoch, total, s.warmup(plan.steps_per_epoch, total - offset), offset)  # type: ignore[arg-type]


def checkpoint_state(trainer: "Trainer", position: Position, config: TrainConfig, world: int,
                     total_steps: int) -> dict[str, Any]:
    """Everything a checkpoint holds: all that decides the rest of the run, and what it was run with.

    Collective under DDP (every rank's sampler and RNG states are gathered): call it on every rank."""
    net = trainer.net
    sampler = trainer.sampler.state_dict() if trainer.sampler is not None else None
    return {"version": CHECKPOINT_VERSION, "model": trainer.model_state(),
            "trainer": trainer.state_dict(), "sampler": _gather(sampler, world), "rng": _gather(rng_state(), world),
            "step": position.step, "epoch": position.epoch, "epoch_step": position.epoch_step,
            "total_steps": total_steps, "world_size": world, "config": config.to_dict(),
            "stitches": [s.name for s in net.space] if isinstance(net, StitchedBase) else None,
            "route_mode": getattr(net, "route_mode", None), "teacher_sha256": trainer.teacher_digest}


def resume_from(config: TrainConfig, out: Path, net: StitchedBase | nn.Module, world: int) -> Resumed | None:
    """The checkpoint this run continues from (None: a fresh run), checked against the run: the same
    network and stitch space, the same number of processes, and the same settings wherever they
    change the result, unless ``run.resume_with_changes`` (then each change is recorded)."""
    path = resolve_resume(config.run.resume, out)
    if path is None:
        return None
    state = load_checkpoint(path)
    names = [s.name for s in net.space] if isinstance(net, StitchedBase) else None
    if state["stitches"] != names:
        theirs, ours = state["stitches"] or [], names or []
        raise CheckpointError(
            f"checkpoint {path} was made for another stitch space ({len(theirs)} stitches, e.g. {theirs[:2]}) than this "
            f"network's ({len(ours)} stitches, e.g. {ours[:2]}); resume with the same anchors and space options")
    mode = getattr(net, "route_mode", None)
    saved_mode = state.get("route_mode", mode)  # (checkpoints before the mode was recorded: not known, not checked)
    if saved_mode != mode:  # the same stitches run another way: the checkpoint's weights were trained for its mode
        raise CheckpointError(f"checkpoint {path} trained its networks in route mode {saved_mode!r}, this network runs "
                              f"{mode!r}: resume from the same network (--model.init of the folder the run started from)")
    if state.get("world_size", 1) != world:
        raise CheckpointError(f"checkpoint {path} was written by {state.get('world_size')} processes; resume it with "
                              f"the same number (now {world}) so every rank gets its own data shard and sampler back")
    saved = checkpoint_config(state)
    changes = check_changes(state, config, out, path, world)
    position = Position(state["step"], state["epoch"], state["epoch_step"])
    # the history is the checkpoint's run's: with --resume a/checkpoint.pt --out b, b holds none yet
    return Resumed(path, state, position, _read_history(run_folder(path), saved, world), changes, saved)


def check_changes(state: dict[str, Any], config: TrainConfig, out: Path, path: Path, world: int) -> list[str]:
    """The settings a resume from checkpoint ``state`` (read from ``path``) changes (see :func:`result_changes`), or
    a refusal in one line naming each unless ``run.resume_with_changes``; a finished run's refusal says how to go on.
    The refusals name the run ``path`` belongs to, not ``out`` (this run's folder), which ``--resume a/checkpoint.pt
    --out b`` makes another: b holds no run, and b/final no network to start from."""
    saved = checkpoint_config(state)
    changes = result_changes(saved, config, world)
    source = run_folder(path)
    kind = (saved.get("optim") or {}).get("optimizer")
    if kind is not None and kind != config.optim.optimizer:
        raise CheckpointError(f"cannot resume {path} with optim.optimizer {config.optim.optimizer!r}: its state is "
                              f"{kind!r}'s (its moments do not carry over to another optimizer): resume with "
                              f"--optim.optimizer {kind}, or {_new_run_from(source)}")
    if changes and not config.run.resume_with_changes:
        step, total = state["step"], state.get("total_steps")
        ask = ("add --resume-with-changes to continue with these settings (train_config.json keeps each segment's), "
               "or use the original values")
        if _finished(state):
            raise CheckpointError(
                f"{source} holds a finished run ({step} of {total} steps); training it further changes its settings "
                f"({'; '.join(changes)}): that is a deliberate act: {ask}; or {_new_run_from(source)}")
        raise CheckpointError(f"cannot resume {path} with different settings ({'; '.join(changes)}): they change what "
                              f"the run computes; {ask}")
    return changes


def _finished(state: dict[str, Any]) -> bool:
    """Whether checkpoint ``state`` is of a run that had done all its steps (checkpoints before the total was
    recorded: not known, taken as unfinished)."""
    total = state.get("total_steps")
    return total is not None and state["step"] >= total


def _new_run_from(run: Path) -> str:
    """How to start a new run from the network ``run`` ends with: ``--model.init run/final``, which an unfinished run
    (or one whose final/ was deleted) does not have yet: resumed in its own folder, the run writes it when it ends."""
    final = run / FINAL_NAME
    if final.is_dir():
        return f"start a new run from its network with --model.init {final} and another --out"
    return (f"once the run has finished (resumed in {run} with its own settings; it then writes its network to {final}), "
            f"start a new run from that network with --model.init {final} and another --out")


def check_resume(config: TrainConfig, world: int = 1) -> None:
    """:func:`check_changes` before any work (a command runs it before building its network): the
    checkpoint's settings are read without its tensors; the full checks come when the run starts."""
    from .checkpoint import peek_checkpoint

    path = resolve_resume(config.run.resume, config.run.out_dir)
    state = peek_checkpoint(path) if path is not None else None
    if state is not None:
        check_changes(state, config, Path(config.run.out_dir), path, world)  # type: ignore[arg-type]


def result_changes(saved: dict[str, Any], config: TrainConfig, world: int) -> list[str]:
    """``"path: old -> new"`` for each setting that changes what a run computes (all but
    :data:`NOT_RESULT_SETTINGS`) and differs between ``saved`` (a checkpoint's settings, possibly
    partial) and ``config``. Learning rates are compared as used (after the linear scaling rule)."""
    ours = _result_settings(config.to_dict(), config, world)
    theirs = _result_settings(saved, TrainConfig().merged(saved), world)  # a partial dict: what it holds
    given_ours, given_theirs = flatten(config.to_dict()), flatten(saved)
    changes = []
    for k, v in theirs.items():
        if k in ours and v != ours[k]:
            old, new = given_theirs.get(k, v), given_ours.get(k, ours[k])
            used = f" (used: {_show(v)} -> {_show(ours[k])})" if (old, new) != (v, ours[k]) else ""
            changes.append(f"{k}: {_show(old)} -> {_show(new)}{used}")
    return changes


def result_settings(config: TrainConfig, world: int = 1) -> dict[str, Any]:
    """The settings that decide what a run computes, by path (the learning rates as used on ``world``
    processes): what a resume must keep, and what tables of runs trained alike record."""
    return _result_settings(config.to_dict(), config, world)


def _result_settings(settings: dict[str, Any], config: TrainConfig, world: int) -> dict[str, Any]:
    flat = flatten(settings)  # only what ``settings`` holds (a partial dict from an old checkpoint)
    rates = config.rates(world)
    used = {"optim.lr": rates.lr, "schedule.min_lr": rates.min_lr, "schedule.warmup_lr": rates.warmup_lr}
    return {k: used.get(k, v) for k, v in flat.items() if k not in NOT_RESULT_SETTINGS}


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value)


def load_run_config(out_dir: str | os.PathLike) -> TrainConfig:
    """The settings of the last segment of the run in ``out_dir`` (its ``train_config.json``, either layout)."""
    path = Path(out_dir) / TRAIN_CONFIG_NAME
    if not path.is_file():
        raise RunFolderError(f"{out_dir} holds no training run ({TRAIN_CONFIG_NAME} is missing)")
    return TrainConfig().merged(_read_history(Path(out_dir), {}, 1)[-1]["config"])


# ---------------------------------------------------------------------------- the run's parts


def _plan(config: TrainConfig, order: EpochSampler, world: int) -> Plan:
    steps_per_epoch = order.shard_size() // config.data.batch_size
    if steps_per_epoch == 0:
        from .data import DatasetError

        raise DatasetError(f"each of the {world} processes gets {order.shard_size()} images, fewer than one batch "
                            f"of {config.data.batch_size}: lower --data.batch_size")
    total = config.schedule.total_steps(steps_per_epoch)
    return Plan(steps_per_epoch, total, config.schedule.warmup(steps_per_epoch, total))


class _DataFailed(Exception):
    """Fetching a batch failed (the cause is the error); raised between two steps."""


def _batches(data: Dataset, order: EpochSampler, config: TrainConfig, start: Position,
             plan: Plan) -> Iterator[Any]:
    """The run's batches from ``start`` to its last step, epoch after epoch (each epoch's order and
    augmentation drawn when it starts). A failure to fetch one is raised as :class:`_DataFailed`."""
    step, epoch, skip = start.step, start.epoch, start.epoch_step
    while step < plan.total:
        batches = iter(_epoch_loader(data, order, epoch, skip, config))
        try:
            while step < plan.total:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as e:
                    raise _DataFailed() from e
                yield batch
                step += 1
        finally:
            # the loader's workers told to stop and joined now, whatever ends the epoch: a traceback that holds
            # this frame would otherwise keep them alive until the interpreter's exit
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        epoch, skip = epoch + 1, 0


def _epoch_loader(data: Dataset, order: EpochSampler, epoch: int, start_batch: int, config: TrainConfig) -> DataLoader:
    """This epoch's batches from ``start_batch`` on (data augmentation re-drawn for the epoch)."""
    from .data import set_epoch

    d, seed = config.data, config.run.seed
    loader = WorkerLoader(data, batch_size=d.batch_size, sampler=order, drop_last=True, num_workers=d.workers,
                        pin_memory=torch.cuda.is_available(),
                        # own generator: creating an iterator must not touch the global RNG
                        generator=torch.Generator().manual_seed(seed * 7 + epoch),
                        worker_init_fn=seed_worker(seed, epoch) if d.workers else None)
    set_epoch(loader, epoch)
    order.start = start_batch * d.batch_size
    return loader


def _load_weights(net: StitchedBase | nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    if isinstance(net, StitchedBase):
        net.load_weights(state, source=source)
    else:
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{source} was written for another model ({str(e).splitlines()[0]})") from e


def _save_final(net: StitchedBase | nn.Module, final: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The trained network: ``save_pretrained`` for a stitched one, ``model.safetensors`` for a plain model
    (``state``: the weights gathered from a sharded network)."""
    if isinstance(net, StitchedBase):
        return net.save_pretrained(final, state)
    from safetensors.torch import save_file, save_model

    final.mkdir(parents=True, exist_ok=True)
    if state is None:
        # save_model writes a tensor shared by two names (a tied LM head) once; load_model ties it back
        atomic_write(final / WEIGHTS_NAME, lambda tmp: save_model(net, str(tmp)))
        return final
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(final / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    return final


def _save_final_or_say(net: StitchedBase | nn.Module, final: Path, state: dict[str, torch.Tensor] | None,
                       checkpoint: Path) -> Path:
    """:func:`_save_final` at a run's end, a write that fails (a full disk) one line: safetensors raises its own
    error, not an OSError. The checkpoint just written holds the network; a resume of the finished run writes it."""
    from safetensors import SafetensorError

    try:
        return _save_final(net, final, state)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot write the trained network to {final} ({str(e).splitlines()[0] if str(e) else e}); "
                              f"checkpoint {checkpoint} holds it: free some disk space and run the same command with "
                              "--resume auto, which writes it") from e


def _save(path: Path, state: dict[str, Any], keep: int, rank: int) -> Path:
    if rank == 0:
        save_checkpoint(path, state, keep)
    return path


def _already_finished(net: StitchedBase | nn.Module, resumed: Resumed, plan: Plan, out: Path, rank: int,
                      config: TrainConfig, world: int) -> TrainResult:
    """A finished run resumed with its own settings: nothing to train, nothing rewritten (final/ restored if
    deleted); the network holds the run's trained weights, as after training. Resumed into another folder
    (``--resume a/checkpoint.pt --out b``), b holds the run as a resume of an unfinished one leaves it: its settings'
    history, logs, checkpoint and network (with b/final alone, ``--resume auto --out b`` found nothing to continue).
    Resumed with changes (``run.resume_with_changes``, no longer schedule), it is the same: no step is trained with
    them, so no segment records them (one from the last step trained none, and the next resume dropped it)."""
    final, checkpoint = out / FINAL_NAME, resumed.path
    _load_weights(net, resumed.state["model"], str(resumed.path))
    if (source := _resumed_from_elsewhere(resumed, out)) is not None:
        checkpoint = out / CHECKPOINT_NAME
        if rank == 0:
            _write_history(out, config, world, resumed.position.step, resumed, trains=False)
            _carry_logs(source, out, resumed.position.step)
            save_checkpoint(checkpoint, resumed.state, config.run.keep_checkpoints)
    # only if someone deleted it, or a save was interrupted between its files (the weights in, config.json not)
    names = (WEIGHTS_NAME, CONFIG_NAME) if isinstance(net, StitchedBase) else (WEIGHTS_NAME,)
    if rank == 0 and not all((final / name).is_file() for name in names):
        _save_final_or_say(net, final, None, checkpoint)
    return TrainResult(resumed.position.step, plan.total, True, float("nan"), 0.0, 0.0, out, checkpoint, final)


@dataclass(frozen=True)
class Validation:
    """The data evaluated at each epoch's end, and how its images are read (recorded in every row of evals.jsonl)."""

    dataset: Dataset
    protocol: str  # 'paper', 'timm', 'native' (Fashion-MNIST as stored) or 'as given' (the caller's dataset)
    transform: str  # snnet.data.describe_transform of the dataset


def validation_set(net: StitchedBase | nn.Module, config: TrainConfig, task: Task,
                   given: Dataset | None = None) -> Validation | None:
    """What a run validates on: ``given`` as it is, else split ``data.val_split`` of the training source read as
    ``snnet eval`` reads it (the paper's resize and crop for the families the paper trained, unless
    ``data.eval_protocol`` says timm: :func:`snnet.reference.eval_data_config`); None: no validation."""
    from .data import FASHION_MNIST_NAMES, describe_transform

    d = config.data
    if given is None and d.val_split is None:
        return None
    if given is not None:
        return Validation(given, "as given", describe_transform(given))
    if isinstance(task, CausalLM):  # text is read as it is: no resize, crop or normalisation to choose
        if d.eval_protocol is not None:
            raise ConfigError("--data.eval_protocol chooses how images are resized and cropped; causal-lm reads text: "
                              "drop it")
        dataset = task.dataset(d, None, config.run.seed, split=d.val_split, train=False)
        return Validation(dataset, "text", f"{d.block_size}-token blocks of {d.corpus}")
    if isinstance(net, StitchedNet):
        from .reference import eval_data_config

        protocol, data_config = eval_data_config(net, d.source, d.eval_protocol, "--data.eval_protocol")
    else:
        from timm.data import resolve_data_config

        data_config = resolve_data_config(model=net)
        protocol = "native" if str(d.source).lower() in FASHION_MNIST_NAMES else "timm"
        if d.eval_protocol == "paper":
            raise ConfigError("--data.eval_protocol paper applies to stitched networks of the paper's families; "
                              "use timm for one model")
    dataset = task.dataset(d, data_config, config.run.seed, split=d.val_split, train=False)
    return Validation(dataset, protocol, describe_transform(dataset))


def _evaluate(net: StitchedBase | nn.Module, validation: Validation, config: TrainConfig, task: Task,
              position: Position, device: torch.device) -> dict[str, Any]:
    """One evaluation at an epoch's end: the task's scores of the model, or of every stitch (their means, the
    anchors'), and the protocol and transform the data were read with."""
    from .evaluate import validation_scores
    from .lm_eval import lm_validation_scores

    data = validation.dataset
    # the training's random streams put back afterwards: a loader draws its workers' seed from torch's (a dataset
    # may draw too), so a run with validation trained other weights (drop-path, erasing) than the same run without
    rng = rng_state()
    try:
        if isinstance(task, CausalLM):
            scores = lm_validation_scores(net, data, config.data.batch_size)
        else:
            scores = validation_scores(net, data, config.data.batch_size, config.data.workers, device, task)
    finally:
        set_rng_state(rng)
    return ({"step": position.step, "epoch": position.epoch} | scores
            | {"eval_protocol": validation.protocol, "eval_transform": validation.transform, "time": time.time()})


# ---------------------------------------------------------------------------- the settings' history


def _read_history(out: Path, saved: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Each segment's settings (``train_config.json``: a list of segments; before the configuration tree,
    one flat ``train``/``optim`` pair), or one segment holding ``saved`` if the file is missing."""
    path = out / TRAIN_CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return [{"from_step": 0, "world_size": world, "config": saved}]
    if "segments" in data:
        return list(data["segments"])
    from .config import from_legacy

    return [{"from_step": 0, "world_size": data.get("world_size", 1),
             "config": from_legacy(data.get("train", {}), data.get("optim"))}]


def _write_history(out: Path, config: TrainConfig, world: int, step: int, resumed: Resumed | None,
                   trains: bool = True) -> None:
    """``train_config.json``: every segment's settings; a resume with changes adds one (what changed, from which step),
    unless it ``trains`` no step (a finished run's: the history is the run's up to ``step``)."""
    segment = {"from_step": step, "world_size": world, "config": config.to_dict()}
    if resumed is None:
        segments = [segment]
    else:  # the same settings: the last segment goes on; changed ones: a new segment
        # a segment from this step on or later trained none of the checkpoint's steps: it belongs to a part of the run
        # given up (a resume with changes killed before its first checkpoint, or a run gone back to an earlier copy)
        kept = [s for s in resumed.history if s.get("from_step", 0) < step] or resumed.history[:1]
        changes = resumed.changes
        if not changes and len(kept) < len(resumed.history):  # one given up may have rewritten the checkpoint (its
            changes = result_changes(kept[-1]["config"], config, world)  # settings): what differs from the last kept
        segments = kept + ([{**segment, "changes": changes}] if changes and trains else [])
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"segments": segments}
    if resumed is not None and _resumed_from_elsewhere(resumed, out) is not None:
        # which checkpoint this folder's run came from: the same command, failed before the folder's first checkpoint
        # (the logs' copy, a full disk), takes the folder over again (runlock.check_run_folder)
        record[RESUMED_FROM] = str(resumed.path.resolve())
    text = json.dumps(record, indent=2)
    # atomically, like every other file of a run: an interrupted write never leaves half a config
    atomic_write(out / TRAIN_CONFIG_NAME, lambda tmp: tmp.write_text(text), durable=False)


def _resumed_from_elsewhere(resumed: Resumed, out: Path) -> Path | None:
    """The folder of the run ``resumed`` came from when it is not ``out`` (``--resume a/checkpoint.pt --out b``: a),
    else None."""
    source = run_folder(resumed.path)
    return None if source.resolve() == out.resolve() else source


def _carry_logs(source: Path, out: Path, step: int) -> None:
    """With ``--resume a/checkpoint.pt --out b``, b continues a's run (``source``), as its train_config.json says (a's
    segments): a's metrics.jsonl and evals.jsonl rows up to the checkpoint's ``step`` are copied to b (those after it
    are of steps b redoes, or of a's own later part), and so are a's TensorBoard event files (:func:`_carry_events`)."""
    for name in (METRICS_NAME, EVALS_NAME):
        try:
            if not (source / name).is_file():
                continue
            # errors="replace": a line garbled by a crash mid-write is dropped by _line_step (as _Log does)
            rows = [ln for ln in (source / name).read_text(errors="replace").splitlines()
                    if ln.strip() and _line_step(ln) <= step]
            atomic_write(out / name, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in rows)), durable=False)
        except OSError as e:
            raise TrainingError(f"cannot copy {source / name} to {out / name} ({e.strerror or e}); free some disk "
                                "space and run the same command again") from e
    _carry_events(source / TB_NAME, out / TB_NAME, step)


def _carry_events(source: Path, out: Path, step: int) -> None:
    """a's TensorBoard event files (``source``: a/tb) into b's (``out``), each under its name (older than the file b's
    writer opens: TensorBoard reads a's curve first), with the events of steps up to the checkpoint's ``step`` only.
    Copied whole, a file holds a's steps after the checkpoint too, which b redoes or never trains (a's own later part;
    a finished run resumed into b writes nothing more): b's writer records a purge from the step after the checkpoint,
    which TensorBoard's Python loader applies and not every reader does, and none where b trains nothing. So those
    steps showed twice in b, or a's later curve as b's. A file left with no scalar (written by a resume of a after the
    checkpoint) is not copied. Without tensorboard installed none can be read (nor written): they stay in a."""
    files = sorted(source.glob("events.out.tfevents.*")) if source.is_dir() else []
    try:  # TensorBoard's own reader and writer of event files (records framed with checksums)
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:  # tensorboard is optional
        return

    def write(tmp: Path, records: list[bytes]) -> None:
        with open(tmp, "wb") as f:
            w = RecordWriter(f)
            for record in records:
                w.write(record)

    for path in files:
        try:
            # a torn last record (a writer killed mid-write) ends the file, as TensorBoard reads it
            events = [(data, Event.FromString(data)) for data in RawEventFileLoader(str(path)).Load()]
            kept = [(data, e) for data, e in events if e.step <= step]
            if any(e.HasField("summary") for _, e in kept):
                out.mkdir(parents=True, exist_ok=True)
                atomic_write(out / path.name, lambda tmp: write(tmp, [data for data, _ in kept]), durable=False)
        except OSError as e:
            raise TrainingError(f"cannot copy {path} to {out / path.name} ({e.strerror or e}); free some disk space "
                                "and run the same command again") from e


# ---------------------------------------------------------------------------- the step engine


def route_modules(net: StitchedBase, stitch: Stitch) -> list[nn.Module]:
    """The modules the route of ``stitch`` runs, flat (exactly what :meth:`StitchedNet.forward` calls)."""
    return list(net.route(stitch).modules())


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def stitch_weights(net: StitchedBase, sampling: SamplingConfig) -> list[float]:
    """The weighted sampler's weight of every stitch of ``net``: ``sampling.stitch_weight`` for the
    ``weighted_stitches`` (ids or names; an unknown one is refused in one line), 1 for the others."""
    ids = []
    for key in sampling.weighted_stitches or ():
        try:
            ids.append(net.space[key].id)
        except StitchNotFoundError as e:  # the space says which names are near; say which setting holds it
            raise ConfigError(f"sampling.weighted_stitches: {e} (`snnet stitches` lists this space's stitches; "
                              "--sampling.sampler uniform draws them all alike)") from None
    if len(set(ids)) != len(ids):
        raise ConfigError("sampling.weighted_stitches names a stitch twice; list each once")
    return [sampling.stitch_weight if i in ids else 1.0 for i in range(len(net.space))]


class Trainer:
    """One optimisation step at a time: stitch sampling, the task's loss, AMP, distillation, DDP, the optimizer.

    :func:`train` drives it over a dataset with checkpoints and logs; use it directly for a
    custom loop. ``total_steps`` sizes the learning-rate schedule; ``steps_per_epoch`` is needed
    by the per-epoch schedule (``schedule.unit='epoch'``) and warm-ups given in epochs. ``net``
    is a :class:`StitchedNet` (a stitch sampled every step) or any plain model. ``optim``
    replaces ``config.optim`` (the earlier call form).
    """

    def __init__(self, net: StitchedBase | nn.Module, config: TrainConfig = TrainConfig(),
                 optim: OptimConfig | None = None, *, total_steps: int, warmup_steps: int | None = None,
                 teacher: nn.Module | None = None, device: str | torch.device | None = None,
                 steps_per_epoch: int | None = None, task: Task | None = None) -> None:
        if optim is not None:
            config = dataclasses.replace(config, optim=optim)
        sch = config.schedule
        if not steps_per_epoch and (sch.unit == "epoch" or (warmup_steps is None and not sch.warmup_steps
                                                           and sch.warmup_epochs)):
            # without it the rate would change every step, and a warm-up in epochs would be none: silently
            what = "schedule.unit 'epoch'" if sch.unit == "epoch" else f"schedule.warmup_epochs {sch.warmup_epochs:g}"
            raise ConfigError(f"{what} needs the length of an epoch: give Trainer(..., steps_per_epoch=N) (or "
                              "warmup_steps=N and schedule.unit 'step')")
        self.net, self.config = net, config
        self.rank, self.world_size = _dist()
        self.device = default_device(device or config.run.device)
        net.to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        # what the teacher is, recorded in checkpoints: a copy of the largest anchor is made from the network as
        # built, before a resume loads its weights, so a network built otherwise would teach something else
        self.teacher_digest = state_digest(self.teacher.state_dict()) if self.teacher is not None else None
        self.total_steps = total_steps
        self.sampler = None
        if isinstance(net, StitchedBase):
            s = config.sampling
            # per_rank: every rank its own stream of stitches; shared: one stream for all ranks
            seed = config.run.seed + (self.rank if s.stitch_sync == "per_rank" else 0)
            flops = [c.flops for c in net.costs()] if s.sampler in ("flops_bucketed", "ros") else None
            weights = stitch_weights(net, s) if s.sampler == "weighted" else None
            self.sampler = make_stitch_sampler(s.sampler, len(net.space), seed + 7919, flops, s.num_buckets,
                                               s.ros_gap, s.ros_ramp, weights)
        self.fsdp = self.world_size > 1 and config.run.fsdp
        if self.fsdp:
            _fully_shard(net, self.device)  # before the optimizer: it holds the shards
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.rates = config.rates(self.world_size)
        self.optimizer = build_optimizer(net, config.optim, self.rates.lr)
        warm = warmup_steps if warmup_steps is not None else config.schedule.warmup(steps_per_epoch or 0, total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.schedule, self.rates, total_steps, warm, steps_per_epoch))
        amp = config.run.amp
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.task = task if task is not None else get_task(config.task, config.data, net)
        self.model: nn.Module = net
        if self.world_size > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # A route uses only some parameters: without find_unused_parameters DDP would
            # wait forever for the gradients of the others.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(net, device_ids=ids, find_unused_parameters=True)
        self._route_cache: dict[int, torch.Tensor] = {}
        # LeViT's (and distilled DeiT's) two heads learn as DeiT and the reference train them: the class head on
        # the targets, the distillation head on the teacher (:meth:`loss`); without a teacher, their average
        self.two_heads = (isinstance(net, StitchedNet) and self.teacher is not None
                          and set_two_head_training(net) > 0)
        self.unused_stepped = 0  # parameters the last step updated without using them (optim.unused_updates)

    # -- the step
    def loss(self, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        """The training loss of logits ``out`` on (possibly mixed) inputs ``x`` with targets ``y``; ``out`` is
        a (class, distillation) pair from a network with two heads (:func:`snnet.distill.two_head_loss`)."""
        if isinstance(out, (tuple, list)):
            d = self.config.distill
            teacher = teacher_logits(self.teacher, x).float() if self.teacher is not None else None
            return two_head_loss(out, y, self.task.loss, teacher, d.type, d.alpha, d.temperature)
        loss = self.task.loss(out, y)
        if self.teacher is not None:
            d = self.config.distill
            loss = (1 - d.alpha) * loss + d.alpha * self.task.distill(out, teacher_logits(self.teacher, x), d)
        return loss

    def backward(self, x: torch.Tensor, y: torch.Tensor, stitch: int | str | Stitch | None = None) -> float:
        """Forward + loss + backward (on ``stitch`` for a stitched network); leaves synchronised, corrected gradients."""
        s = self.net.select(stitch) if stitch is not None else None  # type: ignore[operator]
        self.optimizer.zero_grad(set_to_none=True)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x, y = self.task.mix(x, y)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.loss(self.model(x), x, y)
        self.scaler.scale(loss).backward()
        if self.world_size > 1 and s is not None:
            self._sync_grads(s)
        return float(loss.detach())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Stitch | None]:
        """Sample a stitch (a stitched network) and take one optimisation step; returns (loss, stitch or None)."""
        stitch = self.net.space[self.sampler.sample()] if self.sampler is not None else None  # type: ignore[union-attr]
        try:
            loss = self.backward(x, y, stitch)
        except Exception as e:
            if _is_oom(e):
                b = len(x)
                raise TrainingError(f"a batch of {b} does not fit in {self.device} memory ({str(e).splitlines()[0]}); "
                                    f"try --data.batch_size {max(b // 2, 1)}") from e
            raise
        if self.config.optim.unused_updates == "reference":  # what no route used: decayed and moved on its momentum,
            self.unused_stepped = stale_zero_grads(self.optimizer)  # as the reference's steps on PyTorch < 2.0
        if self.config.optim.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad([p for p in self.params if p.grad is not None], self.config.optim.clip_grad,
                               mode=self.config.optim.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, stitch

    def _used(self, s: Stitch) -> torch.Tensor:
        """1.0 for each parameter on the route of ``s``, else 0.0 (cached per stitch)."""
        if s.id not in self._route_cache:
            on_route = {id(p) for m in route_modules(self.net, s) for p in m.parameters()}  # type: ignore[arg-type]
            self._route_cache[s.id] = torch.tensor([float(id(p) in on_route) for p in self.params])
        return self._route_cache[s.id]

    def _sync_grads(self, s: Stitch) -> None:
        """After DDP's all-reduce: parameters no rank used get no gradient (as in one process);
        with ``ddp_grads='users'`` the others get the mean over the ranks that used them."""
        if self.config.sampling.stitch_sync == "shared":
            return  # every rank ran the same route: DDP's mean is already the right one
        # a copy: all_reduce works in place, and on CPU .to() would hand back the cached tensor
        # itself, so every later step on this stitch would sum ever larger counts
        count = self._used(s).to(self.device, copy=True)
        torch.distributed.all_reduce(count)
        rescale = self.config.sampling.ddp_grads == "users"
        scale = (self.world_size / count.clamp(min=1)).tolist()
        for p, n, k in zip(self.params, count.tolist(), scale):
            if n == 0:
                p.grad = None  # on no rank's route: untouched, like single-process training
            elif rescale and p.grad is not None and k != 1.0:
                p.grad.mul_(k)

    # -- state
    def model_state(self) -> dict[str, torch.Tensor]:
        """The network's weights on the CPU, whole (gathered from every rank under FSDP: collective, rank 0 gets them)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(self.net, options=_full_state_options())
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer (whole, keyed by parameter name under FSDP: collective), schedule and scaler."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(self.net, self.optimizer, options=_full_state_options())
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's optimizer state (moments, step counts), schedule position and scaler. The
        settings stay this run's: a resume with changes (``run.resume_with_changes``: another rate,
        weight decay, betas) takes them from here on, where loading alone would bring back the saved ones."""
        ours = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.fsdp:  # every rank read the whole checkpoint: each takes its own shards of the optimizer state
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # a parameter on no route so far has no optimizer state yet (not strict), and must not get one
            # here: AdamW starts its moments when it first sees a gradient, as in the uninterrupted run
            set_optimizer_state_dict(self.net, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
            names: dict[Any, set[str]] = {}
            for name, p in self.net.named_parameters(remove_duplicate=False):  # a tied weight has two names
                names.setdefault(p, set()).add(name)
            saved = state["optimizer"]["state"]
            for p in [p for p in self.optimizer.state if not names.get(p, set()) & saved.keys()]:
                del self.optimizer.state[p]
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, ours):
            group.update(settings)
        sched = self.scheduler
        sched.load_state_dict({**state["scheduler"], "base_lrs": sched.base_lrs})
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)  # where this run's schedule is at the saved step
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # else: saved without fp16 loss scaling (amp off or bf16, or 'auto' on another device: run.device is not a
        # result setting), resumed with it: the scaler starts as a fresh fp16 run's (torch refuses the empty state)


def _fully_shard(net: nn.Module, device: torch.device) -> None:
    """torch's FSDP2 (``fully_shard``) over every process: each block of each anchor is one unit (gathered
    just before it runs, freed after), the rest (stems, heads, stitching layers) the root's. Rank 0's weights
    are broadcast first, as DDP does: it alone fitted the stitching layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for t in [*net.parameters(), *net.buffers()]:
        torch.distributed.broadcast(t.data, 0)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for anchor in getattr(net, "anchors", ()):
        for block in anchor.blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


# ---------------------------------------------------------------------------- DDP helpers


def _claim_run_folder(config: TrainConfig) -> RunLock | None:
    """Rank 0 locks and readies ``out_dir``; every rank gets its verdict, so a refusal stops all of them."""
    rank, world = _dist()
    lock, problem = None, None
    if rank == 0:
        try:
            lock = claim_run_folder(config.run.out_dir, config.run.resume, config.run.overwrite)
        except SnnetError as e:
            problem = e
    if world > 1:
        verdict = _gather(str(problem) if problem is not None else None, world)[0]
        if verdict is not None and problem is None:
            problem = RunFolderError(verdict)
    if problem is not None:
        raise problem
    return lock


def _stop_requested(stops: StopSignals, world_size: int, device: torch.device) -> bool:
    """Whether any rank got Ctrl-C/SIGTERM; every rank asks after every step, so all stop at the same one."""
    if world_size == 1:
        return stops.received is not None
    flag = torch.tensor([float(stops.received is not None)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    anyone = bool(flag.item())
    if anyone and stops.received is None:
        stops.received = "a signal to another process"
    return anyone


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    # tensors inside all_gather_object do not survive its pickling: send torch.save bytes instead
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


# ---------------------------------------------------------------------------- logs


class _Log:
    """A JSON-lines file of the run (metrics.jsonl: one object per step) and TensorBoard scalars, on rank 0 only.

    On resume the lines of steps after the checkpoint (written by the interrupted run, and
    about to be redone) are dropped, so the file always describes one run. A write that fails
    (a full disk) is one :class:`TrainingError` line. Without ``create`` (evals.jsonl of a run without
    validation) the file is only pruned: none is made, nothing written.
    """

    def __init__(self, out_dir: Path, active: bool, start_step: int, tensorboard: bool,
                 name: str = METRICS_NAME, create: bool = True) -> None:
        self.file = self.writer = None
        if not active:
            return
        self.path = out_dir / name
        try:
            if self.path.exists():
                # errors="replace": a line garbled by a crash mid-write is dropped by _line_step, not a traceback
                lines = self.path.read_text(errors="replace").splitlines()
                keep = [ln for ln in lines if ln.strip() and _line_step(ln) <= start_step]
                if len(keep) < len(lines):  # atomically: a write that fails (a full disk) lost every line before
                    text = "".join(ln + "\n" for ln in keep)
                    atomic_write(self.path, lambda tmp: tmp.write_text(text), durable=False)
            if create:
                self.file = open(self.path, "a")
        except OSError as e:
            raise TrainingError(f"cannot write {self.path} ({e.strerror or e}); it and the checkpoint are kept: free "
                                "some disk space and resume with --resume auto") from e
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out_dir / TB_NAME), purge_step=start_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise TrainingError(f"cannot write {self.path} ({e.strerror or e}); the last checkpoint is kept") from e
        if self.writer is not None:
            for k in ("loss", "lr", "img_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the failed write has been reported
                pass
        if self.writer is not None:
            self.writer.close()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: drop it
