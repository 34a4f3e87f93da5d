"""Tests of snnet.pretrained: registry names, aliases, and the shipped pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from snnet import pretrained
from snnet.data import FashionMNIST, make_loader

FAMILY_JSON = pretrained.WEIGHTS_DIR / "family.json"
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")


def test_hyphen_alias() -> None:
    assert pretrained.normalize_name("fmnist-vit-ti") == "fmnist_vit_ti"
    assert pretrained.normalize_name("FMNIST-ViT-B") == "fmnist_vit_b"
    assert pretrained.normalize_name("fmnist_vit_s") == "fmnist_vit_s"
    assert pretrained.normalize_name("fmnist-vit-s.some-tag") == "fmnist_vit_s.some-tag"


def test_registered_in_timm() -> None:
    assert set(pretrained.FMNIST_FAMILY) <= set(timm.list_models("fmnist_vit_*"))
    cfg = timm.models.get_pretrained_cfg("fmnist_vit_ti")
    assert Path(cfg.file) == pretrained.WEIGHTS_DIR / "fmnist_vit_ti.safetensors"
    assert cfg.input_size == (1, 28, 28) and cfg.num_classes == 10
    assert cfg.mean == (0.2860,) and cfg.std == (0.3530,) and cfg.crop_pct == 1.0


@pytest.mark.parametrize("name, width, heads", [("fmnist_vit_ti", 24, 2), ("fmnist_vit_s", 48, 3), ("fmnist_vit_b", 96, 6)])
def test_architecture(name: str, width: int, heads: int) -> None:
    model = timm.create_model(name)
    assert model.embed_dim == width and len(model.blocks) == 3
    assert model.blocks[0].attn.num_heads == heads
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    data_config = timm.data.resolve_data_config({}, model=model)
    assert data_config["input_size"] == (1, 28, 28)
    # its docstring (help(), timm's registry) says the same; it described the family before it was re-chosen
    doc = getattr(pretrained, name).__doc__
    assert f"width {width}, {heads} heads, depth 3" in doc, doc


def test_the_converged_training_is_a_pretrained_tag() -> None:
    from snnet.adapters import family
    from snnet.errors import SnnetError

    cfg = timm.models.get_pretrained_cfg("fmnist_vit_b.converged")
    assert Path(cfg.file) == pretrained.WEIGHTS_DIR / "converged" / "fmnist_vit_b.safetensors"
    assert "converged" in cfg.notes and cfg.input_size == (1, 28, 28)
    assert timm.models.get_pretrained_cfg("fmnist_vit_b").file == str(pretrained.WEIGHTS_DIR / "fmnist_vit_b.safetensors")
    assert family("FMNIST-converged") == [f"fmnist_vit_{m}.converged" for m in ("ti", "s", "b")]
    with pytest.raises(SnnetError, match="no pretrained tag 'best'; its shipped trainings are 'converged'"):
        timm.create_model("fmnist_vit_b.best", pretrained=True)


@pytest.mark.parametrize("tag", ["", "converged"])
@pytest.mark.skipif(not DEBIAN_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_pretrained_weights_match_family_json(tag: str) -> None:
    name = "fmnist_vit_s" + (f".{tag}" if tag else "")
    expected = json.loads((pretrained.weights_path(name).parent / "family.json").read_text())["models"]["fmnist_vit_s"]["top1"]
    model = timm.create_model(name, pretrained=True).eval()
    assert model.patch_embed.proj.weight.dtype == torch.float32  # fp16 file upcast into fp32 params
    # The test split is shuffled, so its first 1,000 images are a fair sample
    # (binomial std ~1.4 points, hence the 3-point tolerance).
    data = FashionMNIST(DEBIAN_ROOT, "test", limit=1000)
    correct = 0
    with torch.no_grad():
        for images, labels in make_loader(data, batch_size=500, shuffle=False):
            correct += int((model(images).argmax(-1) == labels).sum())
    accuracy = 100.0 * correct / len(data)
    assert len(data) == 1000
    assert abs(accuracy - expected) < 3.0, f"{accuracy:.1f}% on 1,000 test images vs {expected}% in family.json"


def test_damaged_shipped_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shipped file whose bytes differ from family.json's SHA-256 is refused with one clear line;
    the intact file loads."""
    from snnet.errors import SnnetError

    shipped = pretrained.weights_path("fmnist_vit_ti")
    assert json.loads(FAMILY_JSON.read_text())["sha256"][shipped.name]
    timm.create_model("fmnist_vit_ti", pretrained=True)  # the intact file passes the check
    copy = tmp_path / "weights"
    copy.mkdir()
    (copy / "family.json").write_bytes(FAMILY_JSON.read_bytes())
    damaged = bytearray(shipped.read_bytes())
    damaged[-1] ^= 0xFF  # one flipped byte: still a loadable safetensors file, silently wrong weights
    (copy / shipped.name).write_bytes(bytes(damaged))
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", copy)
    with pytest.raises(SnnetError, match="damaged.*reinstall snnet"):
        timm.create_model("fmnist_vit_ti", pretrained=True)


def test_a_family_json_of_the_older_layout_still_verifies_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A family.json written before the checksums were kept by file name (each model's own "sha256") was read as
    recording none: a damaged weights file loaded, with only a warning that family.json records no SHA-256."""
    import warnings

    from snnet.errors import SnnetError

    family = json.loads(FAMILY_JSON.read_text())
    table = family.pop("sha256")
    for entry in family["models"].values():
        entry["sha256"] = table[entry["file"]]
    shipped = pretrained.weights_path("fmnist_vit_ti")
    copy = tmp_path / "weights"
    copy.mkdir()
    (copy / "family.json").write_text(json.dumps(family))
    (copy / shipped.name).write_bytes(shipped.read_bytes())
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the intact file is verified: no "UNVERIFIED" warning
        timm.create_model("fmnist_vit_ti", pretrained=True)
    damaged = bytearray(shipped.read_bytes())
    damaged[-1] ^= 0xFF
    (copy / shipped.name).write_bytes(bytes(damaged))
    with pytest.raises(SnnetError, match="damaged.*reinstall snnet"):
        timm.create_model("fmnist_vit_ti", pretrained=True)


@pytest.mark.parametrize("layout", ["table", "older", "not a table"])
def test_a_family_json_whose_checksum_is_not_one_is_called_corrupt(layout: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A family.json whose SHA-256 entry was not a string (a number) called the intact shipped weights "damaged",
    and one whose older-layout entry was not a string, or whose table was not one, loaded them unverified:
    the record itself is said to be corrupt, and what to do."""
    from snnet.errors import SnnetError

    family = json.loads(FAMILY_JSON.read_text())
    shipped = pretrained.weights_path("fmnist_vit_ti")
    if layout == "table":
        family["sha256"][shipped.name] = 5
    elif layout == "older":
        family.pop("sha256")
        family["models"]["fmnist_vit_ti"]["sha256"] = 5
    else:
        family["sha256"] = 5
    copy = tmp_path / "weights"
    copy.mkdir()
    (copy / "family.json").write_text(json.dumps(family))
    (copy / shipped.name).write_bytes(shipped.read_bytes())
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", copy)
    with pytest.raises(SnnetError, match=r"family\.json is corrupt \(.*5.*cannot be verified; reinstall snnet"):
        timm.create_model("fmnist_vit_ti", pretrained=True)
