"""publish() end to end against a real ``mlflow server`` (PostgreSQL + SeaweedFS): faults too."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from heimdall.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from heimdall.data import generate
from heimdall.errors import PublishError, StorageError
from heimdall.inference import LocalizationModel
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.pipeline import publish
from heimdall.results import PublishResult
from tests.fixtures.mlflow_server import MlflowBackend
from tests.fixtures.process import free_port, unavailable

pytestmark = pytest.mark.integration

PREFIX = "models/localization/"
FAST: dict[str, Any] = {"bench": False, "verify_batch_sizes": (1, 3)}
CLI_TIMEOUT_S = 600
# matplotlib's first colour (C0), which the report's plots draw their points in
PLOT_BLUE = np.array([31, 119, 180])


def unique(label: str) -> str:
    return f"heimdall-{label}-{os.urandom(3).hex()}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    """Random atto weights saved as a checkpoint; each test publishes it to a bucket or name of
    its own, so stored bytes and registered versions never carry over between tests."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("pipeline-ckpt") / "atto.safetensors"
    save_checkpoint(LocalizationNet(ModelConfig(backbone="atto")), path, training_run_id="run-it")
    return load_checkpoint(path)


def client_for(backend: MlflowBackend) -> MlflowClient:
    return MlflowClient(tracking_uri=backend.tracking_uri)


def versions_of(backend: MlflowBackend, name: str) -> list[Any]:
    return list(client_for(backend).search_model_versions(f"name = '{name}'"))


def objects(backend: MlflowBackend, bucket: str) -> dict[str, str]:
    """``{key: ETag}`` of every object under the models prefix."""
    assert backend.seaweedfs is not None
    listed = backend.seaweedfs.client().list_objects_v2(Bucket=bucket, Prefix=PREFIX)
    return {o["Key"]: o["ETag"] for o in listed.get("Contents", [])}


def onnx_keys(backend: MlflowBackend, bucket: str) -> set[str]:
    return {k for k in objects(backend, bucket) if k.endswith(".onnx")}


@dataclass(frozen=True)
class OnServer:
    name: str
    result: PublishResult
    backend: MlflowBackend


@pytest.fixture(scope="module")
def on_server(
    mlflow_server: MlflowBackend,
    checkpoint: LoadedCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    one_torch_thread: None,
) -> OnServer:
    """The checkpoint published once, benchmark included, to the session's mlflow server."""
    name = unique("pipeline")
    result = publish(
        checkpoint.path,
        settings=mlflow_server.settings(),
        name=name,
        bench_budget_s=0.2,
        verify_batch_sizes=(1, 3),
        output_dir=tmp_path_factory.mktemp("pipeline-out"),
    )
    return OnServer(name, result, mlflow_server)


def test_the_staging_alias_serves_what_pytorch_predicts(
    on_server: OnServer, checkpoint: LoadedCheckpoint
) -> None:
    features, _ = generate(16, seed=31)
    with torch.inference_mode():
        positions, uncertainties = (
            t.numpy() for t in checkpoint.model.eval()(torch.from_numpy(features))
        )

    served = LocalizationModel.load(
        f"models:/{on_server.name}@staging", settings=on_server.backend.settings()
    )
    predicted = served.predict(features)

    primary = on_server.result.primary
    assert primary.upload.uri.startswith(f"s3://{on_server.backend.bucket}/{PREFIX}")
    assert (served.version, served.sha256) == (primary.version.version, primary.upload.sha256)
    assert np.abs(predicted.positions - positions).max() <= 1e-4
    assert np.abs(predicted.uncertainties - uncertainties).max() <= 1e-4


