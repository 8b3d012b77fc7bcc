"""The publish preflight against stand-ins for broken targets: a refused port, an HTTP 500."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from heimdall.config import Settings
from heimdall.errors import ConfigError, RegistryError, StorageError
from heimdall.preflight import check_pairing, check_server, preflight
from heimdall.storage import open_store
from tests.fixtures.process import free_port

DEADLINE_S = 6.0
MARGIN_S = 10.0  # a correctness bound on a loaded 2-core machine, not a benchmark


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        **{"tracking_uri": None, "s3_endpoint_url": None, "mlflow_timeout_s": DEADLINE_S, **values},
    )


def test_a_tracking_server_with_a_local_object_store_is_refused(tmp_path: Path) -> None:
    paired = settings(tmp_path, tracking_uri="http://u:pw@mlflow.example:5000")
    with pytest.raises(ConfigError) as caught:
        check_pairing(paired, open_store(paired))

    message = str(caught.value)
    assert "no other host could load the model" in message
    assert "MLFLOW_S3_ENDPOINT_URL" in message
    assert "pw" not in message and "\n" not in message


def test_the_embedded_store_with_a_local_object_store_is_a_valid_pairing(tmp_path: Path) -> None:
    embedded = settings(tmp_path)
    check_pairing(embedded, open_store(embedded))


def test_a_server_answering_500_is_reported_with_its_status_and_message(
    failing_server: str, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError) as caught:
        check_server(settings(tmp_path), failing_server)

    message = str(caught.value)
    assert f"the MLflow server at {failing_server} answered HTTP 500: database is gone" in message
    assert "did not answer" not in message and "\n" not in message


def test_a_refused_connection_says_nothing_listens_there_without_urllib3_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url, secret_url = f"http://***@127.0.0.1:{port}", f"http://u:pw-7f3a@127.0.0.1:{port}"
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(RegistryError) as caught:
        check_server(settings(tmp_path, tracking_uri=secret_url, s3_endpoint_url=None), secret_url)

    assert time.monotonic() - started < DEADLINE_S + MARGIN_S
    assert f"nothing listens at {url}" in str(caught.value)
    assert "pw-7f3a" not in str(caught.value)
    assert "Retrying" not in capsys.readouterr().err
    assert not [r for r in caplog.records if r.getMessage().startswith("Retrying")]


def test_a_missing_local_bucket_names_create_bucket_and_a_fresh_data_dir_stays_untouched(
    tmp_path: Path,
) -> None:
    fresh = settings(tmp_path / "data")
    with pytest.raises(StorageError, match="--create-bucket"):
        preflight(fresh, bucket="absent", create_bucket=False)

    preflight(fresh, bucket="absent", create_bucket=True)

    # A publish that fails at its first step then leaves no store behind.
    assert not (tmp_path / "data").exists()


def test_an_unwritable_object_store_is_one_line_before_any_registry_call(tmp_path: Path) -> None:
    # Permission bits do not stop root; a path under a regular file cannot be written by anyone.
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError) as caught:
        preflight(settings(tmp_path / "file" / "data"), bucket="b", create_bucket=True)

    assert "is not writable" in str(caught.value)
    assert "HEIMDALL_DATA_DIR" in str(caught.value)
