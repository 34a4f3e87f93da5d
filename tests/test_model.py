"""snnet.model: the stitched network: switching routes, running them, costs, save/load and bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn

import snnet
from snnet.anchors import AnchorParts, split_model
from snnet.flops import count_macs, unfused_attention

from snnet.train import route_modules

from .conftest import TINY_VITS, fitted_net, seeded_net, _by_hand


# ----------------------------------------------------------------- running


def test_every_stitch_runs_with_the_right_shape(tiny_net: snnet.StitchedNet, images: torch.Tensor) -> None:
    tiny_net.eval()
    outs = {}
    for s in tiny_net.space:
        tiny_net.select(s.id)
        out = tiny_net(images)
        assert out.shape == (len(images), 10) and torch.isfinite(out).all()
        outs[s.id] = out
    assert not torch.equal(outs[3], outs[4])  # different routes, different outputs


def test_anchor_route_equals_the_timm_model(images: torch.Tensor) -> None:
    import timm

    torch.manual_seed(0)
    models = [timm.create_model(n).eval() for n in TINY_VITS]
    net = snnet.create_snnet(models).eval()
    for k, m in enumerate(models):
        net.select(k)
        torch.testing.assert_close(net(images), m(images), rtol=0, atol=0)


def test_parts_cover_every_parameter_once() -> None:
    import timm

    m = timm.create_model("snnet_tiny_vit_s")
    parts = split_model(m)
    assert sum(p.numel() for p in parts.parameters()) == sum(p.numel() for p in m.parameters())


def test_select_changes_the_route_and_nothing_else(tiny_net: snnet.StitchedNet, images: torch.Tensor) -> None:
    tiny_net.eval()
    before = {k: (v.data_ptr(), v.clone()) for k, v in tiny_net.state_dict().items()}
    tiny_net.select(0)
    y0 = tiny_net(images)
    chosen = tiny_net.select("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[1:]")
    assert tiny_net.active is chosen and chosen.layer is not None
    y1 = tiny_net(images)
    assert not torch.allclose(y0, y1)
    after = tiny_net.state_dict()
    for k, (ptr, value) in before.items():
        assert after[k].data_ptr() == ptr, f"{k} was reallocated by select"
        assert torch.equal(after[k], value), f"{k} changed"
    tiny_net.select(0)
    assert torch.equal(tiny_net(images), y0)


def test_forward_runs_only_the_active_route(tiny_net: snnet.StitchedNet, images: torch.Tensor) -> None:
    s = tiny_net.select("snnet_tiny_vit_s[:3]+snnet_tiny_vit_b[2:]")
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
             for name, m in tiny_net.named_modules() if name.count(".") == 3 and ".blocks." in name]
    tiny_net(images)
    for h in hooks:
        h.remove()
    expected = {f"anchors.1.blocks.{k}" for k in range(s.src_end)} | {f"anchors.2.blocks.{k}" for k in range(s.dst_start, 4)}
    assert called == expected


# ----------------------------------------------------------------- costs


def test_fused_attention_on_the_cpu_is_priced_as_its_two_matmuls() -> None:
    """From about a hundred tokens torch runs scaled_dot_product_attention on the CPU in a kernel its counter
    did not price: a module calling it directly lost its attention (timm's DeiT-Ti: 1.08 G, not 1.26)."""
    from torch.nn import functional as F

    q, k, v = torch.randn(1, 3, 197, 64), torch.randn(1, 3, 197, 64), torch.randn(1, 3, 197, 64)
    fused, _ = count_macs(F.scaled_dot_product_attention, q, k, v)
    explicit, _ = count_macs(lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, q, k, v)
    assert fused == explicit == 3 * 197 * 197 * (64 + 64)


def test_stitch_flops_equal_flops_counted_on_the_running_route(tiny_net: snnet.StitchedNet) -> None:
    x = torch.zeros(1, 3, 32, 32)
    tiny_net.eval()
    costs = tiny_net.costs()
    for s in tiny_net.space:
        tiny_net.select(s.id)
        with unfused_attention(tiny_net):
            counted, _ = count_macs(tiny_net, x)
        assert costs[s.id].flops == counted, s.name
        used = sum(p.numel() for p in tiny_net.anchors[s.src].stem.parameters())
        used += sum(p.numel() for b in tiny_net.anchors[s.src].blocks[:s.src_end] for p in b.parameters())
        last = tiny_net.anchors[s.src] if s.is_anchor else tiny_net.anchors[s.dst]
        if not s.is_anchor:
            used += sum(p.numel() for p in tiny_net.stitch_layers[s.layer].parameters())
            used += sum(p.numel() for b in last.blocks[s.dst_start:] for p in b.parameters())
        used += sum(p.numel() for p in last.head.parameters())
        assert costs[s.id].params == used, s.name


def test_anchor_costs_match_the_model_and_grow_with_input_size() -> None:
    import timm

    net = snnet.create_snnet(TINY_VITS, img_size=64)
    assert net.input_size == (3, 64, 64)
    for k, name in enumerate(TINY_VITS):
        m = timm.create_model(name, img_size=64)
        assert net.costs()[k].params == sum(p.numel() for p in m.parameters())
    small = snnet.create_snnet(TINY_VITS)
    assert all(a.flops > b.flops for a, b in zip(net.costs(), small.costs()))


def test_deit_space_matches_the_paper() -> None:
    """71 networks, 1.26–18.34 GFLOPs at 224 (random init on the meta device: no weights)."""
    net = snnet.create_snnet(["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"], device="meta")
    flops = [c.flops for c in net.costs()]
    assert len(net.space) == 71 and len(net.stitch_layers) == 22
    assert round(min(flops) / 1e9, 2) == 1.26
    assert round(max(flops) / 1e9, 2) == 18.34
    assert [round(c.flops / 1e9, 3) for c in net.costs()[:3]] == [1.258, 4.608, 17.583]


# ----------------------------------------------------------------- save / load


def test_save_load_round_trip(tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path) -> None:
    tiny_net.init_stitching([images], max_images=6)
    tiny_net.select(7)
    tiny_net.save_pretrained(tmp_path / "net")
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["config.json", "model.safetensors"]
    loaded = snnet.load(tmp_path / "net")
    assert loaded.active.id == 7
    tiny_net.eval(), loaded.eval()
    for s in tiny_net.space:
        tiny_net.select(s.id), loaded.select(s.id)
        assert torch.equal(tiny_net(images), loaded(images)), s.name


def test_save_load_with_own_modules(images: torch.Tensor, tmp_path) -> None:
    import timm

    def family() -> list[nn.Module]:
        return [timm.create_model(n) for n in TINY_VITS[:2]]

    net = snnet.create_snnet(family()).eval()
    net.save_pretrained(tmp_path)
    with pytest.raises(snnet.CheckpointError, match="pass them again"):
        snnet.load(tmp_path)
    loaded = snnet.load(tmp_path, anchors=family()).eval()
    net.select(3), loaded.select(3)
    assert torch.equal(net(images), loaded(images))


# ----------------------------------------------------------------- bad input


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(snnet.UnknownModelError, match="deit_tiny_patch16_224"):
        snnet.create_snnet(["deit_tiny", "deit_small_patch16_224"])


def test_fewer_than_two_anchors() -> None:
    with pytest.raises(snnet.NotStitchableError, match="at least two"):
        snnet.create_snnet(["snnet_tiny_vit_ti"])


def test_labels_must_name_every_anchor() -> None:
    """Fewer labels than anchors silently dropped the anchors past the last label (a family of 3 became 2)."""
    from snnet.errors import ConfigError

    for labels in (["ti", "s"], ["ti", "s", "b", "x"]):
        with pytest.raises(ConfigError, match=f"{len(labels)} labels for 3 anchors"):
            snnet.create_snnet(TINY_VITS, labels=labels)
    assert snnet.create_snnet(TINY_VITS, labels=["ti", "s", "b"]).labels == ("ti", "s", "b")


def test_different_token_counts_are_refused_with_the_shapes() -> None:
    import timm

    a = timm.create_model("snnet_tiny_vit_ti")
    b = timm.create_model("snnet_tiny_vit_s", patch_size=4)  # 64 patches instead of 16
    with pytest.raises(snnet.NotStitchableError, match=r"token counts differ.*17.*65"):
        snnet.create_snnet([a, b])


def test_different_heads_are_refused() -> None:
    import timm

    a = timm.create_model("snnet_tiny_vit_ti")
    b = timm.create_model("snnet_tiny_vit_s", num_classes=7)
    with pytest.raises(snnet.NotStitchableError, match="classes"):
        snnet.create_snnet([a, b])


def test_unknown_kind_of_model_is_refused() -> None:
    with pytest.raises(snnet.NotStitchableError, match="no adapter"):
        snnet.create_snnet([nn.Linear(2, 2), nn.Linear(2, 2)])


def test_stitch_lookup_errors(tiny_net: snnet.StitchedNet) -> None:
    with pytest.raises(snnet.StitchNotFoundError, match=r"out of range.*0\.\.22"):
        tiny_net.select(23)
    with pytest.raises(snnet.StitchNotFoundError, match="Did you mean"):
        tiny_net.select("snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[9:]")
    assert tiny_net.select("5").id == 5


def test_corrupt_and_mismatched_checkpoints(tiny_net: snnet.StitchedNet, tmp_path) -> None:
    tiny_net.save_pretrained(tmp_path / "good")
    # corrupt weights
    bad = tmp_path / "bad"
    tiny_net.save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        snnet.load(bad)
    # corrupt config
    (bad / "config.json").write_text("{not json")
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        snnet.load(bad)
    # weights of another family
    other = snnet.create_snnet(TINY_VITS[:2])
    with pytest.raises(snnet.CheckpointError, match="does not match"):
        other.load_weights(snnet.load(tmp_path / "good").state_dict(), "good")
    # config edited to another space
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    cfg["space"]["stride"] = 2
    (tmp_path / "good" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(snnet.CheckpointError, match="different stitch space"):
        snnet.load(tmp_path / "good")
    with pytest.raises(snnet.CheckpointError, match="not a saved stitched network"):
        snnet.load(tmp_path / "nothing")


def test_a_config_json_of_binary_bytes_or_without_its_space_is_a_clear_error(tiny_net: snnet.StitchedNet, tmp_path) -> None:
    """A damaged config.json (bytes that are not UTF-8, e.g. a weights file copied over it) or one missing
    its "space" ended loading in a UnicodeDecodeError / KeyError traceback instead of one CheckpointError line."""
    tiny_net.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00" + (tmp_path / "model.safetensors").read_bytes()[:64])
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        snnet.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in json.loads(cfg).items() if k != "space"}))
    with pytest.raises(snnet.CheckpointError, match="corrupt"):
        snnet.load(tmp_path)


