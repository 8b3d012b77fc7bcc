"""Storage against a real SeaweedFS S3 server with real access keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from heimdall.errors import StorageError
from heimdall.files import sha256_chunks, sha256_file
from heimdall.storage import (
    LocalStore,
    ObjectExistsError,
    ObjectStore,
    S3Store,
    download_model,
    upload_model,
)
from tests.fixtures.process import free_port
from tests.fixtures.seaweedfs import SeaweedFS, peak_rss_of

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("wb") as fh:
        for offset in range(0, size, 16 * MiB):
            fh.write(rng.bytes(min(16 * MiB, size - offset)))
    return path


def stored_sha256(client: Any, bucket: str, key: str) -> str:
    return sha256_chunks(client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(MiB))[0]


@pytest.fixture
def store(seaweedfs: SeaweedFS) -> S3Store:
    return S3Store.from_settings(seaweedfs.settings())


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_random(tmp_path / "model.onnx", 12 * MiB + 5)


_UPLOAD = """
import json, sys
from heimdall.storage import upload_to_minio
print(json.dumps({"uri": upload_to_minio(sys.argv[1], bucket_name=sys.argv[2])}))
"""
_BASELINE = """
import sys
from heimdall.config import load_settings
from heimdall.storage import open_store
assert open_store(load_settings()).bucket_exists(sys.argv[2])
"""


def test_110mb_round_trip_keeps_bytes_and_metadata_with_bounded_memory(
    seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path
) -> None:
    path = write_random(tmp_path / "model.onnx", 110 * MiB)
    env = {**os.environ, **seaweedfs.env(), "HEIMDALL_DATA_DIR": str(tmp_path / "data")}
    args = [str(path), s3_bucket]

    _, baseline = peak_rss_of([sys.executable, "-c", _BASELINE, *args], env)
    out, peak = peak_rss_of([sys.executable, "-c", _UPLOAD, *args], env)

    uri = json.loads(out.splitlines()[-1])["uri"]  # structlog may print before it
    match = re.fullmatch(
        rf"s3://{s3_bucket}/(models/localization/v\d{{8}}_\d{{6}}-[0-9a-f]{{12}}\.onnx)", uri
    )
    assert match, uri
    client = seaweedfs.client()
    head = client.head_object(Bucket=s3_bucket, Key=match[1])
    local_sha = sha256_file(path)
    assert head["ContentLength"] == path.stat().st_size
    assert head["ContentType"] == "application/octet-stream"
    assert head["Metadata"]["sha256"] == local_sha
    assert head["Metadata"]["file-size"] == str(110 * MiB)
    assert {"export-date", "model-type", "format"} <= head["Metadata"].keys()
    assert not any(seaweedfs.secret_key in v for v in head["Metadata"].values())
    store = S3Store.from_settings(seaweedfs.settings())
    downloaded = download_model(store, uri, tmp_path / "down")
    assert sha256_file(downloaded) == local_sha
    # The process holds a few parts at a time, never the file: well under its size + 200 MB,
    # and within 100 MiB of a process that imported the same code and made one request.
    assert peak < path.stat().st_size + 200 * MiB, (peak, baseline)
    assert peak - baseline < 100 * MiB, (peak, baseline)


def test_unreachable_server_fails_fast_with_a_clear_error(model: Path) -> None:
    secret = secrets.token_urlsafe(16)
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store(endpoint, access_key_id="id", secret_access_key=secret)

    started = time.monotonic()
    with pytest.raises(StorageError, match="nothing listens at") as caught:
        upload_model(model, store, "heimdall-models")

    assert time.monotonic() - started < 15
    assert endpoint in str(caught.value)
    assert secret not in str(caught.value)


def test_server_killed_mid_upload_leaves_no_object_and_no_stale_multipart_upload(
    seaweedfs_factory: Callable[[], SeaweedFS], tmp_path: Path
) -> None:
    server = seaweedfs_factory()
    client = server.client()
    client.create_bucket(Bucket="crash-test")
    path = write_random(tmp_path / "model.onnx", 40 * MiB)
    store = S3Store.from_settings(server.settings(), part_size=5 * MiB, concurrency=2)
    now = datetime.now(UTC).replace(microsecond=0)
    key = f"models/localization/v{now:%Y%m%d_%H%M%S}-{sha256_file(path)[:12]}.onnx"
    sent: list[int] = []

    def crash_after_first_part(done: int, total: int) -> None:
        if not sent:
            server.kill()
        sent.append(done)

    started = time.monotonic()
    with pytest.raises(StorageError, match=r"nothing listens at|cannot reach") as caught:
        upload_model(path, store, "crash-test", clock=at(now), progress=crash_after_first_part)
    assert time.monotonic() - started < 30
    assert "could not be aborted" in str(caught.value)
    assert 0 < sent[0] < path.stat().st_size

    server.restart()
    assert store.head("crash-test", key) is None
    # The dead server could not be told to abort; the upload outlived the crash ...
    assert len(client.list_multipart_uploads(Bucket="crash-test").get("Uploads", [])) == 1
    # ... until the next upload under the prefix, once it has been idle for `stale_after`.
    result = upload_model(path, store, "crash-test", clock=at(now + timedelta(hours=2)))
    assert client.list_multipart_uploads(Bucket="crash-test").get("Uploads", []) == []
    assert stored_sha256(client, "crash-test", result.key) == sha256_file(path)


def test_wrong_secret_key_is_a_clear_error_without_the_secret(
    seaweedfs: SeaweedFS, s3_bucket: str, model: Path
) -> None:
    wrong = f"wrong-{secrets.token_urlsafe(16)}"
    store = S3Store.from_settings(seaweedfs.settings(s3_secret_access_key=wrong))

    with capture_logs() as logs, pytest.raises(StorageError) as caught:
        upload_model(model, store, s3_bucket)

    assert "refused the credentials" in str(caught.value)
    everything = "".join(traceback.format_exception(caught.value)) + repr(logs)
    assert wrong not in everything
    assert seaweedfs.secret_key not in everything


def test_missing_bucket_is_an_error_naming_create_bucket(
    seaweedfs: SeaweedFS, store: S3Store, model: Path
) -> None:
    bucket = f"absent-{secrets.token_hex(4)}"

    with pytest.raises(StorageError, match="--create-bucket"):
        upload_model(model, store, bucket)

    # SeaweedFS would create a bucket on the first PUT; the check comes before any PUT.
    assert bucket not in [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]


def test_missing_bucket_is_created_when_asked(store: S3Store, model: Path) -> None:
    bucket = f"created-{secrets.token_hex(4)}"

    result = upload_model(model, store, bucket, create_bucket=True)

    assert store.bucket_exists(bucket)
    assert result.uri == f"s3://{bucket}/{result.key}"


class CountingStore(S3Store):
    puts = 0

    def put_file(self, *args: Any, **kwargs: Any) -> None:
        type(self).puts += 1
        super().put_file(*args, **kwargs)


def test_same_bytes_again_return_the_existing_uri_without_a_second_put(
    seaweedfs: SeaweedFS, s3_bucket: str, model: Path
) -> None:
    store = CountingStore.from_settings(seaweedfs.settings())
    now = datetime.now(UTC)
    first = upload_model(model, store, s3_bucket, clock=at(now))
    listing = store.list_objects(s3_bucket)

    again = upload_model(model, store, s3_bucket, clock=at(now + timedelta(minutes=5)))

    assert (again.uri, again.reused, CountingStore.puts) == (first.uri, True, 1)
    assert store.list_objects(s3_bucket) == listing  # same keys, sizes, LastModified, ETags


class Unaware:
    """A writer that sees only its own objects and writes unconditionally.

    Two of them over one bucket are two processes that looked for a free key at the same moment
    on a server that does not enforce ``If-None-Match`` under concurrency (SeaweedFS).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    def head(self, bucket: str, key: str) -> Any:
        return super().head(bucket, key) if key in self.written else None  # type: ignore[misc]

    def list_objects(self, bucket: str, prefix: str = "") -> list[Any]:
        found = super().list_objects(bucket, prefix)  # type: ignore[misc]
        return [info for info in found if info.key in self.written]

    def put_file(self, bucket: str, key: str, path: Path, **kwargs: Any) -> None:
        super().put_file(bucket, key, path, **{**kwargs, "if_absent": False})  # type: ignore[misc]
        self.written.add(key)

    def put_bytes(self, bucket: str, key: str, data: bytes, **kwargs: Any) -> None:
        super().put_bytes(bucket, key, data, **{**kwargs, "if_absent": False})  # type: ignore[misc]
        self.written.add(key)


