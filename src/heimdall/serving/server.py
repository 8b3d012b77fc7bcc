"""The single-machine server: the app over a follower and a batcher, run by uvicorn.

``serve`` binds the port first, then loads: ``/v2/health/live`` answers at once and
``/v2/health/ready`` is 503 until the first verified, warmed-up load (a long download never
fails a liveness probe), and a first load that fails stops the server with that one-line error.
SIGTERM and SIGINT stop it gracefully: no new connections, in-flight requests finish, the
follower's poll thread stops.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import onnxruntime as ort
import structlog
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from heimdall.config import Settings, redact_uri
from heimdall.errors import ConfigError, HeimdallError, InputError
from heimdall.machine import check_memory
from heimdall.registry.names import parse_models_uri
from heimdall.retry import wait_for
from heimdall.serving.app import create_app, in_flight_budget
from heimdall.serving.backend import Inferred, Limits, Served, infer_pinned
from heimdall.serving.batching import Batcher
from heimdall.serving.follower import Follower
from heimdall.serving.metrics import Metrics
from heimdall.serving.protocol import SAMPLE_BYTES

log = structlog.get_logger(__name__)

GRACEFUL_STOP_S = 10.0  # in-flight requests get this long after SIGTERM


@dataclass(frozen=True)
class Ready:
    """What ``serve`` reports once the first verified model answers."""

    name: str
    version: str
    sha256: str
    alias: str | None
    source: str
    url: str  # where the Open Inference Protocol routes answer

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class LocalBackend:
    """A follower's model behind a batcher: the backend of the single-machine app."""

    def __init__(
        self, follower: Follower, *, limits: Limits, webhook_secret: SecretStr | None = None
    ) -> None:
        self.follower = follower
        self.limits = limits
        self.metrics = Metrics()
        self.webhook_secret = webhook_secret
        self.batcher = Batcher(limits, self.metrics)
        self.failure: HeimdallError | None = None
        follower.on_swap = self.metrics.on_swap
        follower.on_refused = self.metrics.on_refused

    @property
    def current(self) -> Served | None:
        return self.follower.current

    async def infer(self, features: np.ndarray) -> Inferred:
        return await infer_pinned(self.follower.current, features, self.batcher.run)

    def notify(self, name: str, alias: str) -> None:
        if (name, alias) == (self.follower.name, self.follower.alias):
            self.follower.notify()

    def load_and_follow(
        self,
        on_ready: Callable[[Served], None] | None = None,
        on_failure: Callable[[HeimdallError], None] | None = None,
    ) -> None:
        """The first verified load, then polling; a failed load is kept in ``failure``."""
        try:
            served = self.follower.load()
        except Exception as exc:  # the loader thread's failure must reach serve()
            self.failure = (
                exc
                if isinstance(exc, HeimdallError)
                else HeimdallError(f"cannot serve {self.follower.source}: {exc}")
            )
            if on_failure is not None:  # the caller reports it (serve: as its one-line error)
                on_failure(self.failure)
            else:
                log.error("serving.first_load_failed", uri=self.follower.source, error=str(exc))
            return
        self.follower.start()
        if on_ready is not None:
            on_ready(served)

    async def aclose(self) -> None:
        self.follower.stop()
        await self.batcher.aclose()