def test_the_report_renders_in_headless_chromium(on_server: OnServer, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        unavailable("chromium is not installed")
    assert browser is not None and on_server.result.report is not None
    shot = tmp_path / "report.png"

    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            on_server.result.report.html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert shot.is_file(), done.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    gray = pixels.mean(axis=2)
    assert gray.std() > 10, "the page rendered blank"
    assert (gray < 200).mean() > 0.01  # text, tables and axes
    # The inlined SVG plots were drawn: many pixels in the plots' point colour.
    plotted = (np.abs(pixels - PLOT_BLUE).max(axis=2) < 40).sum()
    assert plotted > 500, f"only {plotted} pixels of plot colour"


def test_s3_down_is_refused_by_the_preflight_before_any_export(
    mlflow_server: MlflowBackend,
    checkpoint: LoadedCheckpoint,
    tmp_path: Path,
    one_torch_thread: None,
) -> None:
    assert mlflow_server.seaweedfs is not None
    settings = mlflow_server.settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    name = unique("s3down")

    with pytest.raises(StorageError, match="nothing listens at") as failure:
        publish(checkpoint.path, settings=settings, name=name, output_dir=tmp_path, **FAST)

    assert mlflow_server.seaweedfs.secret_key not in str(failure.value)
    assert list(tmp_path.iterdir()) == []  # not even exported
    assert versions_of(mlflow_server, name) == []


class Forwarder:
    """A local port that forwards TCP to ``target`` until closed: a server going away mid-run."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._target, timeout=30)
            self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Refuse new connections and cut the open ones (kept-alive HTTP ones included)."""
        with contextlib.suppress(OSError):  # wakes the accepting thread (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for end in self._open:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_mlflow_down_after_the_upload_fails_at_register_and_a_rerun_reuses_the_upload(
    mlflow_server: MlflowBackend,
    checkpoint: LoadedCheckpoint,
    s3_bucket: str,
    tmp_path: Path,
    one_torch_thread: None,
) -> None:
    name = unique("mlflowdown")
    server = urlparse(mlflow_server.tracking_uri)
    assert server.hostname is not None and server.port is not None
    forwarder = Forwarder(server.hostname, server.port)
    down = mlflow_server.settings(
        bucket=s3_bucket, tracking_uri=f"http://127.0.0.1:{forwarder.port}"
    )

    def stop_mlflow_once_uploaded(step: str, status: str, _detail: str) -> None:
        if step == "upload" and status in ("ok", "reused"):
            forwarder.close()

    with pytest.raises(PublishError) as failure:
        publish(
            checkpoint.path,
            settings=down,
            name=name,
            output_dir=tmp_path,
            progress=stop_mlflow_once_uploaded,
            **FAST,
        )

    error = failure.value
    uploaded = error.existing.get("uploaded", "")
    assert error.step == "register"
    assert uploaded.startswith(f"s3://{s3_bucket}/{PREFIX}") and uploaded.endswith(".onnx")
    assert uploaded in str(error)
    assert "nothing listens at" in error.reason or "did not answer" in error.reason
    stored = objects(mlflow_server, s3_bucket)
    upload_key = uploaded.removeprefix(f"s3://{s3_bucket}/")
    assert upload_key in stored
    assert versions_of(mlflow_server, name) == []

    result = publish(
        checkpoint.path,
        settings=mlflow_server.settings(bucket=s3_bucket),
        name=name,
        output_dir=tmp_path,
        **FAST,
    )

    status = {s.name: s.status for s in result.steps}
    assert (status["upload"], status["register"], status["alias"]) == ("reused", "ok", "ok")
    assert result.primary.upload.uri == uploaded
    after = objects(mlflow_server, s3_bucket)
    assert {k: after[k] for k in stored} == stored  # nothing sent or rewritten again
    model_dir = upload_key.removesuffix(".onnx") + "/"
    assert all(k.startswith(model_dir) for k in set(after) - set(stored))
    versions = versions_of(mlflow_server, name)
    assert [(str(v.version), v.status) for v in versions] == [("1", "READY")]
    assert str(client_for(mlflow_server).get_model_version_by_alias(name, "staging").version) == "1"


def cli_env(backend: MlflowBackend, data_dir: Path, bucket: str, name: str) -> dict[str, str]:
    """The environment a user would set for the CLI, and nothing of the developer's own."""
    own = ("MLFLOW_", "AWS_", "HEIMDALL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return {
        **env,
        **backend.env(),
        "HEIMDALL_DATA_DIR": str(data_dir),
        "HEIMDALL_BUCKET": bucket,
        "HEIMDALL_MODEL_NAME": name,
    }


def heimdall_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "heimdall.cli", *(str(a) for a in args)]


def kill_after_upload(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``cmd`` until its log says the upload step finished, then SIGKILL it."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if re.search(r"publish\.step .*step=upload\b", line):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        return proc.wait(timeout=60), "".join(seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def test_sigkill_after_the_upload_then_a_rerun_leaves_one_version_and_one_copy(
    mlflow_server: MlflowBackend,
    checkpoint: LoadedCheckpoint,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    assert mlflow_server.seaweedfs is not None
    name = unique("sigkill")
    env = cli_env(mlflow_server, tmp_path / "data", s3_bucket, name)
    cmd = heimdall_cmd("--log-level", "INFO", "publish", checkpoint.path, "--no-bench")

    code, log = kill_after_upload(cmd, env, tmp_path)

    assert code == -signal.SIGKILL, f"not killed mid-publish (exit {code}):\n{log[-3000:]}"
    (upload_key,) = onnx_keys(mlflow_server, s3_bucket)

    rerun = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"publish\.step .*status=reused step=upload\b", rerun.stderr)
    client = mlflow_server.seaweedfs.client()
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    sha256 = client.head_object(Bucket=s3_bucket, Key=upload_key)["Metadata"]["sha256"]
    (version,) = client_for(mlflow_server).search_model_versions(
        f"name = '{name}' and tags.sha256 = '{sha256}'"
    )
    assert version.status == "READY"
    source_key = version.source.removeprefix(f"s3://{s3_bucket}/")
    assert source_key.startswith(upload_key.removesuffix(".onnx") + "/")  # its own folder
    assert onnx_keys(mlflow_server, s3_bucket) == {upload_key, f"{source_key}/model.onnx"}
    assert len(versions_of(mlflow_server, name)) == 1