class UnawareS3Store(Unaware, S3Store):
    pass


class UnawareLocalStore(Unaware, LocalStore):
    pass


@pytest.mark.parametrize("backend", ["seaweedfs", "local"])
def test_two_models_uploaded_in_the_same_second_without_if_none_match_both_survive(
    backend: str, seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path
) -> None:
    a = write_random(tmp_path / "a.onnx", 6 * MiB, seed=1)
    b = write_random(tmp_path / "b.onnx", 6 * MiB, seed=2)
    now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

    def writer() -> ObjectStore:
        if backend == "seaweedfs":
            return UnawareS3Store.from_settings(seaweedfs.settings(), part_size=5 * MiB)
        return UnawareLocalStore(tmp_path / "objects")

    bucket = s3_bucket if backend == "seaweedfs" else "heimdall-models"
    first = upload_model(a, writer(), bucket, clock=at(now), create_bucket=True)
    second = upload_model(b, writer(), bucket, clock=at(now), create_bucket=True)

    stamp = "models/localization/v20250601_120000"
    assert first.key == f"{stamp}-{sha256_file(a)[:12]}.onnx"
    assert second.key == f"{stamp}-{sha256_file(b)[:12]}.onnx"
    reader = S3Store.from_settings(seaweedfs.settings()) if backend == "seaweedfs" else None
    store = reader or LocalStore(tmp_path / "objects")
    for result, source in ((first, a), (second, b)):
        downloaded = download_model(store, result.uri, tmp_path / "down" / source.stem)
        assert sha256_file(downloaded) == sha256_file(source) == result.sha256


