"""snnet on Ray Serve: two replicas on a local Ray instance, one stitch policy for both.

Start, predict, a pin that reaches both replicas and outlives the stitch policy actor, scale to
three (the new replica takes the pin from its start), /metrics for all replicas, and shutdown
draining requests in flight. One module fixture starts Ray once (it takes most of the time);
everything it started is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import snnet  # noqa: E402
from snnet.deploy.ray import application, merge_metrics  # noqa: E402
from snnet.deploy.serve import ServeConfig  # noqa: E402

from .conftest import TINY_VITS, _png, TOKEN, _synthetic_rows, _until  # noqa: E402

# Ray 2.60 compares look_back_period_s with the deprecated metrics_interval_s (default 10 s) and warns below it;
# setting metrics_interval_s to satisfy it warns of its deprecation instead. The test scales within seconds on
# purpose, so the comparison's warning is silenced here, not by slowing the test.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`look_back_period_s`.*must be greater than:FutureWarning")]
AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_merge_metrics_labels_every_sample_with_its_replica() -> None:
    text = '# HELP snnet_requests_total Requests\n# TYPE snnet_requests_total counter\nsnnet_requests_total{code="200"} 3.0\n'
    merged = merge_metrics({"a": text, "b": text.replace("3.0", "5.0")}).decode()
    samples = {(s.labels["replica"], s.value) for f in text_string_to_metric_families(merged) for s in f.samples}
    assert samples == {("a", 3.0), ("b", 5.0)}


def test_serve_run_builder_parses_optional_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve run snnet.deploy.ray:app ... steady_cv2=0.5`: an optional number (float | None) is a number, not a string
    that ServeConfig then refuses ("--steady-cv2 must be a finite number >= 0, got 0.5")."""
    import snnet.deploy.ray as snray

    got: dict[str, Any] = {}
    monkeypatch.setattr(snray, "application", lambda config, **kw: got.update(config=config, **kw))
    snray.app({"model": "DIR", "steady_cv2": "0.5", "replicas": "2"})
    assert got["config"].steady_cv2 == 0.5 and got["replicas"] == 2
    snray.app({"model": "DIR", "steady_cv2": "none"})
    assert got["config"].steady_cv2 is None


@pytest.mark.parametrize("args, says", [({"max_batch": "abc"}, "max_batch='abc' is not a whole number"),
                                        ({"replicas": "two"}, "replicas='two' is not a whole number"),
                                        ({"slo_ms": "fast"}, "slo_ms='fast' is not a number"),
                                        ({"resize": "flase"}, "resize='flase' is not true or false")])
def test_serve_run_builder_refuses_a_bad_value_in_one_line(monkeypatch: pytest.MonkeyPatch, args: dict[str, str],
                                                          says: str) -> None:
    """`serve run snnet.deploy.ray:app max_batch=abc` raised int()'s bare ValueError, and `resize=flase` was read as
    False (the server refused other image sizes): each is a ServeError naming the setting."""
    import snnet.deploy.ray as snray
    from snnet.errors import ServeError

    monkeypatch.setattr(snray, "application", lambda config, **kw: None)
    with pytest.raises(ServeError, match=re.escape(says)):
        snray.app({"model": "DIR", **args})


