"""Integrity of what snnet writes and reads back: every exported file checksummed and verified on
load, and a load that cannot be verified says so (once, loudly) instead of passing silently."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import timm
import torch

import snnet
from snnet import deploy, pretrained
from snnet.cli import main
from snnet.errors import CheckpointError, ExportError, UnverifiedFileWarning

from .conftest import TINY_VITS

ROOT = Path(__file__).resolve().parents[1]


def _flip16(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + 16] = bytes(b ^ 0x5A for b in raw[at:at + 16])
    path.write_bytes(bytes(raw))


def _largest_weight_offset(pt2: Path) -> int:
    """Where the middle of the largest weight tensor of a .pt2 zip (stored uncompressed) lies in the file."""
    with zipfile.ZipFile(pt2) as z:
        info = max((i for i in z.infolist() if "/weights/weight" in i.filename), key=lambda i: i.file_size)
    raw = pt2.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def _onnx_weight_offset(onnx_file: Path) -> int:
    """Where the middle of the largest initializer's raw bytes lies in an .onnx file."""
    import onnx

    model = onnx.load(str(onnx_file))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    return onnx_file.read_bytes().index(raw) + len(raw) // 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, snnet.StitchedNet]:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS[:2])
    out = tmp_path_factory.mktemp("export") / "stitch"
    deploy.export_stitch(net, 2, out)
    return out, net


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, to))


def test_every_exported_file_is_checksummed_and_loads_verified(exported, images: torch.Tensor) -> None:
    out, net = exported
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["sha256"]) == ["model.onnx", "model.pt2", "model.safetensors"]
    want = deploy.extract(net, 2)(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified: no warning
        with torch.inference_mode():
            got_pt2 = deploy.load_program(out / "model.pt2").module()(images)
        sess = deploy.load_onnx(out / "model.onnx")
    got_onnx = torch.from_numpy(sess.run(None, {"x": images.numpy()})[0])
    assert (got_pt2 - want).abs().max() <= 1e-5 and (got_onnx - want).abs().max() <= 1e-5


def test_onnx_providers_given_as_one_string_or_missing_here(exported) -> None:
    from snnet.errors import ExportError

    out, _ = exported
    assert deploy.load_onnx(out / "model.onnx", providers="CPUExecutionProvider").get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="no execution provider 'NoSuchExecutionProvider'; it has .*CPUExecutionProvider"):
        deploy.load_onnx(out / "model.onnx", providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])


def test_sixteen_flipped_bytes_in_pt2_and_onnx_are_refused(exported, tmp_path: Path, images: torch.Tensor) -> None:
    """torch.export and onnxruntime load the damaged files without a word, and compute other outputs;
    snnet's loaders refuse them in one line naming the file."""
    import onnxruntime as ort

    out, net = _copy(exported[0], tmp_path / "stitch"), exported[1]
    want = deploy.extract(net, 2)(images)
    _flip16(out / "model.pt2", _largest_weight_offset(out / "model.pt2"))
    _flip16(out / "model.onnx", _onnx_weight_offset(out / "model.onnx"))
    with torch.inference_mode():
        silent = torch.export.load(str(out / "model.pt2")).module()(images)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert not torch.allclose(silent, want, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(sess.run(None, {"x": images.numpy()})[0]), want, atol=1e-5)
    for load, name in ((deploy.load_program, "model.pt2"), (deploy.load_onnx, "model.onnx")):
        with pytest.raises(CheckpointError) as refused:
            load(out / name)
        assert str(refused.value).startswith(f"{out / name} is damaged") and "export the stitch again" in str(refused.value)


def _warnings_of(code: str) -> list[str]:
    """The UnverifiedFileWarning lines a fresh Python process prints running ``code`` (Python's default
    warning filter, as a user has it: each warning once)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if "UnverifiedFileWarning" in ln]


def test_a_deleted_checksum_entry_or_record_is_said_once_loudly(exported, tmp_path: Path) -> None:
    out = _copy(exported[0], tmp_path / "stitch")
    config = json.loads((out / "config.json").read_text())
    del config["sha256"]["model.pt2"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.warns(UnverifiedFileWarning, match=r"model\.pt2 is loaded UNVERIFIED: .*config\.json records no SHA-256"):
        deploy.load_program(out / "model.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy.load_onnx(out / "model.onnx")  # its entry is still there: verified, no warning
    (out / "config.json").unlink()
    with pytest.warns(UnverifiedFileWarning, match=r"model\.onnx is loaded UNVERIFIED: there is no config\.json beside it"):
        deploy.load_onnx(out / "model.onnx")
    # once per file and process, however often it is loaded
    lines = _warnings_of(f"from snnet import deploy\nfor _ in range(3): deploy.load_program({str(out / 'model.pt2')!r})")
    assert len(lines) == 1, lines


def test_a_saved_network_without_its_checksum_warns_on_the_command_line(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    folder = snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path / "net")
    config = json.loads((folder / "config.json").read_text())
    del config["sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    main(["select", "flops<=1G", "--model", str(folder)])  # returns: the work goes on
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {folder / 'model.safetensors'} is loaded UNVERIFIED"), err


@pytest.mark.parametrize("entry", [5, ["0" * 64], "not a digest"])
def test_a_checksum_entry_that_is_not_one_calls_the_record_corrupt(entry, tmp_path: Path) -> None:
    """A config.json whose SHA-256 entry was not a checksum (a number, a list) called the intact weights "damaged"
    (bytes changed on disk): the record itself is said to be corrupt, for a saved network and an export."""
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS[:2])
    folders = {net.save_pretrained(tmp_path / "net"): snnet.load, tmp_path / "stitch": deploy.load_stitch}
    deploy.export_stitch(net, 2, tmp_path / "stitch", formats=["safetensors"])
    for folder, load in folders.items():
        config = json.loads((folder / "config.json").read_text())
        config["sha256"]["model.safetensors"] = entry
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=r"config\.json is corrupt \(its SHA-256 for model\.safetensors is "
                                                  r".*cannot be verified; (restore it|export the stitch again)"):
            load(folder)


def test_shipped_weights_without_family_json_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting family.json (the shipped files' checksums) does not turn verification off silently."""
    shipped = pretrained.weights_path("fmnist_vit_ti")
    if not shipped.is_file():
        pytest.skip("shipped weights are not built")
    copy = tmp_path / "weights"
    copy.mkdir()
    (copy / shipped.name).write_bytes(shipped.read_bytes())
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", copy)
    with pytest.warns(UnverifiedFileWarning, match=r"family\.json, which records the shipped files' SHA-256, is missing"):
        timm.create_model("fmnist_vit_ti", pretrained=True)
    (copy / "family.json").write_text("{not json")
    with pytest.raises(snnet.errors.SnnetError, match="family.json is corrupt"):
        timm.create_model("fmnist_vit_ti", pretrained=True)