def test_conditional_multipart_write_refuses_a_taken_key_and_aborts(
    seaweedfs: SeaweedFS, s3_bucket: str, model: Path
) -> None:
    store = S3Store.from_settings(seaweedfs.settings(), part_size=5 * MiB)
    store.put_bytes(s3_bucket, "models/taken.onnx", b"the original")

    with pytest.raises(ObjectExistsError):
        store.put_file(s3_bucket, "models/taken.onnx", model)

    assert store.read_bytes(s3_bucket, "models/taken.onnx") == b"the original"
    uploads = seaweedfs.client().list_multipart_uploads(Bucket=s3_bucket)
    assert uploads.get("Uploads", []) == []


class CorruptingS3Store(S3Store):
    """Answers 200 but stores one byte altered: the failure seaweedfs#6548 showed."""

    def put_file(self, bucket: str, key: str, path: Path, **kwargs: Any) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        altered = path.with_name(f"{path.name}.altered")
        altered.write_bytes(bytes(data))
        super().put_file(bucket, key, altered, **kwargs)


def test_altered_stored_bytes_are_detected_and_the_object_removed(
    seaweedfs: SeaweedFS, s3_bucket: str, model: Path
) -> None:
    store = CorruptingS3Store.from_settings(seaweedfs.settings())
    now = datetime.now(UTC)

    with pytest.raises(StorageError, match=r"do not match model\.onnx.*were removed"):
        upload_model(model, store, s3_bucket, clock=at(now))

    assert store.list_objects(s3_bucket) == []


def test_external_data_is_uploaded_and_downloaded_as_one_unit(
    store: S3Store, s3_bucket: str, tmp_path: Path
) -> None:
    model = write_random(tmp_path / "model.onnx", 1000)
    data = write_random(tmp_path / "model.onnx.data", 7 * MiB, seed=1)

    result = upload_model(model, store, s3_bucket)

    assert [f.key for f in result.files] == [result.key, f"{result.key}.data"]
    downloaded = download_model(store, result.uri, tmp_path / "down")
    assert downloaded.read_bytes() == model.read_bytes()
    assert sha256_file(downloaded.parent / "model.onnx.data") == sha256_file(data)