def test_serve_run_builder_takes_yaml_numbers_and_booleans(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Serve config file's args are YAML: `replicas: 2`, `resize: false` arrive as an int and a bool, not text."""
    import snnet.deploy.ray as snray

    got: dict[str, Any] = {}
    monkeypatch.setattr(snray, "application", lambda config, **kw: got.update(config=config, **kw))
    snray.app({"model": "DIR", "replicas": 2, "resize": False, "steady_cv2": 0.5, "max_batch": 8})
    c = got["config"]
    assert got["replicas"] == 2 and c.resize is False and c.steady_cv2 == 0.5 and c.max_batch == 8

def test_a_pin_here_while_the_follower_applies_an_older_setting_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica's follower read setting B (version 6) from the policy actor and was applying it when a PUT on
    this replica pinned C and published it (version 7). C landed first, B over it, and the PUT recorded version
    7: the replica served B while counting itself up to date, until the next PUT. No Ray: the actor and the
    model process are stood in for, with the delays that give that order."""
    import asyncio

    from snnet.deploy.ray import RayFleet

    applied: list[str] = []
    state = {"version": 6, "setting": {"stitch": "B", "policy": None}}

    class Remote:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    async def current() -> tuple[int, dict[str, Any]]:
        return state["version"], state["setting"]

    async def publish(setting: dict[str, Any], known: int) -> int:
        await asyncio.sleep(0.05)
        state.update(version=max(state["version"], known) + 1, setting=setting)
        return state["version"]

    class Batcher:
        async def ask(self, op: str, key: Any) -> dict[str, Any]:
            await asyncio.sleep(0.02 if key == "B" else 0.0)  # the follower's older setting lands after the PUT's
            applied.append(key)
            return {"current": key}

    class Svc:
        batcher = Batcher()

    actor = type("Actor", (), {"current": Remote(current), "publish": Remote(publish)})()
    monkeypatch.setattr(RayFleet, "_actor", staticmethod(lambda: actor))
    fleet = RayFleet.__new__(RayFleet)
    fleet.version, fleet.setting, fleet._task, fleet._lock = 5, {"stitch": "A", "policy": None}, None, asyncio.Lock()

    async def main() -> None:
        follow = asyncio.create_task(fleet._follow_once(Svc()))
        await asyncio.sleep(0)  # the follower has read version 6 (B) and is applying it
        await fleet.steer(Svc(), {"stitch": "C", "policy": None})
        await follow
        await fleet._follow_once(Svc())  # the next tick

    asyncio.run(main())
    assert applied[-1] == "C" and fleet.version == state["version"] == 7


def test_a_replica_that_starts_after_a_return_to_auto_follows_the_fleets_policy(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """PUT {"stitch": "auto", "policy": "last-second"}, a pin, then PUT {"stitch": "auto"}: the running replicas
    return to last-second, but the actor held {"stitch": "auto", "policy": None}, and a replica that started
    afterwards (the autoscaler's) applied only that: it stayed on its config's controller, the fleet on two
    policies. The setting published names the policy the "auto" returned to. No Ray: the actor is stood in for;
    each replica's model process is a real engine, asked directly."""
    import asyncio

    from snnet.deploy.ray import RayFleet, StitchPolicy
    from snnet.deploy.serve.engine import _Engine

    torch.manual_seed(0)
    net = snnet.create_snnet(TINY_VITS)
    net.save_pretrained(tmp_path / "net")
    (tmp_path / "results.json").write_text(json.dumps(_synthetic_rows(net)))
    config = ServeConfig(str(tmp_path / "net"), str(tmp_path / "results.json"), max_batch=8)
    policy = StitchPolicy()

    class Remote:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    async def call(fn: Any, *args: Any) -> Any:
        return fn(*args)

    actor = type("Actor", (), {name: Remote(lambda *a, fn=getattr(policy, name): call(fn, *a)) for name in ("current", "publish")})()
    monkeypatch.setattr(RayFleet, "_actor", staticmethod(lambda: actor))

    def replica() -> tuple[RayFleet, Any, _Engine]:
        engine = _Engine.load(config, print)

        class Batcher:
            async def ask(self, op: str, arg: Any = None) -> Any:
                return engine.control(op, arg)

        fleet = RayFleet.__new__(RayFleet)
        fleet.version, fleet.setting, fleet._task, fleet._lock = 0, None, None, asyncio.Lock()
        return fleet, type("Svc", (), {"batcher": Batcher()})(), engine

    first, svc, engine = replica()

    async def main() -> None:
        for setting in ({"stitch": "auto", "policy": "last-second"}, {"stitch": 3, "policy": None}, {"stitch": "auto", "policy": None}):
            await first.steer(svc, setting)
        later, later_svc, later_engine = replica()
        await later._follow_once(later_svc)
        assert engine.policy.name == later_engine.policy.name == "last-second"
        assert later_engine.policy.pinned is None

    asyncio.run(main())

def test_a_pin_outlives_the_policy_actor_that_ray_serve_recreates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stitch policy actor is started again when it dies, empty: a replica that started after that went back to
    its config's policy (the pin lost), and a pin published to the new actor got version 1 again, which a replica
    still counting the dead actor's version 1 took for the setting it had (and did not apply). The replicas give the
    new actor their setting back, and a setting is numbered past the one its replica followed. No Ray: the actor is
    stood in for, and so are the model processes."""
    import asyncio

    from snnet.deploy.ray import RayFleet, StitchPolicy

    actors = [StitchPolicy()]  # the live one last

    class Remote:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    async def call(name: str, *args: Any) -> Any:
        return getattr(actors[-1], name)(*args)

    actor = type("Actor", (), {name: Remote(lambda *a, name=name: call(name, *a)) for name in ("current", "publish", "restore")})()
    monkeypatch.setattr(RayFleet, "_actor", staticmethod(lambda: actor))

    class Batcher:
        stitch: Any = "auto"  # what the model process serves

        async def ask(self, op: str, arg: Any = None) -> dict[str, Any]:
            self.stitch = arg if op == "pin" else "auto"
            return {"current": arg, "policy": "controller"}

    def replica() -> tuple[RayFleet, Any]:
        fleet = RayFleet.__new__(RayFleet)
        fleet.version, fleet.setting, fleet._task, fleet._lock = 0, None, None, asyncio.Lock()
        return fleet, type("Svc", (), {"batcher": Batcher()})()

    async def main() -> None:
        (a, a_svc), (b, b_svc) = replica(), replica()
        await a.steer(a_svc, {"stitch": 3, "policy": None})
        await b._follow_once(b_svc)
        actors.append(StitchPolicy())  # the actor died, and a replica started another
        await b._follow_once(b_svc)
        later, later_svc = replica()  # started after that (the autoscaler's, or one Ray Serve replaced)
        await later._follow_once(later_svc)
        assert later_svc.batcher.stitch == 3 and actors[-1].current() == (1, {"stitch": 3, "policy": None})
        actors.append(StitchPolicy())  # again, and a pin on one replica before the others have followed
        await a.steer(a_svc, {"stitch": 4, "policy": None})
        for fleet, svc in ((b, b_svc), (later, later_svc)):
            await fleet._follow_once(svc)
        assert [svc.batcher.stitch for svc in (a_svc, b_svc, later_svc)] == [4, 4, 4]

    asyncio.run(main())


def test_a_kept_pin_the_redeployed_network_lacks_leaves_the_replica_on_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin outlives a redeploy; one with another network, without that stitch, made the new replica's model process
    refuse it (404) as the replica started: the replica failed to start, again at every retry, and the redeploy
    failed. The replica starts on its config's policy and says why in its log, once. No Ray: the actor and the model
    process are stood in for."""
    import asyncio

    import snnet.deploy.ray as snray
    from snnet.deploy.ray import RayFleet, StitchPolicy
    from snnet.deploy.serve.rejected import Rejected

    policy = StitchPolicy()
    policy.publish({"stitch": 20, "policy": None})  # pinned before the redeploy, in the network before it
    asked: list[Any] = []

    class Remote:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    async def current() -> tuple[int, dict[str, Any] | None]:
        return policy.current()

    class Batcher:
        async def ask(self, op: str, arg: Any = None) -> Any:
            asked.append((op, arg))
            raise Rejected(404, f"no stitch {arg!r} in this network (23 stitches)", "bad_request")

    actor = type("Actor", (), {"current": Remote(current)})()
    monkeypatch.setattr(RayFleet, "_actor", staticmethod(lambda create=True: actor))
    fleet = RayFleet.__new__(RayFleet)
    fleet.version, fleet.setting, fleet._task, fleet._lock = 0, None, None, asyncio.Lock()
    svc = type("Svc", (), {"batcher": Batcher()})()

    async def main() -> None:
        await fleet._follow_once(svc)  # the replica's start
        await fleet._follow_once(svc)  # the next tick: not asked again

    warned: list[str] = []
    monkeypatch.setattr(snray.log, "warning", lambda msg, *args: warned.append(msg % args))
    asyncio.run(main())
    assert asked == [("pin", 20)] and fleet.version == 1 and fleet.setting is None
    assert len(warned) == 1 and "no stitch 20 in this network" in warned[0] and "PUT /stitch" in warned[0]


@pytest.mark.parametrize("looks, gone_at", [(["RUNNING", "DEPLOYING", "RUNNING", None], 4),
                                             (["RUNNING", "DELETING", "DELETING", None], 4),
                                             (["RUNNING", "DELETING", "DEPLOYING"], 3),
                                             ([OSError, "RUNNING", "DELETING", OSError], 4)])
def test_the_stitch_policy_actor_leaves_with_its_application(looks: list[Any], gone_at: int) -> None:
    """The policy actor is detached (Ray Serve's deployment actors are per code version, so a redeploy lost the pin):
    nothing of Ray Serve's stops it, and it stops itself once its application is gone: not there, or deleted and
    deployed again between two looks (the new application on auto, not on this pin). An unreachable controller is
    not gone, unless the application was being deleted (serve shutdown); while it is, the actor gives out no setting
    and takes none back from the replicas still draining. No Ray: Ray Serve's status is stood in for."""
    from snnet.deploy.ray import StitchPolicy

    policy = StitchPolicy()
    policy.publish({"stitch": 4, "policy": None})
    asked: list[Any] = []

    def status() -> Any:
        look = looks[len(asked)]
        asked.append(look)
        if isinstance(look, type):
            raise look("the Serve controller does not answer")
        return look

    left: list[int] = []
    policy.watch(status, lambda: left.append(len(asked)), period_s=0)
    assert left == [gone_at]
    if "DELETING" in looks:
        assert policy.restore(9, {"stitch": 4, "policy": None}) == (0, None)  # a draining replica's pin: not taken back
    else:
        assert policy.current() == (1, {"stitch": 4, "policy": None})


def test_serve_ray_gives_the_replicas_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`snnet serve --ray --admin-token-file admin.token` (relative, as the docs show) passed the token's path on
    as given, while the model's and the results' were made absolute: a replica on another node, or started
    from another working directory, could not read it. No Ray is started: its calls are stood in for."""
    import snnet.deploy.ray as snray
    from snnet.commands import serve as serve_cmd
    from snnet.deploy.serve import Listen

    (tmp_path / "admin.token").write_text(TOKEN)
    monkeypatch.chdir(tmp_path)
    got: dict[str, Any] = {}

    def stop(config: ServeConfig, *args: Any, **kw: Any) -> None:
        got["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(serve, "start", lambda *a, **k: None)
    monkeypatch.setattr(serve, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(snray, "application", stop)
    config = ServeConfig("", admin_token_file="admin.token")
    with pytest.raises(KeyboardInterrupt):
        serve_cmd._serve_ray(config, Listen(port=0), Path("net"), None, 1, None, 2.0)
    assert got["config"].admin_token_file == str(tmp_path / "admin.token") and Path(got["config"].model).is_absolute()


def test_each_replica_bounds_its_shutdown_by_the_deployment_s_graceful_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """`application(graceful_shutdown_s=7)`: Ray waits 7 s for a replica's requests, and the replica's app waits as long
    at most for its model process (it waited up to 10 minutes for one that hangs, and Ray killed it meanwhile). No Ray
    is started: the replica is built as Ray's replica builds it, its app and fleet stood in for."""
    import asyncio

    import snnet.deploy.ray as snray

    deployment = application(ServeConfig("DIR"), graceful_shutdown_s=7)._bound_deployment
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 7
    got: dict[str, Any] = {}
    monkeypatch.setattr(snray, "RayFleet", lambda: None)
    monkeypatch.setattr(snray, "create_app", lambda config, **kw: got.update(kw))
    cls = deployment.func_or_class
    replica = SimpleNamespace()  # not an instance: Ray's ingress class has an async __del__, Ray's to await
    asyncio.run(cls.__init__(replica, *deployment.init_args, **deployment.init_kwargs))  # and an async __init__
    cls.__serve_build_asgi_app__(replica)
    assert got["graceful_shutdown_s"] == 7


def test_serve_ray_gives_the_replicas_its_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """`snnet serve --ray --log-level warning` logged at the default level in every replica: the setting reached neither
    Ray's logging of the deployment nor the app's log in the replica. No Ray is started: the replica is built as Ray's
    replica builds it, and Ray's calls are stood in for."""
    import asyncio
    import logging

    import snnet.deploy.ray as snray
    from snnet.commands import serve as serve_cmd
    from snnet.deploy.serve import Listen
    from snnet.deploy.serve.config import log

    deployment = application(ServeConfig("DIR"), log_level="warning")._bound_deployment
    assert deployment._deployment_config.logging_config["log_level"] == "WARNING"
    assert application(ServeConfig("DIR"), log_level="trace")._bound_deployment._deployment_config.logging_config["log_level"] == "DEBUG"
    before = log.level
    try:
        replica = SimpleNamespace()  # not an instance: Ray's ingress class has an async __del__, Ray's to await
        asyncio.run(deployment.func_or_class.__init__(replica, *deployment.init_args, **deployment.init_kwargs))
        assert log.level == logging.WARNING
    finally:
        log.setLevel(before)
    got: dict[str, Any] = {}
    for name in ("init", "shutdown"):
        monkeypatch.setattr(ray, name, lambda *a, **k: None)
    for name in ("start", "shutdown", "run", "delete"):
        monkeypatch.setattr(serve, name, lambda *a, **k: None)
    monkeypatch.setattr(snray, "application", lambda *a, **k: got.update(k))
    monkeypatch.setattr(signal, "sigwait", lambda signals: signal.SIGTERM)
    serve_cmd._serve_ray(ServeConfig(""), Listen(port=0, log_level="warning"), Path("net"), None, 1, None, 2.0)
    assert got["log_level"] == "warning"


def test_serve_ray_on_port_0_serves_and_says_one_free_port(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`snnet serve --ray --port 0` handed Ray's proxy port 0 (a port of its own choosing, said nowhere) and printed
    "serving ... at http://127.0.0.1:0". The free port is found first, given to Ray and said. No Ray is started."""
    import snnet.deploy.ray as snray
    from snnet.commands import serve as serve_cmd
    from snnet.deploy.serve import Listen

    got: dict[str, Any] = {}
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(serve, "start", lambda *a, http_options, **k: got.update(http_options))
    monkeypatch.setattr(serve, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(serve, "run", lambda *a, **k: None)
    monkeypatch.setattr(snray, "application", lambda *a, **k: None)
    monkeypatch.setattr(signal, "sigwait", lambda signals: signal.SIGTERM)
    monkeypatch.setattr(serve, "delete", lambda *a, **k: None)
    serve_cmd._serve_ray(ServeConfig(""), Listen(port=0), Path("net"), None, 1, None, 2.0)
    assert 0 < got["port"] < 65536
    assert f"at http://127.0.0.1:{got['port']} with" in capsys.readouterr().out

def test_serve_ray_gives_rays_proxy_absolute_tls_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`snnet serve --ray --ssl-certfile cert.pem --ssl-keyfile key.pem` (relative) was checked here, then handed to
    Ray's proxies as given: they read them from their own working directory (a cluster's, joined at $RAY_ADDRESS).
    No Ray is started: its calls are stood in for."""
    import subprocess

    import snnet.deploy.ray as snray
    from snnet.commands import serve as serve_cmd
    from snnet.deploy.serve import Listen

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    got: dict[str, Any] = {}

    def start(*args: Any, http_options: dict[str, Any], **kw: Any) -> None:
        got.update(http_options)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(serve, "start", start)
    with pytest.raises(KeyboardInterrupt):
        serve_cmd._serve_ray(ServeConfig(""), Listen(port=0, ssl_certfile="cert.pem", ssl_keyfile="key.pem"), Path("net"),
                             None, 1, None, 2.0)
    assert got["ssl_certfile"] == str(tmp_path / "cert.pem") and got["ssl_keyfile"] == str(tmp_path / "key.pem")

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServeConfig]]:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ray")
    net = snnet.create_snnet(TINY_VITS)
    net.save_pretrained(folder / "net")
    (folder / "results.json").write_text(json.dumps(_synthetic_rows(net)))
    (folder / "token").write_text(TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # inline_max_images=0: the tests below hold requests in flight by stopping the model processes, and a lone
        # request to an idle replica would otherwise run in its server process (the latency path)
        config = ServeConfig(str(folder / "net"), str(folder / "results.json"), max_batch=4, admin_token_file=str(folder / "token"),
                             inline_max_images=0)
        # two replicas, three when each has more than one request in flight (quickly: a test)
        serve.run(application(config, replicas=2, max_replicas=3, target_ongoing=1,
                              autoscaling={"upscale_delay_s": 1.0, "look_back_period_s": 2.0}), name="snnet", route_prefix="/")
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas(url: str, path: str, want: int, seconds: float = 120) -> dict[str, Any]:
    """Ask ``path`` until ``want`` distinct replicas have answered; their last answers by replica."""
    seen: dict[str, Any] = {}
    _until(lambda: len(seen.update({(r := httpx.get(url + path, timeout=60).json())["replica"]: r}) or seen) >= want,
           seconds, f"{want} replicas answering {path}")
    return seen


def test_two_replicas_predict_and_a_pin_reaches_both(cluster: tuple[str, ServeConfig]) -> None:
    url, _ = cluster
    r = httpx.post(url + "/predict", content=_png(), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    assert httpx.put(url + "/stitch", json={"stitch": 3}, timeout=60).status_code == 401  # steering needs the token
    r = httpx.put(url + "/stitch", json={"stitch": 3}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["current"]["id"] == 3

    def both_pinned() -> bool:
        answers = _replicas(url, "/stitch", 2)
        return all(a["mode"] == "pinned" and a["current"]["id"] == 3 for a in answers.values())

    _until(both_pinned, 60, "the pin reached both replicas")
    with ThreadPoolExecutor(8) as pool:  # requests spread over both replicas: all on the pinned stitch
        served = list(pool.map(lambda k: httpx.post(url + "/predict", content=_png(seed=k), timeout=60).json()["stitch"]["id"], range(16)))
    assert set(served) == {3}
    text = httpx.get(url + "/metrics", timeout=60).text  # every replica's metrics, whichever replica answers
    pinned = {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) if f.name == "snnet_stitch_pinned"
              for s in f.samples}
    assert len(pinned) == 2


def test_a_pin_outlives_the_stitch_policy_actor(cluster: tuple[str, ServeConfig]) -> None:
    """The stitch policy actor killed: the next replica to call starts another, empty (no restart of Ray's own), and the replicas
    give it the pin back: they still serve it, GET /stitch says pinned, and the new actor holds it for a replica
    that starts later. Before, the new actor held no setting: replicas started from then on served automatically."""
    url, _ = cluster
    assert httpx.put(url + "/stitch", json={"stitch": 4}, headers=AUTH, timeout=60).status_code == 200
    _until(lambda: all(a["mode"] == "pinned" and a["current"]["id"] == 4 for a in _replicas(url, "/stitch", 2).values()),
           60, "the pin reached both replicas")
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("::stitch_policy")]
    assert len(named) == 1, named
    name, namespace = named[0]["name"], named[0]["namespace"]
    dead = ray.get_actor(name, namespace=namespace)
    ray.kill(dead)

    def restored() -> bool:
        try:
            actor = ray.get_actor(name, namespace=namespace)
            if actor._actor_id == dead._actor_id:
                return False  # not recreated yet
            version, setting = ray.get(actor.current.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError):  # not there yet, or not ready
            return False
        return setting is not None and setting["stitch"] == 4

    _until(restored, 60, "the new stitch policy actor holds the pin")
    answers = _replicas(url, "/stitch", 2)
    assert {a["mode"] for a in answers.values()} == {"pinned"} and {a["current"]["id"] for a in answers.values()} == {4}
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda k: httpx.post(url + "/predict", content=_png(seed=k), timeout=60).json()["stitch"]["id"], range(8)))
    assert set(served) == {4}