@pytest.mark.parametrize("config", [{"model_type": "vit", "hidden_size": 768}, {"format": "snnet-stitch"}, "not json"])
def test_saving_over_a_folder_of_another_model_is_refused_and_leaves_its_files(tiny_net: snnet.StitchedNet, tmp_path,
                                                                                config) -> None:
    """save_pretrained replaced the config.json and model.safetensors of whatever the folder held (a Hugging Face
    model, an exported stitch, a file of the user's own) without a word; a network saved there before is replaced."""
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"someone else's weights")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(snnet.CheckpointError, match="cannot save to .*choose another folder"):
        tiny_net.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    tiny_net.save_pretrained(tmp_path / "net")
    tiny_net.select(3)
    tiny_net.save_pretrained(tmp_path / "net")  # over a network of its own kind: saved, as before
    assert snnet.load(tmp_path / "net").active.id == 3


def test_model_init_refuses_rule_settings_its_saved_space_was_not_built_with(tmp_path) -> None:
    """With model.init, two_way/chains/routes/cut were refused but SN-Net's own settings (stride, kernel_size,
    nearest, stages, rule, unpaired) were dropped without a word: `--space.stride 2` trained the saved stride-1
    space, and the run's settings recorded stride 2."""
    from snnet.config import SpaceConfig
    from snnet.model import saved_network

    snnet.create_snnet(TINY_VITS[:2], stride=2).save_pretrained(tmp_path)
    for space, said in ((SpaceConfig(stride=3), "space.stride=3 (it was built with 2)"),
                        (SpaceConfig(stride=2, kernel_size=3), "space.kernel_size=3 (it was built with 2)"),
                        (SpaceConfig(rule="forward"), "space.rule='forward' (it was built with None)")):
        with pytest.raises(snnet.SnnetError, match=f"stitch space is fixed: drop {re.escape(said)}$"):
            saved_network(snnet.StitchedNet, str(tmp_path), space)
    # the defaults (a recipe that sets none of them) and the saved settings themselves are what it was built with
    for space in (SpaceConfig(), SpaceConfig(stride=2), SpaceConfig(lora_rank=2)):
        assert saved_network(snnet.StitchedNet, str(tmp_path), space).space.config.stride == 2


