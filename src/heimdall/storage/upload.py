"""Uploading a model you can trust: streamed, conditional, verified, idempotent, all or nothing.

- streamed: S3 multipart with a few parts in flight, never the whole file in memory;
- unique: the default key carries the bytes' sha256 (``v…_HHMMSS-<12 hex>.onnx``), so two
  writers of different models in one second never share a key even where the server does not
  enforce ``If-None-Match: *`` under concurrency (SeaweedFS); the final write is conditional
  all the same, so a different object is never knowingly overwritten;
- verified: the stored bytes are streamed back and hashed; on any mismatch the upload is removed
  and :class:`StorageError` says so;
- idempotent: bytes whose sha256 is already stored under the key's prefix are not sent again
  (a small index object ``<prefix>/.sha256/<hex>.json`` points at them); before reuse the stored
  bytes are streamed back and hashed, and when they no longer match (replaced, with their
  metadata, behind heimdall's back) they are left untouched and the model goes to a new key;
- all or nothing for a model with external-data files (``model.onnx.data``).

Why parts go straight to the final key rather than to a staging key plus a server-side copy:
a multipart upload is invisible until it completes, so a failure before completion leaves
nothing at the key, and the copy would double the server's writes (and need multipart copy
above 5 GiB). The upload is aborted on any failure. When the server itself dies the abort cannot
reach it; the next :func:`upload_model` under the same prefix aborts uploads that have been idle
for ``stale_after``, and a bucket created here carries the S3 lifecycle rule that aborts them
after ``INCOMPLETE_UPLOAD_DAYS``. (MinIO lists multipart uploads only for an exact key, does not
keep that rule, and expires stale ones itself after 24 h by default.) The one window left: the
server dies after completing an object but before a failed verification could remove it; the
error then says what is left.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from heimdall.config import DEFAULT_BUCKET, Settings, load_settings
from heimdall.errors import InputError, StorageError
from heimdall.files import sha256_chunks
from heimdall.objects import (
    ObjectExistsError,
    ObjectStore,
    Progress,
    check_key,
    check_metadata,
)
from heimdall.retry import Backoff, retry
from heimdall.storage.reuse import (
    LocalFile,
    find_indexed,
    hash_local,
    key_state,
    write_index,
)
from heimdall.storage.stores import open_store

log = structlog.get_logger(__name__)

DEFAULT_PREFIX = "models/localization"
MODEL_TYPE = "LocalizationNet"
_MAX_KEY_SUFFIX = 99
SHA_IN_KEY = 12
"""Hex digits of the sha256 in a default key."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredFile:
    """One local file of a model and the key its bytes are stored under."""

    name: str
    key: str
    sha256: str
    size: int


@dataclass(frozen=True)
class UploadResult:
    """Where a model's bytes are stored, and whether this call sent them or found them there."""

    uri: str
    bucket: str
    key: str
    sha256: str
    size: int
    reused: bool
    files: tuple[StoredFile, ...]
    upload_seconds: float = 0.0
    verify_seconds: float = 0.0
    replaced_stale: str | None = None
    """The key of an earlier upload of these bytes whose stored bytes no longer match them."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``files`` as a list)."""
        return {**asdict(self), "files": [asdict(f) for f in self.files]}


