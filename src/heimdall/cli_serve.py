"""`heimdall serve`: serve a model by URI over the Open Inference Protocol."""

from __future__ import annotations

import json
from collections.abc import Callable

import typer
from rich.text import Text

from heimdall.display import JsonOpt, errors, out, settings_of
from heimdall.errors import ConfigError, InputError


def serve(
    ctx: typer.Context,
    uri: str = typer.Argument(
        ...,
        help="models:/NAME@ALIAS (followed as the alias moves), models:/NAME/VERSION, "
        "s3://BUCKET/KEY or a path (served as is).",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8080, help="Port to listen on."),
    poll_interval: float = typer.Option(
        10.0, help="Seconds between alias checks (MLflow webhooks wake it at once)."
    ),
    max_batch: int = typer.Option(32, help="Most samples merged into one ONNX Runtime call."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait for a batch to fill, in ms."),
    max_request_samples: int = typer.Option(
        1024, help="Largest request, in samples; bigger ones get 413."
    ),
    max_queue: int = typer.Option(
        1024, help="Most samples waiting; beyond it requests get 503 with Retry-After."
    ),
    providers: str = typer.Option(
        None, help="Comma-separated ONNX Runtime providers, e.g. CUDAExecutionProvider."
    ),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve replicas."),
    replicas: int = typer.Option(1, help="Ray Serve replicas (with --ray)."),
    as_json: bool = JsonOpt,
) -> None:
    """Serve a model over HTTP (Open Inference Protocol), following its alias.

    The bytes are checked against the registered sha256 before a session opens; a version that
    fails any check is never served. /v2/health/ready is 200 once a verified model is loaded.
    """
    from heimdall.serving.backend import Limits
    from heimdall.serving.server import Ready, check_options
    from heimdall.serving.server import serve as run_server

    settings = settings_of(ctx)
    chosen = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
    limits = Limits(
        max_request_samples=max_request_samples,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue_samples=max_queue,
    )

    def announce(ready: Ready) -> None:
        if as_json:
            out.print(json.dumps(ready.to_dict()), highlight=False, soft_wrap=True)
            return
        version = f"version {ready.version}" if ready.version else "unregistered"
        alias = f" @{ready.alias}" if ready.alias else ""
        line = f"serving {ready.name} {version}{alias} (sha256 {ready.sha256[:12]}) at {ready.url}"
        out.print(Text(line), soft_wrap=True)

    with errors(as_json):
        check_options(
            uri,
            port=port,
            poll_interval_s=poll_interval,
            limits=limits,
            providers=chosen,
            replicas=replicas,
            settings=settings,
        )
        if replicas != 1 and not ray:
            raise InputError("--replicas is for Ray Serve: add --ray, or leave --replicas out")
        if ray:
            _serve_on_ray()(
                uri,
                settings=settings,
                host=host,
                port=port,
                replicas=replicas,
                poll_interval_s=poll_interval,
                limits=limits,
                providers=chosen,
                on_ready=announce,
            )
            return
        run_server(
            uri,
            settings=settings,
            host=host,
            port=port,
            poll_interval_s=poll_interval,
            limits=limits,
            providers=chosen,
            on_ready=announce,
        )


def _serve_on_ray() -> Callable[..., None]:
    try:
        from heimdall.serving.ray import serve_on_ray
    except ImportError as exc:
        raise ConfigError(
            f"--ray needs Ray Serve ({exc.name or exc}): install heimdall[ray]"
        ) from None
    return serve_on_ray