def test_copy_is_server_side_keeps_metadata_and_refuses_to_overwrite(
    store: S3Store, s3_bucket: str, model: Path
) -> None:
    result = upload_model(model, store, s3_bucket, "src/model.onnx")

    store.copy(s3_bucket, "src/model.onnx", "dst/model.onnx")

    info = store.head(s3_bucket, "dst/model.onnx")
    assert info is not None
    assert (info.size, info.metadata["sha256"]) == (result.size, result.sha256)
    assert (
        hashlib.sha256(store.read_bytes(s3_bucket, "dst/model.onnx")).hexdigest() == result.sha256
    )
    with pytest.raises(ObjectExistsError):
        store.copy(s3_bucket, "dst/model.onnx", "src/model.onnx")


def put_other_bytes_with_the_same_metadata(client: Any, bucket: str, key: str) -> bytes:
    """Replace an object with other bytes of its size, its metadata copied (no heimdall code)."""
    head = client.head_object(Bucket=bucket, Key=key)
    other = secrets.token_bytes(head["ContentLength"])
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=other,
        Metadata=head["Metadata"],
        ContentType=head["ContentType"],
    )
    return other


def test_changed_stored_bytes_with_copied_metadata_are_uploaded_afresh_to_a_new_key(
    seaweedfs: SeaweedFS, store: S3Store, s3_bucket: str, model: Path
) -> None:
    client = seaweedfs.client()
    now = datetime.now(UTC)
    first = upload_model(model, store, s3_bucket, clock=at(now))
    other = put_other_bytes_with_the_same_metadata(client, s3_bucket, first.key)

    with capture_logs() as logs:
        again = upload_model(model, store, s3_bucket, clock=at(now + timedelta(minutes=5)))

    assert (again.key != first.key, again.reused) == (True, False)
    assert again.replaced_stale == first.key
    assert stored_sha256(client, s3_bucket, again.key) == sha256_file(model)
    assert stored_sha256(client, s3_bucket, first.key) == hashlib.sha256(other).hexdigest()
    assert "storage.reuse.stale_bytes" in [e["event"] for e in logs]
    # Every later upload of these bytes reuses the fresh copy: it recovers for good.
    third = upload_model(model, store, s3_bucket, clock=at(now + timedelta(minutes=9)))
    assert (third.key, third.reused) == (again.key, True)


def lifecycle_rules(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"])


ABORT_AFTER_A_DAY = {
    "ID": "heimdall-abort-incomplete-multipart-uploads",
    "Filter": {"Prefix": ""},
    "Status": "Enabled",
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
}


def test_a_created_bucket_aborts_incomplete_multipart_uploads_by_lifecycle(
    seaweedfs: SeaweedFS, store: S3Store, model: Path
) -> None:
    # SeaweedFS 4.x stores and returns the rule (MinIO would not: abort_incomplete_after warns).
    bucket = f"lifecycle-{secrets.token_hex(4)}"

    with capture_logs() as logs:
        result = upload_model(model, store, bucket, create_bucket=True)

    assert lifecycle_rules(seaweedfs.client(), bucket) == [ABORT_AFTER_A_DAY]
    assert not [
        e
        for e in logs
        if e["event"].startswith("storage.lifecycle.") and e["log_level"] == "warning"
    ]
    assert stored_sha256(seaweedfs.client(), bucket, result.key) == sha256_file(model)


def test_the_lifecycle_rule_is_merged_with_the_bucket_rules_and_added_once(
    seaweedfs: SeaweedFS, store: S3Store, s3_bucket: str
) -> None:
    client = seaweedfs.client()
    expire_tmp = {
        "ID": "expire-tmp",
        "Filter": {"Prefix": "tmp/"},
        "Status": "Enabled",
        "Expiration": {"Days": 7},
    }
    client.put_bucket_lifecycle_configuration(
        Bucket=s3_bucket, LifecycleConfiguration={"Rules": [expire_tmp]}
    )

    assert store.abort_incomplete_after(s3_bucket, 1) is True
    assert store.abort_incomplete_after(s3_bucket, 1) is True

    rules = sorted(lifecycle_rules(client, s3_bucket), key=lambda r: r["ID"])
    assert rules == [expire_tmp, ABORT_AFTER_A_DAY]
