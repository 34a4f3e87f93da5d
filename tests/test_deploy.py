"""Deployment: budgets and selection, standalone export of one stitch (every family kind), profiling."""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import snnet
from snnet import deploy
from snnet.budget import MB
from snnet.deploy import export as deploy_export, profiling as deploy_profile
from snnet.deploy import Budget, parse_budget, select_stitch
from snnet.errors import BudgetError, ExportError, StitchNotFoundError

from snnet.train import route_modules

from .conftest import TINY_VITS, fitted_net, fresh_net, seeded_net

# One family per kind of model snnet supports, including the cross-kind and unpaired cases.
FAMILIES = {
    "vit": TINY_VITS,
    "vit_unpaired": ["snnet_tiny_vit_ti", "snnet_tiny_vit_deep"],
    "swin": ["snnet_tiny_swin_t", "snnet_tiny_swin_s", "snnet_tiny_swin_b"],
    "resnet": ["snnet_tiny_resnet18", "snnet_tiny_resnet50"],
    "resnet_to_swin": ["snnet_tiny_resnet18", "snnet_tiny_swin_t"],
    "convnext": ["snnet_tiny_convnext_t", "snnet_tiny_convnext_s"],
    "levit": ["snnet_tiny_levit_a", "snnet_tiny_levit_b"],  # 64x64 input
    "deit3_two_way": (["snnet_tiny_deit3_s", "snnet_tiny_deit3_l"], {"two_way": True}),
    "vit_reference_routes": (TINY_VITS, {"route_mode": "reference"}),  # stitched routes without the final norm
}


def _net(entry: list[str] | tuple[list[str], dict]) -> snnet.StitchedNet:
    """A family's network: its anchors' names, or (names, create_snnet options)."""
    names, options = entry if isinstance(entry, tuple) else (entry, {})
    torch.manual_seed(0)
    return snnet.create_snnet(names, **options).eval()


def _sized(net: snnet.StitchedNet, images: torch.Tensor) -> torch.Tensor:
    """The fixture's images, or as many random ones of the network's input size where it takes another."""
    if tuple(images.shape[1:]) == tuple(net.input_size):
        return images
    return torch.randn(len(images), *net.input_size, generator=torch.Generator().manual_seed(0))


def _in_network(net: snnet.StitchedNet, stitch: snnet.Stitch, x: torch.Tensor) -> torch.Tensor:
    net.select(stitch)
    with torch.inference_mode():
        return net(x)


def _routes(net: snnet.StitchedNet) -> list[snnet.Stitch]:
    """The smallest anchor, the largest, and a stitch through a stitching layer."""
    stitched = [s for s in net.space if not s.is_anchor]
    return [net.space[0], net.space[len(net.anchors) - 1], stitched[len(stitched) // 2]]


# ------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("text, expected", [
    ("flops<=2G", Budget(flops=2e9)),
    ("2GFLOPs", Budget(flops=2e9)),
    ("flops=1.5m", Budget(flops=1.5e6)),
    ("300 MACs", Budget(flops=300)),
    ("params=5M", Budget(params=5e6)),
    ("latency=30ms", Budget(latency_ms=30)),
    ("latency<0.5s", Budget(latency_ms=500)),
    ("250us", Budget(latency_ms=0.25)),
    ("memory=200MB", Budget(memory_mb=200)),
    ("mem:1GB", Budget(memory_mb=1024)),
    ("flops<=2G, latency=30ms", Budget(flops=2e9, latency_ms=30)),
    ("latency_ms<=30", Budget(latency_ms=30)),  # the key names the unit
    ("memory_mb<=200", Budget(memory_mb=200)),
    ("peak_mem_mb=1.5", Budget(memory_mb=1.5)),
])
def test_budget_parsing(text: str, expected: Budget) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text, words", [
    ("flops<=2Q", ["unknown unit 'q'", "K, M, G, T"]),
    ("latency=30min", ["unknown unit 'min'", "us, ms, s"]),
    ("memory=200", ["memory", "KB, MB, GB"]),
    ("speed<=3", ["unknown cost 'speed'", "flops, params, latency, memory"]),
    ("2G", ["does not say which cost"]),
    ("flops<=2G,flops<=3G", ["twice"]),
    ("", ["empty budget"]),
    ("flops<=-1G", ["cannot read"]),
])
def test_bad_budgets_say_what_is_accepted(text: str, words: list[str]) -> None:
    with pytest.raises(BudgetError) as e:
        parse_budget(text)
    assert all(w in str(e.value) for w in words), str(e.value)


# ------------------------------------------------------------------------- selection


def _fake_results(net: snnet.StitchedNet) -> list[dict]:
    """Accuracies that are NOT monotone in FLOPs, so accuracy and the proxy disagree."""
    rows = []
    for c in net.costs():
        acc = 50.0 + (c.id * 37 % 11)  # a deterministic scramble
        rows.append(dict(c.to_dict(), acc1=acc, acc5=90.0, latency_ms=c.flops / 1e5, peak_mem_mb=c.params / 1e5))
    return rows


