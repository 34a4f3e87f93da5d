"""Anchors cut between sublayers (``space.cut: sublayer``): each ViT block as its attention and its
MLP, so a stitch may cut inside a block. The cut must compute exactly what the blocks did, share the
anchors' weights, survive save/load and export, and be refused for models it does not fit."""

from __future__ import annotations

import json

import pytest
import torch

import snnet
from snnet.anchors import Sublayer, cut_parts, split_model
from snnet.config import SpaceConfig
from snnet.deploy.export import export_stitch, load_stitch
from snnet.errors import ConfigError, NotStitchableError
from snnet.model import StitchedNet

from .conftest import TINY_VITS, _cli, _image_folder, _one_line


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name).eval()


@pytest.mark.parametrize("name", ["snnet_tiny_vit_s", "snnet_tiny_deit3_s"])  # DeiT III: layer scale in each sublayer
def test_sublayers_compute_the_blocks_with_the_blocks_weights(name, images):
    parts = split_model(_model(name))
    cut = cut_parts(parts, "sublayer", name)
    assert cut.depth == 2 * parts.depth and cut.stages == (2 * parts.depth,) and cut.cut == "sublayer"
    assert [type(u) for u in cut.blocks] == [Sublayer] * cut.depth
    with torch.no_grad():
        h = parts.stem(images)
        for k, block in enumerate(parts.blocks):
            # a block is its two sublayers, bit for bit: the same modules in the same order
            assert torch.equal(cut.blocks[2 * k + 1](cut.blocks[2 * k](h)), block(h))
            h = block(h)
        assert torch.equal(cut(images), parts(images))
    # the same tensors under the block's own names: nothing copied, nothing left out
    mine = {k: v for k, v in cut.state_dict().items()}
    theirs = parts.state_dict()
    assert {v.data_ptr() for v in mine.values()} == {v.data_ptr() for v in theirs.values()}
    assert "blocks.1.mlp.fc1.weight" in mine and "blocks.0.attn.qkv.weight" in mine and "blocks.1.attn.qkv.weight" not in mine
    assert cut_parts(cut, "sublayer") is cut and cut_parts(parts, "block") is parts


def test_a_sublayer_network_adds_the_cuts_inside_blocks_and_keeps_the_anchors(images):
    torch.manual_seed(0)
    by_block = snnet.create_snnet(TINY_VITS)
    by_sublayer = StitchedNet(list(by_block.anchors), by_block.labels, config=SpaceConfig(cut="sublayer"))
    assert len(by_sublayer.space) > len(by_block.space)
    names = {s.name for s in by_sublayer.space}
    assert "snnet_tiny_vit_ti[:3]+snnet_tiny_vit_s[3:]" in names  # Ti's first block and a half, then S's MLP
    by_block.eval(), by_sublayer.eval()
    with torch.no_grad():
        for k in range(3):  # the anchors run whole compute what they did
            by_block.select(k), by_sublayer.select(k)
            assert torch.equal(by_sublayer(images), by_block(images))
        flops = {c.name: c.flops for c in by_sublayer.costs()}
        block_flops = {c.name: c.flops for c in by_block.costs()}
        assert all(flops[n] == block_flops[n] for n in by_block.labels)
        # a stitch that cuts after an attention costs between the block cuts around it (more of Ti: cheaper)
        mid = flops["snnet_tiny_vit_ti[:3]+snnet_tiny_vit_s[3:]"]
        assert flops["snnet_tiny_vit_ti[:4]+snnet_tiny_vit_s[4:]"] < mid < flops["snnet_tiny_vit_ti[:2]+snnet_tiny_vit_s[2:]"]
        for s in by_sublayer.space:
            by_sublayer.select(s.id)
            assert torch.isfinite(by_sublayer(images)).all(), s.name


