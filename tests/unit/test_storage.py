"""Storage semantics on the local-directory backend: no server needed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs

from heimdall.config import Settings
from heimdall.errors import InputError, StorageError
from heimdall.storage import (
    LocalStore,
    ObjectExistsError,
    S3Store,
    download_model,
    open_store,
    upload_model,
    upload_to_minio,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
BUCKET = "heimdall-models"


def at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_key(model: Path, when: datetime = NOW, suffix: str = "") -> str:
    """``models/localization/vYYYYMMDD_HHMMSS-<12 hex of sha256>[-n].onnx``."""
    sha12 = sha256_of(model.read_bytes())[:12]
    return f"models/localization/v{when:%Y%m%d_%H%M%S}-{sha12}{suffix}.onnx"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


@pytest.fixture
def bucket(store: LocalStore) -> str:
    store.create_bucket(BUCKET)
    return BUCKET


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_random(tmp_path / "model.onnx", 3 * 1024 * 1024 + 17)


class CorruptingStore(LocalStore):
    """Answers every write with success but stores one byte altered (seaweedfs#6548's shape)."""

    def put_file(self, bucket: str, key: str, path: Path, **kwargs: Any) -> None:
        super().put_file(bucket, key, path, **kwargs)
        stored = self.root / bucket / key
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))


class FailingModelStore(LocalStore):
    """Stores external-data files, then fails on the model file itself."""

    def put_file(self, bucket: str, key: str, path: Path, **kwargs: Any) -> None:
        if key.endswith(".onnx"):
            raise StorageError(f"simulated failure storing {key}")
        super().put_file(bucket, key, path, **kwargs)


class BlindStore(LocalStore):
    """Never sees ``hidden``, as if another writer created it right after we looked."""

    hidden = ""

    def head(self, bucket: str, key: str) -> Any:
        return None if key == self.hidden else super().head(bucket, key)


def test_upload_stores_the_bytes_with_metadata_under_the_default_key(
    store: LocalStore, bucket: str, model: Path, tmp_path: Path
) -> None:
    result = upload_model(model, store, bucket, clock=at(NOW))

    key = default_key(model)
    assert (result.key, result.reused) == (key, False)
    assert result.uri == store.uri(bucket, key) == (tmp_path / "objects" / bucket / key).as_uri()
    assert result.sha256 == sha256_of(model.read_bytes())
    info = store.head(bucket, key)
    assert info is not None
    assert info.content_type == "application/octet-stream"
    assert dict(info.metadata) == {
        "export-date": "2025-01-02T03:04:05+00:00",
        "model-type": "LocalizationNet",
        "format": "onnx",
        "file-size": str(model.stat().st_size),
        "sha256": result.sha256,
    }
    downloaded = download_model(store, result.uri, tmp_path / "down")
    assert downloaded.name == key.rpartition("/")[2]
    assert downloaded.read_bytes() == model.read_bytes()


def test_result_serializes_to_a_plain_dict(store: LocalStore, bucket: str, model: Path) -> None:
    result = upload_model(model, store, bucket, clock=at(NOW))

    as_dict = result.to_dict()
    assert as_dict["uri"] == result.uri
    assert as_dict["files"] == [
        {
            "name": "model.onnx",
            "key": default_key(model),
            "sha256": result.sha256,
            "size": result.size,
        }
    ]


def test_missing_bucket_is_an_error_that_names_create_bucket(
    store: LocalStore, model: Path
) -> None:
    with pytest.raises(StorageError, match="--create-bucket"):
        upload_model(model, store, "absent-bucket", clock=at(NOW))

    assert not store.bucket_exists("absent-bucket")


def test_missing_bucket_is_created_when_asked(store: LocalStore, model: Path) -> None:
    result = upload_model(model, store, "new-bucket", create_bucket=True, clock=at(NOW))

    assert store.bucket_exists("new-bucket")
    assert store.exists("new-bucket", result.key)