def test_model_init_refuses_weights_files_and_a_new_head_it_would_drop(tmp_path) -> None:
    """With model.init, model.weights (files that need not even exist) and model.num_classes were dropped without a
    word: a run asked for a 5-class head trained the saved network's 10-class one."""
    from snnet.config import ModelConfig, SpaceConfig
    from snnet.model import network_from_config

    snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path)
    with pytest.raises(snnet.SnnetError, match="model.weights is set when the anchors are built"):  # by the config itself
        network_from_config(ModelConfig(init=str(tmp_path), weights=("a.safetensors", "b.safetensors")), SpaceConfig())
    with pytest.raises(snnet.SnnetError, match="model.num_classes=5 .* predicts 10 classes and keeps its heads"):
        network_from_config(ModelConfig(init=str(tmp_path), num_classes=5), SpaceConfig())
    for model in (ModelConfig(init=str(tmp_path)), ModelConfig(init=str(tmp_path), num_classes=10)):
        assert network_from_config(model, SpaceConfig()).num_classes == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_network_loads_back_in_its_dtype(dtype: torch.dtype, tmp_path) -> None:
    """A network saved in bfloat16/float16 (model.safetensors holds that dtype) came back as float32: twice the
    memory, and not the network that was saved."""
    net = seeded_net(anchors=TINY_VITS[:2]).to(dtype)
    net.select(4)
    net.save_pretrained(tmp_path)
    back = snnet.load(tmp_path)
    assert {v.dtype for v in back.state_dict().values() if v.is_floating_point()} == {dtype}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in back.state_dict().items())
    assert back.active == net.active


