"""Single networks (family and zoo members) trained through snnet's loop, and the scripts that record them."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import snnet
from snnet.config import TrainConfig
from snnet.members import create_member, train_member
from snnet.pretrained import FmnistVitSpec
from snnet.recipes import recipe_config

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path(snnet.__file__).parent / "weights"
TINY = FmnistVitSpec.parse("fmnist_vit_w8_d1_p14_h1")  # 2x2 patches: a member in milliseconds


def _script(name: str):
    """A script of scripts/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _quick(tmp_path: Path, **more) -> TrainConfig:
    return recipe_config("fmnist-family").override(epochs=2, limit=512, batch_size=128, progress=False,
                                                   out_dir=str(tmp_path / "run"), **more)


def test_a_member_trains_through_the_loop_with_its_validation_curve_and_is_measured_as_shipped(tmp_path):
    row = train_member(TINY.name, "fmnist_vit", TINY.model_kwargs(), _quick(tmp_path), ("val",), tmp_path / "w")
    assert row["epochs"] == 2 and row["steps"] == 8 and row["image_steps"] == 8 * 128
    assert len(row["val_curve"]) == 2 and all(0 <= a <= 100 for a in row["val_curve"])  # one top-1 per epoch
    assert row["val_curve"][-1] == row["acc_fp32"]["val"]  # the last epoch's evaluation is the trained model's
    run = tmp_path / "run"
    assert [json.loads(ln)["epoch"] for ln in (run / "evals.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "train_config.json").read_text())["segments"][0]["config"]["optim"]["clip_grad"] == 1.0
    # what users get: the float16 file through timm's pretrained path
    reloaded = create_member("fmnist_vit", TINY.model_kwargs(), tmp_path / "w" / f"{TINY.name}.safetensors")
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    # run again: the finished run is measured again, not retrained
    again = train_member(TINY.name, "fmnist_vit", TINY.model_kwargs(), _quick(tmp_path), ("val",), tmp_path / "w")
    assert again["acc"] == row["acc"] and again["val_curve"] == row["val_curve"]


def test_the_zoo_script_records_members_through_the_library(tmp_path, capsys):
    zoo = _script("train_fmnist_zoo")
    table = tmp_path / "zoo.json"
    zoo.main(["--models", TINY.name, "--epochs", "1", "--limit", "256", "--json", str(table), "--weights-dir",
              str(tmp_path / "w"), "--zoo.runs", str(tmp_path / "runs"), "--threads", "1", "--run.progress", "false"])
    rows = json.loads(table.read_text())
    assert [m["name"] for m in rows["models"]] == [TINY.name] and rows["recipe"]["optim.lr"] == 0.002
    assert rows["models"][0]["val_curve"] and rows["split"]["train"] == 256
    rows["models"][0]["val_curve"] = [50.0, 61.5, 61.5, 60.25]
    table.write_text(json.dumps(rows))
    zoo.main(["--show", "--json", str(table)])
    out = capsys.readouterr().out
    # where the curve peaked (the first epoch of a tie) and how it ended
    assert "best val (epoch)" in out and re.search(r"61\.50 \(2\) +61\.50 61\.50 60\.25", out)
    # a table of models trained otherwise is refused, not mixed
    with pytest.raises(snnet.SnnetError, match="trained with other settings"):
        zoo.main(["--models", TINY.name, "--epochs", "1", "--limit", "256", "--lr", "1e-3", "--json", str(table),
                  "--weights-dir", str(tmp_path / "w"), "--zoo.runs", str(tmp_path / "runs2"), "--threads", "1",
                  "--run.progress", "false"])


def test_the_zoo_trains_with_the_converged_recipe_and_reads_files_older_than_a_setting(tmp_path):
    zoo = _script("train_fmnist_zoo")
    table = tmp_path / "zoo.json"
    common = ["--limit", "256", "--json", str(table), "--weights-dir", str(tmp_path / "w"), "--threads", "1",
              "--run.progress", "false"]
    zoo.main(["--recipe", "fmnist-converged", "--epochs", "1", "--models", TINY.name, "--zoo.runs", str(tmp_path / "r1"),
              *common])
    rows = json.loads(table.read_text())
    assert rows["recipe"]["data.augment"] is False and rows["recipe"]["data.crop_padding"] is None
    # a file written before data.crop_padding existed: the missing setting is its default, not a change
    rows["recipe"].pop("data.crop_padding")
    table.write_text(json.dumps(rows))
    other = FmnistVitSpec.parse("fmnist_vit_w8_d1_p14_h2")
    # each member at its own epochs (a small one needs more): recorded in its row, not the file's recipe
    zoo.main(["--recipe", "fmnist-converged", "--epochs", "2", "--models", other.name, "--zoo.runs", str(tmp_path / "r2"),
              *common])
    rows = json.loads(table.read_text())
    assert {m["name"]: m["epochs"] for m in rows["models"]} == {TINY.name: 1, other.name: 2}
    assert "schedule.epochs" not in rows["recipe"]
    with pytest.raises(snnet.SnnetError, match=r"other settings \(data.augment, data.crop_padding\)"):
        zoo.main(["--models", TINY.name, "--epochs", "1", "--augment", "--data.crop_padding", "0", "--zoo.runs",
                  str(tmp_path / "r3"), *common])


def test_a_zoo_run_that_chooses_settings_leaves_the_test_split_unread(tmp_path, capsys, monkeypatch):
    zoo = _script("train_fmnist_zoo")
    read = []
    real = zoo.train_member
    monkeypatch.setattr(zoo, "train_member", lambda *a: read.append(a[4]) or real(*a))
    table = tmp_path / "zoo.json"
    zoo.main(["--models", TINY.name, "--epochs", "1", "--limit", "256", "--no-test", "--json", str(table),
              "--weights-dir", str(tmp_path / "w"), "--zoo.runs", str(tmp_path / "runs"), "--threads", "1",
              "--run.progress", "false"])
    assert read == [("val",)]  # the member is measured on the validation split only
    rows = json.loads(table.read_text())
    assert rows["models"][0]["test_acc1"] is None and rows["models"][0]["val_acc1"] is not None
    assert rows["split"]["test"] is None and len(rows["models"][0]["val_curve"]) == 1
    capsys.readouterr()
    zoo.main(["--show", "--json", str(table)])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(TINY.name))
    assert " - " in line  # no test top-1 to show


def test_the_family_card_renders_from_the_family_file_written_before_the_tree(tmp_path):
    family = _script("train_fmnist_family")
    shutil.copy(WEIGHTS / "family.json", tmp_path / "family.json")
    family.main(["--card-only", "--family.out", str(tmp_path)])
    assert (tmp_path / "MODEL_CARD.md").read_text() == (WEIGHTS / "MODEL_CARD.md").read_text()


def test_the_converged_family_card_renders_from_its_family_file(tmp_path):
    family = _script("train_fmnist_family")
    shutil.copy(WEIGHTS / "converged" / "family.json", tmp_path / "family.json")
    family.main(["--card-only", "--family.tag", "converged", "--family.out", str(tmp_path)])
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert card == (WEIGHTS / "converged" / "MODEL_CARD.md").read_text()
    assert 'timm.create_model("fmnist_vit_ti.converged", pretrained=True)' in card and "fmnist-converged" in card
    with pytest.raises(snnet.SnnetError, match="unknown tag 'best'"):
        family.main(["--card-only", "--family.tag", "best", "--family.out", str(tmp_path)])


def test_a_family_file_older_than_a_setting_keeps_its_members(tmp_path):
    """A setting snnet gained after a family was trained (here space.cut) is its default, not another recipe:
    training one more member keeps the others (and a real change of recipe still starts the file anew)."""
    family = _script("train_fmnist_family")
    common = ["--limit", "256", "--epochs", "1", "--family.out", str(tmp_path), "--family.threads", "1",
              "--run.progress", "false"]
    family.main(["--models", "fmnist_vit_ti", "--family.runs", str(tmp_path / "r1"), *common])
    record = json.loads((tmp_path / "family.json").read_text())
    record["recipe"].pop("space.cut")  # as written before the setting existed
    (tmp_path / "family.json").write_text(json.dumps(record))
    family.main(["--models", "fmnist_vit_s", "--family.runs", str(tmp_path / "r2"), *common])
    assert list(json.loads((tmp_path / "family.json").read_text())["models"]) == ["fmnist_vit_ti", "fmnist_vit_s"]
    family.main(["--models", "fmnist_vit_ti", "--family.runs", str(tmp_path / "r3"), "--optim.lr", "1e-3", *common])
    assert list(json.loads((tmp_path / "family.json").read_text())["models"]) == ["fmnist_vit_ti"]


def test_the_float16_file_keeps_integer_buffers_exact():
    # every tensor was cast to float16: BatchNorm's step count 4097 came back as 4096
    from snnet.members import fp16_state

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].num_batches_tracked.fill_(4097)
    state = fp16_state(model)
    assert state["1.num_batches_tracked"].dtype == torch.int64 and int(state["1.num_batches_tracked"]) == 4097
    assert state["0.weight"].dtype == torch.float16 and state["1.running_var"].dtype == torch.float16
