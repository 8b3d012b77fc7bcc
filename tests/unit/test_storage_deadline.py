"""S3 requests against a server that accepts connections and never answers fail in time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from heimdall.config import Settings
from heimdall.errors import InputError, StorageError
from heimdall.export import ExportResult
from heimdall.storage import MiB, S3Store, open_store, upload_model
from tests.fixtures.process import free_port

DEADLINE_S = 5.0
# A correctness bound, not a benchmark: the old client waited 3 x 60 s.
MARGIN_S = 10.0
SLOW_BYTES_PER_S = 2 * 1024 * 1024


@pytest.fixture
def slow_endpoint() -> Iterator[str]:
    """An S3 endpoint on a slow link: reads request bodies at 2 MiB/s, then answers 200.

    Enough of S3 for put_object and a multipart upload; it stores nothing.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            head, _, body = head.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            if fields.get("expect") == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            length, got, started = int(fields.get("content-length", 0)), len(body), time.monotonic()
            while got < length:
                got += len(conn.recv(min(16384, length - got)))
                time.sleep(max(0.0, got / SLOW_BYTES_PER_S - (time.monotonic() - started)))
            method, target = lines[0].split()[:2]
            if method == "POST" and target.endswith("?uploads"):
                xml = "<InitiateMultipartUploadResult><UploadId>u</UploadId>"
                payload = f"{xml}</InitiateMultipartUploadResult>".encode()
            elif method == "POST":
                payload = b"<CompleteMultipartUploadResult></CompleteMultipartUploadResult>"
            else:
                payload = b""
            conn.sendall(
                b'HTTP/1.1 200 OK\r\nETag: "e"\r\nConnection: close\r\n'
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, name="slow-s3", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


def test_attempts_and_socket_timeouts_fit_the_deadline() -> None:
    for timeout in (2.0, 5.0, 26.0, 30.0, 60.0, 600.0):
        store = S3Store("http://127.0.0.1:9", timeout_s=timeout)
        config = store._client.meta.config
        attempts = config.retries["total_max_attempts"]
        # botocore's standard mode sleeps up to min(2**i, 20) s, plus 5 s of retry-after; an
        # attempt with a streamed body first waits 1 s for "100 Continue".
        backoff = sum(min(2**i, 20) + 5 for i in range(attempts - 1))
        worst = attempts * (config.connect_timeout + 1 + config.read_timeout) + backoff
        assert worst <= timeout + 1e-9, (timeout, attempts, config.read_timeout)
        assert config.read_timeout >= timeout / 10, (timeout, config.read_timeout)
        # Requests with a body wait 8 s more per attempt: 8 MiB parts at 1 MiB/s.
        send = store._send_client.meta.config
        assert send.read_timeout == pytest.approx(config.read_timeout + 8)
        assert send.retries["total_max_attempts"] == attempts


def test_a_deadline_too_short_for_one_attempt_is_refused() -> None:
    with pytest.raises(InputError, match="HEIMDALL_S3_TIMEOUT_S"):
        S3Store("http://127.0.0.1:9", timeout_s=0.5)


def test_s3_store_from_settings_takes_the_deadline_from_settings() -> None:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9", s3_timeout_s=12.5)

    store = open_store(settings)

    assert isinstance(store, S3Store)
    assert store.timeout_s == 12.5


def test_silent_s3_endpoint_fails_within_the_deadline_naming_endpoint_and_setting(
    silent_endpoint: str, tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(1000))
    store = S3Store(
        silent_endpoint,
        access_key_id="id",
        secret_access_key="secret-value-123",
        timeout_s=DEADLINE_S,
    )

    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        upload_model(model, store, "heimdall-models")
    elapsed = time.monotonic() - started

    assert elapsed < DEADLINE_S + MARGIN_S, elapsed
    message = str(caught.value)
    assert "\n" not in message
    assert silent_endpoint in message
    assert "did not answer within the 5 s deadline" in message
    assert "HEIMDALL_S3_TIMEOUT_S" in message
    assert "secret-value-123" not in message


def test_credentials_in_a_silent_endpoint_url_are_redacted_in_the_error(
    silent_endpoint: str, tmp_path: Path
) -> None:
    host = silent_endpoint.removeprefix("http://")
    store = S3Store(
        f"http://someone:hunter2-secret@{host}",
        access_key_id="id",
        secret_access_key="secret-value-123",
        timeout_s=2.0,
    )

    with pytest.raises(StorageError) as caught:
        store.bucket_exists("heimdall-models")

    assert "did not answer within the 2 s deadline" in str(caught.value)
    assert host in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)
    assert "HEIMDALL_S3_TIMEOUT_S" in str(caught.value)