def test_same_bytes_again_return_the_existing_uri_without_writing(
    store: LocalStore, bucket: str, model: Path
) -> None:
    first = upload_model(model, store, bucket, clock=at(NOW))
    stored = (store.root / bucket / first.key).stat()
    objects = store.list_objects(bucket)

    again = upload_model(model, store, bucket, clock=at(NOW + timedelta(days=1)))

    assert (again.uri, again.reused) == (first.uri, True)
    assert store.list_objects(bucket) == objects
    after = (store.root / bucket / first.key).stat()
    assert (after.st_ino, after.st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)


def test_an_upload_whose_index_entry_was_lost_is_found_and_not_sent_again(
    store: LocalStore, bucket: str, model: Path
) -> None:
    first = upload_model(model, store, bucket, clock=at(NOW))
    index = f"models/localization/.sha256/{first.sha256}.json"
    store.delete(bucket, index)  # as if the uploader was killed before writing it

    again = upload_model(model, store, bucket, clock=at(NOW + timedelta(seconds=5)))

    assert (again.uri, again.reused) == (first.uri, True)
    assert store.exists(bucket, index)
    models = [o.key for o in store.list_objects(bucket, "models/localization/v")]
    assert models == [first.key]


def test_two_models_uploaded_in_one_second_get_keys_named_by_their_sha256(
    store: LocalStore, bucket: str, tmp_path: Path
) -> None:
    a = write_random(tmp_path / "a.onnx", 1000, seed=1)
    b = write_random(tmp_path / "b.onnx", 1000, seed=2)

    first = upload_model(a, store, bucket, clock=at(NOW))
    second = upload_model(b, store, bucket, clock=at(NOW))

    assert (first.key, second.key) == (default_key(a), default_key(b))
    assert store.read_bytes(bucket, first.key) == a.read_bytes()
    assert store.read_bytes(bucket, second.key) == b.read_bytes()


def test_a_key_taken_after_the_check_is_not_overwritten(tmp_path: Path, model: Path) -> None:
    store = BlindStore(tmp_path / "objects")
    store.hidden = default_key(model)
    store.create_bucket(BUCKET)
    store.put_bytes(BUCKET, store.hidden, b"someone else's model")

    result = upload_model(model, store, BUCKET, clock=at(NOW))

    assert result.key == default_key(model, suffix="-1")
    assert LocalStore(store.root).read_bytes(BUCKET, store.hidden) == b"someone else's model"


def test_explicit_key_holding_other_bytes_is_refused(
    store: LocalStore, bucket: str, model: Path, tmp_path: Path
) -> None:
    other = write_random(tmp_path / "other.onnx", 1000, seed=3)
    upload_model(other, store, bucket, "custom/model.onnx")

    with pytest.raises(StorageError, match="already holds a different object"):
        upload_model(model, store, bucket, "custom/model.onnx")

    assert store.read_bytes(bucket, "custom/model.onnx") == other.read_bytes()


def test_explicit_key_holding_the_same_bytes_is_reused(
    store: LocalStore, bucket: str, model: Path
) -> None:
    first = upload_model(model, store, bucket, "custom/model.onnx")
    again = upload_model(model, store, bucket, "custom/model.onnx")

    assert (first.reused, again.reused, again.uri) == (False, True, first.uri)


def test_altered_stored_bytes_are_detected_and_removed(tmp_path: Path, model: Path) -> None:
    store = CorruptingStore(tmp_path / "objects")
    store.create_bucket(BUCKET)

    with pytest.raises(StorageError, match=r"do not match model\.onnx") as caught:
        upload_model(model, store, BUCKET, clock=at(NOW))

    assert "the uploaded objects were removed" in str(caught.value)
    assert store.list_objects(BUCKET) == []


