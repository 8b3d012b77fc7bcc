"""The FastAPI app: Open Inference Protocol routes over whichever backend hosts it.

Routes only. The model, its version and how requests run come from
``request.app.state.backend`` (``heimdall.serving.backend.Backend``); the single-machine
server and each Ray Serve replica set it, so both serve this same app. Every answer is JSON
``{"error": "<one line>"}`` on failure: 4xx for what the client sent, 503 (with
``Retry-After`` when busy) while the server cannot answer, 500 only for a fault of ours.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from heimdall.config import heimdall_version, redact_uri
from heimdall.errors import ConfigError, HeimdallError, InputError, ResourceError
from heimdall.serving.backend import Backend, Limits, Served
from heimdall.serving.batching import Overloaded
from heimdall.serving.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_response,
    max_body_bytes,
    model_metadata,
    parse_header_length,
    parse_infer_request,
)
from heimdall.serving.webhook import MAX_BODY_BYTES, WebhookRefused, alias_moved, verify_delivery

log = structlog.get_logger(__name__)

SERVER_NAME = "heimdall"
EXTENSIONS = ["binary_tensor_data"]
# Bodies above this are decoded in a worker thread so the event loop keeps serving others.
_THREAD_DECODE_BYTES = 256 * 1024  # one sample as JSON, about 5 as binary
# Decoding JSON costs about 11x its size in Python objects (50 MB of JSON: +557 MB resident).
JSON_DECODE_FACTOR = 12
RETRY_AFTER_S = 1

Handler = Callable[..., Awaitable[Response]]
router = APIRouter()


class _Refusal(Exception):
    """A request this server cannot answer now or here (not a fault of the input)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(backend: Backend | None = None) -> FastAPI:
    """A new app; its host sets ``app.state.backend`` (here or before the first request)."""
    app = FastAPI(title=SERVER_NAME, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    app.add_exception_handler(StarletteHTTPException, _unrouted)
    if backend is not None:
        app.state.backend = backend
    return app


def _observed(handler: Handler) -> Handler:
    """Answer every failure as one JSON line and record the request's code and latency."""

    @functools.wraps(handler)
    async def observed(request: Request, **params: str) -> Response:
        start = time.perf_counter()
        try:
            response = await handler(request, **params)
        except Exception as exc:
            response = _failure(exc, request)
        route = getattr(request.scope.get("route"), "path", "unrouted")
        backend = getattr(request.app.state, "backend", None)
        if backend is not None:
            backend.metrics.observe_request(
                route, response.status_code, time.perf_counter() - start
            )
        return response

    return observed


@router.get("/v2/health/live")
@_observed
async def live(request: Request) -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
@_observed
async def ready(request: Request) -> Response:
    _current(_backend(request))
    return Response(status_code=200)


@router.get("/v2")
@_observed
async def server_metadata(request: Request) -> Response:
    body = {"name": SERVER_NAME, "version": heimdall_version(), "extensions": EXTENSIONS}
    return JSONResponse(body)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
@_observed
async def metadata(request: Request, name: str) -> Response:
    version = request.path_params.get("version")
    return JSONResponse(model_metadata(_serving(_backend(request), name, version)))


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
@_observed
async def model_ready(request: Request, name: str) -> Response:
    version = request.path_params.get("version")
    _serving(_backend(request), name, version)
    return Response(status_code=200)


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
@_observed
async def infer(request: Request, name: str) -> Response:
    version = request.path_params.get("version")
    backend = _backend(request)
    _serving(backend, name, version)
    limit = backend.limits.max_request_samples
    cap = max_body_bytes(limit)
    header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
    size = reservation(_body_size(request, cap), binary=header_length is not None)
    with _in_flight(request, backend).reserve(size):
        body = await _read_body(request, cap)
        decode = functools.partial(
            parse_infer_request, body, header_length, max_request_samples=limit
        )
        parsed = decode() if len(body) < _THREAD_DECODE_BYTES else await run_in_threadpool(decode)
        inferred = await backend.infer(parsed.features)
        # The alias may have moved while the request waited: the answer names who gave it, and
        # a request for one version never gets another's.
        _check_served(inferred.served, name, version)
        encoded = encode_response(inferred, parsed)
    headers = {} if encoded.header_length is None else {HEADER_LENGTH: str(encoded.header_length)}
    return Response(encoded.body, media_type=encoded.content_type, headers=headers)


@router.get("/metrics")
@_observed
async def metrics(request: Request) -> Response:
    body, content_type = _backend(request).metrics.render()
    return Response(body, headers={"Content-Type": content_type})


@router.post("/v2/webhooks/mlflow")
@_observed
async def mlflow_webhook(request: Request) -> Response:
    backend = _backend(request)
    if backend.webhook_secret is None:
        raise _Refusal(404, "webhooks are off: set HEIMDALL_WEBHOOK_SECRET to receive MLflow's")
    try:
        body = await _read_body(request, MAX_BODY_BYTES)
        payload = verify_delivery(body, request.headers, backend.webhook_secret, now=time.time())
    except (WebhookRefused, ProtocolError) as exc:
        reason = getattr(exc, "reason", "bad_payload")
        backend.metrics.on_webhook(reason)
        log.warning("serving.webhook_refused", reason=reason)
        raise
    moved = alias_moved(payload)
    served = backend.current
    # Before the first load the server cannot tell which alias it follows: the backend can.
    if moved is None or (served is not None and moved != (served.name, served.alias)):
        backend.metrics.on_webhook("ignored")
        return JSONResponse({"status": "ignored"})
    backend.notify(*moved)
    backend.metrics.on_webhook("notified")
    log.info("serving.webhook_alias_moved", name=moved[0], alias=moved[1])
    return JSONResponse({"status": "notified"})


def _backend(request: Request) -> Backend:
    backend: Backend | None = getattr(request.app.state, "backend", None)
    if backend is None:
        raise ConfigError("this app has no backend yet: its host sets app.state.backend")
    return backend


def _current(backend: Backend) -> Served:
    served = backend.current
    if served is None:
        raise _Refusal(503, "no verified model is loaded yet; retry when /v2/health/ready is 200")
    return served


def _serving(backend: Backend, name: str, version: str | None) -> Served:
    served = _current(backend)
    _check_served(served, name, version)
    return served


def _check_served(served: Served, name: str, version: str | None) -> None:
    if name != served.name:
        raise _Refusal(
            404, f"model {name!r} is not served here; this server serves {served.name!r}"
        )
    if version is not None and version != served.version:
        now = f"version {served.version}" if served.version else "an unregistered model"
        alias = f" (@{served.alias})" if served.alias else ""
        raise _Refusal(404, f"version {version!r} of {name!r} is not served here; {now}{alias} is")


class _InFlight:
    """Bytes of request bodies held by requests in progress, bounded.

    The batcher's queue bounds decoded samples; this bounds what comes before (bodies read and
    being decoded, where JSON costs several times its size), so that many concurrent large
    requests cannot together exhaust memory: past the budget they get 503 + Retry-After.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        if self.used + size > self.budget:
            raise Overloaded(
                f"the server is busy ({self.used} bytes of requests in progress, at most "
                f"{self.budget}); retry shortly"
            )
        self.used += size
        try:
            yield
        finally:
            self.used -= size


def in_flight_budget(limits: Limits) -> int:
    """Bytes that request bodies in progress may cost together, decoding included.

    Room for two full queues of binary bodies, and at least for the largest JSON body decoded.
    """
    return max(
        2 * max_body_bytes(limits.max_queue_samples),
        reservation(max_body_bytes(limits.max_request_samples), binary=False),
    )


def reservation(body_bytes: int, *, binary: bool) -> int:
    """What a body of ``body_bytes`` costs in memory until it is decoded."""
    return body_bytes if binary else JSON_DECODE_FACTOR * body_bytes


def _in_flight(request: Request, backend: Backend) -> _InFlight:
    state = request.app.state
    if not hasattr(state, "in_flight"):
        state.in_flight = _InFlight(in_flight_budget(backend.limits))
    in_flight: _InFlight = state.in_flight
    return in_flight


def _body_size(request: Request, limit: int) -> int:
    """The body's declared size (``limit`` when undeclared), refused when over ``limit``."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ProtocolError(f"Content-Encoding {encoding!r} is not accepted; send it plain", 415)
    declared = request.headers.get("content-length")
    if declared is None:
        return limit
    if not re.fullmatch(r"[0-9]+", declared.strip()):  # isdigit() takes non-ASCII digits
        raise ProtocolError("Content-Length is not a number")
    if int(declared) > limit:
        raise _too_large(limit)
    return int(declared)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    _body_size(request, limit)
    if "content-length" in request.headers:  # the server reads no more than it declares
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
    return b"".join(parts)


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError(
        f"the request body exceeds {limit} bytes; send fewer samples a request (JSON numbers "
        "take about 5× the bytes of the binary tensor data extension)",
        413,
    )


def _failure(exc: Exception, request: Request) -> Response:
    """The one-line JSON answer to a failure; only the unexpected ones are logged in full."""
    if isinstance(exc, ProtocolError | WebhookRefused | _Refusal):
        return _error(exc.status, str(exc))
    if isinstance(exc, Overloaded):
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ResourceError):  # out of memory: a later or smaller request may fit
        return _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, InputError):
        return _error(400, str(exc))
    if isinstance(exc, HeimdallError):
        return _error(503, str(exc))
    log.error(
        "serving.unexpected_error",
        path=request.url.path,
        error=type(exc).__name__,
        detail=redact_uri(str(exc))[:500],
        exc_info=exc,
    )
    return _error(
        500,
        f"internal error ({type(exc).__name__}); the server log has it as serving.unexpected_error",
    )


async def _unrouted(request: Request, exc: Any) -> Response:
    """Starlette's 404/405 for paths no route matches, as the protocol's error object."""
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)