def _cli(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "heimdall.cli", *args],
        env={**os.environ, "HEIMDALL_DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=DEADLINE_S + 120,
        check=False,
    )
    return result, time.monotonic() - started


def test_heimdall_upload_to_a_silent_endpoint_fails_within_the_deadline(
    silent_endpoint: str, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    env = {
        "HEIMDALL_S3_ENDPOINT_URL": silent_endpoint,
        "HEIMDALL_S3_TIMEOUT_S": str(DEADLINE_S),
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret-value-123",
    }
    # What the command costs before its first S3 request: start-up, imports, validation.
    _, startup = _cli(["validate", str(atto_onnx.path)], env, tmp_path)

    result, elapsed = _cli(["upload", str(atto_onnx.path)], env, tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < startup + DEADLINE_S + MARGIN_S, (elapsed, startup)
    message = one_line(result.stderr)
    assert silent_endpoint in message
    assert "HEIMDALL_S3_TIMEOUT_S" in message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("size_mib", [4, 6], ids=["one-put", "multipart"])
def test_large_bodies_reach_a_slow_server_within_a_short_deadline(
    slow_endpoint: str, tmp_path: Path, size_mib: int
) -> None:
    # 2 s gives a 0.5 s read timeout: far less than the slow server needs to drain what the
    # kernel buffered after the last byte was sent. Bodies get their own allowance.
    store = S3Store(
        slow_endpoint,
        access_key_id="id",
        secret_access_key="secret-value-123",
        part_size=5 * MiB,
        concurrency=1,
        timeout_s=2.0,
    )
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes(size_mib * MiB))

    store.put_file("bucket", "models/model.onnx", path, if_absent=False)


def test_an_s3_error_hides_a_secret_key_of_any_length() -> None:
    """S3 servers other than MinIO accept keys under 8 characters; they are scrubbed too."""
    store = S3Store("http://127.0.0.1:9", access_key_id="AKID", secret_access_key="k3y")
    failure = ClientError({"Error": {"Code": "Denied", "Message": "key k3y refused"}}, "PutObject")

    message = str(store._translate("upload", failure))
    assert "refused" in message and "k3y" not in message


def test_a_refused_s3_connection_says_nothing_listens_there_within_the_deadline() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store(endpoint, access_key_id="id", secret_access_key="secret", timeout_s=DEADLINE_S)

    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        store.bucket_exists("heimdall-models")

    assert time.monotonic() - started < DEADLINE_S + MARGIN_S
    assert f"nothing listens at {endpoint}" in str(caught.value)
    assert "MLFLOW_S3_ENDPOINT_URL" in str(caught.value)


def test_refused_credentials_name_both_spellings_of_the_key_variables() -> None:
    store = S3Store("http://127.0.0.1:9", access_key_id="AKID", secret_access_key="k3y")
    denied = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")

    message = str(store._translate("checking bucket 'b'", denied))

    for name in (
        "MLFLOW_S3_ACCESS_KEY_ID",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_S3_SECRET_ACCESS_KEY",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert name in message


def test_no_credentials_at_all_names_the_variables_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(f"http://127.0.0.1:{free_port()}", timeout_s=DEADLINE_S)

    with pytest.raises(StorageError) as caught:
        store.bucket_exists("heimdall-models")

    message = str(caught.value)
    assert "no S3 credentials" in message
    assert "MLFLOW_S3_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