def test_a_given_sha256_is_not_computed_again_from_the_local_file(
    store: LocalStore, bucket: str, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = sha256_of(model.read_bytes())

    def no_hashing(path: Path, *args: Any) -> Any:
        raise AssertionError(f"{path} was read to be hashed")

    monkeypatch.setattr("heimdall.storage.reuse.iter_file", no_hashing)
    result = upload_model(model, store, bucket, clock=at(NOW), sha256=known)

    assert (result.sha256, result.key, result.reused) == (known, default_key(model), False)
    info = store.head(bucket, result.key)
    assert info is not None and info.metadata["sha256"] == known
    assert (store.root / bucket / result.key).read_bytes() == model.read_bytes()


def test_a_given_sha256_that_the_stored_bytes_do_not_have_stores_nothing(
    store: LocalStore, bucket: str, model: Path
) -> None:
    wrong = sha256_of(b"other bytes")

    with pytest.raises(StorageError, match=rf"do not match model\.onnx \(sha256 \w+ != {wrong}"):
        upload_model(model, store, bucket, clock=at(NOW), sha256=wrong)

    assert store.list_objects(bucket) == []
    with pytest.raises(InputError, match="64 lowercase hex"):
        upload_model(model, store, bucket, sha256="ABC")


def tamper(store: LocalStore, bucket: str, key: str) -> bytes:
    """Replace a stored object's bytes with others of the same size; keep its metadata."""
    path = store.root / bucket / key
    other = bytes(b ^ 0xFF for b in path.read_bytes())
    path.write_bytes(other)
    return other


def test_reuse_rereads_the_bytes_and_uploads_afresh_when_they_changed(
    store: LocalStore, bucket: str, model: Path
) -> None:
    first = upload_model(model, store, bucket, clock=at(NOW))
    tampered = tamper(store, bucket, first.key)

    with capture_logs() as logs:
        again = upload_model(model, store, bucket, clock=at(NOW + timedelta(minutes=5)))

    later = NOW + timedelta(minutes=5)
    assert (again.key, again.reused) == (default_key(model, later), False)
    assert again.replaced_stale == first.key
    assert sha256_of(store.read_bytes(bucket, again.key)) == again.sha256 == first.sha256
    assert store.read_bytes(bucket, first.key) == tampered  # left as it was, not overwritten
    stale = [e for e in logs if e["event"] == "storage.reuse.stale_bytes"]
    assert [(e["log_level"], e["uri"]) for e in stale] == [
        ("warning", store.uri(bucket, first.key))
    ]
    # The index now points at the fresh copy: the next upload reuses it.
    third = upload_model(model, store, bucket, clock=at(NOW + timedelta(minutes=9)))
    assert (third.key, third.reused, third.replaced_stale) == (again.key, True, None)


def test_a_changed_unindexed_upload_in_the_same_second_is_not_reused_or_overwritten(
    store: LocalStore, bucket: str, model: Path
) -> None:
    first = upload_model(model, store, bucket, clock=at(NOW))
    store.delete(bucket, f"models/localization/.sha256/{first.sha256}.json")
    tampered = tamper(store, bucket, first.key)

    again = upload_model(model, store, bucket, clock=at(NOW))

    assert (again.key, again.reused) == (default_key(model, suffix="-1"), False)
    assert again.replaced_stale == first.key
    assert sha256_of(store.read_bytes(bucket, again.key)) == first.sha256
    assert store.read_bytes(bucket, first.key) == tampered


def test_changed_external_data_is_not_reused(
    store: LocalStore, bucket: str, tmp_path: Path
) -> None:
    model = write_random(tmp_path / "model.onnx", 1000)
    data = write_random(tmp_path / "model.onnx.data", 5000, seed=1)
    first = upload_model(model, store, bucket, clock=at(NOW))
    tamper(store, bucket, f"{first.key}.data")

    again = upload_model(model, store, bucket, clock=at(NOW + timedelta(minutes=1)))

    assert (again.key != first.key, again.reused) == (True, False)
    assert again.replaced_stale == first.key
    assert store.read_bytes(bucket, f"{again.key}.data") == data.read_bytes()


def test_an_explicit_key_whose_bytes_changed_is_refused_and_left_alone(
    store: LocalStore, bucket: str, model: Path
) -> None:
    upload_model(model, store, bucket, "custom/model.onnx")
    tampered = tamper(store, bucket, "custom/model.onnx")

    with pytest.raises(StorageError, match="no longer match their recorded sha256"):
        upload_model(model, store, bucket, "custom/model.onnx")

    assert store.read_bytes(bucket, "custom/model.onnx") == tampered


def _onnx_with_external_data(directory: Path) -> tuple[Path, np.ndarray]:
    weights = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weights, "w")],
    )
    path = directory / "model.onnx"
    onnx.save_model(
        helper.make_model(graph),
        path,
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path, weights


def test_external_data_is_stored_and_restored_as_one_loadable_unit(
    store: LocalStore, bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "export").mkdir()
    path, weights = _onnx_with_external_data(tmp_path / "export")

    result = upload_model(path, store, bucket, clock=at(NOW))

    key = default_key(path)
    assert [f.key for f in result.files] == [key, f"{key}.data"]
    info = store.head(bucket, key)
    assert info is not None
    assert info.metadata["external-data"] == '{".data": "model.onnx.data"}'
    downloaded = download_model(store, result.uri, tmp_path / "down")
    assert sorted(p.name for p in downloaded.parent.iterdir()) == [
        "model.onnx.data",
        key.rpartition("/")[2],
    ]
    loaded = onnx.load(str(downloaded))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights)