def upload_model(
    onnx_path: Path | str,
    store: ObjectStore,
    bucket: str = DEFAULT_BUCKET,
    object_name: str | None = None,
    *,
    create_bucket: bool = False,
    progress: Progress | None = None,
    extra_files: Sequence[Path | str] | None = None,
    metadata: Mapping[str, str] | None = None,
    clock: Callable[[], datetime] | None = None,
    stale_after: timedelta = timedelta(hours=1),
    sha256: str | None = None,
) -> UploadResult:
    """Upload an ONNX model (and its external-data files) so that it is stored whole or not at all.

    ``object_name`` defaults to ``models/localization/v{YYYYMMDD_HHMMSS}-{sha12}.onnx`` (UTC,
    from ``clock``; ``sha12``: the first 12 hex digits of the model's sha256), with ``-1``,
    ``-2``… appended when that key holds other bytes (a stale copy of these); an explicit
    ``object_name`` holding other bytes is an error. Without ``object_name``, bytes already
    stored under the prefix are found by sha256 and returned with ``reused=True`` once their
    stored bytes have been read back and hashed; an earlier upload whose bytes changed under its
    metadata is left untouched, logged, and named in ``replaced_stale`` of the fresh upload.
    External-data files default to a sibling ``<name>.data``; each is stored at the model's key
    plus its suffix (``model.onnx.data`` → ``<key>.data``) and recorded in the model's metadata
    (``external-data``) so :func:`download_model` restores the names the ONNX file refers to.
    ``metadata`` adds to or overrides the defaults (export-date, model-type, format).
    ``progress`` gets (bytes sent, bytes total) over all files. Unfinished multipart uploads
    under the prefix idle for ``stale_after`` (left by a crashed server or client) are aborted
    first. ``sha256`` is the model file's, when its writer already computed it (an export):
    the file is not hashed again, and the stored bytes read back must match it all the same.
    """
    now = (clock or _utc_now)().astimezone(UTC)
    files = _local_files(Path(onnx_path), extra_files, sha256)
    user_metadata = check_metadata(metadata or {})
    _ensure_bucket(store, bucket, create_bucket)
    keys = [object_name] if object_name is not None else list(_default_keys(now, files[0].sha256))
    check_key(keys[0])
    prefix = keys[0].rpartition("/")[0]

    stale: list[str] = []  # keys whose recorded sha256 matches but whose bytes do not
    if object_name is None:
        indexed = find_indexed(store, bucket, prefix, files, stale)
        if indexed is not None:
            return _reused(store, bucket, indexed, files)
    _abort_stale(store, bucket, prefix, stale_after, now)

    base = {
        "export-date": now.isoformat(timespec="seconds"),
        "model-type": MODEL_TYPE,
        "format": "onnx",
        **user_metadata,
    }
    return _store_at_first_free_key(
        store, bucket, (keys, object_name), files, base, (stale, progress)
    )


def _store_at_first_free_key(
    store: ObjectStore,
    bucket: str,
    keys: tuple[list[str], str | None],
    files: list[LocalFile],
    base: dict[str, str],
    state: tuple[list[str], Progress | None],
) -> UploadResult:
    """Upload under the first key that is free (or find these bytes there); an explicit key
    (``keys[1]``) that holds other bytes is an error, never overwritten."""
    candidates, object_name = keys
    stale, progress = state
    prefix = candidates[0].rpartition("/")[0]
    for key in candidates:
        found = "stale" if key in stale else key_state(store, bucket, key, files, stale)
        if found == "same":
            write_index(store, bucket, prefix, key, files)
            return _reused(store, bucket, key, files)
        if found in {"taken", "stale"}:
            if object_name is not None:
                holds = (
                    "holds bytes that no longer match their recorded sha256"
                    if found == "stale"
                    else "already holds a different object"
                )
                raise StorageError(
                    f"{store.uri(bucket, key)} {holds}; nothing was overwritten. Choose another "
                    "key (--key) or leave it out for a new version"
                )
            continue
        try:
            result = _upload_unit(store, bucket, key, files, base, progress)
        except ObjectExistsError as exc:  # another writer took the key since we looked
            if object_name is not None:
                raise StorageError(f"{exc}; choose another key (--key)") from exc
            continue
        write_index(store, bucket, prefix, key, files)
        if stale:
            log.warning("storage.upload.replaced_stale", uri=result.uri, stale=stale)
            return replace(result, replaced_stale=stale[0])
        return result
    raise StorageError(
        f"no free key for {candidates[0]!r} in bucket {bucket!r} after {len(candidates)} tries; "
        "pass an explicit key (--key)"
    )