def build_app(
    uri: str,
    *,
    settings: Settings,
    limits: Limits = Limits(),
    poll_interval_s: float = 10.0,
    providers: Sequence[str] | None = None,
    on_ready: Callable[[Served], None] | None = None,
    on_failure: Callable[[HeimdallError], None] | None = None,
) -> FastAPI:
    """The app serving ``uri``; its lifespan loads the model on a thread, then follows it."""
    follower = Follower(
        uri,
        settings=settings,
        providers=providers,
        poll_interval_s=poll_interval_s,
        warm_batch=limits.max_batch,
    )
    backend = LocalBackend(follower, limits=limits, webhook_secret=settings.webhook_secret)
    app = create_app(backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # On a thread: the event loop answers live (and ready: 503) while the bytes download.
        loader = threading.Thread(
            target=backend.load_and_follow,
            args=(on_ready, on_failure),
            name="heimdall-first-load",
            daemon=True,
        )
        loader.start()
        yield
        await backend.aclose()

    app.router.lifespan_context = lifespan
    return app


def serve(
    uri: str,
    *,
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8080,
    poll_interval_s: float = 10.0,
    limits: Limits = Limits(),
    providers: Sequence[str] | None = None,
    on_ready: Callable[[Ready], None] | None = None,
) -> None:
    """Serve ``uri`` on ``host:port`` until SIGTERM or SIGINT; HeimdallError if it cannot."""
    check_options(
        uri,
        port=port,
        poll_interval_s=poll_interval_s,
        limits=limits,
        providers=providers,
        settings=settings,
    )
    sock = bind(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    servers: list[_Server] = []  # the callbacks run on the loader thread, once it exists

    def ready(served: Served) -> None:
        server = servers[0]
        wait_for(  # the loader can finish before uvicorn's startup does
            lambda: True if server.started or server.should_exit else None,
            deadline_s=60.0,
            timeout=lambda: HeimdallError("uvicorn did not start within 60 s"),
        )
        report = Ready(served.name, served.version, served.sha256, served.alias, served.source, url)
        log.info("serving.ready", **report.to_dict())
        if on_ready is not None and not server.should_exit:
            on_ready(report)

    def failed(_: HeimdallError) -> None:
        servers[0].should_exit = True

    app = build_app(
        uri,
        settings=settings,
        limits=limits,
        poll_interval_s=poll_interval_s,
        providers=providers,
        on_ready=ready,
        on_failure=failed,
    )
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,  # heimdall's logging (structlog, scrubbed) is the one configured
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(GRACEFUL_STOP_S),
    )
    server = _Server(config)
    servers.append(server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    failure = app.state.backend.failure
    if failure is not None:
        raise failure


def check_options(
    uri: str,
    *,
    port: int,
    poll_interval_s: float,
    limits: Limits,
    providers: Sequence[str] | None = None,
    replicas: int = 1,
    settings: Settings | None = None,
) -> None:
    """InputError (ConfigError for missing settings), in one line, for the first option
    ``serve`` would fail on later; with ``settings``, also what the URI needs of them."""
    _check_uri(uri, settings)
    problems = [
        (not 1 <= port <= 65535, f"port must be from 1 to 65535, got {port}"),
        (
            # Faster polling only loads the registry: webhooks are the way to hear at once.
            not 1 <= poll_interval_s <= 86400,
            f"poll interval must be from 1 to 86400 s, got {poll_interval_s:g}",
        ),
        (limits.max_batch < 1, f"max batch must be at least 1, got {limits.max_batch}"),
        (
            not 0 <= limits.max_wait_ms <= 10_000,
            f"max wait must be from 0 to 10000 ms, got {limits.max_wait_ms:g}",
        ),
        (
            limits.max_request_samples < 1,
            f"max request samples must be at least 1, got {limits.max_request_samples}",
        ),
        (
            limits.max_queue_samples < limits.max_request_samples,
            f"max queue ({limits.max_queue_samples} samples) must hold the largest request "
            f"({limits.max_request_samples} samples)",
        ),
        (replicas < 1, f"replicas must be at least 1, got {replicas}"),
    ]
    unknown = sorted(set(providers or ()) - set(ort.get_all_providers()))
    problems.append(
        (bool(unknown), f"unknown ONNX Runtime providers {unknown}; e.g. CUDAExecutionProvider")
    )
    for failed, message in problems:
        if failed:
            raise InputError(message)
    _check_memory(limits)


def _check_memory(limits: Limits) -> None:
    """Refuse limits whose worst case (bodies in flight, a full queue) would not fit."""
    queued = limits.max_queue_samples
    worst = in_flight_budget(limits) + queued * SAMPLE_BYTES
    check_memory(
        f"serving with --max-queue {queued} and --max-request-samples {limits.max_request_samples}",
        queued,
        -(-worst // queued),
        fix="lower --max-queue or --max-request-samples",
    )


def _check_uri(uri: str, settings: Settings | None) -> None:
    if uri.startswith("models:/"):
        parse_models_uri(uri)
        return
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        if not urlparse(uri).netloc or not urlparse(uri).path.strip("/"):
            raise InputError(f"{redact_uri(uri)!r} names no object: use s3://BUCKET/KEY")
        if settings is not None and not settings.s3_endpoint_url:
            raise ConfigError(
                f"{redact_uri(uri)!r} needs an object store: set MLFLOW_S3_ENDPOINT_URL and the "
                "S3 keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            )
    elif scheme in ("", "file"):
        path = Path(unquote(urlparse(uri).path)) if scheme == "file" else Path(uri)
        if not path.exists():
            raise InputError(f"no model at {path}: give models:/NAME@ALIAS, s3://…, or a path")
    else:
        raise InputError(
            f"cannot serve {redact_uri(uri)!r}: use models:/NAME@ALIAS (followed), "
            "models:/NAME/VERSION, s3://BUCKET/KEY or a local path"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``; InputError in one line when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
            "or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, less its re-raising of the stop signal after a graceful shutdown.

    uvicorn raises a caught SIGTERM/SIGINT again once it has stopped, so the process dies by the
    signal (or a KeyboardInterrupt) before ``serve`` returns; a clean stop should exit 0.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)