def test_failed_model_upload_removes_its_external_data(tmp_path: Path) -> None:
    store = FailingModelStore(tmp_path / "objects")
    store.create_bucket(BUCKET)
    model = write_random(tmp_path / "model.onnx", 1000)
    write_random(tmp_path / "model.onnx.data", 5000, seed=1)

    with pytest.raises(StorageError, match="simulated failure"):
        upload_model(model, store, BUCKET, clock=at(NOW))

    assert store.list_objects(BUCKET) == []


def test_progress_counts_every_file_up_to_the_total(
    store: LocalStore, bucket: str, tmp_path: Path
) -> None:
    model = write_random(tmp_path / "model.onnx", 9 * 1024 * 1024)
    write_random(tmp_path / "model.onnx.data", 20 * 1024 * 1024, seed=1)
    calls: list[tuple[int, int]] = []

    upload_model(model, store, bucket, clock=at(NOW), progress=lambda d, t: calls.append((d, t)))

    total = 29 * 1024 * 1024
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_conditional_write_never_overwrites(store: LocalStore, bucket: str) -> None:
    store.put_bytes(bucket, "k/one", b"first")

    with pytest.raises(ObjectExistsError):
        store.put_bytes(bucket, "k/one", b"second")

    assert store.read_bytes(bucket, "k/one") == b"first"
    store.put_bytes(bucket, "k/one", b"second", if_absent=False)
    assert store.read_bytes(bucket, "k/one") == b"second"


def test_copy_keeps_metadata_and_refuses_to_overwrite(store: LocalStore, bucket: str) -> None:
    store.put_bytes(bucket, "a", b"bytes", metadata={"sha256": "x"}, content_type="text/plain")
    store.put_bytes(bucket, "taken", b"other")

    store.copy(bucket, "a", "b")

    copied = store.head(bucket, "b")
    assert copied is not None
    assert (dict(copied.metadata), copied.content_type) == ({"sha256": "x"}, "text/plain")
    with pytest.raises(ObjectExistsError):
        store.copy(bucket, "a", "taken")
    assert store.read_bytes(bucket, "taken") == b"other"


