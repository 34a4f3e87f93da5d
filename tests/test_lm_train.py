"""Training a stitched language model through the one loop (``task: causal-lm``, snnet.tasks.CausalLM).

Tiny random-init Pythia-like anchors (GPT-NeoX configs from transformers' own config class, two
sizes, the larger with a padded embedding matrix) saved as model folders with a byte-level BPE
tokenizer, and a corpus of real text: a few files of this Python's standard library copied
into a folder. Checked: a run trains one stitch per step and lowers held-out loss, distils from
the largest anchor, resumes to the bit, runs under bf16 autocast and on two processes (gloo),
and the command line trains, evaluates and exports.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import snnet.lm as lm  # noqa: E402
from snnet.config import TrainConfig  # noqa: E402
from snnet.errors import ConfigError  # noqa: E402
from snnet.tasks import CausalLM, get_task  # noqa: E402
from snnet.train import train  # noqa: E402

from .conftest import lm_config, lm_tokenizer, spawn_two  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

BLOCK = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    """Two tiny Pythia-like anchors (2 and 4 layers; the larger pads its embedding matrix), with their tokenizer."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lm_anchors")
    tok = lm_tokenizer()
    out = []
    for name, (w, d, extra) in {"small": (32, 2, 0), "large": (48, 4, 16)}.items():
        AutoModelForCausalLM.from_config(lm_config("pythia", w, d, len(tok), extra)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(str(root / name))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 small files of the standard library's source: real text, held out by file."""
    root = tmp_path_factory.mktemp("corpus")
    files = sorted((p for p in lm.stdlib_sources() if 2_000 < p.stat().st_size < 6_000), key=lambda p: p.name)[:40]
    for k, p in enumerate(files):
        shutil.copy(p, root / f"{k:02d}_{p.name}")
    return root


def _config(folders: list[str], corpus: Path, out: Path, **changes) -> TrainConfig:
    base = {"task": "causal-lm", "anchors": ",".join(folders), "corpus": str(corpus), "block_size": BLOCK,
            "batch_size": 4, "max_steps": 6, "epochs": None, "lr": 2e-3, "lr_base_batch": None, "init_images": 8,
            "weight_decay": 0.0, "label_smoothing": 0.0, "out_dir": str(out), "progress": False, "tensorboard": False,
            "ckpt_every": 0}
    return TrainConfig().override({**base, **changes})


def _build(config: TrainConfig):
    torch.manual_seed(config.run.seed)
    net = get_task(config.task).build_network(config)
    task = get_task(config.task, config.data, net)
    return net, task


def _held_out_loss(net, task, config) -> float:
    val = task.dataset(config.data, split="val", train=False, limit=16)
    rows = lm.evaluate_lm(net, lm.text_loader(val, 8), progress=False)
    return sum(r.loss for r in rows) / len(rows)


def test_a_run_trains_one_stitch_per_step_and_lowers_held_out_loss(folders, corpus, tmp_path):
    config = _config(folders, corpus, tmp_path / "run", max_steps=40, limit=64)
    net, task = _build(config)
    assert isinstance(task, CausalLM) and isinstance(net, lm.StitchedLM) and net.context == BLOCK
    before = _held_out_loss(net, task, config)
    val = task.dataset(config.data, split="val", train=False, limit=8)
    result = train(net, task.dataset(config.data), config.override(epochs=2, max_steps=None), val_data=val)
    assert result.finished and result.step == 2 * (64 // 4)
    assert len(set(result.stitches)) > 3  # one stitch per step, drawn from the whole space
    after = _held_out_loss(net, task, config)
    assert after < before - 0.5, (before, after)  # next-token training works on every network (mean over all)
    evals = [line for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and '"bpb_mean"' in evals[-1]  # validation at each epoch's end, in bits per byte
    saved = lm.StitchedLM.from_pretrained(tmp_path / "run" / "final")
    assert [s.name for s in saved.space] == [s.name for s in net.space] and saved.tokenizer is not None
    ids = task.dataset(config.data, split="val", train=False, limit=2).ids[:, :-1]
    net.eval()
    for s in (0, len(net.space) - 1):
        net.select(s)
        saved.select(s)
        torch.testing.assert_close(saved(ids), net(ids))


def test_images_only_settings_are_refused_for_a_causal_lm_run(folders, corpus, tmp_path):
    with pytest.raises(ConfigError, match="mixup and data.cutmix mix images"):
        get_task("causal-lm", TrainConfig().override(mixup=0.8).data)
    with pytest.raises(ConfigError, match="model.num_classes is for image models"):
        _build(_config(folders, corpus, tmp_path, num_classes=10))
    config = _config(folders, corpus, tmp_path, block_size=80)  # the anchors know 64 positions
    with pytest.raises(Exception, match="lower --data.block_size to at most 64"):  # refused already at building:
        net, task = _build(config)  # costs would be stated at a context no route can run
        train(net, task.dataset(config.data), config)
    assert not (tmp_path / "checkpoint.pt").exists()


def _trained(folders, corpus, out: Path, stop_after: int | None = None, **changes):
    config = _config(folders, corpus, out, limit=32, **changes)
    net, task = _build(config)
    result = train(net, task.dataset(config.data), config, stop_after=stop_after)
    return net, result


@pytest.mark.parametrize("lora", [0, 4], ids=["whole", "lora"])
def test_an_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(folders, corpus, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    run = dict(distill="largest", ckpt_every=2, anchor_lora_rank=lora)
    full, done = _trained(folders, corpus, tmp_path / "full", **run)
    _, first = _trained(folders, corpus, tmp_path / "cut", stop_after=3, **run)
    assert not first.finished and first.step == 3
    resumed, rest = _trained(folders, corpus, tmp_path / "cut", resume="auto", **run)
    assert rest.finished and rest.stitches == done.stitches[3:]  # the sampler's stream goes on where it stopped
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # to the bit


def test_a_resume_with_another_corpus_setting_is_refused(folders, corpus, tmp_path):
    from snnet.errors import CheckpointError

    _trained(folders, corpus, tmp_path / "run", stop_after=2)
    with pytest.raises(CheckpointError, match="data.block_size: 16 -> 8"):
        _trained(folders, corpus, tmp_path / "run", resume="auto", block_size=8)


def test_distillation_is_token_level_from_the_largest_anchor_or_a_named_teacher(folders, corpus, tmp_path):
    from snnet.train import Trainer

    config = _config(folders, corpus, tmp_path, alpha=1.0, temperature=2.0)
    net, task = _build(config)
    x, y = task.inputs(next(iter(lm.text_loader(task.dataset(config.data), 4))))
    largest = len(net.anchors) - 1  # the largest anchor's own network: it matches its teacher exactly
    for teacher in ("largest", folders[-1]):  # a copy of it, or the same model loaded by name (a padded head)
        trainer = Trainer(net, config, total_steps=1, teacher=task.build_teacher(net, teacher), task=task, device="cpu")
        assert trainer.backward(x, y, largest) == pytest.approx(0.0, abs=1e-5)
        assert trainer.backward(x, y, 0) > 0.01  # the small anchor does not
    with pytest.raises(Exception, match="shares weights"):
        task.check_teacher(net.anchors[-1], net)


def test_bf16_autocast_trains_on_cpu(folders, corpus, tmp_path):
    from snnet.train import Trainer

    losses = {}
    for amp in ("off", "bf16"):
        config = _config(folders, corpus, tmp_path, amp=amp)
        net, task = _build(config)
        trainer = Trainer(net, config, total_steps=1, task=task, device="cpu")
        x, y = task.inputs(next(iter(lm.text_loader(task.dataset(config.data), 4))))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            assert net(x).dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
        losses[amp] = trainer.backward(x, y, 3)
        assert trainer.amp_dtype == (torch.bfloat16 if amp == "bf16" else None)
    assert losses["bf16"] != losses["off"] and losses["bf16"] == pytest.approx(losses["off"], abs=0.05)


def _join(rank: int, world: int, port: int) -> None:
    """Join a gloo process group of ``world`` CPU processes, as torchrun's environment would say."""
    import os

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _ddp_runs(rank: int, folders: list[str], corpus: str, out: str) -> None:
    """One rank of a two-process run into ``out/run``: its own stitch per step, DDP's mean gradient, rank 0 writes the run."""
    net, result = _trained(folders, Path(corpus), Path(out) / "run", batch_size=2, max_steps=4, ckpt_every=2)
    torch.save({"state": net.state_dict(), "stitches": result.stitches}, Path(out) / f"rank{rank}.pt")


def _two_process_worker(rank: int, world: int, port: int, folders: list[str], corpus: str, out: str) -> None:
    """The runs of _ddp_runs and _fsdp_runs (their own folders) on one process group: spawning is the slow part."""
    _join(rank, world, port)
    try:
        _ddp_runs(rank, folders, corpus, out)
        _fsdp_runs(rank, folders, corpus, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(folders, corpus, tmp_path_factory) -> Path:
    """Run the two-process job of _two_process_worker once."""
    out = tmp_path_factory.mktemp("lm_two_processes")
    spawn_two(_two_process_worker, folders, str(corpus), str(out))
    return out


@pytest.mark.slow
def test_two_processes_train_one_stitched_lm_with_ddp(two_process_runs):
    tmp_path = two_process_runs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert len(r0["stitches"]) == 4 and r0["stitches"] != r1["stitches"]  # each rank its own stitch per step
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # one network after all
    saved = lm.StitchedLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert all(torch.equal(saved[k], r0["state"][k]) for k in saved)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and len(ckpt["sampler"]) == 2


def _snnet(*args: str, cwd: Path) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "snnet", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_command_line_trains_evaluates_generates_and_exports(folders, corpus, tmp_path, capsys):
    """`python -m snnet train --task causal-lm ...` in a process of its own, then eval, generate, export on its network."""
    import json

    from snnet.cli import main

    run = tmp_path / "run"
    out = _snnet("train", "--recipe", "causal-lm", "--task", "causal-lm", "--model.anchors", ",".join(folders),
                 "--data.corpus", str(corpus), "--data.block_size", str(BLOCK), "--data.batch_size", "4", "--data.limit", "16",
                 "--schedule.max_steps", "4", "--model.init_images", "4", "--run.out_dir", str(run),
                 "--run.progress", "false", "--distill.teacher", "largest", cwd=tmp_path)
    assert "trained 4 steps" in out and "seq/s" in out
    assert json.loads((run / "train_config.json").read_text())["segments"][0]["config"]["task"] == "causal-lm"
    main(["eval", "--model", str(run / "final"), "--limit", "8", "--batch-size", "4", "--out", str(tmp_path / "eval"),
          "--no-progress"])
    assert "bits/byte" in capsys.readouterr().out
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    net = lm.StitchedLM.from_pretrained(run / "final")
    assert len(rows) == len(net.space) and all(r["split"] == "val" for r in rows)  # the run's held-out files
    assert {r["blocks"] for r in rows} == {8}  # what --limit read: the fingerprint names only the files
    assert {r["limit_seed"] for r in rows} == {0}  # read in the order drawn with eval's fixed seed, not sorted
    assert all(math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-6) for r in rows)
    assert (tmp_path / "eval" / "frontier.html").is_file()
    # drawn again from the file: bits per byte as above (it was tabled and drawn as top-1 of "images")
    main(["eval", "--results", str(tmp_path / "eval"), "--out", str(tmp_path / "again")])
    assert "bits/byte" in capsys.readouterr().out and (tmp_path / "again" / "frontier.html").is_file()
    assert not (tmp_path / "again" / "pareto.html").exists()
    main(["generate", "--model", str(run / "final"), "--prompt", "def add(", "--max-new-tokens", "5", "--stitch", "1"])
    assert capsys.readouterr().out.startswith("def add(")
    with pytest.raises(SystemExit) as refused:  # the image export's options are refused, not ignored
        main(["export", "--model", str(run / "final"), "--stitch", "2", "--format", "onnx", "--out", str(tmp_path / "stitch")])
    assert refused.value.code == 2 and "--format is for image networks" in capsys.readouterr().err
    main(["export", "--model", str(run / "final"), "--stitch", "2", "--out", str(tmp_path / "stitch")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "stitch").eval()  # snnet.lm registered the class
    ids = torch.randint(0, net.vocab_size, (1, 8))
    net.eval().select(2)
    torch.testing.assert_close(exported(ids).logits[..., :net.vocab_size], net(ids), atol=1e-5, rtol=1e-5)


def _fsdp_runs(rank: int, folders: list[str], corpus: str, out: str) -> None:
    """Three runs into ``out/fsdp``, ``out/ddp``, ``out/cut``: FSDP, the same with DDP, and FSDP stopped at step 2 and resumed."""
    common = dict(batch_size=2, max_steps=4, ckpt_every=2, stitch_sync="shared", clip_grad=1.0)
    nets = {}
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        net, result = _trained(folders, Path(corpus), Path(out) / name, fsdp=fsdp, **common)
        nets[name] = result.stitches
        # what this process holds of the network's parameters
        nets[f"{name}_held"] = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in net.parameters())
    _trained(folders, Path(corpus), Path(out) / "cut", stop_after=2, fsdp=True, **common)
    _, result = _trained(folders, Path(corpus), Path(out) / "cut", resume="auto", fsdp=True, **common)
    nets["cut"] = result.stitches
    torch.save(nets, Path(out) / f"stitches{rank}.pt")


@pytest.mark.slow
def test_fsdp_shards_the_anchors_trains_as_ddp_does_and_resumes_exactly(folders, two_process_runs):
    tmp_path = two_process_runs
    stitches = [torch.load(tmp_path / f"stitches{r}.pt") for r in range(2)]
    assert stitches[0]["fsdp"] == stitches[1]["fsdp"] == stitches[0]["ddp"]  # one route for every rank per step
    whole = stitches[0]["ddp_held"]  # DDP: every process holds the whole network; FSDP: about half of it each
    assert stitches[0]["fsdp_held"] + stitches[1]["fsdp_held"] >= whole and stitches[0]["fsdp_held"] < 0.6 * whole
    final = {name: lm.StitchedLM.from_pretrained(tmp_path / name / "final").state_dict() for name in ("fsdp", "ddp", "cut")}
    start = lm.create_stitched_lm(",".join(folders), weights=True).state_dict()
    moved = 0
    for k, v in final["fsdp"].items():
        torch.testing.assert_close(v, final["ddp"][k], atol=2e-6, rtol=1e-5)  # the same optimisation as DDP
        assert torch.equal(v, final["cut"][k]), k  # and a resumed sharded run ends where the uninterrupted one does
        moved += k in start and not torch.equal(v, start[k])
    assert moved > 10  # training moved the anchors' weights
    ckpt = torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["config"]["run"]["fsdp"] and set(ckpt["model"]) == set(final["fsdp"])


def test_lora_on_the_anchors_trains_only_adapters_and_stitching_layers_and_saves_them_apart(folders, corpus, tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    config = _config(folders, corpus, tmp_path / "run", limit=32, anchor_lora_rank=4, anchor_lora_alpha=8.0)
    net, task = _build(config)
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k or k.startswith("stitch_layers.") for k in trainable)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = train(net, task.dataset(config.data), config)
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable  # the anchors' own weights did not move
    assert any(".lora_B." in k for k in changed)  # the adapters (B starts at zero) did
    saved = lm.StitchedLM.from_pretrained(result.final_dir)  # a plain network: the adapters merged into its weights
    assert not any(".lora_" in k for k in saved.state_dict())
    ids = task.dataset(config.data, split="val", train=False, limit=2).ids[:, :-1]
    net.eval()
    for s in range(len(net.space)):
        net.select(s)
        saved.select(s)
        torch.testing.assert_close(saved(ids), net(ids), atol=1e-5, rtol=1e-5)
    adapters = load_file(str(result.final_dir / "adapters.safetensors"))
    assert set(adapters) == trainable  # only what training changed, apart
    assert sum(v.numel() for v in adapters.values()) < sum(v.numel() for v in saved.state_dict().values()) / 4
    with pytest.raises(ConfigError, match="anchor_lora_rank puts PEFT adapters on language-model anchors"):
        get_task("image-classification").build_network(TrainConfig().override(anchor_lora_rank=4))


def test_a_token_id_outside_the_vocabulary_is_named() -> None:
    # a negative id was refused under the largest id of the block, which may well be inside the vocabulary
    import types

    from snnet.data import DatasetError

    task = CausalLM(net=types.SimpleNamespace(vocab_size=100, tokenizer=None))
    for ids, bad in (([5, -1, 7, 9], -1), ([5, 100, 7, 9], 100)):
        with pytest.raises(DatasetError, match=rf"^token id {bad} is outside the network's 100-token vocabulary"):
            task.check_dataset(torch.nn.Linear(1, 1), [{"input_ids": torch.tensor(ids)}] * 4, 2)