def _stop_saves_before_the_config(monkeypatch, error: BaseException = KeyboardInterrupt()) -> None:
    """Every save_pretrained from here on stops (as Ctrl-C would, or with ``error``) between its weights and its
    config.json."""
    from pathlib import Path

    import snnet.model as model_module

    real = model_module.atomic_write

    def stop_before_the_config(path, write, *args, **kwargs):
        if Path(path).name == model_module.CONFIG_NAME:
            raise error
        return real(path, write, *args, **kwargs)

    monkeypatch.setattr(model_module, "atomic_write", stop_before_the_config)


def test_a_save_interrupted_between_its_files_keeps_the_network_saved_before(tmp_path, monkeypatch) -> None:
    """Overwriting a saved network renames the new weights in, then the new config.json. Stopped between the
    two (Ctrl-C, a kill), the folder held new weights beside the old config, and the network saved before was
    refused as damaged: lost. Its weights are now kept until the new config is in, and load."""
    old = seeded_net(anchors=TINY_VITS[:2])
    torch.manual_seed(1)
    new = snnet.create_snnet(TINY_VITS[:2])
    old.select(4)
    old.save_pretrained(tmp_path)
    _stop_saves_before_the_config(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()  # saves finish again
    with pytest.warns(UserWarning, match="interrupted between its files"):
        back = snnet.load(tmp_path)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in back.state_dict().items()) and back.active == old.active
    new.save_pretrained(tmp_path)  # saving again finishes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in snnet.load(tmp_path).state_dict().items())


