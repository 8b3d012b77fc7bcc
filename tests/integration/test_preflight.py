"""The publish preflight against real targets: SeaweedFS, `mlflow server` and the embedded store.

Each broken target fails in one line within its deadline, and the preflight leaves nothing on
the servers: no object, no registered model (its write probe is created and deleted).
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from heimdall.config import Settings
from heimdall.errors import ConfigError, HeimdallError, RegistryError, StorageError
from heimdall.preflight import check_server, preflight
from heimdall.storage import LocalStore
from tests.fixtures.mlflow_server import MlflowBackend
from tests.fixtures.process import ManagedProcess, free_port, http_ok, unavailable
from tests.fixtures.seaweedfs import SeaweedFS

DEADLINE_S = 6.0
MARGIN_S = 10.0  # a correctness bound on a loaded 2-core machine, not a benchmark


def all_models(backend: MlflowBackend) -> set[str]:
    client = MlflowClient(tracking_uri=backend.tracking_uri)
    return {m.name for m in client.search_registered_models(max_results=1000)}


def one_line_within_deadline(started: float, error: HeimdallError) -> str:
    assert time.monotonic() - started < DEADLINE_S + MARGIN_S
    message = str(error)
    assert "\n" not in message
    return message


def test_a_healthy_server_and_bucket_pass_and_leave_no_registered_model(
    mlflow_server: MlflowBackend,
) -> None:
    before = all_models(mlflow_server)

    preflight(mlflow_server.settings(), bucket=mlflow_server.bucket)

    assert all_models(mlflow_server) == before


def test_a_missing_bucket_fails_naming_create_bucket_and_is_created_when_asked(
    mlflow_server: MlflowBackend, seaweedfs: SeaweedFS
) -> None:
    bucket = f"absent-{secrets.token_hex(4)}"
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        preflight(mlflow_server.settings(bucket=bucket), bucket=bucket)

    assert "--create-bucket" in one_line_within_deadline(started, caught.value)
    client = seaweedfs.client()
    assert bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}

    preflight(mlflow_server.settings(bucket=bucket), bucket=bucket, create_bucket=True)
    assert bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_a_wrong_secret_fails_naming_the_key_variables_without_the_secret(
    seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path
) -> None:
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        preflight(
            seaweedfs.settings(data_dir=tmp_path, s3_secret_access_key=wrong, s3_timeout_s=5),
            bucket=s3_bucket,
        )

    message = one_line_within_deadline(started, caught.value)
    assert "refused the credentials" in message
    assert "MLFLOW_S3_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY)" in message
    assert "MLFLOW_S3_ACCESS_KEY_ID (or AWS_ACCESS_KEY_ID)" in message
    assert wrong not in message
    assert seaweedfs.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_an_endpoint_nobody_listens_on_fails_within_the_deadline(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        preflight(
            Settings(
                data_dir=tmp_path,
                tracking_uri=None,
                s3_endpoint_url=endpoint,
                s3_access_key_id="id",
                s3_secret_access_key="secret",
                s3_timeout_s=DEADLINE_S,
            ),
            bucket="heimdall-models",
        )

    assert f"nothing listens at {endpoint}" in one_line_within_deadline(started, caught.value)


def test_a_tracking_server_with_a_local_store_is_refused_before_anything_is_written(
    mlflow_server: MlflowBackend,
) -> None:
    before = all_models(mlflow_server)
    local = mlflow_server.settings(
        s3_endpoint_url=None, s3_access_key_id=None, s3_secret_access_key=None
    )

    with pytest.raises(ConfigError, match="no other host could load the model"):
        preflight(local, bucket=local.bucket, create_bucket=True)

    assert all_models(mlflow_server) == before
    assert not (local.resolved_data_dir / "objects").exists()


def test_a_store_given_explicitly_is_the_one_checked_and_paired(
    mlflow_server: MlflowBackend, tmp_path: Path
) -> None:
    """The seed API passes its own client: the settings then carry no S3 endpoint."""
    bare = mlflow_server.settings(
        s3_endpoint_url=None, s3_access_key_id=None, s3_secret_access_key=None
    )

    preflight(bare, bucket=mlflow_server.bucket, store=mlflow_server.store())

    with pytest.raises(ConfigError, match="no other host could load the model"):
        preflight(bare, bucket="b", create_bucket=True, store=LocalStore(tmp_path))


def test_the_embedded_store_passes_and_keeps_no_probe(embedded_mlflow: MlflowBackend) -> None:
    settings = embedded_mlflow.settings()

    all_models(embedded_mlflow)  # the store exists: the probe runs
    preflight(settings, bucket=settings.bucket, create_bucket=True)

    assert not [name for name in all_models(embedded_mlflow) if "preflight" in name]


@pytest.fixture(scope="module")
def server_without_s3_keys(
    seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`mlflow server` proxying artifacts to SeaweedFS with no S3 credentials of its own."""
    bucket = f"keyless-{secrets.token_hex(3)}"
    seaweedfs.client().create_bucket(Bucket=bucket)
    workdir = tmp_path_factory.mktemp("keyless-mlflow")
    port = free_port()
    process = ManagedProcess(
        "mlflow-keyless",
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}"),
            *("--artifacts-destination", f"s3://{bucket}"),
        ],
        env={
            "MLFLOW_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"),
            "AWS_CONFIG_FILE": str(workdir / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
        cwd=workdir,
    ).start()
    url = f"http://127.0.0.1:{port}"
    if not process.wait_until(http_ok(f"{url}/health"), timeout=180):
        tail = process.log_tail()
        process.stop()
        unavailable(f"mlflow server without S3 keys did not start:\n{tail}")
    try:
        yield url
    finally:
        process.stop()


def test_a_server_without_s3_keys_is_reported_with_its_500_and_what_it_lacks(
    server_without_s3_keys: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, mlflow_timeout_s=DEADLINE_S)
    with pytest.raises(RegistryError) as caught:
        check_server(settings, server_without_s3_keys)

    message = str(caught.value)
    assert "answered HTTP 500" in message
    assert "AWS_ACCESS_KEY_ID" in message and "did not answer" not in message