def upload_to_minio(
    onnx_path: Path | str,
    bucket_name: str = DEFAULT_BUCKET,
    object_name: str | None = None,
    *,
    settings: Settings | None = None,
) -> str:
    """The original API: upload with settings from the environment and return the model's URI.

    ``s3://bucket/key`` when an S3 endpoint is configured, else a ``file://`` URI in the local
    store.
    """
    store = open_store(settings if settings is not None else load_settings())
    return upload_model(onnx_path, store, bucket_name, object_name).uri


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _default_keys(now: datetime, sha256: str) -> Iterator[str]:
    """The time makes keys sort by upload; the sha256 keeps concurrent writers of others apart."""
    stamp = f"{DEFAULT_PREFIX}/v{now.astimezone(UTC):%Y%m%d_%H%M%S}-{sha256[:SHA_IN_KEY]}"
    yield f"{stamp}.onnx"
    for n in range(1, _MAX_KEY_SUFFIX + 1):
        yield f"{stamp}-{n}.onnx"


def _local_files(
    model: Path, extra_files: Sequence[Path | str] | None, sha256: str | None = None
) -> list[LocalFile]:
    """The model first, then its external-data files, each hashed (streamed) unless known."""
    if not model.is_file():
        raise InputError(f"model file {model} does not exist")
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise InputError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if extra_files is None:
        sidecar = model.with_name(f"{model.name}.data")
        extras = [sidecar] if sidecar.is_file() else []
    else:
        extras = [Path(p) for p in extra_files]
    files = [
        hash_local(model, "")
        if sha256 is None
        else LocalFile(path=model, suffix="", sha256=sha256, size=model.stat().st_size)
    ]
    for extra in extras:
        if not extra.is_file():
            raise InputError(f"external-data file {extra} does not exist")
        if extra.resolve().parent != model.resolve().parent or extra.name == model.name:
            raise InputError(f"external-data file {extra} must sit next to {model.name}")
        suffix = extra.name.removeprefix(model.name)
        files.append(hash_local(extra, suffix if suffix != extra.name else f".{extra.name}"))
    return files


def _ensure_bucket(store: ObjectStore, bucket: str, create: bool) -> None:
    if store.bucket_exists(bucket):
        return
    if not create:
        raise StorageError(
            f"bucket {bucket!r} does not exist; create it or pass --create-bucket "
            "(create_bucket=True)"
        )
    store.create_bucket(bucket)


def _abort_stale(
    store: ObjectStore, bucket: str, prefix: str, stale_after: timedelta, now: datetime
) -> None:
    try:
        store.abort_incomplete(
            bucket, f"{prefix}/" if prefix else "", older_than=stale_after, now=now
        )
    except StorageError as exc:  # e.g. a key allowed to write but not to list uploads
        log.warning("storage.multipart.cleanup_skipped", bucket=bucket, error=str(exc))