def test_the_interrupted_save_warning_names_the_callers_line(tmp_path, monkeypatch) -> None:
    """The warning that the network saved before an interrupted save is loaded named a line inside snnet whenever
    the load went through another of its functions (a model.init network: saved_network), not the caller's."""
    from snnet.config import SpaceConfig
    from snnet.model import saved_network

    seeded_net(anchors=TINY_VITS[:2]).save_pretrained(tmp_path)
    _stop_saves_before_the_config(monkeypatch)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path)
    monkeypatch.undo()
    for load in (lambda: snnet.load(tmp_path), lambda: saved_network(snnet.StitchedNet, str(tmp_path), SpaceConfig())):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
        assert [w.filename for w in caught if "interrupted between its files" in str(w.message)] == [__file__]


def test_a_save_failing_between_its_files_puts_the_network_saved_before_back(tmp_path, monkeypatch) -> None:
    """A save over a saved network that failed with an error (a full disk writing config.json) left new weights
    beside the old config, the old network loading with a warning until the next save: it is put back as it was."""
    old = seeded_net(anchors=TINY_VITS[:2])
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _stop_saves_before_the_config(monkeypatch, OSError(28, "No space left on device"))
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old network, whole: no fallback warning
        back = snnet.load(tmp_path)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in back.state_dict().items())


def test_a_save_failing_before_its_weights_are_in_leaves_no_previous_file(tmp_path, monkeypatch) -> None:
    """A save over a saved network that failed writing its weights (a full disk) left model.safetensors.previous
    behind: the kept link was only dropped once the new config.json was in."""
    import snnet.model as model_module

    old = seeded_net(anchors=TINY_VITS[:2])
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(path, write, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        old.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_from_pretrained_puts_the_network_where_map_location_says(tmp_path, monkeypatch) -> None:
    """from_pretrained(map_location="cuda") loaded the tensors there and copied them into a network left on the
    CPU. No GPU here: the device move is recorded (the weights themselves load on the CPU)."""
    import safetensors.torch

    from snnet.model import StitchedNet

    seeded_net(anchors=TINY_VITS[:2]).save_pretrained(tmp_path)
    real_load, real_to, moved = safetensors.torch.load_file, StitchedNet.to, []
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, device="cpu": real_load(path))
    monkeypatch.setattr("snnet.devices.default_device", lambda name: name)  # no GPU here: let 'cuda' through the check

    def to(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return self if moved[-1] == "cuda" else real_to(self, *args, **kwargs)

    monkeypatch.setattr(StitchedNet, "to", to)
    StitchedNet.from_pretrained(tmp_path, map_location="cuda")
    assert "cuda" in moved


def test_custom_parts_are_accepted(images: torch.Tensor) -> None:
    """A model no adapter knows can still be stitched by splitting it by hand."""
    def make(width: int) -> AnchorParts:
        stem = nn.Sequential(nn.Flatten(2), nn.Linear(32 * 32, width))  # (B, 3, W): 3 "tokens"
        blocks = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(3)]
        head = nn.Sequential(nn.Flatten(1), nn.Linear(3 * width, 10))
        return AnchorParts(stem, blocks, head, layout="tokens", data_config={"input_size": (3, 32, 32)})

    net = snnet.create_snnet([make(8), make(16)])
    assert len(net.space) == 2 + 7
    net.select(5)
    assert net(images).shape == (6, 10)


# ----------------------------------------------------------------- SN-Netv2: two-way routes, low-rank stitching layers


def test_large_to_small_and_round_trips_equal_their_segments_by_hand(images: torch.Tensor) -> None:
    net = fitted_net(two_way=True, chains=True)
    kinds = set()
    with torch.no_grad():
        for s in net.space:
            net.select(s)
            assert torch.equal(net(images), _by_hand(net, s, images)), s.name
            kinds.add(s.anchors)
    assert {(1, 0), (0, 1, 0), (1, 0, 1), (0, 1, 2)} <= kinds  # L->S, both round trips, Ti->S->B


