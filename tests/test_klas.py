"""snnet.klas: KLAS, choosing a few stitches by how alike their representations are."""

from __future__ import annotations

import json

import pytest
import torch

import snnet
from snnet.klas import candidates, klas, klas_net, klas_scores, KlasScore, select_klas

from .conftest import seeded_net


def _batches_of_images(n: int = 48, seed: int = 0) -> list[torch.Tensor]:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + 16] for i in range(0, n, 16)]


def test_klas_keeps_n_deterministically() -> None:
    net = seeded_net()
    cands = candidates(net)
    assert len(cands) == 6 * 4 * 4  # 6 ordered pairs of anchors, cut after 1..4 blocks, resume at 0..3
    a, b = klas(net, _batches_of_images(), keep=5), klas(net, _batches_of_images(), keep=5)
    assert a == b and len(a.routes) == 5 and sum(s.kept for s in a.scores) == 5
    lo, hi = min(c.flops for c in net.costs()[:3]), max(c.flops for c in net.costs()[:3])
    assert all(lo < s.flops < hi for s in a.scores if s.kept)
    chosen = klas_net(net, a.routes)
    assert [s.name for s in chosen.space][3:] == list(a.routes) and len(chosen.stitch_layers) == 5
    assert {c.name: c.flops for c in chosen.costs()[3:]} == {s.name: s.flops for s in a.scores if s.kept}
    assert a.to_dict()["routes"] == list(a.routes) and len(a.to_dict()["candidates"]) == len(cands)


def test_klas_flops_are_the_kept_networks_in_the_reference_route_mode() -> None:
    """The reference route mode ends stitched DeiT routes without the final norm: KLAS priced them with it."""
    net = seeded_net(route_mode="reference")
    result = klas(net, _batches_of_images(), keep=3)
    chosen = klas_net(net, [s.name for s in result.scores])
    costs = {c.name: c.flops for c in chosen.costs()}
    assert {s.name: s.flops for s in result.scores} == {s.name: costs[s.name] for s in result.scores}


def test_klas_scores_identical_representations_zero() -> None:
    import timm

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(timm.create_model("snnet_tiny_vit_ti"))
    net = snnet.create_snnet(models, labels=["a", "b"])
    scores = klas_scores(net, _batches_of_images())
    same = [s.kl for s in scores if s.src_end == s.dst_start]
    other = [s.kl for s in scores if s.src_end != s.dst_start]
    assert max(same) < 1e-9 < min(other)


def test_select_klas_spreads_over_the_flops_range() -> None:
    def score(name: str, flops: int, kl: float) -> KlasScore:
        return KlasScore(name, 0, 1, 1, 0, flops, kl)

    scores = [score("a", 5, 0.9), score("b", 12, 0.1), score("c", 14, 0.2), score("d", 25, 0.5), score("e", 99, 0.0)]
    assert [s.name for s in select_klas(scores, 2, 0, 30)] == ["b", "d"]  # the best of each half of (0, 30)
    assert [s.name for s in select_klas(scores, 2, 0, 30, spread=False)] == ["b", "c"]  # e is dearer than the range
    assert [s.name for s in select_klas(scores, 3, 0, 30)] == ["a", "b", "d"]
    with pytest.raises(snnet.SnnetError, match="--keep 4"):
        select_klas(scores, 5, 0, 30)


def test_klas_space_saves_and_loads(images: torch.Tensor, tmp_path) -> None:
    net = seeded_net()
    result = klas(net, _batches_of_images(), keep=4)
    chosen = klas_net(net, result.routes)
    chosen.init_stitching([images], max_images=6)
    chosen.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["space"]["routes"] == list(result.routes)
    loaded = snnet.load(tmp_path).eval()
    chosen.eval()
    for s in chosen.space:
        chosen.select(s), loaded.select(s)
        assert torch.equal(chosen(images), loaded(images))


def test_klas_skips_batches_of_two_images() -> None:
    """With two images each one's distribution over the other is certain: every candidate scored KL 0, so
    `--calib-images 2` kept stitches by candidate order alone. Such batches are skipped, like a lone image."""
    net = seeded_net()
    x = _batches_of_images()[0]
    with pytest.raises(snnet.SnnetError, match="at least 3 images"):
        klas_scores(net, [x[:2]])
    assert klas_scores(net, [x[:2], x[2:8]]) == klas_scores(net, [x[2:8]])
    assert len({s.kl for s in klas_scores(net, [x[:3]])}) > 1  # three images already tell candidates apart


def test_cli_klas_calibrates_on_images_of_every_class(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`snnet stitches --select klas --data FOLDER --calib-images 6` scored on the folder's first 6 images, all of
    its first class; they are a choice spread over the classes, drawn with --seed (the same for the same seed)."""
    import snnet.klas as snnet_klas

    from .conftest import TINY_VITS, _folder, _run

    data = _folder(tmp_path / "calib", classes=4, per_class=8)
    seen: list[list[int]] = []
    score = snnet_klas.klas

    def recording(net, batches, *args, **kwargs):
        seen.append([int(y) for _, labels in batches for y in labels])
        return score(net, batches, *args, **kwargs)

    monkeypatch.setattr(snnet_klas, "klas", recording)
    for _ in range(2):
        assert _run(["stitches", "--anchors", ",".join(TINY_VITS[:2]), "--select", "klas", "--data", str(data),
                     "--calib-images", "6", "--keep", "3", "--json"]) == 0
    assert len(seen[0]) == 6 and len(set(seen[0])) > 1, seen[0]  # not six images of class0
    assert sorted(seen[1]) == sorted(seen[0])  # the same images for the same seed
