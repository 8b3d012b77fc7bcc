"""Opening MLflow stores: deadlines, unopenable and half-migrated SQLite files, safe creation."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heimdall.config import Settings
from heimdall.errors import RegistryError
from heimdall.registry import list_models
from heimdall.tracking import (
    describe_failure,
    describe_response,
    http_policy,
    open_client,
    quiet_retries,
    sqlite_path,
)

DEADLINE_S = 6.0
MARGIN_S = 4.0  # a correctness bound, not a benchmark: the old client waited 135 s


def test_every_mlflow_wait_defaults_to_at_most_30_seconds() -> None:
    assert Settings().mlflow_timeout_s <= 30


@pytest.mark.parametrize("deadline", [6.0, 30.0, 120.0])
def test_the_http_policy_fits_three_attempts_and_backoff_in_the_deadline(deadline: float) -> None:
    policy = http_policy(deadline)
    attempts = int(policy["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    backoff = float(policy["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) + float(
        policy["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"]
    )
    assert attempts * int(policy["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + backoff <= deadline


def test_a_hanging_mlflow_server_fails_within_the_deadline_naming_it_and_the_setting(
    silent_endpoint: str, tmp_path: Path
) -> None:
    uri = silent_endpoint.replace("http://", "http://user:pw-7f3a@")
    settings = Settings(data_dir=tmp_path, tracking_uri=uri, mlflow_timeout_s=DEADLINE_S)
    started = time.monotonic()

    with pytest.raises(RegistryError) as failure:
        list_models(settings=settings)

    assert time.monotonic() - started < DEADLINE_S + MARGIN_S
    message = str(failure.value)
    assert silent_endpoint.removeprefix("http://") in message
    assert "HEIMDALL_MLFLOW_TIMEOUT_S" in message
    assert "pw-7f3a" not in message and "\n" not in message


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b"this is not a database" * 100),
        lambda p: p.mkdir(),
    ],
    ids=["garbage", "directory"],
)
def test_an_unopenable_store_is_reported_at_once(make: object, tmp_path: Path) -> None:
    make(tmp_path / "mlflow.db")  # type: ignore[operator]
    started = time.monotonic()

    with pytest.raises(RegistryError, match="cannot open the MLflow store"):
        list_models(settings=Settings(data_dir=tmp_path, tracking_uri=None))

    assert time.monotonic() - started < MARGIN_S


def test_a_damaged_sqlite_store_is_never_advised_aside(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)

    with pytest.raises(RegistryError, match="cannot open the MLflow store") as caught:
        list_models(settings=Settings(data_dir=tmp_path, tracking_uri=None))

    assert "aside" not in str(caught.value) and "backup" in str(caught.value)


def test_a_half_migrated_store_is_explained_never_used(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table _alembic_tmp_metrics (id integer)")
        connection.execute("create table experiments (id integer)")

    with pytest.raises(RegistryError, match=r"half-migrated .*_alembic_tmp_metrics"):
        list_models(settings=Settings(data_dir=tmp_path, tracking_uri=None))


def test_a_new_store_is_created_whole_and_in_wal_mode(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"

    open_client(uri, None, timeout_s=30).search_experiments()

    path = sqlite_path(uri)
    assert path is not None
    with sqlite3.connect(path) as connection:
        assert connection.execute("pragma journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in connection.execute("select name from sqlite_master")}
    assert {"experiments", "registered_models", "model_versions", "alembic_version"} <= tables


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:////abs/dir/mlflow.db", Path("/abs/dir/mlflow.db")),
        ("sqlite:///relative.db", Path("relative.db")),
        ("postgresql://u@h/db", None),
        ("http://127.0.0.1:5000", None),
    ],
)
def test_sqlite_path_reads_sqlalchemy_uris(uri: str, expected: Path | None) -> None:
    assert sqlite_path(uri) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "API request to http://h/api failed with exception HTTPConnectionPool: Max retries "
            "exceeded with url: /api (Caused by ResponseError('too many 500 error responses'))",
            "the MLflow server at http://h answered HTTP 500 to every attempt",
        ),
        (
            "API request to endpoint /api failed with error code 503 != 200. Response body: "
            '\'{"error_code": "X", "message": "store is down"}\'',
            "the MLflow server at http://h answered HTTP 503: store is down",
        ),
        (
            "HTTPConnectionPool(host='h', port=1): Max retries exceeded (Caused by "
            "NewConnectionError('Failed to establish a new connection: [Errno 111] Connection "
            "refused'))",
            "nothing listens at http://h",
        ),
        (
            "NoCredentialsError: Unable to locate credentials",
            "no S3 credentials: set MLFLOW_S3_ACCESS_KEY_ID (or AWS_ACCESS_KEY_ID)",
        ),
    ],
)
def test_a_failed_mlflow_call_says_what_happened(text: str, expected: str) -> None:
    described = describe_failure(text, "http://h")
    assert described is not None and expected in described


def test_a_failure_that_names_no_status_or_refusal_is_left_to_the_caller() -> None:
    assert describe_failure("read timed out", "http://h") is None


def test_an_html_error_page_is_reported_by_its_title() -> None:
    page = "<html><head><title>500 Internal Server Error</title></head><body>long…</body></html>"
    assert describe_response(500, page, "http://h").endswith("HTTP 500: Internal Server Error")


def test_quiet_retries_holds_back_urllib3_retry_warnings_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = logging.getLogger("urllib3.connectionpool")
    filters = list(pool.filters)
    with caplog.at_level(logging.WARNING, logger=pool.name), quiet_retries():
        pool.warning("Retrying (Retry(total=1)) after connection broken")
        pool.warning("Connection pool is full")

    assert [r.getMessage() for r in caplog.records] == ["Connection pool is full"]
    assert pool.filters == filters


def test_a_read_only_data_dir_is_said_plainly_never_move_aside(tmp_path: Path) -> None:
    """A healthy store on a read-only mount (root ignores permission bits: a private mount
    namespace makes the data dir read-only for the CLI alone)."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("needs unshare --mount for a read-only bind mount")
    data = tmp_path / "data"
    env = {**os.environ, "HEIMDALL_DATA_DIR": str(data), "MLFLOW_TRACKING_URI": ""}
    heimdall = str(Path(sys.executable).with_name("heimdall"))
    subprocess.run([heimdall, "models", "list"], env=env, check=True, capture_output=True)
    script = (
        f'mount --bind "{data}" "{data}" && mount -o remount,bind,ro "{data}" && '
        f'"{heimdall}" models list'
    )

    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], env=env, capture_output=True, text=True
    )

    assert done.returncode == 1, done.stderr
    assert "read-only" in done.stderr and "make" in done.stderr and "writable" in done.stderr
    assert "aside" not in done.stderr and "Traceback" not in done.stderr