def test_round_trip_runs_only_its_route(images: torch.Tensor) -> None:
    net = seeded_net(two_way=True)
    s = net.select("snnet_tiny_vit_s[:1]+snnet_tiny_vit_b[1:3]+snnet_tiny_vit_s[3:]")
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
             for name, m in net.named_modules() if name.count(".") in (1, 3) and name.startswith(("anchors", "stitch_layers"))]
    net(images)
    for h in hooks:
        h.remove()
    blocks = {n for n in called if ".blocks." in n}
    assert blocks == {"anchors.1.blocks.0", "anchors.2.blocks.1", "anchors.2.blocks.2", "anchors.1.blocks.3"}
    assert {n for n in called if n.startswith("stitch_layers")} == {f"stitch_layers.{k}" for k in s.layers}


def test_multi_segment_costs_sum_their_parts() -> None:
    net = seeded_net(two_way=True, chains=True)
    pcs, costs = net.part_costs(), net.costs()
    for s in net.space:
        modules = route_modules(net, s)
        assert costs[s.id].params == sum(p.numel() for m in modules for p in m.parameters()), s.name
        blocks = sum(pcs[seg.anchor].route(seg.start, seg.stop, False, False)[0] for seg in s.segments)
        ends = pcs[s.src].stem_flops + pcs[s.anchors[-1]].head_flops
        layers = sum(net.space.layers[k].src_spec.positions * net.space.layers[k].src_spec.channels
                     * net.space.layers[k].dst_spec.channels for k in s.layers)
        assert costs[s.id].flops == blocks + ends + layers, s.name


def test_least_squares_fits_both_directions(images: torch.Tensor) -> None:
    net = seeded_net(two_way=True)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    down = [slot for slot in net.space.layers if slot.src > slot.dst]
    assert down

    def mse() -> list[float]:
        out = []
        for slot in down:
            (e, st), = slot.joins
            x, y = net.activations(slot.src, calib)[e], net.activations(slot.dst, calib)[st]
            with torch.no_grad():
                out.append(float(((net.stitch_layers[slot.index](x) - y) ** 2).mean()))
        return out

    before = mse()
    report = net.init_stitching([calib], max_images=16)
    assert report.layers == len(net.stitch_layers)
    assert all(a < 0.7 * b for a, b in zip(mse(), before))


def test_v1_configs_still_load(tiny_net: snnet.StitchedNet, images: torch.Tensor, tmp_path) -> None:
    tiny_net.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["version"] == 1 and "stitching" not in cfg
    for key in ("two_way", "chains", "routes"):  # what snnet wrote before v2
        del cfg["space"][key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = snnet.load(tmp_path)
    assert [s.name for s in loaded.space] == [s.name for s in tiny_net.space]


def test_saving_a_network_on_the_meta_device_is_refused_clearly(tmp_path: Path) -> None:
    """save_pretrained of a network built with device="meta" (for planning) failed deep inside torch:
    "NotImplementedError: Cannot copy out of meta tensor; no data!"; it now says why, writing nothing."""
    from snnet.errors import ConfigError

    net = snnet.create_snnet(TINY_VITS[:2], device="meta")
    with pytest.raises(ConfigError, match=r"is on the meta device, which holds no weights; build it without device='meta'"):
        net.save_pretrained(tmp_path / "net")
    assert not (tmp_path / "net").exists()


def test_running_a_network_on_the_meta_device_is_refused_clearly() -> None:
    """A network built with device="meta" lists and prices its space; fitting its stitching layers, scoring KLAS
    or evaluating it failed deep inside torch ("Cannot copy out of meta tensor", "Tensor.item() cannot be called
    on meta tensors"). Each now says why, before reading the loader."""
    from snnet.errors import ConfigError
    from snnet.evaluate import evaluate
    from snnet.klas import klas

    net = snnet.create_snnet(TINY_VITS[:2], device="meta")
    assert len(net.costs()) == len(net.space)  # what it is for still works

    def batches():
        raise AssertionError("the loader was read")
        yield

    said = r"cannot run {}: the network is on the meta device, which holds no weights .* build it without device='meta'"
    with pytest.raises(ConfigError, match=said.format("least-squares init")):
        net.init_stitching(batches())
    with pytest.raises(ConfigError, match=said.format("KLAS scores")):
        klas(net, batches(), keep=2)
    for device in (None, "cpu"):
        with pytest.raises(ConfigError, match=said.format("an evaluation")):
            evaluate(net, batches(), device=device, progress=False)


def test_calibration_images_are_read_as_evaluation_reads_them() -> None:
    """init_stitching and KLAS stopped at the first layer with torch's "Input type (double) and bias type (float)
    should be the same" on float64 images (numpy's default), which evaluate casts; uint8 images or images of
    another channel count failed deep inside torch too."""
    from snnet.klas import klas

    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS[:2])
    x = torch.randn(4, 3, 32, 32)
    assert net.init_stitching([x.double()]).images == 4
    fitted = [p.clone() for p in net.stitch_layers.parameters()]
    net.init_stitching([x])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fitted, net.stitch_layers.parameters()))
    assert klas(net, [(x.double(), torch.zeros(4))], keep=2).images == 4
    with pytest.raises(snnet.SnnetError, match=r"least-squares init: images must be float tensors, .* torch\.uint8"):
        net.init_stitching([(x * 50).to(torch.uint8)])
    with pytest.raises(snnet.SnnetError, match=r"KLAS scores: images of shape \(1, 32, 32\) do not fit this network, "
                                               r"which takes \(3, 32, 32\)"):
        klas(net, [x[:, :1]], keep=2)


