"""Object storage for model files: an S3-compatible server or a local directory.

One small interface, :class:`ObjectStore`, with two backends: :class:`S3Store` (boto3, plain
S3 API; production runs MinIO, the tests a real SeaweedFS) and :class:`LocalStore` (buckets as
directories, the embedded default, ``file://`` URIs). :func:`upload_model` is the upload you can
trust:

- streamed: S3 multipart with a few parts in flight, never the whole file in memory;
- conditional: ``If-None-Match: *`` on the final write, so a different object is never
  overwritten; two default keys in one second become ``v…_HHMMSS.onnx`` and ``v…_HHMMSS-1.onnx``;
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

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import SecretStr

from heimdall.config import DEFAULT_BUCKET, Settings, load_settings, redact_uri
from heimdall.errors import InputError, StorageError

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
DEFAULT_PREFIX = "models/localization"
# There is no registered media type for ONNX; S3 servers and browsers handle opaque bytes well.
CONTENT_TYPE = "application/octet-stream"
MODEL_TYPE = "LocalizationNet"
INDEX_DIR = ".sha256"
INCOMPLETE_UPLOAD_DAYS = 1
"""Days after which a bucket created here aborts an unfinished multipart upload (S3 lifecycle)."""

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as an upload advances."""

_CHUNK = 8 * MiB
_MAX_PARTS = 10_000
_MAX_KEY_SUFFIX = 99
_MAX_ATTEMPTS = 3
_LIFECYCLE_RULE_ID = "heimdall-abort-incomplete-multipart-uploads"
_MIN_ATTEMPT_S = 10.0
_MIN_TIMEOUT_S = 2.0
# After a body's last byte is sent, at most this much is still queued on its way (Linux's
# default maximum send and receive buffers, 4 + 6 MiB), reaching a slow server at this rate.
_IN_FLIGHT_BYTES = 10 * MiB
_SLOW_LINK_BYTES_PER_S = 1 * MiB
_CONTINUE_WAIT_S = 1.0  # botocore waits this long for "100 Continue" before sending a body
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9\-]*")
_AUTH_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


