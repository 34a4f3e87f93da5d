"""snnet serve's latency path: a lone small request runs in the server process (snnet.deploy.serve.inline).

The server runs in-process as in tests/test_serve.py (uvicorn in a thread, the model process a
real subprocess) on a tiny saved network with a synthetic latency table. Nothing here times the
machine: which path a request took is read from its answer (``inline``) and from /metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from snnet.deploy import loadgen  # noqa: E402
from snnet.deploy.serve import EngineInfo, ServeConfig, Service  # noqa: E402
from snnet.deploy.serve.batcher import TELL_INLINE_S  # noqa: E402
from snnet.deploy.serve.engine import probabilities  # noqa: E402
from snnet.deploy.serve import inline  # noqa: E402
from snnet.deploy.serve.inline import RUNTIMES, InlineModel, RouteGraphs  # noqa: E402
from snnet.deploy.serve.upstream import stamped  # noqa: E402
from snnet.errors import ServeError  # noqa: E402
from snnet.results import read_rows  # noqa: E402

from .conftest import TOKEN, _png, _until  # noqa: E402
from .test_serve import _multipart, _Server, saved  # noqa: E402,F401 - saved: the tiny network and its results, a fixture

AUTH = {"authorization": f"Bearer {TOKEN}"}


def _service(saved: tuple[Path, Path], **kw: Any) -> Service:
    model, results = saved
    kw.setdefault("inline_max_ms", 1e6)  # every stitch of the synthetic table may run inline
    return Service.load(ServeConfig(str(model), str(results), max_batch=8, admin_token_file=str(model.parent / "token"), **kw))


@pytest.fixture(scope="module")
def server(saved: tuple[Path, Path]) -> Iterator[_Server]:
    with _Server(_service(saved)) as s:
        yield s


@pytest.fixture
def client(server: _Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _metric(client: httpx.Client, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_a_lone_request_runs_inline_with_the_batched_paths_answer(server: _Server, client: httpx.Client) -> None:
    before = _metric(client, "snnet_inline_requests_total")
    image, other = _png(seed=3), _png(seed=4)
    for stitch in (1, 3):  # pinned: the two answers below come from one stitch whatever the policy would do
        assert client.put("/stitch", json={"stitch": stitch}, headers=AUTH).status_code == 200
        first = client.post("/predict", content=image, headers={"content-type": "image/png"}).json()  # eager; traced after
        alone = client.post("/predict", content=image, headers={"content-type": "image/png"}).json()  # the traced graph
        np.testing.assert_allclose(first["predictions"][0]["probs"], alone["predictions"][0]["probs"], rtol=1e-5, atol=1e-6)
        assert first["inline"] is True and alone["inline"] is True and alone["batch"]["id"] is None and alone["batch"]["size"] == 1
        assert alone["batch"]["reason"].startswith("inline") and alone["latency_ms"] > 0 and alone["stitch"]["id"] == stitch
        # two images are more than --inline-max-images (1): the model process runs them
        body, ctype = _multipart([("file", image, "a.png"), ("file", other, "b.png")])
        batched = client.post("/predict", content=body, headers={"content-type": ctype}).json()
        assert batched["inline"] is False and batched["batch"]["id"] is not None and batched["stitch"]["id"] == stitch
        np.testing.assert_allclose(alone["predictions"][0]["probs"], batched["predictions"][0]["probs"], rtol=1e-5, atol=1e-6)
    assert client.put("/stitch", json={"stitch": "auto"}, headers=AUTH).status_code == 200
    assert _metric(client, "snnet_inline_requests_total") == before + 4
    # the model process heard of the inline request (its policy saw its arrival and latency)
    _until(lambda: client.get("/health").json()["inline"] >= 1, 30, "the model process counts inline requests")


def test_a_pinned_stitch_is_honoured_inline(server: _Server, client: httpx.Client) -> None:
    try:
        for stitch in (0, 2):
            assert client.put("/stitch", json={"stitch": stitch}, headers=AUTH).status_code == 200
            r = client.post("/predict", content=_png(seed=stitch), headers={"content-type": "image/png"}).json()
            assert r["inline"] is True and r["stitch"]["id"] == stitch and r["mode"] == "pinned"
    finally:
        assert client.put("/stitch", json={"stitch": "auto"}, headers=AUTH).json()["mode"] == "auto"
    time.sleep(4 * TELL_INLINE_S)  # the model process has heard of the requests above (it decides again on them in auto mode)
    current = client.get("/stitch").json()["current"]["id"]  # the model process's next batch's stitch: a lone request's too
    r = client.post("/predict", content=_png(seed=1), headers={"content-type": "image/png"}).json()
    assert r["inline"] is True and r["mode"] == "auto" and r["stitch"]["id"] == current


@pytest.mark.parametrize("stamping", [False, True], ids=["plain-protocol", "stamping-protocol"])
def test_under_concurrent_requests_batches_still_form(saved: tuple[Path, Path], server: _Server, stamping: bool) -> None:
    """16 closed-loop clients of one-image requests (the load generator of the benchmarks): the model
    process's batches carry them; a request runs inline only when it finds the server idle. Under
    `snnet serve` (the stamping protocol) the requests read and waiting say so; under a plain
    protocol, the requests that start during one turn of the event loop."""
    bodies = [loadgen.make_body("/predict", raw=_png(seed=k)) for k in range(16)]
    if stamping:
        svc = _service(saved)  # its own protocol class: the module's server already claimed StampedProtocol.upstream
        with _Server(svc, http=stamped(svc.upstream)) as s:
            results = loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", s.port, bodies, 16, 1.5, warmup=0.3))
    else:
        results = loadgen.run(lambda: loadgen.closed_loop("127.0.0.1", server.port, bodies, 16, 1.5, warmup=0.3))
    assert results and all(r.status == 200 for r in results)
    answers = [json.loads(r.body) for r in results]
    batched = [a for a in answers if not a["inline"]]
    assert len(batched) > 0.8 * len(answers), f"{len(answers) - len(batched)} of {len(answers)} ran inline"
    assert np.mean([a["batch"]["size"] for a in batched]) > 2


def test_off_when_set_to_zero_or_when_no_stitch_is_short_enough(saved: tuple[Path, Path]) -> None:
    service = _service(saved, inline_max_images=0)
    assert service.inline is None
    with _Server(service) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/predict", content=_png(), headers={"content-type": "image/png"}).json()
        assert r["inline"] is False and r["batch"]["id"] is not None
        assert _metric(c, "snnet_inline_requests_total") == 0
    rows = read_rows(json.loads(saved[1].read_text()))
    info = EngineInfo(rows, (3, 32, 32), {}, 0)
    fastest = min(r.latency_by_batch[0].latency_ms for r in rows)
    assert InlineModel.load(ServeConfig(str(saved[0]), inline_max_ms=fastest / 2), info) is None  # no copy loaded
    loaded = InlineModel.load(ServeConfig(str(saved[0]), inline_max_ms=fastest), info)
    assert loaded is not None and set(loaded.rungs) == {r.id for r in rows if r.latency_by_batch[0].latency_ms <= fastest}


@pytest.mark.parametrize("bad", [{"inline_max_images": -1}, {"inline_max_images": 9}, {"inline_max_ms": 0}])
def test_bad_inline_settings_are_refused_in_one_line(bad: dict) -> None:
    with pytest.raises(ServeError, match="--inline-max"):
        ServeConfig("m", max_batch=8, **bad)


@pytest.mark.parametrize("runtimes", [RUNTIMES, ("torchscript",)], ids=["onnxruntime-first", "torchscript"])
def test_route_graphs_compile_a_stitch_after_its_first_eager_answer(saved: tuple[Path, Path], runtimes: tuple[str, ...]) -> None:
    import torch

    from snnet.model import StitchedNet

    pytest.importorskip("onnxruntime")  # snnet[export], part of the dev install
    net = StitchedNet.from_pretrained(str(saved[0])).eval()
    graphs = RouteGraphs(net, max_images=2, runtimes=runtimes)
    x = torch.randn(1, *net.input_size)
    stitches = [0, len(net.space) - 1]
    for s in stitches:
        np.testing.assert_allclose(graphs.probabilities(s, x.numpy()), probabilities(net, s, x), rtol=1e-6)  # eager, and noted
    assert graphs.graphs == {} and sorted(graphs.pending) == stitches
    graphs.trace_pending()
    assert sorted(graphs.graphs) == stitches and graphs.pending == []
    assert graphs.runtime == {s: runtimes[0] for s in stitches}
    for s in stitches:  # a graph per stitch, each the stitch's own route, at one and at two images
        for n in (1, 2):
            xs = torch.randn(n, *net.input_size)
            np.testing.assert_allclose(graphs.probabilities(s, xs.numpy()), probabilities(net, s, xs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(graphs.probabilities(stitches[0], x.numpy()), graphs.probabilities(stitches[1], x.numpy()))


def test_a_graph_that_fails_or_disagrees_leaves_its_stitch_eager(saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from snnet.model import StitchedNet

    net = StitchedNet.from_pretrained(str(saved[0])).eval()
    x = torch.randn(1, *net.input_size)
    graphs = RouteGraphs(net)
    graphs.probabilities(0, x.numpy())
    graphs.trace_pending()

    def broken(*_: Any) -> Any:
        raise RuntimeError("a graph that fails")

    graphs.graphs[0] = broken
    np.testing.assert_allclose(graphs.probabilities(0, x.numpy()), probabilities(net, 0, x), rtol=1e-6)  # eager answers
    assert 0 not in graphs.graphs and 0 in graphs.eager
    graphs.probabilities(0, x.numpy())
    assert graphs.pending == []  # not traced again

    wrong = RouteGraphs(net)
    # graphs with other answers, in both runtimes
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (lambda inp: torch.zeros(len(inp), 10)))
    monkeypatch.setattr(inline, "_onnx", lambda *a: (lambda inp: np.full((len(inp), 10), 0.1, np.float32)))
    wrong.probabilities(1, x.numpy())
    wrong.trace_pending()
    assert wrong.graphs == {} and wrong.eager == {1}


def test_a_stitch_onnx_cannot_export_runs_as_its_torchscript_graph(saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from snnet.model import StitchedNet

    net = StitchedNet.from_pretrained(str(saved[0])).eval()
    x = torch.randn(1, *net.input_size)

    def no_export(*_: Any, **__: Any) -> None:
        raise RuntimeError("an operator the exporter lacks")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    graphs = RouteGraphs(net)
    graphs.trace(0)
    assert graphs.runtime == {0: "torchscript"}
    np.testing.assert_allclose(graphs.probabilities(0, x.numpy()), probabilities(net, 0, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown runtime"):
        RouteGraphs(net, runtimes=("tensorrt",))


def test_an_onnx_graph_answers_what_its_array_holds_now_in_a_reused_buffer_or_a_new_one(saved: tuple[Path, Path]) -> None:
    """OrtGraph binds an array's memory once and reads it at each run (the server decodes every lone
    request into one buffer): new contents, a new array of the same shape, another size, a strided view."""
    import torch

    from snnet.model import StitchedNet

    pytest.importorskip("onnxruntime")
    net = StitchedNet.from_pretrained(str(saved[0])).eval()
    graphs = RouteGraphs(net, max_images=2)
    graphs.trace(0)
    assert graphs.runtime == {0: "onnxruntime"}
    graph, rng = graphs.graphs[0], np.random.default_rng(0)
    buffer = np.empty((4, *net.input_size), np.float32)
    answers = []
    for _ in range(3):
        buffer[...] = rng.standard_normal(buffer.shape, np.float32)
        for x in (buffer[:1], buffer[:2], buffer[::2], rng.standard_normal((2, *net.input_size), np.float32)):
            got = graph(x)
            np.testing.assert_allclose(got, probabilities(net, 0, torch.from_numpy(np.array(x))), rtol=1e-5, atol=1e-6)
            answers.append(got)
    assert not np.shares_memory(answers[0], answers[4])  # an answer is the caller's: the next run does not overwrite it
    np.testing.assert_allclose(answers[0].sum(-1), 1.0, rtol=1e-5)