def test_the_unverified_warning_names_the_callers_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """UnverifiedFileWarning named a line inside snnet (a fixed stacklevel counted from a helper), not the line that
    loaded the file, so the location shown and filters by module pointed at snnet: for a saved network, an exported
    stitch, and shipped weights loaded through timm (its factory is not the user's line either) or create_snnet."""
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS[:2])
    folder = net.save_pretrained(tmp_path / "net")
    deploy.export_stitch(net, 2, tmp_path / "stitch", formats=["safetensors"])
    for record in (folder / "config.json", tmp_path / "stitch" / "config.json"):
        config = json.loads(record.read_text())
        del config["sha256"]
        record.write_text(json.dumps(config))
    loads = {"snnet.load": lambda: snnet.load(folder), "deploy.load_stitch": lambda: deploy.load_stitch(tmp_path / "stitch")}
    shipped = pretrained.weights_path("fmnist_vit_ti")
    if shipped.is_file():  # the shipped weights are built: family.json, their record, taken away
        copy = tmp_path / "weights"
        copy.mkdir()
        for name in ("fmnist_vit_ti", "fmnist_vit_s"):
            (copy / pretrained.weights_path(name).name).write_bytes(pretrained.weights_path(name).read_bytes())
        monkeypatch.setattr(pretrained, "WEIGHTS_DIR", copy)
        loads["timm.create_model"] = lambda: timm.create_model("fmnist_vit_ti", pretrained=True)
        loads["snnet.create_snnet"] = lambda: snnet.create_snnet(["fmnist_vit_ti", "fmnist_vit_s"], pretrained=True)
    for entry, load in loads.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
        said = [w for w in caught if issubclass(w.category, UnverifiedFileWarning)]
        assert said and all(w.filename == __file__ for w in said), (entry, [(w.filename, w.lineno) for w in said])


def test_export_refuses_a_folder_it_would_mix_or_overwrite(exported, tmp_path: Path) -> None:
    """A saved network's config.json is not overwritten, and an export of fewer formats does not leave the
    files of an earlier export beside a config.json that no longer records them."""
    out, net = _copy(exported[0], tmp_path / "stitch"), exported[1]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"holds model\.pt2, model\.onnx of an earlier export"):
        deploy.export_stitch(net, 3, out, ["safetensors"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    saved = net.save_pretrained(tmp_path / "net")
    with pytest.raises(ExportError, match="not an exported stitch's"):
        deploy.export_stitch(net, 3, saved, ["onnx"])
    assert snnet.load(saved)  # intact
    own = tmp_path / "own"  # a program and an ONNX file of the user's own, no export's config.json beside them
    own.mkdir()
    for name in ("model.pt2", "model.onnx"):
        (own / name).write_bytes(b"mine")
        with pytest.raises(ExportError, match=f"holds {name} without an export's config.json"):
            deploy.export_stitch(net, 3, own, ["safetensors", "pt2", "onnx"])
        assert sorted(p.name for p in own.iterdir()) == [name] and (own / name).read_bytes() == b"mine"
        (own / name).unlink()


@pytest.mark.parametrize("edit", [
    lambda c: c["anchors"][0].pop("label"),
    lambda c: c["anchors"][0]["spec"].pop("name"),
    lambda c: c["space"].pop("kernel_size"),
    lambda c: c.pop("input_size"),
    lambda c: c.__setitem__("stitching", {"lora_rank": "x"}),
    lambda c: c.__setitem__("anchors", 3),
    lambda c: c.__setitem__("version", "four"),
], ids=["label", "spec-name", "space-key", "input_size", "lora_rank", "anchors", "version"])
def test_a_damaged_config_of_a_saved_network_is_named_in_one_line(tmp_path: Path, edit) -> None:
    """A config.json with a field missing or of the wrong type failed with a bare KeyError/TypeError/ValueError
    from inside from_pretrained (KeyError: 'label', TypeError: '>' not supported between 'str' and 'int'...)."""
    snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json is corrupt"):
        snnet.StitchedNet.from_pretrained(tmp_path)
