"""The same serving on a Ray cluster: ``heimdall.serving.app`` in Ray Serve replicas.

Each replica is a :class:`Replica`: it builds the app with ``create_app(self)`` through
``serve.ingress`` (late bound: ``__serve_build_asgi_app__`` runs on the replica after
``__init__``, so ``app.state.backend`` is the replica itself; Serve's usual
``serve.ingress(app)`` would pickle a frozen copy of a module-level app that no replica can reach).
Batching is Ray's ``serve.batch`` (counted in samples); the single-machine Batcher is not used.

Following the alias: every replica holds its own ``Follower`` (poll every ``poll_interval_s``,
jittered), and a verified webhook that reaches one replica is fanned out to all of them through
a small named actor (``_Notices``): the receiving replica bumps its counter, and every replica
long-polls it and wakes its follower. We chose this over the controller pushing ``reconfigure``
because it needs no driver: an app started with ``serve run heimdall.serving.ray:app_builder``
or a Serve config file follows the alias just as ``heimdall serve --ray`` does, each replica
checks the bytes it loads itself, and a replica restarted after a node failure loads whatever the
alias names then (a pushed user_config would have to be kept current by a process that may be
gone). Polling stays on: a lost delivery or a lost notice costs at most one interval.

During a switch replicas move one by one, so a response may come from either version, but each
request keeps the ``Served`` it started with (a batch is grouped by it), so every response
names its own version. Replicas spread one per node (``max_replicas_per_node=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import structlog
from pydantic import SecretStr
from ray import serve

from heimdall.config import Settings, load_settings, redact_uri
from heimdall.errors import ConfigError, HeimdallError
from heimdall.retry import Backoff, wait_for
from heimdall.serving.app import create_app
from heimdall.serving.backend import Inferred, Limits, Outputs, Served, infer_pinned
from heimdall.serving.follower import Follower
from heimdall.serving.metrics import Metrics
from heimdall.serving.server import Ready

log = structlog.get_logger(__name__)

APP_NAME = "heimdall"
NOTICE_WAIT_S = 30.0  # a long poll on the notices actor; a bump answers it at once
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica is built with (pickled into the deployment by Ray)."""

    uri: str
    settings: Settings
    limits: Limits
    poll_interval_s: float
    providers: tuple[str, ...] | None
    webhook_secret: SecretStr | None  # kept wrapped: a repr or log of the config shows ***
    notices: str  # the name of the fan-out actor


