"""The single-machine server: ready only after the first verified load, its failure kept."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import uvicorn
from fastapi import FastAPI

from heimdall.config import Settings
from heimdall.errors import ConfigError, HeimdallError, InputError
from heimdall.export import ExportResult
from heimdall.inference import LocalizationModel
from heimdall.retry import wait_for
from heimdall.serving import follower as follower_module
from heimdall.serving.app import JSON_DECODE_FACTOR, in_flight_budget
from heimdall.serving.backend import Limits
from heimdall.serving.protocol import max_body_bytes
from heimdall.serving.server import build_app, check_options
from tests.fixtures.process import free_port


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a thread (real HTTP, its lifespan included); its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: True if server.started else None, deadline_s=30, timeout=TimeoutError)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_ready_is_503_until_the_first_verified_load_and_live_answers_meanwhile(
    tmp_path: Path, atto_onnx: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    loaded = threading.Event()
    real_load = LocalizationModel.load

    def held_load(*args: object, **kwargs: object) -> LocalizationModel:
        release.wait(30)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(follower_module.LocalizationModel, "load", held_load)
    app = build_app(
        str(atto_onnx.path),
        settings=Settings(data_dir=tmp_path),
        limits=Limits(max_batch=4),
        on_ready=lambda served: loaded.set(),
    )

    with running(app) as url:
        assert requests.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        waiting = requests.get(f"{url}/v2/health/ready", timeout=5)
        assert waiting.status_code == 503 and "no verified model" in waiting.json()["error"]
        release.set()
        assert loaded.wait(30)
        assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
        name = atto_onnx.path.stem
        described = requests.get(f"{url}/v2/models/{name}", timeout=5).json()
        assert described["parameters"]["sha256"] == (real_load(atto_onnx.path).sha256)


def test_a_failed_first_load_is_kept_and_reported_and_ready_stays_503(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    failures: list[HeimdallError] = []
    done = threading.Event()

    def failed(exc: HeimdallError) -> None:
        failures.append(exc)
        done.set()

    app = build_app(str(broken), settings=Settings(data_dir=tmp_path), on_failure=failed)

    with running(app) as url:
        assert done.wait(30)
        assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 503

    assert app.state.backend.failure is failures[0]
    assert "cannot load the model" in str(failures[0])


def test_webhook_notices_for_other_models_or_aliases_do_not_wake_the_follower(
    tmp_path: Path,
) -> None:
    app = build_app("models:/follow-me@live", settings=Settings(data_dir=tmp_path))
    backend = app.state.backend
    woken: list[bool] = []
    backend.follower.notify = lambda: woken.append(True)

    backend.notify("other", "live")
    backend.notify("follow-me", "staging")
    backend.notify("follow-me", "live")

    assert woken == [True]


def test_the_backend_wires_swaps_and_refusals_into_its_metrics(tmp_path: Path) -> None:
    app = build_app("models:/follow-me@live", settings=Settings(data_dir=tmp_path))
    backend = app.state.backend

    backend.follower.on_refused("sha256")
    text = backend.metrics.render()[0].decode()

    assert 'heimdall_refused_versions_total{reason="sha256"} 1.0' in text
    assert backend.follower.on_swap == backend.metrics.on_swap
    assert backend.current is None  # nothing loads before the app starts


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_request_samples=1024, max_queue_samples=10**9),
        Limits(max_request_samples=10**8, max_queue_samples=10**8),
    ],
)
def test_queue_limits_beyond_the_memory_available_are_refused(
    atto_onnx: ExportResult, limits: Limits
) -> None:
    with pytest.raises(InputError, match="lower --max-queue or --max-request-samples") as refused:
        check_options(str(atto_onnx.path), port=8080, poll_interval_s=10, limits=limits)
    assert "\n" not in str(refused.value) and "is available" in str(refused.value)


def test_the_in_flight_budget_holds_the_largest_json_request_decoded() -> None:
    limits = Limits(max_request_samples=32, max_queue_samples=64)
    budget = in_flight_budget(limits)
    assert budget >= JSON_DECODE_FACTOR * max_body_bytes(32)
    assert budget >= 2 * max_body_bytes(64)
    check_options("models:/m@live", port=8080, poll_interval_s=10, limits=limits)  # fits


def test_a_poll_interval_under_one_second_is_refused() -> None:
    with pytest.raises(InputError, match=r"poll interval must be from 1 to 86400 s, got 0\.001"):
        check_options("models:/m@live", port=8080, poll_interval_s=0.001, limits=Limits())


def test_s3_without_an_object_store_says_which_settings_it_needs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, s3_endpoint_url=None, tracking_uri=None)
    with pytest.raises(ConfigError, match="MLFLOW_S3_ENDPOINT_URL") as refused:
        check_options(
            "s3://bucket/k.onnx", port=8080, poll_interval_s=10, limits=Limits(), settings=settings
        )
    assert "AWS_SECRET_ACCESS_KEY" in str(refused.value)


def test_the_webhook_secret_never_shows_in_the_backend_or_its_settings(tmp_path: Path) -> None:
    secret = "do-not-print-me-0123"
    settings = Settings(data_dir=tmp_path, webhook_secret=secret)
    backend = build_app("models:/follow-me@live", settings=settings).state.backend

    shown = [repr(backend), repr(vars(backend)), repr(settings), str(backend.webhook_secret)]
    assert not [text for text in shown if secret in text]
    assert backend.webhook_secret.get_secret_value() == secret
