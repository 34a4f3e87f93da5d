"""Replicas of one SN-Net server on Ray Serve, all following one stitch policy.

Each replica is the same server as ``snnet serve`` (:func:`snnet.deploy.serve.create_app`: the
routes, the body limits, the admin token) with a model process of its own, so each has its own
batcher and controller and decides from its own queue. Ray Serve routes requests to replicas and
scales them (``autoscaling_config`` on ongoing requests per replica); what Ray does not know about
is the stitch, and that is what this module adds:

* :class:`StitchPolicy` — a detached actor named after the application and its deployment (one per
  application) that holds the shared setting: auto (with the policy's name) or a pinned stitch,
  with a version number, and each replica's latest metrics. Not one of Ray Serve's deployment
  actors: Serve names those by code version, so every redeploy (``serve deploy`` with changed
  args, ``serve run`` again) started an empty one and the new replicas dropped the pin. The first
  replica to need it creates it (``get_if_exists``); it leaves when its application is deleted
  (``serve delete``, ``serve shutdown``), which it watches for. If it dies, the next replica to
  call starts another, empty: the replicas hold the setting they follow, and the first to reach
  the new actor gives it theirs back (:meth:`StitchPolicy.restore`), so a pin outlives the actor;
* each replica applies the setting when it starts (a replica added by the autoscaler serves the
  pin from its first request) and checks for a new version twice a second; a ``PUT /stitch`` on
  any replica is applied there, then published, so it reaches every replica within that time;
* ``GET /metrics`` on any replica reports every live replica's metrics, each sample labelled with
  its ``replica``.

Run it with ``snnet serve --ray --replicas N [--max-replicas M]`` or Ray's own command line:
``serve run snnet.deploy.ray:app model=DIR results=FILE replicas=2`` (any :class:`ServeConfig`
field as ``name=value``). On a multi-node cluster (KubeRay), the same application runs from a
RayService manifest: see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import typing
from dataclasses import fields
from typing import Any, Callable

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve
from ray.serve.schema import ApplicationStatus

from ..errors import ServeError
from .serve import ServeConfig, Service, create_app
from .serve.app import apply_setting
from .serve.config import log as serve_log
from .serve.rejected import Rejected

__all__ = ["RayFleet", "StitchPolicy", "StitchPolicyActor", "app", "application", "merge_metrics"]

log = logging.getLogger("ray.serve")
FOLLOW_S = 0.5  # how often a replica checks the shared setting and reports its metrics
FRESH_S = 10.0  # metrics of a replica that has not reported for this long are left out (it is gone)
WATCH_S = 1.0  # how often the policy actor asks Ray Serve whether its application is still there
POLICY_NAMESPACE = "snnet"  # the Ray namespace of the policy actors


def policy_actor_name(app: str, deployment: str) -> str:
    """The name of the stitch policy actor of ``deployment`` in application ``app``: by application, not by
    code version, so the replicas of a redeploy find the one the replicas before them followed."""
    return f"{app}::{deployment}::stitch_policy"


class StitchPolicy:
    """The setting every replica follows, and every replica's latest metrics (a Ray actor). Given its ``app``
    (the actor the replicas start), it watches that application and leaves with it (:meth:`watch`)."""

    def __init__(self, app: str | None = None) -> None:
        self.version = 0
        self.setting: dict[str, Any] | None = None
        self.reports: dict[str, tuple[float, str]] = {}
        self.ending = False  # its application is being deleted: it gives out no setting, and takes none back
        if app is not None:
            threading.Thread(target=self.watch, args=(lambda: _app_status(app), _leave), name="snnet-watch",
                             daemon=True).start()

    def watch(self, status: Callable[[], str | None], leave: Callable[[], None], period_s: float = WATCH_S) -> None:
        """Every ``period_s``, ``status()`` of the application (None: not there, or Ray Serve is not); ``leave()``
        once it is gone. It is detached (it outlives a code version, so nothing of Ray Serve's stops it): it
        stops itself. Gone is not there, or no longer being deleted after it was (deleted and deployed again
        between two looks: the new application starts on auto, not on this pin). A Serve controller that does
        not answer is not gone (Ray restarts it), unless the application was being deleted (serve shutdown)."""
        while True:
            time.sleep(period_s)
            try:
                now = status()
            except Exception:  # noqa: BLE001 - the controller restarting, or gone with serve shutdown
                if not self.ending:
                    continue
                now = None
            if now is None or (self.ending and now != ApplicationStatus.DELETING):
                leave()
                return
            if now == ApplicationStatus.DELETING and not self.ending:
                # replicas still draining keep calling it: they get no setting, and cannot give theirs back
                self.ending, self.version, self.setting = True, 0, None

    def publish(self, setting: dict[str, Any], known: int = 0) -> int:
        """A new setting, from a replica that followed up to version ``known``: it is numbered past both (an actor
        started again after one died counts from 0 again, and a replica still holding the dead actor's version, 3 say,
        took this actor's 3 for the one it had and did not apply it)."""
        self.version = max(self.version, known) + 1
        self.setting = dict(setting)
        return self.version

    def restore(self, version: int, setting: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """A replica's setting, for an actor that has an older one (started again after one died: it has
        none); the setting then. A pin outlives the actor: the replicas follow it, and new ones start on it."""
        if version > self.version and not self.ending:
            self.version, self.setting = version, dict(setting)
        return self.version, self.setting

    def current(self) -> tuple[int, dict[str, Any] | None]:
        return self.version, self.setting

    def report(self, replica: str, metrics: str) -> None:
        self.reports[replica] = (time.time(), metrics)

    def leave(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def metrics(self) -> dict[str, str]:
        now = time.time()
        return {r: text for r, (t, text) in self.reports.items() if now - t <= FRESH_S}


StitchPolicyActor = ray.remote(StitchPolicy)


def _app_status(app: str) -> str | None:
    """Ray Serve's status of application ``app``; None if it has none (deleted, or Serve shut down)."""
    found = serve.status().applications.get(app)
    return found.status if found is not None else None


def _leave() -> None:
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Several servers' Prometheus texts as one, every sample labelled with its ``replica``."""
    families: dict[str, Any] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, type(fam)(fam.name, fam.documentation, fam.type, fam.unit))
            merged.samples += [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar) for s in fam.samples]

    class _Merged:
        def collect(self) -> Any:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


class RayFleet:
    """This replica's part of the fleet (see :class:`snnet.deploy.serve.app.Fleet`)."""

    def __init__(self) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        self.version = 0  # of the setting this replica applied last
        self.setting: dict[str, Any] | None = None  # that setting, for an actor that lost it (StitchPolicy.restore)
        self._task: asyncio.Task | None = None
        # a setting is applied and its version recorded as one step: a PUT here while the follower applied an
        # older setting read from the actor could otherwise land first, the older one over it, and the PUT's
        # newer version be recorded: this replica on the older stitch, counting itself up to date
        self._lock = asyncio.Lock()

    @staticmethod
    def _actor(create: bool = True) -> Any:
        """The application's policy actor, looked up each time (it may have died and been started again); started
        here if there is none (``get_if_exists``: one however many replicas ask at once), unless not ``create``."""
        context = serve.get_replica_context()
        name = policy_actor_name(context.app_name, context.deployment)
        if not create:
            return ray.get_actor(name, namespace=POLICY_NAMESPACE)
        return StitchPolicyActor.options(name=name, namespace=POLICY_NAMESPACE, lifetime="detached", get_if_exists=True,
                                         num_cpus=0).remote(context.app_name)

    async def start(self, svc: Service) -> None:
        await self._follow_once(svc)
        self._task = asyncio.get_running_loop().create_task(self._follow(svc), name="snnet-follow")

    async def _follow_once(self, svc: Service) -> None:
        async with self._lock:
            actor = self._actor()
            version, setting = await actor.current.remote()
            if version < self.version and self.setting is not None:
                # an actor behind this replica's setting: started again after one died, empty (replicas started from then
                # on took their config's policy: the pin was lost). It gets ours back, unless another gave it a newer one
                version, setting = await actor.restore.remote(self.version, self.setting)
            if version != self.version and setting is not None:
                try:
                    await apply_setting(svc, setting)
                    self.setting = setting
                except Rejected as e:
                    if e.status not in (400, 404):
                        raise  # the model process not answering: asked again at the next tick
                    # a setting this network does not have: a pin kept through a redeploy with another network. The
                    # replica serves on its config's policy (refusing to start would fail the redeploy, at every retry)
                    log.warning("snnet: the fleet's stitch setting %s does not apply to this replica's network (%s): "
                                "it serves on its configured policy; send PUT /stitch to set one for every replica",
                                setting, e.reason)
            self.version = version

    async def _follow(self, svc: Service) -> None:
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                await self._follow_once(svc)
                await self._actor().report.remote(self.name, svc.metrics.render().decode())
            except Exception:  # noqa: BLE001 - the actor is being started again: try again at the next tick
                log.warning("snnet: could not reach the stitch policy actor; retrying", exc_info=True)

    async def steer(self, svc: Service, setting: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            answer = await apply_setting(svc, setting)  # refused here (an unknown stitch: 404): published nowhere
            if setting["stitch"] == "auto":
                # the policy it returned to, by name: a replica that starts later applies only the latest setting, and
                # "auto" without one would leave it on its config's policy while the others went back to theirs
                setting = {**setting, "policy": answer["policy"]}
            self.version = await self._actor().publish.remote(setting, self.version)
            self.setting = setting
        return answer

    async def metrics(self, svc: Service) -> bytes:
        actor = self._actor()
        await actor.report.remote(self.name, svc.metrics.render().decode())
        return merge_metrics(await actor.metrics.remote())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self._actor(create=False).leave.remote(self.name)  # not started again by a replica that stops
        except Exception:  # noqa: BLE001 - the application is going away with its actor
            pass


@serve.ingress()
class SnnetReplica:
    """One replica: the snnet server app, with its own model process, following the shared policy."""

    def __init__(self, config_json: str, graceful_shutdown_s: float, log_level: str = "info") -> None:
        from uvicorn.config import LOG_LEVELS

        self.config = ServeConfig.from_json(config_json)
        self.graceful_shutdown_s = graceful_shutdown_s  # the deployment's: the replica waits for its model process no longer
        serve_log.setLevel(LOG_LEVELS[log_level])  # the app's log (uvicorn's logger, which no uvicorn configures here)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.config, fleet=RayFleet(), freeze=True, graceful_shutdown_s=self.graceful_shutdown_s)


def application(config: ServeConfig, replicas: int = 1, max_replicas: int | None = None, target_ongoing: float = 2.0,
                graceful_shutdown_s: float = 60.0, autoscaling: dict[str, Any] | None = None,
                log_level: str = "info") -> serve.Application:
    """The Ray Serve application: ``replicas`` replicas, or from ``replicas`` up to ``max_replicas``
    scaled by Ray on ongoing requests per replica (``target_ongoing``; ``autoscaling``: more of
    Ray's ``autoscaling_config``). Each replica reserves ``config.threads`` CPUs for its model
    process. On shutdown Ray waits up to ``graceful_shutdown_s`` for the requests in flight.
    ``log_level`` (uvicorn's names, as ``--log-level``): the replicas' logs, Ray's and the app's."""
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ServeError(f"need replicas >= 1 and max replicas >= replicas (got {replicas}, {max_replicas})")
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                          "target_ongoing_requests": target_ongoing, "upscale_delay_s": 3.0, **(autoscaling or {})}}
    deployment = serve.deployment(
        SnnetReplica, name="snnet",
        ray_actor_options={"num_cpus": config.threads},
        max_ongoing_requests=max(8, config.max_queue),  # the server's own bound (503 with Retry-After) decides
        graceful_shutdown_timeout_s=graceful_shutdown_s,
        logging_config={"log_level": "DEBUG" if log_level == "trace" else log_level.upper()},  # Ray has no "trace"
        **scaling,
    )
    return deployment.bind(config.to_json(), graceful_shutdown_s, log_level)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(name: str, text: str, kind: Any) -> Any:
    """``text`` of the ``serve run`` setting ``name`` as ``kind`` (bool, int, float or str), or a one-line
    :class:`ServeError` (int("abc") raised a bare ValueError; "resize=flase" was read as False)."""
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ServeError(f"{name}={text!r} is not true or false: give one of {', '.join(_TRUE + _FALSE)}")
        return text.lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ServeError(f"{name}={text!r} is not {'a whole number' if kind is int else 'a number'}: "
                             f"give e.g. {name}={'2' if kind is int else '0.5'}") from None
    return text


def app(args: dict[str, Any]) -> serve.Application:
    """The application builder for ``serve run snnet.deploy.ray:app model=DIR [name=value ...]``:
    any :class:`ServeConfig` field, and ``replicas``, ``max_replicas``, ``target_ongoing``."""
    # as text: a Serve config file's YAML args may be numbers or booleans (replicas: 2, resize: false)
    args = {name: str(value) for name, value in args.items()}
    scaling = {k: args.pop(k) for k in ("replicas", "max_replicas", "target_ongoing") if k in args}
    hints = typing.get_type_hints(ServeConfig)
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ServeError(f"unknown setting(s) {', '.join(unknown)}: use the fields of ServeConfig ({', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, text in args.items():
        kind = hints[name]
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        if kinds and type(None) in typing.get_args(kind):  # an optional setting: "none" (or nothing) is None
            if text.lower() in ("none", "null", ""):
                values[name] = None
                continue
            kind = kinds[0] if len(kinds) == 1 else str
        values[name] = _parse(name, text, kind)
    return application(ServeConfig(**values), replicas=_parse("replicas", scaling.get("replicas", "1"), int),
                       max_replicas=_parse("max_replicas", scaling["max_replicas"], int) if "max_replicas" in scaling else None,
                       target_ongoing=_parse("target_ongoing", scaling.get("target_ongoing", "2.0"), float))