def test_a_pin_survives_a_redeploy_of_the_application(cluster: tuple[str, ServeConfig]) -> None:
    """`serve.run` again (or `serve deploy` with changed args: a new code version) replaces every replica. Ray Serve
    names a deployment-scoped actor by code version, so the new replicas found a new, empty stitch policy actor and
    served automatically: the operator's pin was lost without a word. The policy actor is the application's, not
    the code version's: the new replicas start on the pin (and the one actor is all there is)."""
    url, config = cluster
    assert httpx.put(url + "/stitch", json={"stitch": 5}, headers=AUTH, timeout=60).status_code == 200
    _until(lambda: {a["current"]["id"] for a in _replicas(url, "/stitch", 2).values()} == {5}, 60,
           "the pin reached both replicas")
    before = _replicas(url, "/stitch", 2)
    # serve.run without a version: a new code version, as `serve deploy` with a changed config gives
    serve.run(application(config, replicas=2, max_replicas=3, target_ongoing=1,
                          autoscaling={"upscale_delay_s": 1.0, "look_back_period_s": 2.0}), name="snnet", route_prefix="/")
    after = _replicas(url, "/stitch", 2)
    assert not set(after) & set(before), "the redeploy did not replace the replicas"
    assert {a["mode"] for a in after.values()} == {"pinned"} and {a["current"]["id"] for a in after.values()} == {5}
    assert len([a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("::stitch_policy")]) == 1