def test_calibration_stops_when_what_is_left_fits_no_batch() -> None:
    """With min_batch=2 (KLAS) and one image left to take (max_images=9, batches of 4), every later batch was cut
    to one image and skipped, so the whole loader was read (a training set's) for nothing."""
    from snnet.model import calibration_images

    net = snnet.create_snnet(TINY_VITS[:2])
    drawn = []

    def loader():
        for k in range(1000):
            drawn.append(k)
            yield torch.zeros(4, 3, 32, 32)

    assert sum(len(x) for x in calibration_images(net, loader(), 9, "test", min_batch=2)) == 8
    assert len(drawn) <= 3
    assert [len(x) for x in calibration_images(net, [torch.zeros(1, 3, 32, 32), torch.zeros(3, 3, 32, 32)], 9, "test",
                                               min_batch=2)] == [3]  # a small batch of the loader is still skipped


def test_a_second_save_stopped_between_its_files_keeps_the_network_saved_before(tmp_path, monkeypatch) -> None:
    """After a save stopped between its files, the next save replaced model.safetensors.previous (the only weights
    the config.json in place records) with the unmatched new weights: stopped there too, the folder held nothing
    that loads ("model.safetensors is damaged"), and the network saved before was lost."""
    old = seeded_net(anchors=TINY_VITS[:2])
    old.save_pretrained(tmp_path)
    _stop_saves_before_the_config(monkeypatch)
    for seed in (1, 2):
        torch.manual_seed(seed)
        with pytest.raises(KeyboardInterrupt):
            snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path)
    monkeypatch.undo()  # saves finish again
    with pytest.warns(UserWarning, match="interrupted between its files"):
        back = snnet.load(tmp_path)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in back.state_dict().items())
    torch.manual_seed(3)
    new = snnet.create_snnet(TINY_VITS[:2])
    new.save_pretrained(tmp_path)  # saving again finishes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in snnet.load(tmp_path).state_dict().items())