def test_delete_removes_object_and_metadata_and_tolerates_missing(
    store: LocalStore, bucket: str
) -> None:
    store.put_bytes(bucket, "a/b", b"x", metadata={"k": "v"})

    store.delete(bucket, "a/b")
    store.delete(bucket, "a/b")

    assert store.head(bucket, "a/b") is None
    store.put_bytes(bucket, "a/b", b"y")
    info = store.head(bucket, "a/b")
    assert info is not None and dict(info.metadata) == {}


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "", "a\\b"])
def test_keys_that_could_escape_or_alias_are_refused(
    store: LocalStore, bucket: str, key: str
) -> None:
    with pytest.raises(InputError, match="invalid object key"):
        store.put_bytes(bucket, key, b"x")


@pytest.mark.parametrize("name", ["Upper", "a", "under_score", "../x", "a..b"])
def test_invalid_bucket_names_are_refused(store: LocalStore, name: str) -> None:
    with pytest.raises(InputError, match="invalid bucket name"):
        store.create_bucket(name)


def test_invalid_metadata_is_refused_before_anything_is_stored(
    store: LocalStore, bucket: str, model: Path
) -> None:
    with pytest.raises(InputError, match="invalid metadata"):
        upload_model(model, store, bucket, metadata={"Run ID": "x"})

    assert store.list_objects(bucket) == []


def test_missing_model_and_misplaced_external_data_are_input_errors(
    store: LocalStore, bucket: str, model: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stray = write_random(elsewhere / "weights.bin", 10)

    with pytest.raises(InputError, match="does not exist"):
        upload_model(tmp_path / "nope.onnx", store, bucket)
    with pytest.raises(InputError, match="must sit next to"):
        upload_model(model, store, bucket, extra_files=[stray])


def test_uri_and_locate_round_trip(store: LocalStore) -> None:
    uri = store.uri(BUCKET, "models/a b.onnx")

    assert store.locate(uri) == (BUCKET, "models/a b.onnx")
    with pytest.raises(InputError):
        store.locate("file:///somewhere/else/k")


def test_stale_staged_files_are_cleaned_but_fresh_ones_kept(store: LocalStore, bucket: str) -> None:
    staging = store.root / ".tmp" / bucket
    staging.mkdir(parents=True)
    (staging / "old").write_bytes(b"x")
    (staging / "new").write_bytes(b"x")
    hour_ago = (NOW - timedelta(hours=2)).timestamp()
    os.utime(staging / "old", (hour_ago, hour_ago))

    removed = store.abort_incomplete(bucket, "", older_than=timedelta(hours=1), now=NOW)

    assert removed == 1
    assert [p.name for p in staging.iterdir()] == ["new"]


def test_settings_without_endpoint_open_the_local_store_of_object_store_uri(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    store = open_store(settings)

    assert isinstance(store, LocalStore)
    assert store.uri(settings.bucket, "k") == f"{settings.object_store_uri}/k"


def test_settings_with_endpoint_open_an_s3_store_whose_repr_hides_the_secret() -> None:
    settings = Settings(
        s3_endpoint_url="http://127.0.0.1:9",
        s3_access_key_id="id",
        s3_secret_access_key="very-secret-value",
    )

    store = open_store(settings)

    assert isinstance(store, S3Store)
    assert "very-secret-value" not in repr(store)
    assert "very-secret-value" not in repr(vars(store))


def test_s3_client_sends_checksums_only_when_required() -> None:
    # Deliberate (seaweedfs#6548): see the comment in S3Store.__init__.
    config = S3Store("http://127.0.0.1:9")._client.meta.config

    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"


def test_open_store_accepts_directories_and_file_uris_only(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path), LocalStore)
    assert open_store(tmp_path.as_uri()).root == tmp_path.resolve()  # type: ignore[attr-defined]
    with pytest.raises(InputError, match="needs settings"):
        open_store("s3://bucket")


def test_upload_to_minio_uses_settings_and_returns_the_uri(tmp_path: Path, model: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    open_store(settings).create_bucket(settings.bucket)

    uri = upload_to_minio(model, settings=settings)

    assert uri.startswith(f"{settings.object_store_uri}/models/localization/v")
    assert uri.endswith(".onnx")
