"""`heimdall serve`: every option checked before anything loads, one line per error."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from heimdall.cli import app
from heimdall.export import ExportResult
from tests.fixtures.process import free_port

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HEIMDALL_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "port must be from 1 to 65535, got 0"),
        (["--port", "70000"], "port must be from 1 to 65535"),
        (["--poll-interval", "0"], "poll interval must be from 1 to 86400 s"),
        (["--poll-interval", "0.001"], "poll interval must be from 1 to 86400 s, got 0.001"),
        (["--poll-interval", "nan"], "poll interval must be from 1 to 86400 s"),
        (["--max-queue", "1000000000"], "lower --max-queue or --max-request-samples"),
        (
            ["--max-request-samples", "100000000", "--max-queue", "100000000"],
            "lower --max-queue or --max-request-samples",
        ),
        (["--max-batch", "0"], "max batch must be at least 1"),
        (["--max-wait-ms", "-1"], "max wait must be from 0 to 10000 ms"),
        (["--max-request-samples", "0"], "max request samples must be at least 1"),
        (["--max-request-samples", "64", "--max-queue", "32"], "must hold the largest request"),
        (["--replicas", "2"], "--replicas is for Ray Serve"),
        (["--ray", "--replicas", "0"], "replicas must be at least 1"),
        (["--providers", "CUDAExecutonProvider"], "unknown ONNX Runtime providers"),
    ],
)
def test_bad_options_fail_in_one_line_before_anything_loads(
    args: list[str], message: str, data_dir: Path
) -> None:
    result = runner.invoke(app, ["serve", "models:/m@live", *args])

    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (data_dir / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/m@", "not a registry URI"),
        ("models:/m/one", "not a registry URI"),
        ("http://host/model.onnx", "use models:/NAME@ALIAS"),
        ("s3://bucket-only", "names no object"),
        ("/no/such/model.onnx", "no model at /no/such/model.onnx"),
    ],
)
def test_uris_that_name_no_model_fail_in_one_line(uri: str, message: str, data_dir: Path) -> None:
    result = runner.invoke(app, ["serve", uri, "--json"])

    assert result.exit_code == 1
    error = json.loads(result.output)
    assert error["error"] == "InputError" and message in error["message"]


def test_s3_without_an_object_store_names_the_settings_it_needs(data_dir: Path) -> None:
    result = runner.invoke(app, ["serve", "s3://bucket/k.onnx", "--json"])

    assert result.exit_code == 1
    error = json.loads(result.output)
    assert error["error"] == "ConfigError"
    assert "MLFLOW_S3_ENDPOINT_URL" in error["message"] and "AWS_ACCESS_KEY_ID" in error["message"]
    assert "file://" not in error["message"]


def test_a_port_in_use_fails_in_one_line(data_dir: Path, atto_onnx: ExportResult) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(atto_onnx.path), "--port", str(port)])

    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ray_without_ray_serve_says_what_to_install(
    data_dir: Path, atto_onnx: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "heimdall.serving.ray", None)  # import fails as if absent

    result = runner.invoke(app, ["serve", str(atto_onnx.path), "--ray"])

    assert result.exit_code == 1
    assert "install heimdall[ray]" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ray_gets_every_option(
    data_dir: Path, atto_onnx: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    calls: list[dict[str, object]] = []
    fake = types.ModuleType("heimdall.serving.ray")
    fake.serve_on_ray = lambda uri, **kwargs: calls.append({"uri": uri, **kwargs})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "heimdall.serving.ray", fake)

    result = runner.invoke(
        app, ["serve", str(atto_onnx.path), "--ray", "--replicas", "3", "--port", "9000"]
    )

    assert result.exit_code == 0, result.output
    (call,) = calls
    assert (call["uri"], call["replicas"], call["port"]) == (str(atto_onnx.path), 3, 9000)
    assert call["limits"].max_batch == 32  # type: ignore[attr-defined]
    assert callable(call["on_ready"])  # --ray prints the same ready line


def test_a_first_load_that_fails_stops_the_server_with_its_one_line(
    data_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")

    result = runner.invoke(app, ["serve", str(broken), "--port", str(free_port())])

    assert result.exit_code == 1
    assert "ONNX Runtime cannot load the model" in result.output
    assert len(result.output.strip().splitlines()) == 1