class ObjectExistsError(StorageError):
    """A conditional write found the key already taken; nothing was overwritten."""


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object (listings leave ``metadata`` empty)."""

    key: str
    size: int
    last_modified: datetime
    etag: str | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


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


class ObjectStore(ABC):
    """Buckets of objects with user metadata: what heimdall needs from S3 or a directory."""

    @abstractmethod
    def uri(self, bucket: str, key: str) -> str:
        """The URI of an object: ``s3://bucket/key`` or ``file:///root/bucket/key``."""

    @abstractmethod
    def locate(self, uri: str) -> tuple[str, str]:
        """(bucket, key) of a URI that :meth:`uri` made."""

    @abstractmethod
    def bucket_exists(self, bucket: str) -> bool: ...

    @abstractmethod
    def create_bucket(self, bucket: str) -> None: ...

    @abstractmethod
    def put_file(
        self,
        bucket: str,
        key: str,
        path: Path,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = CONTENT_TYPE,
        if_absent: bool = True,
        progress: Progress | None = None,
    ) -> None:
        """Stream a file to ``key``; with ``if_absent`` raise ObjectExistsError if it is taken."""

    @abstractmethod
    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = CONTENT_TYPE,
        if_absent: bool = True,
    ) -> None: ...

    @abstractmethod
    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        """Size, metadata and content type of an object, or None when there is none."""

    @abstractmethod
    def iter_bytes(self, bucket: str, key: str) -> Iterator[bytes]:
        """The stored bytes of an object, streamed in chunks."""

    @abstractmethod
    def delete(self, bucket: str, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""

    @abstractmethod
    def copy(self, bucket: str, src_key: str, dst_key: str, *, if_absent: bool = True) -> None:
        """Copy an object with its metadata inside the store (no bytes pass through here)."""

    @abstractmethod
    def list_objects(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def abort_incomplete(
        self, bucket: str, prefix: str, *, older_than: timedelta, now: datetime
    ) -> int:
        """Drop unfinished uploads under ``prefix`` idle for ``older_than``; return how many."""

    def exists(self, bucket: str, key: str) -> bool:
        return self.head(bucket, key) is not None

    def read_bytes(self, bucket: str, key: str) -> bytes:
        """A small object's bytes (index entries); stream large ones with :meth:`iter_bytes`."""
        return b"".join(self.iter_bytes(bucket, key))

    def get(self, bucket: str, key: str, dest: Path) -> Path:
        """Download an object to ``dest`` (written under a temporary name, then renamed)."""
        _download(self, bucket, key, Path(dest))
        return Path(dest)


# --- S3 ---------------------------------------------------------------------------------------


class S3Store(ObjectStore):
    """An S3-compatible server (MinIO, SeaweedFS, AWS) through boto3's plain S3 API."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        part_size: int = 8 * MiB,
        concurrency: int = 4,
        timeout_s: float = 30.0,
    ) -> None:
        """A client for one endpoint; ``timeout_s`` is each S3 request's deadline.

        What ``timeout_s`` bounds: how long one request (one API call, its retries included)
        waits on a server that does not answer. Unreachable, or accepting and never replying,
        the server makes the request fail within ``timeout_s``: the attempts and botocore's
        connect and read timeouts are derived from it so that their worst case, backoff
        included, fits (:func:`_attempt_plan`). The read timeout bounds each wait for the
        server, not a transfer: a part, an object or a download that keeps moving bytes runs as
        long as it needs. A request with a body (a part, or an object over 1 MiB sent in one
        PUT) waits ``min(part_size, 10 MiB) / (1 MiB/s)`` longer per attempt for its answer
        (8 s for 8 MiB parts), because after its last byte leaves up to 10 MiB may still sit in
        the kernels' buffers on the way to a slow server: parts go through at 1 MiB/s or more,
        and a silent server fails them within ``timeout_s`` plus that allowance per attempt.
        An operation of several requests gets the deadline per request: a listing per page; a
        multipart upload that stops answering fails within about three deadlines (parts in
        flight, then the abort). DNS resolution is not bounded.
        """
        if part_size < 5 * MiB:
            raise InputError(f"part_size must be at least 5 MiB (the S3 minimum), got {part_size}")
        if concurrency < 1:
            raise InputError(f"concurrency must be at least 1, got {concurrency}")
        if not timeout_s >= _MIN_TIMEOUT_S:
            raise InputError(
                f"the S3 deadline must be at least {_MIN_TIMEOUT_S:g} s, got {timeout_s:g} "
                "(timeout_s, HEIMDALL_S3_TIMEOUT_S)"
            )
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._secret = SecretStr(secret_access_key or "")
        self._attempts, connect_timeout, read_timeout = _attempt_plan(timeout_s)
        self._client = self._make_client(
            endpoint_url, access_key_id, secret_access_key, connect_timeout, read_timeout
        )
        drain_s = min(part_size, _IN_FLIGHT_BYTES) / _SLOW_LINK_BYTES_PER_S
        self._send_client = self._make_client(
            endpoint_url, access_key_id, secret_access_key, connect_timeout, read_timeout + drain_s
        )

    def _make_client(
        self,
        endpoint_url: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> Any:
        config = Config(
            # boto3 >= 1.36 adds CRC checksums to every upload by default, sent as aws-chunked
            # bodies with trailers. Some S3-compatible servers answered 200 and stored the chunk
            # framing as object bytes (seaweedfs#6548). Send checksums only where the S3 API
            # requires them; integrity comes from Content-MD5 on every part and the sha256 of the
            # stored bytes that upload_model reads back.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": self._attempts},
            max_pool_connections=max(10, self.concurrency + 2),
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=self.region,
            config=config,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> S3Store:
        """A store for the endpoint, credentials and deadline (``s3_timeout_s``) in ``settings``."""

        def reveal(secret: SecretStr | None) -> str | None:
            return secret.get_secret_value() if secret is not None else None

        options.setdefault("timeout_s", settings.s3_timeout_s)
        return cls(
            settings.s3_endpoint_url,
            access_key_id=reveal(settings.s3_access_key_id),
            secret_access_key=reveal(settings.s3_secret_access_key),
            region=settings.s3_region,
            **options,
        )

    def __repr__(self) -> str:
        return f"S3Store({self._endpoint!r})"

    def uri(self, bucket: str, key: str) -> str:
        return f"s3://{bucket}/{key}"

    def locate(self, uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
            raise InputError(f"not an s3://bucket/key URI: {redact_uri(uri)!r}")
        return parsed.netloc, parsed.path.lstrip("/")

    def bucket_exists(self, bucket: str) -> bool:
        _check_bucket(bucket)
        found = self._call(
            f"checking bucket {bucket!r}", "head_bucket", _MISSING_CODES, Bucket=bucket
        )
        return found is not None

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket whose lifecycle aborts multipart uploads left unfinished.

        The rule (:meth:`abort_incomplete_after`, ``INCOMPLETE_UPLOAD_DAYS``) is the S3-native
        cleanup of uploads whose client was killed; a server that refuses or drops it costs a
        warning, never the bucket.
        """
        _check_bucket(bucket)
        extra: dict[str, Any] = {}
        if self.region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        action = f"creating bucket {bucket!r}"
        self._call(action, "create_bucket", {"BucketAlreadyOwnedByYou"}, Bucket=bucket, **extra)
        log.info("storage.bucket_created", bucket=bucket, endpoint=self._endpoint)
        self.abort_incomplete_after(bucket, INCOMPLETE_UPLOAD_DAYS)

    def abort_incomplete_after(self, bucket: str, days: int) -> bool:
        """Make the bucket's lifecycle abort multipart uploads unfinished after ``days``.

        The bucket's other rules are kept: the configuration is read, the rule added, and the
        whole written back; a bucket-wide rule that already aborts within ``days`` is left as it
        is. Returns whether the server holds such a rule afterwards. A server that does not
        implement it, refuses it or drops it (MinIO answers MalformedXML or stores the rule
        without its AbortIncompleteMultipartUpload; it expires stale uploads itself after
        24 h) gets a warning, not an error: :func:`upload_model` aborts stale uploads anyway.
        """
        rule = {
            "ID": _LIFECYCLE_RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
        }
        try:
            rules = self._lifecycle_rules(bucket)
            if not any(_aborts_incomplete(r, days) for r in rules):
                kept = [_without_legacy_prefix(r) for r in rules if r.get("ID") != rule["ID"]]
                self._call(
                    f"setting the lifecycle of bucket {bucket!r}",
                    "put_bucket_lifecycle_configuration",
                    Bucket=bucket,
                    LifecycleConfiguration={"Rules": [*kept, rule]},
                )
                rules = self._lifecycle_rules(bucket)
        except StorageError as exc:
            log.warning(
                "storage.lifecycle.unsupported",
                bucket=bucket,
                endpoint=self._endpoint,
                error=str(exc),
                consequence="incomplete multipart uploads are aborted by later uploads only",
            )
            return False
        if not any(_aborts_incomplete(r, days) for r in rules):
            log.warning(
                "storage.lifecycle.not_kept",
                bucket=bucket,
                endpoint=self._endpoint,
                consequence="incomplete multipart uploads are aborted by later uploads only",
            )
            return False
        log.info("storage.lifecycle.aborts_incomplete_uploads", bucket=bucket, days=days)
        return True

    def put_file(
        self,
        bucket: str,
        key: str,
        path: Path,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = CONTENT_TYPE,
        if_absent: bool = True,
        progress: Progress | None = None,
    ) -> None:
        """Stream a file to ``key``: one PUT up to ``part_size``, else a multipart upload.

        The multipart upload is aborted on any failure; when even that fails (the server is
        gone) the error says so and :meth:`abort_incomplete` removes it later.
        """
        path = Path(path)
        size = path.stat().st_size
        if size <= self.part_size:
            self.put_bytes(
                bucket,
                key,
                path.read_bytes(),
                metadata=metadata,
                content_type=content_type,
                if_absent=if_absent,
            )
            if progress is not None:
                progress(size, size)
            return
        _check_key(key)
        action = f"upload to {self.uri(bucket, key)}"
        upload_id = self._call(
            action,
            "create_multipart_upload",
            Bucket=bucket,
            Key=key,
            ContentType=content_type,
            Metadata=dict(metadata or {}),
        )["UploadId"]
        try:
            parts = self._upload_parts(bucket, key, upload_id, path, size, progress)
            self._client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                **_if_absent(if_absent),
            )
        except BaseException as exc:
            problem = self._abort(bucket, key, upload_id)
            if not isinstance(exc, BotoCoreError | ClientError):
                if problem and isinstance(exc, Exception):
                    exc.add_note(problem)
                raise
            error = self._translate(action, exc)
            raise (type(error)(f"{error}; {problem}") if problem else error) from exc

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = CONTENT_TYPE,
        if_absent: bool = True,
    ) -> None:
        _check_key(key)
        self._call(
            f"upload to {self.uri(bucket, key)}",
            "put_object",
            client=self._send_client if len(data) > MiB else self._client,
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentMD5=base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode(),
            ContentType=content_type,
            Metadata=dict(metadata or {}),
            **_if_absent(if_absent),
        )

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        action = f"reading metadata of {self.uri(bucket, key)}"
        resp = self._call(action, "head_object", _MISSING_CODES, Bucket=bucket, Key=key)
        if resp is None:
            return None
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            last_modified=resp["LastModified"],
            etag=resp.get("ETag", "").strip('"') or None,
            content_type=resp.get("ContentType"),
            metadata=dict(resp.get("Metadata", {})),
        )

    def iter_bytes(self, bucket: str, key: str) -> Iterator[bytes]:
        action = f"reading {self.uri(bucket, key)}"
        body = self._call(action, "get_object", Bucket=bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(MiB)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(action, exc) from exc
        finally:
            body.close()

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"deleting {self.uri(bucket, key)}", "delete_object", Bucket=bucket, Key=key)

    def copy(self, bucket: str, src_key: str, dst_key: str, *, if_absent: bool = True) -> None:
        """Server-side CopyObject: up to 5 GiB, the S3 limit for a single copy."""
        _check_key(dst_key)
        self._call(
            f"copying {self.uri(bucket, src_key)} to {dst_key!r}",
            "copy_object",
            Bucket=bucket,
            Key=dst_key,
            CopySource={"Bucket": bucket, "Key": src_key},
            MetadataDirective="COPY",
            **_if_absent(if_absent),
        )

    def list_objects(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        pages = self._pages(
            f"listing s3://{bucket}/{prefix}",
            "list_objects_v2",
            "Contents",
            Bucket=bucket,
            Prefix=prefix,
        )
        found = [
            ObjectInfo(
                key=obj["Key"],
                size=int(obj["Size"]),
                last_modified=obj["LastModified"],
                etag=obj.get("ETag", "").strip('"') or None,
            )
            for obj in pages
        ]
        return sorted(found, key=lambda info: info.key)

    def abort_incomplete(
        self, bucket: str, prefix: str, *, older_than: timedelta, now: datetime
    ) -> int:
        aborted = 0
        uploads = self._pages(
            f"listing unfinished uploads under s3://{bucket}/{prefix}",
            "list_multipart_uploads",
            "Uploads",
            Bucket=bucket,
            Prefix=prefix,
        )
        for upload in uploads:
            key, upload_id = upload["Key"], upload["UploadId"]
            parts = self._pages(
                f"listing parts of unfinished upload {upload_id}",
                "list_parts",
                "Parts",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
            )
            # A live upload keeps adding parts; only one idle for `older_than` is abandoned.
            if now - max([upload["Initiated"], *(p["LastModified"] for p in parts)]) < older_than:
                continue
            problem = self._abort(bucket, key, upload_id)
            if problem:
                log.warning(
                    "storage.multipart.abort_failed", bucket=bucket, key=key, problem=problem
                )
                continue
            log.info("storage.multipart.aborted_stale", bucket=bucket, key=key, upload_id=upload_id)
            aborted += 1
        return aborted

    def _lifecycle_rules(self, bucket: str) -> list[dict[str, Any]]:
        resp = self._call(
            f"reading the lifecycle of bucket {bucket!r}",
            "get_bucket_lifecycle_configuration",
            {"NoSuchLifecycleConfiguration"},
            Bucket=bucket,
        )
        return list(resp.get("Rules", [])) if resp is not None else []

    @property
    def _endpoint(self) -> str:
        return redact_uri(self.endpoint_url or "the AWS default endpoint")

    def _upload_parts(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        path: Path,
        size: int,
        progress: Progress | None,
    ) -> list[dict[str, Any]]:
        """Send parts, ``concurrency`` at a time, each streamed from its range of the file."""
        part_size = max(self.part_size, -(-size // _MAX_PARTS))

        def send(number: int, offset: int) -> tuple[dict[str, Any], int]:
            length = min(part_size, size - offset)
            with _FilePart(path, offset, length) as body:
                resp = self._send_client.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,  # type: ignore[arg-type]
                    ContentLength=length,
                    ContentMD5=body.md5_base64(),
                )
            return {"PartNumber": number, "ETag": resp["ETag"]}, length

        parts, done = [], 0
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="heimdall-upload")
        try:
            offsets = enumerate(range(0, size, part_size), start=1)
            futures = [pool.submit(send, number, offset) for number, offset in offsets]
            for future in as_completed(futures):
                part, length = future.result()
                parts.append(part)
                done += length
                if progress is not None:
                    progress(done, size)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return sorted(parts, key=lambda part: int(part["PartNumber"]))

    def _abort(self, bucket: str, key: str, upload_id: str) -> str | None:
        """Abort a multipart upload; say why when that failed (it then outlives this call)."""
        try:
            self._call(
                f"aborting upload {upload_id}",
                "abort_multipart_upload",
                {"NoSuchUpload"},
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
            )
        except StorageError as exc:
            cause = exc.__cause__
            reason = (
                self._describe(cause) if isinstance(cause, BotoCoreError | ClientError) else exc
            )
            return (
                f"its multipart upload {upload_id} could not be aborted ({reason}); the next "
                "upload_model under the same prefix aborts it once it is stale"
            )
        return None

    def _call(
        self,
        action: str,
        method: str,
        tolerate: Iterable[str] = (),
        *,
        client: Any = None,
        **kwargs: Any,
    ) -> Any:
        """One boto3 call; an error code in ``tolerate`` gives None, any other a StorageError."""
        try:
            return getattr(client or self._client, method)(**kwargs)
        except ClientError as exc:
            if _error_code(exc) in tolerate:
                return None
            raise self._translate(action, exc) from exc
        except BotoCoreError as exc:
            raise self._translate(action, exc) from exc

    def _pages(self, action: str, method: str, field: str, **kwargs: Any) -> list[Any]:
        """Every item of a paginated listing."""
        try:
            pages = self._client.get_paginator(method).paginate(**kwargs)
            return [item for page in pages for item in page.get(field, [])]
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(action, exc) from exc

    def _translate(self, action: str, exc: BotoCoreError | ClientError) -> StorageError:
        """The StorageError that says what failed, in words, without any secret."""
        if isinstance(exc, ClientError) and _error_code(exc) in {"PreconditionFailed", "412"}:
            return ObjectExistsError(f"{action} refused: the key already holds an object")
        return StorageError(self._scrub(f"{action} failed: {self._describe(exc)}"))

    def _describe(self, exc: BotoCoreError | ClientError) -> str:
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code in _AUTH_CODES:
                return (
                    f"the S3 server at {self._endpoint} refused the credentials ({code}); check "
                    "the access key id and secret key (MLFLOW_S3_ACCESS_KEY_ID / "
                    "MLFLOW_S3_SECRET_ACCESS_KEY) and the key's permissions"
                )
            message = exc.response.get("Error", {}).get("Message", "")
            return f"{code}: {message}" if message else code
        if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
            server = f"the S3 server at {self._endpoint}"
            what = (
                f"could not connect to {server}"
                if isinstance(exc, ConnectTimeoutError)
                else f"{server} did not answer"
            )
            tries = f"{self._attempts} attempt{'s' if self._attempts > 1 else ''}"
            return (
                f"{what} within the {self.timeout_s:g} s deadline ({tries}); check that it is "
                "healthy, or raise HEIMDALL_S3_TIMEOUT_S if it is only slow"
            )
        if isinstance(exc, BotoConnectionError):
            return f"cannot reach the S3 server at {self._endpoint}; is it running?"
        if isinstance(exc, HTTPClientError):
            return (
                f"lost the connection to the S3 server at {self._endpoint} "
                f"({type(exc).__name__}); is it still running?"
            )
        return f"{type(exc).__name__}: {exc}"

    def _scrub(self, text: str) -> str:
        # Messages are composed here and never include the secret; this is the second line of
        # defence for server text. Secrets under 8 characters (MinIO's minimum) are not
        # replaced: that would mangle ordinary words.
        secret = self._secret.get_secret_value()
        text = redact_uri(text)
        return text.replace(secret, "***") if len(secret) >= 8 else text


class _FilePart:
    """A byte range of a file as a seekable stream: botocore reads a part, we never hold it.

    botocore rewinds a body with ``seek(0)`` before a retry, so positions are relative to the
    range.
    """

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self._fh = path.open("rb")
        self._offset = offset
        self._length = length
        self._pos = 0

    def __len__(self) -> int:
        return self._length

    def __enter__(self) -> _FilePart:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._fh.close()

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        count = remaining if size is None or size < 0 else min(size, remaining)
        if count <= 0:
            return b""
        self._fh.seek(self._offset + self._pos)
        data = self._fh.read(count)
        if len(data) != count:
            raise StorageError(f"{self._fh.name} shrank while it was being uploaded")
        self._pos += count
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def md5_base64(self) -> str:
        """Content-MD5 of the range (the server rejects a part that arrives altered)."""
        digest = hashlib.md5(usedforsecurity=False)
        self.seek(0)
        while chunk := self.read(MiB):
            digest.update(chunk)
        self.seek(0)
        return base64.b64encode(digest.digest()).decode()


def _attempt_plan(timeout_s: float) -> tuple[int, float, float]:
    """(attempts, connect timeout, read timeout) whose worst case fits in ``timeout_s``.

    A silent server costs an attempt at most the connect timeout, botocore's 1 s wait for
    ``100 Continue`` (streamed bodies: parts) and the read timeout; botocore's standard retry
    mode sleeps at most ``min(2**i, 20)`` s after attempt ``i + 1``, plus up to 5 s when the
    server sends ``x-amz-retry-after``. Retries are added only while each attempt keeps at
    least ``_MIN_ATTEMPT_S``: a slow but healthy server needs a read timeout of seconds.
    """
    for attempts in range(_MAX_ATTEMPTS, 0, -1):
        backoff = sum(min(2.0**i, 20.0) + 5.0 for i in range(attempts - 1))
        per_attempt = (timeout_s - backoff) / attempts
        if per_attempt >= _MIN_ATTEMPT_S or attempts == 1:
            break
    connect = min(3.0, per_attempt / 4)
    return attempts, connect, per_attempt - connect - _CONTINUE_WAIT_S


def _aborts_incomplete(rule: Mapping[str, Any], days: int) -> bool:
    """Whether a lifecycle rule aborts every unfinished multipart upload within ``days``."""
    whole_bucket = rule.get("Filter", {"Prefix": rule.get("Prefix", "")}) in ({}, {"Prefix": ""})
    after = rule.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation")
    return rule.get("Status") == "Enabled" and whole_bucket and after is not None and after <= days


def _without_legacy_prefix(rule: Mapping[str, Any]) -> dict[str, Any]:
    # Some servers echo the deprecated top-level Prefix next to Filter; S3 refuses both at once.
    return {k: v for k, v in rule.items() if not (k == "Prefix" and "Filter" in rule)}


def _error_code(exc: ClientError) -> str:
    code = exc.response.get("Error", {}).get("Code")
    if code:
        return str(code)
    return str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown"))


def _if_absent(if_absent: bool) -> dict[str, str]:
    return {"IfNoneMatch": "*"} if if_absent else {}


# --- local directory --------------------------------------------------------------------------


class LocalStore(ObjectStore):
    """Buckets as directories under ``root``: the embedded default, no server needed.

    Metadata lives in ``root/.meta/<bucket>/<key>.json`` and writes are staged in
    ``root/.tmp/<bucket>/`` (neither is a valid bucket name), then hard-linked into place, so a
    conditional write is atomic and a reader never sees half a file.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def uri(self, bucket: str, key: str) -> str:
        return self._path(bucket, key).as_uri()

    def locate(self, uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise InputError(f"not a file:// URI: {redact_uri(uri)!r}")
        try:
            relative = Path(os.path.normpath(unquote(parsed.path))).relative_to(self.root)
        except ValueError:
            raise InputError(f"{uri!r} is not inside the object store at {self.root}") from None
        bucket, _, key = relative.as_posix().partition("/")
        self._path(bucket, key)
        return bucket, key

    def bucket_exists(self, bucket: str) -> bool:
        _check_bucket(bucket)
        return (self.root / bucket).is_dir()

    def create_bucket(self, bucket: str) -> None:
        """Create the bucket's directory (no lifecycle: :meth:`abort_incomplete` cleans up)."""
        _check_bucket(bucket)
        with self._errors(f"creating bucket {bucket!r}"):
            (self.root / bucket).mkdir(parents=True, exist_ok=True)
        log.info("storage.bucket_created", bucket=bucket, root=str(self.root))

    def put_file(
        self,
        bucket: str,
        key: str,
        path: Path,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = CONTENT_TYPE,
        if_absent: bool = True,
        progress: Progress | None = None,
    ) -> None:
        size = Path(path).stat().st_size
        with self._staged(bucket, key) as tmp:
            with (
                self._errors(f"storing {self.uri(bucket, key)}"),
                Path(path).open("rb") as src,
                tmp.open("wb") as out,
            ):
                done = 0
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, size)
                out.flush()
                os.fsync(out.fileno())
            self._commit(tmp, bucket, key, metadata, content_type, if_absent)

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = CONTENT_TYPE,
        if_absent: bool = True,
    ) -> None:
        with self._staged(bucket, key) as tmp:
            with self._errors(f"storing {self.uri(bucket, key)}"):
                tmp.write_bytes(data)
            self._commit(tmp, bucket, key, metadata, content_type, if_absent)

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        path = self._path(bucket, key)
        if not path.is_file():
            return None
        stat = path.stat()
        meta_path = self._meta_path(bucket, key)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
            content_type=meta.get("content_type"),
            metadata=meta.get("metadata", {}),
        )

    def iter_bytes(self, bucket: str, key: str) -> Iterator[bytes]:
        path = self._path(bucket, key)
        with self._errors(f"reading {self.uri(bucket, key)}"), path.open("rb") as fh:
            while chunk := fh.read(MiB):
                yield chunk

    def delete(self, bucket: str, key: str) -> None:
        with self._errors(f"deleting {self.uri(bucket, key)}"):
            self._path(bucket, key).unlink(missing_ok=True)
            self._meta_path(bucket, key).unlink(missing_ok=True)

    def copy(self, bucket: str, src_key: str, dst_key: str, *, if_absent: bool = True) -> None:
        source = self.head(bucket, src_key)
        if source is None:
            raise StorageError(f"cannot copy {self.uri(bucket, src_key)}: no such object")
        with self._staged(bucket, dst_key) as tmp:
            with self._errors(f"copying {self.uri(bucket, src_key)}"):
                shutil.copyfile(self._path(bucket, src_key), tmp)
            content_type = source.content_type or CONTENT_TYPE
            self._commit(tmp, bucket, dst_key, source.metadata, content_type, if_absent)

    def list_objects(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        if not self.bucket_exists(bucket):
            raise StorageError(f"bucket {bucket!r} does not exist in {self.root}")
        base = self.root / bucket
        found = []
        for directory, _, names in os.walk(base):
            for name in names:
                key = (Path(directory) / name).relative_to(base).as_posix()
                if key.startswith(prefix):
                    stat = (Path(directory) / name).stat()
                    modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                    found.append(ObjectInfo(key=key, size=stat.st_size, last_modified=modified))
        return sorted(found, key=lambda info: info.key)

    def abort_incomplete(
        self, bucket: str, prefix: str, *, older_than: timedelta, now: datetime
    ) -> int:
        """Remove staged files left by crashed writers (the staging area is per bucket)."""
        staging = self.root / ".tmp" / bucket
        removed = 0
        for path in staging.glob("*") if staging.is_dir() else ():
            modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            if now - modified >= older_than:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _path(self, bucket: str, key: str) -> Path:
        _check_bucket(bucket)
        _check_key(key)
        return self.root / bucket / key

    def _meta_path(self, bucket: str, key: str) -> Path:
        return self.root / ".meta" / bucket / f"{key}.json"

    @contextlib.contextmanager
    def _staged(self, bucket: str, key: str) -> Iterator[Path]:
        self._path(bucket, key)
        if not self.bucket_exists(bucket):
            raise StorageError(f"bucket {bucket!r} does not exist in {self.root}")
        staging = self.root / ".tmp" / bucket
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / uuid.uuid4().hex
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(
        self,
        tmp: Path,
        bucket: str,
        key: str,
        metadata: Mapping[str, str] | None,
        content_type: str,
        if_absent: bool,
    ) -> None:
        dest = self._path(bucket, key)
        with self._errors(f"storing {self.uri(bucket, key)}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if if_absent:
                try:
                    os.link(tmp, dest)  # atomic: fails when the key is taken
                except FileExistsError:
                    raise ObjectExistsError(
                        f"{self.uri(bucket, key)} already holds an object; nothing was overwritten"
                    ) from None
            else:
                os.replace(tmp, dest)
            meta_path = self._meta_path(bucket, key)
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            meta_tmp = meta_path.with_name(f".{meta_path.name}.{uuid.uuid4().hex}")
            meta_tmp.write_text(
                json.dumps({"content_type": content_type, "metadata": dict(metadata or {})})
            )
            os.replace(meta_tmp, meta_path)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StorageError(f"{action} failed: {exc.strerror or exc}") from exc


# --- opening a store --------------------------------------------------------------------------


def open_store(source: Settings | str | Path) -> ObjectStore:
    """The store that settings, a ``file://`` URI or a directory points at.

    Settings with an S3 endpoint give an :class:`S3Store`; without one, the local directory
    ``<data_dir>/objects`` (whose buckets are ``Settings.object_store_uri``).
    """
    if isinstance(source, Settings):
        if source.uses_s3:
            return S3Store.from_settings(source)
        return LocalStore(source.resolved_data_dir / "objects")
    text = str(source)
    if text.startswith("file://"):
        return LocalStore(unquote(urlparse(text).path))
    if "://" in text:
        raise InputError(
            f"cannot open {redact_uri(text)!r} as an object store: give a file:// URI or a "
            "directory; an S3 store needs settings (endpoint and credentials)"
        )
    return LocalStore(text)


# --- uploading a model ------------------------------------------------------------------------


@dataclass(frozen=True)
class _LocalFile:
    path: Path
    suffix: str  # appended to the model's key: "" for the model, ".data" for model.onnx.data
    sha256: str
    size: int


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
) -> UploadResult:
    """Upload an ONNX model (and its external-data files) so that it is stored whole or not at all.

    ``object_name`` defaults to ``models/localization/v{YYYYMMDD_HHMMSS}.onnx`` (UTC, from
    ``clock``), with ``-1``, ``-2``… appended when that key holds other bytes; an explicit
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
    first.
    """
    now = (clock or _utc_now)().astimezone(UTC)
    files = _local_files(Path(onnx_path), extra_files)
    user_metadata = _check_metadata(metadata or {})
    _ensure_bucket(store, bucket, create_bucket)
    keys = [object_name] if object_name is not None else list(_default_keys(now))
    _check_key(keys[0])
    prefix = keys[0].rpartition("/")[0]

    stale: list[str] = []  # keys whose recorded sha256 matches but whose bytes do not
    if object_name is None:
        indexed = _find_indexed(store, bucket, prefix, files, stale)
        if indexed is not None:
            return _reused(store, bucket, indexed, files)
    _abort_stale(store, bucket, prefix, stale_after, now)

    base = {
        "export-date": now.isoformat(timespec="seconds"),
        "model-type": MODEL_TYPE,
        "format": "onnx",
        **user_metadata,
    }
    for key in keys:
        state = "stale" if key in stale else _key_state(store, bucket, key, files, stale)
        if state == "same":
            _write_index(store, bucket, prefix, key, files)
            return _reused(store, bucket, key, files)
        if state in {"taken", "stale"}:
            if object_name is not None:
                holds = (
                    "holds bytes that no longer match their recorded sha256"
                    if state == "stale"
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
        _write_index(store, bucket, prefix, key, files)
        if stale:
            log.warning("storage.upload.replaced_stale", uri=result.uri, stale=stale)
            return replace(result, replaced_stale=stale[0])
        return result
    raise StorageError(
        f"no free key for {keys[0]!r} in bucket {bucket!r} after {len(keys)} tries; "
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


def download_model(store: ObjectStore, uri: str, dest_dir: Path | str) -> Path:
    """Download a model and its external-data files into ``dest_dir``, checking each sha256.

    The model keeps its key's file name; external-data files get the names the ONNX file
    refers to. Returns the model's local path.
    """
    bucket, key = store.locate(uri)
    info = store.head(bucket, key)
    if info is None:
        raise StorageError(f"{uri} does not exist")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    targets = [(key, dest / key.rpartition("/")[2], info)]
    for suffix, name in json.loads(info.metadata.get("external-data", "{}")).items():
        if Path(name).name != name or name in {"", ".", ".."}:
            raise StorageError(f"{uri} names an unsafe external-data file {name!r}")
        extra = store.head(bucket, key + suffix)
        if extra is None:
            raise StorageError(f"{uri} is missing its external-data object {key + suffix!r}")
        targets.append((key + suffix, dest / name, extra))
    for target_key, path, target in targets:
        digest = _download(store, bucket, target_key, path)
        expected = target.metadata.get("sha256")
        if expected is None:
            log.warning("storage.download.unverified", uri=store.uri(bucket, target_key))
        elif digest != expected:
            path.unlink(missing_ok=True)
            raise StorageError(
                f"downloaded bytes of {store.uri(bucket, target_key)} do not match its "
                f"recorded sha256 ({digest} != {expected})"
            )
    return targets[0][1]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _default_keys(now: datetime) -> Iterator[str]:
    stamp = f"{DEFAULT_PREFIX}/v{now.astimezone(UTC):%Y%m%d_%H%M%S}"
    yield f"{stamp}.onnx"
    for n in range(1, _MAX_KEY_SUFFIX + 1):
        yield f"{stamp}-{n}.onnx"


def _local_files(model: Path, extra_files: Sequence[Path | str] | None) -> list[_LocalFile]:
    """The model first, then its external-data files, each hashed (streamed)."""
    if not model.is_file():
        raise InputError(f"model file {model} does not exist")
    if extra_files is None:
        sidecar = model.with_name(f"{model.name}.data")
        extras = [sidecar] if sidecar.is_file() else []
    else:
        extras = [Path(p) for p in extra_files]
    files = [_hash_local(model, "")]
    for extra in extras:
        if not extra.is_file():
            raise InputError(f"external-data file {extra} does not exist")
        if extra.resolve().parent != model.resolve().parent or extra.name == model.name:
            raise InputError(f"external-data file {extra} must sit next to {model.name}")
        suffix = extra.name.removeprefix(model.name)
        files.append(_hash_local(extra, suffix if suffix != extra.name else f".{extra.name}"))
    return files


def _hash_local(path: Path, suffix: str) -> _LocalFile:
    def chunks() -> Iterator[bytes]:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk

    digest, size = _digest(chunks())
    return _LocalFile(path=path, suffix=suffix, sha256=digest, size=size)


def _digest(chunks: Iterable[bytes]) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    for chunk in chunks:
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


def _ensure_bucket(store: ObjectStore, bucket: str, create: bool) -> None:
    if store.bucket_exists(bucket):
        return
    if not create:
        raise StorageError(
            f"bucket {bucket!r} does not exist; create it or pass --create-bucket "
            "(create_bucket=True)"
        )
    store.create_bucket(bucket)


def _key_state(
    store: ObjectStore, bucket: str, key: str, files: Sequence[_LocalFile], stale: list[str]
) -> Literal["free", "same", "taken", "stale"]:
    """Whether ``key`` and its external-data keys are free, hold these files, or hold others.

    Recorded size and sha256 only say what was stored once: before "same" the stored bytes are
    streamed back and hashed. Keys whose bytes changed under their metadata are "stale": they
    are appended to ``stale`` with a warning and never reused or overwritten.
    """
    infos = [store.head(bucket, key + f.suffix) for f in files]
    if all(info is None for info in infos):
        return "free"
    recorded = all(
        info is not None and info.size == f.size and info.metadata.get("sha256") == f.sha256
        for info, f in zip(infos, files, strict=True)
    )
    if not recorded:
        return "taken"
    for f in files:
        digest, size = _digest(store.iter_bytes(bucket, key + f.suffix))
        if (digest, size) != (f.sha256, f.size):
            log.warning(
                "storage.reuse.stale_bytes",
                uri=store.uri(bucket, key + f.suffix),
                recorded_sha256=f.sha256,
                stored_sha256=digest,
                stored_size=size,
                problem="the stored bytes no longer match their recorded sha256; they are left "
                "as they are and these bytes are uploaded to a new key",
            )
            stale.append(key)
            return "stale"
    return "same"


def _index_key(prefix: str, sha256: str) -> str:
    return f"{prefix}/{INDEX_DIR}/{sha256}.json" if prefix else f"{INDEX_DIR}/{sha256}.json"


def _find_indexed(
    store: ObjectStore, bucket: str, prefix: str, files: Sequence[_LocalFile], stale: list[str]
) -> str | None:
    """The key of an earlier upload of these bytes, from the index, if it still holds them."""
    index_key = _index_key(prefix, files[0].sha256)
    if not store.exists(bucket, index_key):
        return _find_unindexed(store, bucket, prefix, files, stale)
    try:
        key = str(json.loads(store.read_bytes(bucket, index_key))["key"])
    except (ValueError, KeyError, TypeError):
        log.warning("storage.index.unreadable", bucket=bucket, key=index_key)
        return _find_unindexed(store, bucket, prefix, files, stale)
    if _key_state(store, bucket, key, files, stale) == "same":
        return key
    return _find_unindexed(store, bucket, prefix, files, stale)


def _find_unindexed(
    store: ObjectStore, bucket: str, prefix: str, files: Sequence[_LocalFile], stale: list[str]
) -> str | None:
    """An upload of these bytes that the index does not point at, by size and sha256.

    The writer may have been killed between upload and index write; the entry is repaired.
    """
    start = f"{prefix}/" if prefix else ""
    for info in store.list_objects(bucket, start):
        name = info.key[len(start) :]
        if "/" in name or info.size != files[0].size or info.key in stale:
            continue
        if _key_state(store, bucket, info.key, files, stale) == "same":
            _write_index(store, bucket, prefix, info.key, files)
            return info.key
    return None


def _write_index(
    store: ObjectStore, bucket: str, prefix: str, key: str, files: Sequence[_LocalFile]
) -> None:
    """Point the model's sha256 at ``key``; a failure only costs a later re-upload."""
    entry = {"key": key, "files": {f.suffix: f.sha256 for f in files}}
    index_key = _index_key(prefix, files[0].sha256)
    try:
        store.put_bytes(
            bucket,
            index_key,
            json.dumps(entry).encode(),
            content_type="application/json",
            if_absent=False,
        )
    except StorageError as exc:
        log.warning("storage.index.write_failed", bucket=bucket, key=index_key, error=str(exc))


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
    files: Sequence[_LocalFile],
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


def _verify(store: ObjectStore, bucket: str, key: str, f: _LocalFile, attempts: int = 3) -> None:
    """Check size, recorded sha256 and the sha256 of the bytes read back; raise on a mismatch."""
    uri = store.uri(bucket, key)
    info = store.head(bucket, key)
    if info is None:
        raise StorageError(f"{uri} is missing right after its upload")
    for attempt in range(1, attempts + 1):
        try:
            digest, size = _digest(store.iter_bytes(bucket, key))
            break
        except StorageError as exc:  # a dropped read is retried; a mismatch is not
            if attempt == attempts:
                raise
            log.warning("storage.verify.retry", uri=uri, attempt=attempt, error=str(exc))
            time.sleep(0.5 * 2**attempt)
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


def _reused(store: ObjectStore, bucket: str, key: str, files: Sequence[_LocalFile]) -> UploadResult:
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


def _stored_files(key: str, files: Sequence[_LocalFile]) -> tuple[StoredFile, ...]:
    return tuple(
        StoredFile(name=f.path.name, key=key + f.suffix, sha256=f.sha256, size=f.size)
        for f in files
    )


def _download(store: ObjectStore, bucket: str, key: str, dest: Path) -> str:
    """Stream an object into ``dest`` via a temporary file; return the sha256 of what arrived."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    sha = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in store.iter_bytes(bucket, key):
                sha.update(chunk)
                out.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return sha.hexdigest()


def _check_bucket(bucket: str) -> None:
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise InputError(
            f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, dots and hyphens"
        )


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or "\\" in key or "\x00" in key or any(p in {"", ".", ".."} for p in parts):
        raise InputError(
            f"invalid object key {key!r}: use non-empty '/'-separated names without '.' or '..'"
        )


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for name, value in metadata.items():
        if not _METADATA_KEY.fullmatch(name) or not value.isascii() or not value.isprintable():
            raise InputError(
                f"invalid metadata {name!r}: names are lowercase letters, digits and hyphens, "
                "values printable ASCII"
            )
    return dict(metadata)