def test_ray_scales_on_requests_in_flight_and_the_new_replica_takes_the_pin(cluster: tuple[str, ServeConfig]) -> None:
    url, _ = cluster
    assert httpx.put(url + "/stitch", json={"stitch": 2}, headers=AUTH, timeout=60).status_code == 200
    models = {h["model_pid"] for h in _replicas(url, "/health", 2).values()}
    for pid in models:  # stalled models: requests stay in flight, over the target of one per replica
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, url + "/predict", content=_png(seed=k), timeout=300) for k in range(8)]
            _until(lambda: serve.status().applications["snnet"].deployments["snnet"].replica_states.get("RUNNING", 0) >= 3
                   or any(f.done() for f in futures), 300, "Ray added a third replica")
            for pid in models:
                os.kill(pid, signal.SIGCONT)
            assert {f.result().status_code for f in futures} == {200}
    finally:
        for pid in models:
            os.kill(pid, signal.SIGCONT)
    answers = _replicas(url, "/stitch", 3, seconds=300)
    assert {a["current"]["id"] for a in answers.values()} == {2} and {a["mode"] for a in answers.values()} == {"pinned"}
    assert httpx.put(url + "/stitch", json={"stitch": "auto"}, headers=AUTH, timeout=60).status_code == 200
    _until(lambda: {a["mode"] for a in _replicas(url, "/stitch", 3).values()} == {"auto"}, 60, "auto on every replica")


def test_shutdown_drains_requests_in_flight(cluster: tuple[str, ServeConfig]) -> None:
    """Requests held by stopped model processes when the application is deleted are still answered."""
    url, _ = cluster
    models = {h["model_pid"] for h in _replicas(url, "/health", 3).values()}
    for pid in models:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, url + "/predict", content=_png(seed=k), timeout=120) for k in range(6)]
            time.sleep(2.0)
            assert not any(f.done() for f in futures)
            deleting = pool.submit(serve.delete, "snnet")
            time.sleep(2.0)
            for pid in models:
                os.kill(pid, signal.SIGCONT)
            codes = [f.result().status_code for f in futures]
            deleting.result(timeout=180)
    finally:
        for pid in models:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert codes == [200] * 6
    _until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in models), 120, "model processes stopped")
    # the policy actor is detached (it outlives a code version): it leaves with the application, not with Ray
    _until(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("::stitch_policy")],
           30, "the stitch policy actor left with the application")
