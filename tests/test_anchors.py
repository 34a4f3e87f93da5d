"""snnet.anchors: stems and heads that hold their timm model and run its own methods."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn

from snnet.anchors import TimmPart, split_model
from snnet.errors import NotStitchableError

ROUTES = Path(__file__).parent / "data" / "anchor-routes"
_spec = importlib.util.spec_from_file_location("make_anchor_routes", ROUTES / "make_anchor_routes.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


@pytest.mark.parametrize("name", list(make.FAMILIES))
def test_routes_compute_what_they_did_before_anchors_held_their_model(name: str) -> None:
    """Every anchor route and a stitch of every layer, on each kind of family in snnet.tiny: the same
    state-dict keys and shapes as before the change, and (under the timm version whose initialisation
    made the recorded weights) the same logits, to float rounding: within 1e-3 of their scale (they
    are bit for bit the same on the CPU that recorded them; float kernels of another instruction set,
    AVX-512 and AMX against AVX2, round otherwise in the last bits, which the stitching layers'
    least-squares fit amplifies: the worst seen was 1e-4 of the scale, on a machine with AMX; a
    wrong route is off by the scale itself)."""
    net = make.build(name)
    x = make.images(name)
    net.init_stitching([x])
    with safe_open(ROUTES / f"{name}.safetensors", "pt") as f:
        recorded = {k: f.get_tensor(k) for k in f.keys()}
        made_with = f.metadata()
    shapes = {k.removeprefix("shape/"): list(v) for k, v in recorded.items() if k.startswith("shape/")}
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == shapes
    routes = make.routes(net)
    assert sorted(f"logits/{s.name}" for s in routes) == sorted(k for k in recorded if k.startswith("logits/"))
    if made_with["timm"] != timm.__version__:
        pytest.skip(f"logits recorded under timm {made_with['timm']}, whose random init differs from {timm.__version__}'s")
    with torch.no_grad():
        for s in routes:
            net.select(s)
            want = recorded[f"logits/{s.name}"]
            torch.testing.assert_close(net(x), want, rtol=0, atol=1e-3 * want.abs().max().item(), msg=s.name)


def test_stem_and_head_hold_the_model_and_only_their_own_weights() -> None:
    model = timm.create_model("snnet_tiny_vit_s").eval()
    parts = split_model(model)
    assert parts.stem.model is model and parts.head.model is model
    assert [k for k, _ in parts.stem.named_children()] == ["patch_embed", "pos_drop", "patch_drop", "norm_pre"]
    assert {k for k, _ in parts.stem.named_parameters(recurse=False)} == {"cls_token", "pos_embed"}
    assert not any(k.startswith("blocks") for k in parts.head.state_dict())


def test_a_weight_no_part_holds_is_refused_by_name() -> None:
    """A timm version adding a module the adapter does not know would otherwise run it unsaved and unmoved."""
    model = timm.create_model("snnet_tiny_vit_ti")
    model.new_thing = nn.Linear(2, 2)
    with pytest.raises(NotStitchableError, match=r"leaves 2 weight\(s\) of VisionTransformer in no part \(new_thing.weight"):
        split_model(model)


def test_replaced_parameters_reach_the_model(images: torch.Tensor) -> None:
    """load_state_dict(assign=True) puts new parameters on the stem; the model's own code must use them."""
    parts = split_model(timm.create_model("snnet_tiny_vit_ti").eval())
    state = {k: v.clone() for k, v in parts.stem.state_dict().items()}
    state["cls_token"] = torch.randn_like(state["cls_token"])
    parts.stem.load_state_dict(state, assign=True)
    assert parts.stem.model.cls_token is parts.stem.cls_token
    wide = parts.to(torch.float64)
    assert wide.stem.model.pos_embed.dtype == torch.float64 and wide(images.double()).dtype == torch.float64


def test_a_copy_runs_its_own_weights(images: torch.Tensor) -> None:
    """A deep copy (the distillation teacher, an exported route) holds a copy of the model with the copied
    piece's own modules and no others (not the blocks): changing the copy leaves the original alone."""
    parts = split_model(timm.create_model("snnet_tiny_vit_ti").eval())
    twin = copy.deepcopy(parts)
    assert twin.stem.model.patch_embed is twin.stem.patch_embed and twin.stem.model is not parts.stem.model
    assert twin.stem.model.num_prefix_tokens == 1 and not hasattr(twin.stem.model, "blocks")
    assert twin.head.model.norm is twin.head.norm and not hasattr(twin.head.model, "patch_embed")
    with torch.no_grad():
        want = parts(images)
        twin.stem.cls_token.add_(1.0)
        assert torch.equal(parts(images), want) and not torch.equal(twin(images), want)


def test_a_reference_head_drops_only_the_final_norm() -> None:
    from snnet.anchors import without_final_norm

    parts = split_model(timm.create_model("snnet_tiny_vit_ti").eval())
    bare = without_final_norm(parts.head)
    assert isinstance(bare, TimmPart) and bare.model is parts.head.model
    assert set(bare.names) == set(parts.head.names) - {"norm"}
    h = torch.randn(2, 17, parts.head.norm.normalized_shape[0])
    with torch.no_grad():
        assert torch.equal(bare(h), parts.head.model.forward_head(h))


def test_the_model_runs_in_the_mode_of_the_piece_running_it() -> None:
    """timm's distilled heads return (class, distillation) logits only in training: the held model must
    follow train()/eval() of the network, which does not reach it."""
    parts = split_model(timm.create_model("snnet_tiny_levit_a"))
    parts.head.model.set_distilled_training(True)
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(parts.train()(x), tuple)
    assert isinstance(parts.eval()(x), torch.Tensor)