@ray.remote(num_cpus=0)
class _Notices:
    """A counter of webhook deliveries that replicas long-poll: the fan-out of one delivery."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()

    async def bump(self) -> int:
        self.count += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return self.count

    async def wait(self, seen: int | None, timeout_s: float) -> int:
        if seen == self.count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout_s)
        return self.count


def _notices(name: str) -> Any:
    return _Notices.options(  # type: ignore[attr-defined]
        name=name, namespace="serve", get_if_exists=True, lifetime="detached"
    ).remote()


def _samples(items: list[tuple[Served, np.ndarray]]) -> int:
    return sum(len(features) for _, features in items)


@serve.deployment(max_replicas_per_node=1, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class Replica:
    """One Ray Serve replica: a follower, ``serve.batch`` and the app, as the app's backend."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.limits = config.limits
        self.metrics = Metrics()
        self.webhook_secret = config.webhook_secret
        self.follower = Follower(
            config.uri,
            settings=config.settings,
            providers=config.providers,
            poll_interval_s=config.poll_interval_s,
            warm_batch=config.limits.max_batch,
            on_swap=self.metrics.on_swap,
            on_refused=self.metrics.on_refused,
        )
        self.follower.load()  # a failure fails the replica; Serve reports it to serve_on_ray
        self.follower.start()
        batcher: Any = self._run_batch  # serve.batch's setters, which its stubs do not declare
        batcher.set_max_batch_size(config.limits.max_batch)
        batcher.set_batch_wait_timeout_s(config.limits.max_wait_ms / 1000)
        self._notices_name = config.notices
        # The listener's handle on the fan-out actor, shared so that a webhook never waits on a
        # GCS lookup in the replica's event loop (None until found, or after the actor is lost).
        self._fanout: Any = None
        self._stopping = threading.Event()
        if self.follower.follows:
            threading.Thread(target=self._listen, name="heimdall-notices", daemon=True).start()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self)

    @property
    def current(self) -> Served | None:
        return self.follower.current

    async def infer(self, features: np.ndarray) -> Inferred:
        return await infer_pinned(self.follower.current, features, self._run_chunks)

    async def _run_chunks(self, served: Served, features: np.ndarray) -> Outputs:
        """``features`` through ``serve.batch``, at most ``max_batch`` samples an item."""
        step = self.limits.max_batch
        chunks = [features[i : i + step] for i in range(0, len(features), step)]
        parts = await asyncio.gather(*(self._run_batch((served, chunk)) for chunk in chunks))
        return np.concatenate([p for p, _ in parts]), np.concatenate([u for _, u in parts])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_samples)
    async def _run_batch(
        self, items: list[tuple[Served, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One ONNX Runtime call per model among the items; results split back in order."""
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(items)
        loop = asyncio.get_running_loop()
        for served in {id(s): s for s, _ in items}.values():
            indices = [i for i, (s, _) in enumerate(items) if s is served]
            batch = np.concatenate([items[i][1] for i in indices])
            self.metrics.batch_size.observe(len(batch))
            positions, uncertainties = await loop.run_in_executor(None, served.run, batch)
            start = 0
            for i in indices:
                stop = start + len(items[i][1])
                results[i] = (positions[start:stop], uncertainties[start:stop])
                start = stop
        return [r for r in results if r is not None]

    def describe(self) -> dict[str, str | None]:
        """What this replica serves now (for the driver's ready line)."""
        served = self.follower.current
        if served is None:
            return {}
        fields = ("name", "version", "sha256", "alias", "source")
        return {field: getattr(served, field) for field in fields}

    def notify(self, name: str, alias: str) -> None:
        """A webhook reached this replica: wake its follower and, through the actor, the rest."""
        if (name, alias) != (self.follower.name, self.follower.alias):
            return
        self.follower.notify()
        fanout = self._fanout
        if fanout is None:  # not found yet: polling still reaches the other replicas
            return
        try:
            fanout.bump.remote()  # submitted, not awaited
        except Exception as exc:
            log.warning("serving.ray_fanout_failed", error=str(exc))

    def _listen(self) -> None:
        """Wake the follower whenever another replica received a webhook."""
        seen: int | None = None
        while not self._stopping.is_set():
            try:
                if self._fanout is None:
                    self._fanout = _notices(self._notices_name)
                wait = self._fanout.wait.remote(seen, NOTICE_WAIT_S)
                count = ray.get(wait, timeout=NOTICE_WAIT_S + 10)
            except Exception:  # the actor's node went away: make it again after a pause
                self._fanout = None
                self._stopping.wait(1.0)
                continue
            if seen is not None and count != seen:
                self.follower.notify()
            seen = count

    def __del__(self) -> None:
        self._stopping.set()
        self.follower.stop()


def application(
    uri: str,
    *,
    settings: Settings,
    replicas: int = 1,
    poll_interval_s: float = 10.0,
    limits: Limits = Limits(),
    providers: Sequence[str] | None = None,
    name: str = APP_NAME,
) -> Any:
    """The bound Serve application (``serve.run`` it, or return it from a builder)."""
    config = ReplicaConfig(
        uri=uri,
        # Replicas run elsewhere: a relative data dir must mean the same folder there.
        settings=settings.model_copy(update={"data_dir": settings.data_dir.resolve()}),
        limits=limits,
        poll_interval_s=poll_interval_s,
        providers=tuple(providers) if providers else None,
        webhook_secret=settings.webhook_secret,
        notices=f"heimdall-notices-{name}",
    )
    options = deployment_options(replicas, limits)
    return Replica.options(**options).bind(config)  # type: ignore[attr-defined]


def deployment_options(replicas: int, limits: Limits) -> dict[str, int]:
    """Serve's bounds for ``limits``: beyond them Serve answers 503 itself.

    Serve counts queued requests, not samples, and its proxy holds each queued body: the queue
    holds as many requests of the largest size as ``max_queue_samples`` allows. It never holds
    fewer than ``max_ongoing_requests``, though: Serve counts a request as queued while its
    replica is being picked, so a queue of one answered 503 to a webhook under 8 clients.
    """
    ongoing = max(2 * limits.max_batch, 8)
    return {
        "num_replicas": replicas,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": max(ongoing, limits.max_queue_samples // limits.max_request_samples),
    }


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run heimdall.serving.ray:app_builder uri=models:/NAME@ALIAS replicas=2``.

    Settings come from the environment of the process that runs ``serve run``.
    """
    if "uri" not in args:
        raise ConfigError("give the model: serve run heimdall.serving.ray:app_builder uri=...")
    limits = Limits(
        max_batch=int(args.get("max_batch", Limits.max_batch)),
        max_wait_ms=float(args.get("max_wait_ms", Limits.max_wait_ms)),
        max_request_samples=int(args.get("max_request_samples", Limits.max_request_samples)),
        max_queue_samples=int(args.get("max_queue", Limits.max_queue_samples)),
    )
    return application(
        args["uri"],
        settings=load_settings(),
        replicas=int(args.get("replicas", 1)),
        poll_interval_s=float(args.get("poll_interval", 10.0)),
        limits=limits,
    )


def serve_on_ray(
    uri: str,
    *,
    settings: Settings,
    host: str,
    port: int,
    replicas: int,
    poll_interval_s: float,
    limits: Limits,
    providers: Sequence[str] | None,
    address: str | None = None,
    on_ready: Callable[[Ready], None] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Run the app on Ray Serve until SIGINT or SIGTERM, then delete it from the cluster.

    ``address`` None lets Ray choose: ``RAY_ADDRESS`` when set, else a new local Ray.
    ``on_ready`` hears what one replica serves once every replica has loaded its model;
    replicas not all running within ``start_timeout_s`` (more than the nodes, say: one replica
    per node) end it with one HeimdallError, the app deleted.
    """
    stop = threading.Event()
    started_here = not ray.is_initialized()
    previous: dict[int, Any] = {}
    try:
        if started_here:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        # After ray.init, which installs handlers of its own for these signals.
        previous = {
            sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        # One proxy, on the head: the address clients use. (A load balancer over every node's
        # proxy is the multi-host alternative; see the README's "Scaling out".)
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
        app = application(
            uri,
            settings=settings,
            replicas=replicas,
            poll_interval_s=poll_interval_s,
            limits=limits,
            providers=providers,
        )
        handle = _start(app, redact_uri(uri), replicas, start_timeout_s)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        served = handle.describe.remote().result(timeout_s=60)
        report = Ready(**served, url=url)
        log.info("serving.ray_ready", replicas=replicas, **report.to_dict())
        if on_ready is not None:
            on_ready(report)
        while not stop.wait(1.0):
            pass
    finally:
        _shut_down(started_here)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(app: Any, uri: str, replicas: int, timeout_s: float) -> Any:
    """Deploy ``app``; its handle once every replica runs, within ``timeout_s``.

    ``serve.run`` would wait without end for a replica that can never be placed.
    """
    target = serve.RunTarget(app, name=APP_NAME, route_prefix="/")
    try:
        serve.run_many([target], wait_for_applications_running=False)
    except RuntimeError as exc:
        raise HeimdallError(f"Ray Serve could not start {uri}: {_one_line(exc)}") from None

    def running() -> bool | None:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise HeimdallError(f"Ray Serve could not start {uri}: {_one_line(status.message)}")
        return True if status is not None and status.status == "RUNNING" else None

    def late() -> HeimdallError:
        return HeimdallError(
            f"Ray Serve did not start {replicas} replicas of {uri} within {timeout_s:.0f} s: "
            f"{_placement()}"
        )

    wait_for(running, deadline_s=timeout_s, timeout=late, backoff=Backoff(0.2, 2.0))
    return serve.get_app_handle(APP_NAME)


def _placement() -> str:
    """Why replicas are pending, as far as Serve and Ray tell."""
    try:
        status = serve.status().applications[APP_NAME]
        states = {
            str(k.value if hasattr(k, "value") else k): n
            for d in status.deployments.values()
            for k, n in d.replica_states.items()
        }
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception as exc:  # the cluster itself is in trouble: say so
        return f"the cluster did not answer ({_one_line(exc)[:200]})"
    running = states.pop("RUNNING", 0)
    others = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items()))
    return (
        f"{running} running, {others or 'none pending'}; replicas go one per node and "
        f"{nodes} node(s) are alive, each needing a free CPU. Add nodes or lower --replicas."
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:400]


def _shut_down(started_here: bool) -> None:
    """Delete the app and its fan-out actor: Serve apps outlive the driver otherwise.

    Serve itself stays up on a cluster we only joined: other apps may use it.
    """
    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
        ray.kill(ray.get_actor(f"heimdall-notices-{APP_NAME}", namespace="serve"))
    except Exception as exc:  # already gone, or the cluster is: nothing left to clean
        log.info("serving.ray_cleanup", detail=str(exc))
    if started_here:
        ray.shutdown()