def test_select_by_measured_accuracy_within_budget(tiny_net: snnet.StitchedNet) -> None:
    results = _fake_results(tiny_net)
    costs = tiny_net.costs()
    bound = sorted(c.flops for c in costs)[len(costs) // 2]
    chosen = select_stitch(tiny_net, f"flops<={bound}", results)
    within = [r for r in results if r["flops"] <= bound]
    best = max(within, key=lambda r: (r["acc1"], -r["flops"], -r["id"]))
    assert chosen.id == best["id"] and chosen.stitch == tiny_net.stitch(best["id"]) and chosen.row.acc1 == best["acc1"]
    assert chosen.ranked_by == "acc1" and set(chosen.candidates) == {r["id"] for r in within}
    assert best["name"] in chosen.reason and f"top-1 {best['acc1']:.2f}%" in chosen.reason
    # the network's select makes the same stitch active and returns it (a Stitch, whatever it was given)
    assert tiny_net.select(budget=f"flops<={bound}", results=results) == chosen.stitch == tiny_net.active
    assert isinstance(tiny_net.select(3), snnet.Stitch)
    # latency and memory budgets use the measured columns
    lat = tiny_net.select(budget=f"latency<={bound / 1e5}ms,memory=100MB", results=results)
    assert lat.id == best["id"]


def test_select_by_proxy_without_accuracy(tiny_net: snnet.StitchedNet) -> None:
    costs = tiny_net.costs()
    bound = sorted(c.flops for c in costs)[len(costs) // 2]
    chosen = select_stitch(tiny_net, Budget(flops=bound))
    dearest = max((c for c in costs if c.flops <= bound), key=lambda c: c.flops)
    assert chosen.id == dearest.id and chosen.ranked_by == "flops" and "proxy" in chosen.reason
    # a plain list of cost rows works as well as the network
    assert select_stitch([c.to_dict() for c in costs], f"flops<={bound}").id == dearest.id
    # FLOPs stay the proxy under a params budget
    pb = sorted(c.params for c in costs)[3]
    assert select_stitch(tiny_net, f"params<={pb}").id == max((c for c in costs if c.params <= pb), key=lambda c: c.flops).id


def test_proxy_reason_names_the_unmeasured_candidate(tiny_net: snnet.StitchedNet) -> None:
    """One candidate without a measured top-1 (NaN) ranks by the FLOPs proxy, as documented, but the reason
    said "no measured accuracy" though every other candidate was measured; it now names the unmeasured one."""
    results = _fake_results(tiny_net)
    results[2]["acc1"] = math.nan
    chosen = select_stitch(tiny_net, f"flops<={max(r['flops'] for r in results)}", results)
    assert chosen.ranked_by == "flops" and "no measured accuracy" not in chosen.reason
    assert f"1 of the {len(results)} candidates has no measured top-1 (e.g. {results[2]['name']!r})" in chosen.reason
    assert "no measured accuracy" in select_stitch(tiny_net, f"flops<={max(r['flops'] for r in results)}").reason


def test_budget_below_the_cheapest_names_it(tiny_net: snnet.StitchedNet) -> None:
    cheapest = min(tiny_net.costs(), key=lambda c: c.flops)
    with pytest.raises(BudgetError) as e:
        tiny_net.select(budget=f"flops<={cheapest.flops - 1}")
    assert cheapest.name in str(e.value) and "cheapest" in str(e.value)
    active = tiny_net.active
    with pytest.raises(BudgetError, match="snnet profile"):
        tiny_net.select(budget="latency<=30ms")  # no profile: says how to get one
    assert tiny_net.active == active  # a failed selection changes nothing
    assert tiny_net.select(3).id == 3  # select(key) is unchanged


def test_results_of_another_network_are_refused(tiny_net: snnet.StitchedNet) -> None:
    rows = _fake_results(tiny_net)
    rows[1]["name"] = "someone_else"
    with pytest.raises(snnet.SnnetError, match="do not belong"):
        tiny_net.select(budget="flops<=1G", results=rows)


# ------------------------------------------------------------------------- export


def test_every_tiny_family_is_covered() -> None:
    """New tiny model families must be added to FAMILIES so the export tests cover their kind."""
    covered = {n for entry in FAMILIES.values() for n in (entry[0] if isinstance(entry, tuple) else entry)}
    assert set(timm.list_models("snnet_tiny_*")) <= covered


@pytest.mark.parametrize("family", list(FAMILIES))
def test_extracted_and_reloaded_stitch_equals_the_stitched_network(family: str, tmp_path: Path, images: torch.Tensor) -> None:
    net = _net(FAMILIES[family])
    images = _sized(net, images)
    whole = sum(v.numel() for v in net.state_dict().values())
    for s in _routes(net):
        want = _in_network(net, s, images)
        route = deploy.extract(net, s)
        assert type(route) is deploy.StitchRoute
        with torch.inference_mode():
            assert (route(images) - want).abs().max() <= 1e-5
        out = tmp_path / str(s.id)
        deploy.save_stitch(route, out, deploy.stitch_config(net, s))
        loaded = deploy.load_stitch(out)  # rebuilt from config.json alone
        with torch.inference_mode():
            assert (loaded(images) - want).abs().max() <= 1e-5
        # the file holds exactly the route's tensors: no other anchor, no unused block
        with safe_open(str(out / deploy.STITCH_WEIGHTS), "pt") as f:
            keys = set(f.keys())
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
        assert keys == set(route.state_dict())
        route_numel = sum(v.numel() for v in deploy_export._route_view(net, s).state_dict().values())
        assert numel == route_numel < whole
        assert (out / deploy.STITCH_WEIGHTS).stat().st_size < 4 * whole
        n_blocks = len(route.src_blocks) + len(route.dst_blocks)
        if s.is_anchor:
            assert n_blocks == net.anchors[s.src].depth and not any(k.startswith("stitch.") for k in keys)
        else:
            assert n_blocks == s.src_end + net.anchors[s.dst].depth - s.dst_start
            assert any(k.startswith("stitch.") for k in keys)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_export_and_onnx_equal_the_stitched_network(family: str, tmp_path: Path, images: torch.Tensor) -> None:
    """torch.export (.pt2) and ONNX (run by onnxruntime) of a stitch through a stitching layer."""
    pytest.importorskip("onnxruntime")
    net = _net(FAMILIES[family])
    images = _sized(net, images)
    # the shortest route through a stitching layer: tracing time grows with the blocks traced
    s = min((s for s in net.space if not s.is_anchor), key=lambda s: s.src_end + net.anchors[s.dst].depth - s.dst_start)
    paths = deploy.export_stitch(net, s, tmp_path, formats=["pt2", "onnx"])
    assert sorted(paths) == ["config.json", "model.onnx", "model.pt2"]  # config.json records their checksums
    want = _in_network(net, s, images)  # 6 images: the export traced a batch of 2, the batch stays dynamic
    with torch.inference_mode():
        got = torch.export.load(str(paths["model.pt2"])).module()(images)
    assert (got - want).abs().max() <= 1e-5
    import onnxruntime as ort

    sess = ort.InferenceSession(str(paths["model.onnx"]), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0])
    assert (got - want).abs().max() <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_export_traced_at_batch_1_takes_any_batch(fmt: str, tmp_path: Path, images: torch.Tensor) -> None:
    """`snnet export --batch-size 1`: torch.export specialised the batch of one to the constant 1, so the
    .pt2 program and the ONNX file refused (a guard error, an invalid-dimensions error) every other batch."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    net = fresh_net().eval()
    s = net.space[0]  # the smallest anchor: the fewest blocks to trace
    paths = deploy.export_stitch(net, s, tmp_path, formats=[fmt], batch_size=1)
    for x in (images[:1], images[:3]):
        want = _in_network(net, s, x)
        if fmt == "pt2":
            with torch.inference_mode():
                got = deploy.load_program(paths["model.pt2"]).module()(x)
        else:
            sess = deploy.load_onnx(paths["model.onnx"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5


def test_an_example_batch_below_1_is_refused_before_work(tmp_path: Path) -> None:
    """batch_size=0 wrote a model.pt2 "verified" on no input, specialised to batch 0 (a guard error on every real
    batch); -1 was torch's "negative dimension" RuntimeError."""
    net = fresh_net().eval()
    for bad in (0, -1):
        with pytest.raises(ExportError, match="batch_size must be at least 1"):
            deploy.export_stitch(net, 0, tmp_path / "out", formats=["pt2"], batch_size=bad)
    assert not (tmp_path / "out").exists()


def test_a_half_precision_stitch_exports_and_loads_back_in_its_dtype(tmp_path: Path) -> None:
    """A float16 network (as snnet.load now gives one saved in float16) was traced with a float32 example: the
    export failed ("Input type (float) and bias type ... should be the same"), and load_stitch gave float32."""
    formats = ["safetensors", "pt2"] + (["onnx"] if _has("onnxruntime") else [])
    net = seeded_net(anchors=TINY_VITS[:2]).to(torch.float16).eval()
    s = net.space[4]
    paths = deploy.export_stitch(net, s, tmp_path, formats=formats)
    route = deploy.load_stitch(tmp_path)
    assert {p.dtype for p in route.parameters()} == {torch.float16}
    x = torch.randn(3, *net.input_size).half()
    with torch.inference_mode():
        want = _in_network(net, s, x)
        assert torch.equal(route(x), want)
        assert torch.equal(deploy.load_program(paths["model.pt2"]).module()(x), want)


def test_a_bfloat16_network_to_onnx_is_refused_before_work_in_one_line(tmp_path: Path) -> None:
    """ONNX of a bfloat16 network was traced and exported, then failed as onnxruntime's InvalidGraph naming a
    temporary file (bfloat16 Conv), with nothing to say what to do; safetensors and pt2 export it."""
    net = seeded_net(anchors=TINY_VITS[:2]).to(torch.bfloat16).eval()
    with pytest.raises(ExportError, match="bfloat16 network cannot be exported to ONNX.*--format safetensors,pt2"):
        deploy.export_stitch(net, 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    deploy.export_stitch(net, 4, tmp_path / "out", formats=["safetensors"])
    assert {p.dtype for p in deploy.load_stitch(tmp_path / "out").parameters()} == {torch.bfloat16}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_unwritable_export_path_fails_before_work_and_leaves_nothing(tiny_net: snnet.StitchedNet, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    # root ignores permissions; nobody can create folders in /proc
    target = locked / "out" if os.geteuid() != 0 else Path("/proc/snnet-test-export")
    try:
        with pytest.raises(ExportError, match="cannot write"):
            deploy.export_stitch(tiny_net, 4, target)
    finally:
        locked.chmod(stat.S_IRWXU)
    assert list(locked.iterdir()) == [] and not target.exists()


def test_unwritable_file_path_is_a_clear_error(tiny_net: snnet.StitchedNet, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        deploy.export_stitch(tiny_net, 4, blocker / "out")
    with pytest.raises(StitchNotFoundError):
        deploy.export_stitch(tiny_net, "no_such_stitch", tmp_path / "x")
    with pytest.raises(ExportError, match="unknown export format"):
        deploy.export_stitch(tiny_net, 4, tmp_path / "y", formats=["tflite"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_failed_verification_leaves_no_file(tiny_net: snnet.StitchedNet, tmp_path: Path, monkeypatch) -> None:
    """An ONNX file whose outputs differ is deleted, and the formats already staged are not moved in."""
    real = deploy_export._max_diff
    monkeypatch.setattr(deploy_export, "_max_diff", lambda a, b: real(a, b) + 1.0)  # as if onnxruntime disagreed
    with pytest.raises(ExportError, match="differ"):
        deploy.export_stitch(tiny_net, 4, tmp_path, formats=["safetensors", "onnx"])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_no_empty_out_folder(tmp_path: Path, monkeypatch) -> None:
    """A failed export left the --out folder it had created (and its parents), empty: "a failure leaves nothing
    behind" (the API and `snnet export`); a folder that was there stays."""
    from .conftest import _run

    net = fresh_net().eval()
    net.save_pretrained(tmp_path / "net")
    real = deploy_export._max_diff
    monkeypatch.setattr(deploy_export, "_max_diff", lambda a, b: real(a, b) + 1.0)  # as if the reloaded program differed
    with pytest.raises(ExportError, match="differ"):
        deploy.export_stitch(net, 0, tmp_path / "new" / "out", formats=["pt2"])
    assert not (tmp_path / "new").exists()
    assert _run(["export", "--model", str(tmp_path / "net"), "--stitch", "0", "--format", "pt2",
                 "--out", str(tmp_path / "cli" / "out")]) != 0
    assert not (tmp_path / "cli").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ExportError, match="differ"):
        deploy.export_stitch(net, 0, tmp_path / "kept", formats=["pt2"])
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_load_stitch_rejects_what_it_cannot_rebuild(tmp_path: Path) -> None:
    with pytest.raises(snnet.CheckpointError, match="not an exported stitch"):
        deploy.load_stitch(tmp_path)
    (tmp_path / deploy.STITCH_CONFIG).write_text(json.dumps({"format": "something else"}))
    (tmp_path / deploy.STITCH_WEIGHTS).write_bytes(b"junk")
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        deploy.load_stitch(tmp_path)



def test_export_refuses_a_networks_weights_left_without_their_config(tiny_net: snnet.StitchedNet, tmp_path: Path) -> None:
    """A saved network's model.safetensors without its config.json (a save cut before it, or copied by hand) was
    replaced by the stitch's weights without a word; an export's own weights left so (an export cut before its
    config.json) are still exported over."""
    tiny_net.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    before = (tmp_path / deploy.STITCH_WEIGHTS).read_bytes()
    with pytest.raises(ExportError, match="not an exported stitch's"):
        deploy.export_stitch(tiny_net, 4, tmp_path, formats=["safetensors"])
    assert (tmp_path / deploy.STITCH_WEIGHTS).read_bytes() == before and not (tmp_path / "config.json").exists()
    cut = tmp_path / "cut"
    deploy.export_stitch(tiny_net, 4, cut, formats=["safetensors"])
    (cut / "config.json").unlink()
    deploy.export_stitch(tiny_net, 3, cut, formats=["safetensors"])
    assert deploy.load_stitch(cut).snnet_stitch == tiny_net.space[3].name


def _stop_exports_before_the_config(monkeypatch, out: Path, error: BaseException = KeyboardInterrupt()) -> None:
    """Make exports into ``out`` stop (as if killed, or with ``error``) once their model files are moved in, before
    their config.json."""
    real = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if Path(dst) == out / deploy.STITCH_CONFIG and Path(src).name == deploy.STITCH_CONFIG:
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_an_export_over_an_export_stopped_between_its_files_keeps_the_old_one_loadable(
        tiny_net: snnet.StitchedNet, tmp_path: Path, monkeypatch) -> None:
    """An export over another moved its new files in one by one, config.json last: stopped between them, the new
    weights sat beside the old config.json, which refused them ("model.safetensors is damaged"), and the old export
    was lost. The old bytes stay until the new config.json is in, even after a second stop."""
    deploy.export_stitch(tiny_net, 4, tmp_path, formats=["safetensors"])
    _stop_exports_before_the_config(monkeypatch, tmp_path)
    for stitch in (3, 2):
        with pytest.raises(KeyboardInterrupt):
            deploy.export_stitch(tiny_net, stitch, tmp_path, formats=["safetensors"])
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted before its config.json"):
        assert deploy.load_stitch(tmp_path).snnet_stitch == tiny_net.space[4].name
    deploy.export_stitch(tiny_net, 3, tmp_path, formats=["safetensors"])  # exporting again finishes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert deploy.load_stitch(tmp_path).snnet_stitch == tiny_net.space[3].name


def test_an_export_failing_between_its_files_puts_the_old_one_back(
        tiny_net: snnet.StitchedNet, tmp_path: Path, monkeypatch) -> None:
    """An export over another that failed with an error (a full disk) while moving its files in left the folder as
    an interrupted export: new weights beside the old config.json, the old export loading with a warning until the
    next export. The old files are put back as they were, and the error says so."""
    deploy.export_stitch(tiny_net, 4, tmp_path, formats=["safetensors"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _stop_exports_before_the_config(monkeypatch, tmp_path, OSError(28, "No space left on device"))
    with pytest.raises(ExportError, match=r"No space left on device.*left as it was before this export"):
        deploy.export_stitch(tiny_net, 3, tmp_path, formats=["safetensors"])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old export, whole: no fallback warning
        assert deploy.load_stitch(tmp_path).snnet_stitch == tiny_net.space[4].name


@pytest.mark.parametrize("name", ["model.pt2", "model.onnx"])
def test_the_interrupted_export_warning_names_the_callers_line(name: str, tmp_path: Path) -> None:
    """load_program's and load_onnx's warning that they fall back to the export before an interrupted one named a
    line inside snnet (stacklevel counted from a helper), not the caller's, so filters by module and the location
    shown pointed at snnet. A folder as such an export leaves it: the record names the kept bytes, not the new ones."""
    import hashlib

    from snnet.errors import SnnetError

    old = b"the earlier export's bytes"
    (tmp_path / f"{name}.previous").write_bytes(old)
    (tmp_path / name).write_bytes(b"the interrupted export's bytes")
    (tmp_path / deploy.STITCH_CONFIG).write_text(json.dumps({"sha256": {name: hashlib.sha256(old).hexdigest()}}))
    load = deploy.load_program if name == "model.pt2" else deploy.load_onnx
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SnnetError):  # not a real program: refused after
        warnings.simplefilter("always")
        load(tmp_path / name)
    said = [w for w in caught if "interrupted before its config.json" in str(w.message)]
    assert [w.filename for w in said] == [__file__]


@pytest.mark.slow
def test_a_program_export_stopped_before_its_config_keeps_the_old_program(
        tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path: Path, monkeypatch) -> None:
    """As above for model.pt2: the old program, kept under another name, still loads (torch.export.load takes a
    file by name only if it ends in .pt2)."""
    deploy.export_stitch(tiny_net, 4, tmp_path, formats=["pt2"])
    with torch.inference_mode():
        old = deploy.load_program(tmp_path / "model.pt2").module()(images)
    _stop_exports_before_the_config(monkeypatch, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        deploy.export_stitch(tiny_net, 3, tmp_path, formats=["pt2"])
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted before its config.json"), torch.inference_mode():
        assert torch.equal(deploy.load_program(tmp_path / "model.pt2").module()(images), old)


def test_save_stitch_refuses_a_folder_holding_a_saved_network(tiny_net: snnet.StitchedNet, tmp_path: Path) -> None:
    """save_stitch replaced a saved network's config.json and model.safetensors without a word (the network lost);
    it refuses such a folder, as export_stitch does."""
    saved = tiny_net.save_pretrained(tmp_path / "net")
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ExportError, match="not an exported stitch's"):
        deploy.save_stitch(deploy.extract(tiny_net, 4), saved, deploy.stitch_config(tiny_net, 4))
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert snnet.StitchedNet.from_pretrained(saved).space[4].name == tiny_net.space[4].name


def test_load_stitch_refuses_a_damaged_config_in_one_line(tiny_net: snnet.StitchedNet, tmp_path: Path) -> None:
    """config.json carries no checksum of its own: one damaged into other JSON was an AttributeError, KeyError,
    TypeError or IndexError from inside load_stitch, not the one line saying the file is corrupt."""
    s = tiny_net.stitch("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[1:]")
    deploy.save_stitch(deploy.extract(tiny_net, s), tmp_path, deploy.stitch_config(tiny_net, s))
    cfg = json.loads((tmp_path / deploy.STITCH_CONFIG).read_text())
    seg = cfg["segments"]
    for damaged in ([], {**cfg, "anchors": "x"}, {**cfg, "segments": [{"anchor": 0}, seg[1]]},
                    {**cfg, "segments": [seg[0], {**seg[1], "anchor": 5}]}, {**cfg, "stitching_layers": [{}]},
                    {**cfg, "anchors": [{"label": "a"}, cfg["anchors"][1]]}):
        (tmp_path / deploy.STITCH_CONFIG).write_text(json.dumps(damaged))
        with pytest.raises(snnet.CheckpointError, match="corrupt"):
            deploy.load_stitch(tmp_path)
    (tmp_path / deploy.STITCH_CONFIG).write_text(json.dumps({**cfg, "version": 99, "anchors": [{"name": "renamed"}]}))
    with pytest.raises(snnet.CheckpointError, match="newer snnet"):  # not called corrupt: a newer format may differ
        deploy.load_stitch(tmp_path)


def test_load_stitch_on_a_device_this_machine_lacks_says_so(tiny_net: snnet.StitchedNet, tmp_path: Path) -> None:
    """map_location of a device that is not here was torch's RuntimeError (no NVIDIA driver) or a sound file called
    "corrupt or unreadable ... export the stitch again"."""
    from snnet.errors import ConfigError

    s = tiny_net.space[4]
    deploy.save_stitch(deploy.extract(tiny_net, s), tmp_path, deploy.stitch_config(tiny_net, s))
    bad = ["bogus", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ConfigError, match="device"):
            deploy.load_stitch(tmp_path, map_location=device)
    assert deploy.load_stitch(tmp_path, map_location=torch.device("cpu")).head is not None

# ------------------------------------------------------------------------- profile


def test_profile_measures_sane_numbers(tiny_net: snnet.StitchedNet) -> None:
    tiny_net.select(1)
    measured, settings = deploy.profile(tiny_net, batch_size=2, warmup=1, repeats=3, stitches=[0, 2, 5], progress=False)
    assert [r.id for r in measured] == [0, 2, 5] and tiny_net.active.id == 1  # the active stitch is restored
    costs = tiny_net.costs()
    for r in measured:
        assert 0 < r.latency_ms <= r.latency_p90_ms < 10_000
        weights = deploy.route_bytes(deploy_export._route_view(tiny_net, tiny_net.stitch(r.id))) / MB
        assert r.peak_mem_mb > weights  # weights + input + activations
        assert r.peak_mem_mb < weights + 5  # a tiny route at batch 2 needs far less than 5 MB of activations
    # the largest anchor needs more memory than the smallest
    assert measured[1].peak_mem_mb > measured[0].peak_mem_mb
    assert settings.batch_size == 2 and settings.repeats == 3
    rows = deploy.merge_profile(None, costs, measured)
    assert len(rows) == len(costs) and rows[5].latency_ms == measured[2].latency_ms and rows[1].latency_ms is None
    assert rows[0].acc1 is None and rows[0].value("profile")["device"] == "cpu"
    assert (rows[5].flops, rows[5].params) == (costs[5].flops, costs[5].params) and measured[2].flops == costs[5].flops


def test_profile_by_batch_size_is_stored_and_read_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`snnet profile --batch-sizes`: every stitch timed at each size, stored as latency_by_batch, read by the server's table."""
    from snnet.cli import main
    from snnet.deploy.controller import LatencyTable

    main(["profile", "--stitches", "0,2", "--batch-sizes", "4,1,16", "--repeats", "3", "--warmup", "1", "--threads", "1",
          "--out", str(tmp_path), "--no-progress"])
    assert "batch 16 ms" in capsys.readouterr().out
    rows = {r["id"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    for k in (0, 2):
        table = rows[k]["latency_by_batch"]
        assert [p["batch_size"] for p in table] == [1, 4, 16]
        assert all(0 < p["latency_ms"] <= p["latency_p90_ms"] for p in table)
        assert table[0]["latency_ms"] == rows[k]["latency_ms"]  # the headline figure is --batch-size's (1)
        assert rows[k]["profile"]["batch_sizes"] == [1, 4, 16]
    assert "latency_by_batch" not in rows[1]
    table = LatencyTable.from_rows(list(rows.values()))
    assert table.batch_sizes(2) == (1, 4, 16) and 1 not in table
    # each size was timed on its own batch (what must be true, whatever the machine's load: the
    # times themselves are not compared, since a busy CPU can make one forward of 1 slower than of 16)
    seen: list[int] = []
    net = snnet.create_snnet(TINY_VITS)
    net.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    deploy.profile(net, stitches=[2], batch_sizes=[4, 1, 16], warmup=1, repeats=3, progress=False)
    assert sorted(set(seen)) == [1, 4, 16] and all(seen.count(b) >= 1 + 3 for b in (1, 4, 16))
    with pytest.raises(SystemExit):
        main(["profile", "--batch-sizes", "1,0", "--out", str(tmp_path)])


def test_activation_memory_tracker_counts_live_tensors() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(10, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10)).eval()
    x = torch.randn(4, 10)
    with torch.inference_mode():
        peak = deploy_profile._peak_activation_bytes(m, x)
    # Linear's output (4x1000 floats) and ReLU's output are alive together; the input and weights are not counted
    assert peak == 2 * 4 * 1000 * 4


def test_profile_command_writes_results_without_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real `snnet profile` on the shipped family, before any evaluation: latency and memory, accuracy empty."""
    from snnet.cli import main

    main(["profile", "--stitches", "0,3", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(snnet.create_snnet("fmnist").space) and all(r.get("acc1") is None for r in rows)
    timed = [r for r in rows if r.get("latency_ms") is not None]
    assert [r["id"] for r in timed] == [0, 3]
    assert all(r["latency_p90_ms"] >= r["latency_ms"] > 0 and r["peak_mem_mb"] > 0 for r in timed)
    assert "no accuracy yet" in capsys.readouterr().out


def test_profile_command_refuses_results_it_cannot_add_to_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A results.json of two stitches (`snnet eval --stitches 0,1`) made `snnet profile` time every stitch and
    then refuse with "lists fewer stitches than this network has: profile the network it was written for" (the
    network it was written for): the time was lost. Now it refuses first, saying which stitch is missing."""
    from snnet.cli import main
    from snnet.results import write_results

    costs = snnet.create_snnet("fmnist", device="meta").costs()
    write_results([replace(c, acc1=50.0, acc5=90.0) for c in costs[:2]], tmp_path)
    before = (tmp_path / "results.json").read_text()
    timed = []
    monkeypatch.setattr("snnet.deploy.profile", lambda *a, **k: timed.append(1))
    with pytest.raises(SystemExit):
        main(["profile", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert not timed and "hold 2 stitches of this network but not" in err and repr(costs[2].name) in err
    assert (tmp_path / "results.json").read_text() == before


def test_profile_into_an_evaluation_of_some_stitches_is_refused_before_measuring(tmp_path: Path, tiny3: Path,
                                                                                 capsys: pytest.CaptureFixture,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Results of `snnet eval --stitches 0,1` of this very network: profiling every stitch into them was refused
    only after measuring all of them, telling the user to "profile the network it was written for" (they had);
    now refused first, with the stitches the file lists (a profile of those adds to it)."""
    from snnet.cli import main
    from snnet.deploy import profiling

    net = snnet.StitchedNet.from_pretrained(tiny3)
    rows = [deploy.merge_profile(None, net.costs(), [])[k] for k in (0, 1)]
    from dataclasses import replace
    from snnet.results import write_results

    write_results([replace(r, acc1=50.0, acc5=100.0) for r in rows], tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    measured: list = []
    real = profiling.profile
    monkeypatch.setattr(deploy, "profile", lambda *a, **k: measured.append(1) or real(*a, **k))
    args = ["profile", "--model", str(tiny3), "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--stitches 0,1" in err and "written for" not in err and not measured
    assert (tmp_path / "results.json").read_bytes() == before  # nothing saved is touched
    main(args + ["--stitches", "0,1"])  # the stitches it lists: added to it
    assert all(r["latency_ms"] > 0 and r["acc1"] == 50.0 for r in json.loads((tmp_path / "results.json").read_text()))

def test_profile_at_another_img_size_than_the_results_is_refused_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`snnet profile --img-size 48` into an evaluation's results.json (FLOPs at 32x32) merged latency measured at
    48x48 onto rows priced at 32x32. Refused before any measuring, leaving the file as it was."""
    from dataclasses import replace

    from snnet.cli import main
    from snnet.results import write_results

    torch.manual_seed(0)
    net = snnet.create_snnet(["snnet_tiny_resnet18", "snnet_tiny_resnet50"])
    net.save_pretrained(tmp_path / "net")
    write_results([replace(r, acc1=50.0, acc5=100.0) for r in deploy.merge_profile(None, net.costs(), [])], tmp_path / "out")
    before = (tmp_path / "out" / "results.json").read_bytes()
    args = ["profile", "--model", str(tmp_path / "net"), "--stitches", "0", "--repeats", "1", "--warmup", "0",
            "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--img-size", "48"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "at input 3x48x48 it costs" in err and "another input size" in err
    assert (tmp_path / "out" / "results.json").read_bytes() == before
    main(args + ["--img-size", str(net.input_size[1])])  # the size the results were written at: added to them
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["latency_ms"] > 0


# ----------------------------------------------------------------- SN-Netv2: two-way routes, low-rank stitching layers


def test_export_of_v2_routes_equals_the_network(images: torch.Tensor, tmp_path) -> None:
    net = fitted_net(two_way=True, chains=True, lora_rank=2)
    picks = ["snnet_tiny_vit_b[:2]+snnet_tiny_vit_s[2:]", "snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]",
             "snnet_tiny_vit_ti[:1]+snnet_tiny_vit_s[1:3]+snnet_tiny_vit_b[3:]", "snnet_tiny_vit_b"]
    for name in picks:
        s = net.stitch(name)
        with torch.no_grad():
            net.select(s)
            want = net(images)
        route = deploy.extract(net, s)
        assert not any("lora" in k for k in route.state_dict())  # shipped merged
        assert len(route.via) == len(s.segments) - 2 if len(s.segments) > 1 else not route.via
        out = tmp_path / str(s.id)
        deploy.save_stitch(route, out, deploy.stitch_config(net, s))
        loaded = deploy.load_stitch(out)
        with torch.inference_mode():
            assert (route(images) - want).abs().max() <= 1e-5, name
            assert (loaded(images) - want).abs().max() <= 1e-5, name
        cfg = json.loads((out / "config.json").read_text())
        assert len(cfg["segments"]) == len(s.segments) and len(cfg["stitching_layers"]) == len(s.layers)
        assert len(cfg["anchors"]) == len(set(s.anchors))


def test_v1_stitch_exports_still_load(tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path) -> None:
    """A stitch exported before v2 (config version 1) loads into the same route."""
    s = tiny_net.stitch("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[1:]")
    route = deploy.extract(tiny_net, s)
    new = deploy.stitch_config(tiny_net, s)
    old = {k: v for k, v in new.items() if k not in ("anchors", "segments", "stitching_layers")}
    old.update(version=1, src=new["anchors"][0], src_end=2, dst=new["anchors"][1], dst_start=1,
               stitching_layer=new["stitching_layers"][0])
    deploy.save_stitch(route, tmp_path, old)
    with torch.inference_mode():
        assert torch.equal(deploy.load_stitch(tmp_path)(images), route(images))
    assert deploy.route_bytes(deploy_export._route_view(tiny_net, s)) == deploy.route_bytes(route)


def test_profile_of_v2_routes() -> None:
    net = seeded_net(two_way=True, lora_rank=2)
    names = ["snnet_tiny_vit_b[:2]+snnet_tiny_vit_s[2:]", "snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]"]
    measured, _ = deploy.profile(net, warmup=0, repeats=2, stitches=names, progress=False)
    assert [m.name for m in measured] == names and all(m.latency_ms > 0 and m.peak_mem_mb > 0 for m in measured)
    s = net.stitch(names[1])
    weights = sum(p.numel() * p.element_size() for m in route_modules(net, s) for p in m.parameters())
    assert deploy.route_bytes(deploy_export._route_view(net, s)) == weights + sum(
        b.numel() * b.element_size() for m in route_modules(net, s) for b in m.buffers())


def test_available_memory_respects_a_cgroup_memory_limit(tmp_path: Path) -> None:
    """The memory checks read /proc/meminfo's MemAvailable only: a container limited to 4 GiB on a 24 GiB host was
    said to have the host's 20 GiB free, and a batch that could not fit ran into the out-of-memory killer. The
    tightest limit of the process's cgroup and those above it counts (v2 and v1; its reclaimable cache is free)."""
    from snnet.deploy.memory import available_memory

    GiB = 1 << 30

    def system(cgroup: str, files: dict[str, str]) -> Path:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name, text in {"proc/meminfo": f"MemTotal: {24 * GiB // 1024} kB\nMemAvailable: {20 * GiB // 1024} kB\n",
                           "proc/self/cgroup": cgroup, **files}.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return root

    v2 = "sys/fs/cgroup/"
    assert available_memory(root=system("0::/\n", {})) == 20 * GiB  # no cgroup files: the host's figure
    assert available_memory(root=system("0::/\n", {v2 + "memory.max": "max\n", v2 + "memory.current": "5\n"})) == 20 * GiB
    assert available_memory(root=system("0::/\n", {v2 + "memory.max": f"{4 * GiB}\n", v2 + "memory.current": f"{GiB}\n",
                                                    v2 + "memory.stat": f"anon 1\ninactive_file {GiB // 2}\n"})) == 3.5 * GiB
    nested = {v2 + "app/memory.max": f"{2 * GiB}\n", v2 + "app/memory.current": "0\n",  # the parent holds the limit
              v2 + "app/job/memory.max": "max\n", v2 + "app/job/memory.current": "0\n"}
    assert available_memory(root=system("0::/app/job\n", nested)) == 2 * GiB
    v1 = "sys/fs/cgroup/memory/"  # v1 bind-mounts the container's own cgroup where the host's path does not exist
    assert available_memory(root=system("4:memory:/docker/abc\n0::/\n", {
        v1 + "memory.limit_in_bytes": f"{4 * GiB}\n", v1 + "memory.usage_in_bytes": f"{3 * GiB}\n",
        v1 + "memory.stat": f"inactive_file 7\ntotal_inactive_file {GiB}\n"})) == 2 * GiB


def test_check_input_refuses_only_what_cannot_run() -> None:
    """A CNN family takes another image size (so it is let through, and runs); a ViT's fixed patch grid and an
    input far beyond this machine's memory are refused, without allocating it."""
    from snnet.deploy.memory import available_memory, check_input
    from snnet.errors import SnnetError

    cnn = snnet.create_snnet(["snnet_tiny_resnet18", "snnet_tiny_resnet50"]).eval()
    check_input(cnn, [2], (3, 64, 64))
    for s in cnn.space:
        cnn.select(s.id)
        assert cnn(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    side = int((available_memory() / 4) ** 0.5) + 1  # one 3-channel image of this side exceeds free memory
    with pytest.raises(SnnetError, match="MiB are free"):
        check_input(cnn, [1], (3, side, side))
    vit = snnet.create_snnet(TINY_VITS[:2])
    with pytest.raises(SnnetError, match="cannot take"):
        check_input(vit, [1], (3, 64, 64), what="--img-size")
    check_input(vit, [64])  # its own size, a batch that fits