def downloaded_run_files(backend: MlflowBackend, run_id: str, dest: Path) -> dict[str, str]:
    """Every artifact of a run, by path, as text."""
    root = Path(client_for(backend).download_artifacts(run_id, "", str(dest)))
    return {
        str(p.relative_to(root)): p.read_text(errors="replace")
        for p in root.rglob("*")
        if p.is_file()
    }


@dataclass(frozen=True)
class SecretRun:
    """``heimdall --log-level DEBUG publish --json`` with a secret key and a password in the
    tracking URI, and every text it left behind: output, report, tags, run artifacts."""

    secrets: tuple[str, ...]
    name: str
    stdout: str
    texts: dict[str, str]


@pytest.fixture(scope="module")
def secret_run(
    mlflow_server: MlflowBackend,
    checkpoint: LoadedCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
) -> SecretRun:
    assert mlflow_server.seaweedfs is not None
    tmp = tmp_path_factory.mktemp("secrets")
    password = f"pw-{os.urandom(6).hex()}"
    bucket, name = unique("secrets"), unique("secrets")
    mlflow_server.seaweedfs.client().create_bucket(Bucket=bucket)
    env = cli_env(mlflow_server, tmp / "data", bucket, name)
    # MLflow basic auth is off on this server: the credentials travel and are ignored.
    port = urlparse(mlflow_server.tracking_uri).port
    env["MLFLOW_TRACKING_URI"] = f"http://heimdall:{password}@127.0.0.1:{port}"
    out = tmp / "out"
    cmd = heimdall_cmd(
        "--log-level", "DEBUG", "publish", checkpoint.path, "--no-bench", "--output-dir", out
    )

    done = subprocess.run(
        [*cmd, "--json"], env=env, cwd=tmp, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting new HTTP connection" in done.stderr  # DEBUG logging really was on
    (version,) = versions_of(mlflow_server, name)
    client = client_for(mlflow_server)
    model = client.get_registered_model(name)
    run = client.get_run(version.run_id)
    texts = {
        "stdout": done.stdout,
        "stderr": done.stderr,
        "report.json": (out / "reports" / name / "v1" / "report.json").read_text(),
        "report.html": (out / "reports" / name / "v1" / "report.html").read_text(),
        "version": json.dumps(
            {"tags": version.tags, "source": version.source, "description": version.description}
        ),
        "model": json.dumps({"tags": model.tags, "description": model.description}),
        "run": json.dumps({"params": run.data.params, "tags": run.data.tags}),
        **downloaded_run_files(mlflow_server, version.run_id, tmp / "artifacts"),
    }
    assert any(k.startswith("onnx_metadata/") for k in texts), sorted(texts)
    assert {f"report/{name}/v1/report.json", f"report/{name}/v1/report.html"} <= set(texts)
    secrets = (mlflow_server.seaweedfs.secret_key, password)
    return SecretRun(secrets, name, done.stdout, texts)


def test_no_secret_reaches_output_reports_tags_or_run_artifacts(secret_run: SecretRun) -> None:
    leaks = [
        f"{where}: {line.strip().replace(secret, '<SECRET>')[:300]}"
        for secret in secret_run.secrets
        for where, text in secret_run.texts.items()
        for line in text.splitlines()
        if secret in line
    ]

    assert not leaks, "a secret appears in:\n" + "\n".join(leaks)


def test_publish_json_against_a_server_is_one_json_document_on_stdout(
    secret_run: SecretRun,
) -> None:
    published = json.loads(secret_run.stdout)

    assert published["success"] is True
    assert published["name"] == secret_run.name
    assert published["published"][0]["version"] == "1"


def test_the_demo_command_runs_unchanged_against_s3_and_an_mlflow_server(
    mlflow_server: MlflowBackend, tmp_path: Path
) -> None:
    assert mlflow_server.seaweedfs is not None
    bucket, name = unique("demo"), unique("demo")
    env = cli_env(mlflow_server, tmp_path / "data", bucket, name)
    # Only the original design's variable names: nothing heimdall-specific for S3.
    for own in ("HEIMDALL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(own)
    cmd = heimdall_cmd("demo", "--epochs", "1", "--samples", "96", "--json")

    done = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)["summary"]
    assert summary["model"] == f"models:/{name}@staging"
    assert summary["stored_at"].startswith(f"s3://{bucket}/models/localization/v")
    (version,) = versions_of(mlflow_server, name)
    assert summary["version"] == str(version.version)
    assert version.tags["sha256"] == summary["sha256"]


def test_training_against_a_server_never_prints_the_tracking_password(
    mlflow_server: MlflowBackend, tmp_path: Path
) -> None:
    password = f"pw-{os.urandom(6).hex()}"
    env = cli_env(mlflow_server, tmp_path / "data", unique("train"), unique("train"))
    port = urlparse(mlflow_server.tracking_uri).port
    env["MLFLOW_TRACKING_URI"] = f"http://heimdall:{password}@127.0.0.1:{port}"
    cmd = heimdall_cmd(
        "train", "--epochs", "1", "--samples", "32", "-o", tmp_path / "c.safetensors", "--json"
    )

    done = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["run_id"]  # the run really went to the server
    assert password not in done.stdout + done.stderr