def test_img_size_and_num_classes_reach_anchors_given_as_specs() -> None:
    """create_snnet([AnchorSpec(...), ...], num_classes=5) built 10-class heads without a word, and img_size=64 failed
    ("cannot take an input of size (3, 64, 64)"): both were applied to anchors given by name only (`snnet stitches
    --select klas --img-size 64` passes specs)."""
    from snnet.anchors import AnchorSpec

    net = snnet.create_snnet([AnchorSpec(TINY_VITS[0], kwargs=(("drop_path_rate", 0.1),)), AnchorSpec(TINY_VITS[1])],
                             num_classes=5, img_size=64)
    assert net.num_classes == 5 and net.input_size == (3, 64, 64)
    assert dict(net.specs[0].kwargs) == {"drop_path_rate": 0.1, "img_size": 64, "num_classes": 5}
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_anchors_built_at_img_size_say_so_to_the_data_pipelines(tmp_path) -> None:
    """create_snnet(img_size=64) left each anchor's data_config at its timm default (32): the images the data
    pipelines made from it (KLAS's calibration, evaluation) were 32x32, and the network failed deep in timm's patch
    embedding ("Input height (32) doesn't match model (64)")."""
    from snnet.data import build_dataset

    from .conftest import _folder

    net = snnet.create_snnet(TINY_VITS[:2], img_size=64)
    assert [tuple(p.data_config["input_size"]) for p in net.anchors] == [(3, 64, 64)] * 2
    images = build_dataset(str(_folder(tmp_path / "imgs", size=48)), "train", net.anchors[0].data_config, limit=2)
    assert tuple(images[0][0].shape) == (3, 64, 64)
    assert net(images[0][0][None]).shape == (1, 10)


def test_init_stitching_with_no_images_to_take_says_so() -> None:
    """init_stitching(loader, max_images=0) blamed the loader: "the loader given to init_stitching yielded nothing"."""
    from snnet.errors import ConfigError

    net = snnet.create_snnet(TINY_VITS[:2])
    with pytest.raises(ConfigError, match=r"init_stitching needs max_images >= 1 calibration images, got 0"):
        net.init_stitching([torch.zeros(4, 3, 32, 32)], max_images=0)


def test_anchors_that_do_not_say_their_input_size_are_told_the_argument_that_does() -> None:
    """Plain timm modules built directly carry no input size: the refusal said "pass input_size=(C, H, W)", which
    create_snnet does not take (TypeError); it names img_size, which works."""
    from timm.models.vision_transformer import VisionTransformer

    a, b = (VisionTransformer(img_size=32, patch_size=8, embed_dim=d, depth=2, num_heads=2, num_classes=10) for d in (32, 48))
    with pytest.raises(snnet.NotStitchableError, match="give create_snnet img_size=H") as e:
        snnet.create_snnet([a, b])
    assert "\n" not in str(e.value)
    assert snnet.create_snnet([a, b], img_size=32).input_size == (3, 32, 32)


@pytest.mark.parametrize("where, says", [("cdua", "unknown device 'cdua'"), ("meta", "snnet runs on cpu, cuda or mps")]
                         + ([("cuda", "torch sees no CUDA GPU here")] if not torch.cuda.is_available() else []))
def test_loading_onto_a_device_this_machine_lacks_names_the_device(tmp_path, where: str, says: str) -> None:
    """from_pretrained(map_location='cuda') without a GPU was torch's 'Found no NVIDIA driver' traceback; a typo or
    'meta' called the sound weights file 'corrupt or unreadable ... re-save it'."""
    snnet.create_snnet(TINY_VITS[:2]).save_pretrained(tmp_path)
    from snnet.errors import ConfigError

    with pytest.raises(ConfigError, match=says) as e:
        snnet.StitchedNet.from_pretrained(tmp_path, map_location=where)
    assert "corrupt" not in str(e.value)


def test_cpu_model_reads_the_model_name_and_falls_back_where_there_is_none(tmp_path) -> None:
    """Benchmark records name the CPU (same-size machines differ in speed and in a training's last digits): the
    first non-empty ``model name`` of /proc/cpuinfo, else the platform's processor string, never an exception."""
    import platform

    from snnet.devices import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: \nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core\n")
    assert cpu_model(str(info)) == "AMD EPYC 9R14 96-Core"
    info.write_text("processor\t: 0\nflags\t: fpu\n")
    assert cpu_model(str(info)) == (platform.processor() or "unknown")
    assert cpu_model(str(tmp_path / "absent")) == (platform.processor() or "unknown")