def _upload_unit(
    store: ObjectStore,
    bucket: str,
    key: str,
    files: Sequence[LocalFile],
    base: Mapping[str, str],
    progress: Progress | None,
) -> UploadResult:
    """Store external data first and the model last, verify all; on failure remove all."""
    model = files[0]
    total = sum(f.size for f in files)
    log.info("storage.upload.started", uri=store.uri(bucket, key), size=total, files=len(files))
    stored: list[str] = []
    started = time.monotonic()
    try:
        done = 0
        for f in [*files[1:], model]:
            meta = {**base, "file-size": str(f.size), "sha256": f.sha256}
            if f is model and len(files) > 1:
                names = {x.suffix: x.path.name for x in files[1:]}
                meta["external-data"] = json.dumps(names, sort_keys=True)
            elif f is not model:
                meta.update({"format": "onnx-external-data", "model-key": key})
            store.put_file(
                bucket,
                key + f.suffix,
                f.path,
                metadata=meta,
                progress=_shifted(progress, done, total),
            )
            stored.append(key + f.suffix)
            done += f.size
        uploaded = time.monotonic()
        for f in files:
            _verify(store, bucket, key + f.suffix, f)
        verified = time.monotonic()
    except BaseException as exc:
        cleanup = _remove(store, bucket, stored)
        if isinstance(exc, StorageError) and not isinstance(exc, ObjectExistsError) and stored:
            raise StorageError(f"{exc}; {cleanup}") from exc
        raise
    log.info(
        "storage.upload.verified",
        uri=store.uri(bucket, key),
        size=total,
        upload_s=round(uploaded - started, 3),
        verify_s=round(verified - uploaded, 3),
    )
    return UploadResult(
        uri=store.uri(bucket, key),
        bucket=bucket,
        key=key,
        sha256=model.sha256,
        size=model.size,
        reused=False,
        files=_stored_files(key, files),
        upload_seconds=uploaded - started,
        verify_seconds=verified - uploaded,
    )


def _shifted(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """Report one file's progress as part of the whole model's bytes."""
    if progress is None:
        return None
    report = progress
    return lambda done, _size: report(offset + done, total)


def _verify(store: ObjectStore, bucket: str, key: str, f: LocalFile, attempts: int = 3) -> None:
    """Check size, recorded sha256 and the sha256 of the bytes read back; raise on a mismatch."""
    uri = store.uri(bucket, key)
    info = store.head(bucket, key)
    if info is None:
        raise StorageError(f"{uri} is missing right after its upload")
    digest, size = retry(  # a dropped read is retried; a mismatch is not
        lambda: sha256_chunks(store.iter_bytes(bucket, key)),
        retryable=lambda exc: isinstance(exc, StorageError),
        attempts=attempts,
        backoff=Backoff(first_s=1.0, max_s=4.0),
        on_retry=lambda n, exc: log.warning(
            "storage.verify.retry", uri=uri, attempt=n, error=str(exc)
        ),
    )
    problems = []
    if info.size != f.size or size != f.size:
        problems.append(f"size {size} (listed {info.size}) != {f.size}")
    if digest != f.sha256:
        problems.append(f"sha256 {digest} != {f.sha256}")
    if info.metadata.get("sha256") != f.sha256:
        problems.append(f"recorded sha256 {info.metadata.get('sha256')!r} != {f.sha256}")
    if problems:
        raise StorageError(
            f"the stored bytes of {uri} do not match {f.path.name} ({'; '.join(problems)}); "
            "the server altered or lost data, or the file changed during the upload"
        )


def _remove(store: ObjectStore, bucket: str, keys: Sequence[str]) -> str:
    """Delete what a failed upload stored; say what was removed or what is left."""
    left = []
    for key in keys:
        try:
            store.delete(bucket, key)
        except StorageError as exc:
            log.warning("storage.cleanup_failed", uri=store.uri(bucket, key), error=str(exc))
            left.append(store.uri(bucket, key))
    if left:
        return f"these objects could not be removed and must be deleted by hand: {', '.join(left)}"
    return "the uploaded objects were removed"


def _reused(store: ObjectStore, bucket: str, key: str, files: Sequence[LocalFile]) -> UploadResult:
    uri = store.uri(bucket, key)
    log.info("storage.upload.reused", uri=uri, sha256=files[0].sha256)
    return UploadResult(
        uri=uri,
        bucket=bucket,
        key=key,
        sha256=files[0].sha256,
        size=files[0].size,
        reused=True,
        files=_stored_files(key, files),
    )


def _stored_files(key: str, files: Sequence[LocalFile]) -> tuple[StoredFile, ...]:
    return tuple(
        StoredFile(name=f.path.name, key=key + f.suffix, sha256=f.sha256, size=f.size)
        for f in files
    )