def test_a_sublayer_network_saves_loads_and_exports_one_stitch(tmp_path, images):
    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS[:2], cut="sublayer").eval()
    name = "snnet_tiny_vit_ti[:5]+snnet_tiny_vit_s[5:]"
    net.select(name)
    with torch.no_grad():
        torch.nn.init.normal_(net.stitch_layers[net.space[name].layers[0]].proj.weight)  # not the identity-like init
        want = net(images)
    net.save_pretrained(tmp_path / "net")
    saved = json.loads((tmp_path / "net" / "config.json").read_text())
    assert saved["space"]["cut"] == "sublayer" and saved["version"] == 4
    again = StitchedNet.from_pretrained(tmp_path / "net").eval()
    again.select(name)
    with torch.no_grad():
        assert torch.equal(again(images), want)
    export_stitch(net, name, tmp_path / "one")
    assert json.loads((tmp_path / "one" / "config.json").read_text())["cut"] == "sublayer"
    with torch.no_grad():
        assert torch.allclose(load_stitch(tmp_path / "one").eval()(images), want, atol=1e-6)


def test_cuts_that_do_not_fit_are_refused_in_one_line(capsys):
    with pytest.raises(NotStitchableError, match="its blocks are BasicBlock; use cut='block'"):
        snnet.create_snnet(["snnet_tiny_resnet18", "snnet_tiny_resnet50"], cut="sublayer", device="meta")
    with pytest.raises(NotStitchableError, match="cannot be cut so: its blocks are SwinTransformerBlock"):
        snnet.create_snnet(["snnet_tiny_swin_t", "snnet_tiny_swin_s"], cut="sublayer", device="meta")
    with pytest.raises(ConfigError, match="unknown space.cut 'half'; use one of block, sublayer"):
        SpaceConfig(cut="half")
    with pytest.raises(ConfigError, match="cut between blocks"):
        snnet.create_snnet(TINY_VITS[:2], cut="sublayer", route_mode="reference", device="meta")
    assert _cli("stitches", "--anchors", "snnet_tiny_resnet18,snnet_tiny_resnet50", "--cut", "sublayer") == 2
    assert "use cut='block'" in _one_line(capsys.readouterr().err)
    assert _cli("stitches", "--anchors", "stdlib-lm", "--cut", "sublayer") == 2
    assert "a language model is stitched between its decoder layers" in _one_line(capsys.readouterr().err)
    # language models are stitched between decoder layers; a saved network keeps the cut it was saved with
    from snnet.config import ModelConfig
    from snnet.families.causal_lm import lm_network_from_config
    from snnet.model import saved_network

    with pytest.raises(ConfigError, match="space.cut is for image models"):
        lm_network_from_config(ModelConfig(anchors="stdlib-lm"), SpaceConfig(cut="sublayer"), 64)
    with pytest.raises(ConfigError, match=r"drop the space options \(two_way, chains, routes, cut\)"):
        saved_network(StitchedNet, "anywhere", SpaceConfig(cut="sublayer"))


def test_the_cli_lists_and_trains_a_sublayer_space(tmp_path, capsys):
    assert _cli("stitches", "--anchors", ",".join(TINY_VITS[:2]), "--cut", "sublayer", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(snnet.create_snnet(TINY_VITS[:2], cut="sublayer", device="meta").space)
    assert all(r.get("ref_id") is None for r in rows)  # the authors' code never cuts inside a block
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    code = _cli("train", "--anchors", ",".join(TINY_VITS[:2]), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
                "--init-images", "8", "--space.cut", "sublayer", "--out", str(out), "--no-progress", "--device", "cpu")
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["space"]["cut"] == "sublayer" and len(saved["stitches"]) == len(rows)
    net = snnet.load(out / "final")
    assert net.space.config.cut == "sublayer" and net.anchors[0].depth == 8


def test_klas_scores_and_keeps_sublayer_routes():
    from snnet.klas import klas, klas_net

    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS[:2], cut="sublayer")
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = klas(net, [x[:16], x[16:]], keep=4)
    kept = klas_net(net, result.routes)
    # the kept routes' indices count sublayers, so the new network is cut the same way
    assert kept.space.config.cut == "sublayer" and kept.anchors[0].depth == 8
    assert [s.name for s in kept.space if not s.is_anchor] == list(result.routes)
    assert {len(kept.space[r].segments) for r in result.routes} == {2}  # KLAS scores every two-anchor cut pair
