"""An S3-compatible server (MinIO, SeaweedFS, AWS) as an :class:`ObjectStore`, through boto3.

Every request has one deadline (``timeout_s``, split by ``s3_client.attempt_plan``); files
above ``part_size`` go as multipart uploads, a few parts in flight, each streamed from its range
of the file; a bucket created here carries the lifecycle rule that aborts uploads left
unfinished.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from heimdall.config import Settings, redact_uri, scrub_secrets
from heimdall.errors import InputError, StorageError
from heimdall.objects import (
    CONTENT_TYPE,
    MiB,
    ObjectExistsError,
    ObjectInfo,
    ObjectStore,
    Progress,
    check_bucket,
    check_key,
)
from heimdall.storage.s3_client import (
    IN_FLIGHT_BYTES,
    MIN_TIMEOUT_S,
    MISSING_CODES,
    SLOW_LINK_BYTES_PER_S,
    abort_rule,
    aborts_incomplete,
    attempt_plan,
    describe,
    error_code,
    if_absent_args,
    make_client,
    without_legacy_prefix,
)
from heimdall.storage.s3_multipart import send_parts

log = structlog.get_logger(__name__)

INCOMPLETE_UPLOAD_DAYS = 1
"""Days after which a bucket created here aborts an unfinished multipart upload (S3 lifecycle)."""


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
        included, fits (:func:`attempt_plan`). The read timeout bounds each wait for the
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
        _check_options(part_size, concurrency, timeout_s)
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._secret = SecretStr(secret_access_key or "")
        self._attempts, connect_timeout, read_timeout = attempt_plan(timeout_s)
        drain_s = min(part_size, IN_FLIGHT_BYTES) / SLOW_LINK_BYTES_PER_S

        def client(read: float) -> Any:
            return make_client(
                endpoint_url,
                access_key_id,
                secret_access_key,
                region=region,
                attempts=self._attempts,
                connect_timeout=connect_timeout,
                read_timeout=read,
                pool=max(10, concurrency + 2),
            )

        self._client = client(read_timeout)
        self._send_client = client(read_timeout + drain_s)

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
        check_bucket(bucket)
        found = self._call(
            f"checking bucket {bucket!r}", "head_bucket", MISSING_CODES, Bucket=bucket
        )
        return found is not None

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket whose lifecycle aborts multipart uploads left unfinished.

        The rule (:meth:`abort_incomplete_after`, ``INCOMPLETE_UPLOAD_DAYS``) is the S3-native
        cleanup of uploads whose client was killed; a server that refuses or drops it costs a
        warning, never the bucket.
        """
        check_bucket(bucket)
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
        rule = abort_rule(days)
        try:
            rules = self._lifecycle_rules(bucket)
            if not any(aborts_incomplete(r, days) for r in rules):
                kept = [without_legacy_prefix(r) for r in rules if r.get("ID") != rule["ID"]]
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
        if not any(aborts_incomplete(r, days) for r in rules):
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
        self._put_multipart(bucket, key, path, size, metadata, content_type, if_absent, progress)

    def _put_multipart(
        self,
        bucket: str,
        key: str,
        path: Path,
        size: int,
        metadata: Mapping[str, str] | None,
        content_type: str,
        if_absent: bool,
        progress: Progress | None,
    ) -> None:
        """``put_file`` of a file over ``part_size``: a multipart upload, aborted on any failure."""
        check_key(key)
        action = f"upload to {self.uri(bucket, key)}"
        upload_id = self._call(
            action,
            "create_multipart_upload",
            Bucket=bucket,
            Key=key,
            ContentType=content_type,
            Metadata=dict(metadata or {}),
        )["UploadId"]
        upload = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
        try:
            parts = send_parts(
                self._send_client, upload, path, size, self.part_size, self.concurrency, progress
            )
            self._client.complete_multipart_upload(
                **upload,
                MultipartUpload={"Parts": parts},
                **if_absent_args(if_absent),
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
        check_key(key)
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
            **if_absent_args(if_absent),
        )

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        action = f"reading metadata of {self.uri(bucket, key)}"
        resp = self._call(action, "head_object", MISSING_CODES, Bucket=bucket, Key=key)
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
        check_key(dst_key)
        self._call(
            f"copying {self.uri(bucket, src_key)} to {dst_key!r}",
            "copy_object",
            Bucket=bucket,
            Key=dst_key,
            CopySource={"Bucket": bucket, "Key": src_key},
            MetadataDirective="COPY",
            **if_absent_args(if_absent),
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
            if error_code(exc) in tolerate:
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
        if isinstance(exc, ClientError) and error_code(exc) in {"PreconditionFailed", "412"}:
            return ObjectExistsError(f"{action} refused: the key already holds an object")
        return StorageError(self._scrub(f"{action} failed: {self._describe(exc)}"))

    def _describe(self, exc: BotoCoreError | ClientError) -> str:
        return describe(
            exc, endpoint=self._endpoint, attempts=self._attempts, timeout_s=self.timeout_s
        )

    def _scrub(self, text: str) -> str:
        # Messages are composed here and never include the secret; this is the second line of
        # defence for server text, with the one scrubber (a secret of any length is replaced).
        return scrub_secrets(text, [self._secret.get_secret_value()])


def _check_options(part_size: int, concurrency: int, timeout_s: float) -> None:
    """Refuse parts under the S3 minimum, no concurrency, or a deadline too short to split."""
    if part_size < 5 * MiB:
        raise InputError(f"part_size must be at least 5 MiB (the S3 minimum), got {part_size}")
    if concurrency < 1:
        raise InputError(f"concurrency must be at least 1, got {concurrency}")
    if not timeout_s >= MIN_TIMEOUT_S:
        raise InputError(
            f"the S3 deadline must be at least {MIN_TIMEOUT_S:g} s, got {timeout_s:g} "
            "(timeout_s, HEIMDALL_S3_TIMEOUT_S)"
        )
