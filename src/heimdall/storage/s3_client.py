"""The boto3 side of :class:`~heimdall.storage.s3.S3Store`: deadline plan, client, errors in words.

One deadline per S3 request: :func:`attempt_plan` splits it into attempts and socket timeouts
whose worst case fits; :func:`make_client` builds the boto3 client with them; :func:`describe`
says what a botocore error means for the user. Lifecycle rules are plain data here, and
:class:`FilePart` lends a byte range of a file to botocore as a part's body.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from heimdall.config import S3_KEY_VARIABLES
from heimdall.errors import StorageError
from heimdall.objects import MiB

MAX_ATTEMPTS = 3
MIN_ATTEMPT_S = 10.0
MIN_TIMEOUT_S = 2.0
# After a body's last byte is sent, at most this much is still queued on its way (Linux's
# default maximum send and receive buffers, 4 + 6 MiB), reaching a slow server at this rate.
IN_FLIGHT_BYTES = 10 * MiB
SLOW_LINK_BYTES_PER_S = 1 * MiB
CONTINUE_WAIT_S = 1.0  # botocore waits this long for "100 Continue" before sending a body
LIFECYCLE_RULE_ID = "heimdall-abort-incomplete-multipart-uploads"
AUTH_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def attempt_plan(timeout_s: float) -> tuple[int, float, float]:
    """(attempts, connect timeout, read timeout) whose worst case fits in ``timeout_s``.

    A silent server costs an attempt at most the connect timeout, botocore's 1 s wait for
    ``100 Continue`` (streamed bodies: parts) and the read timeout; botocore's standard retry
    mode sleeps at most ``min(2**i, 20)`` s after attempt ``i + 1``, plus up to 5 s when the
    server sends ``x-amz-retry-after``. Retries are added only while each attempt keeps at
    least ``MIN_ATTEMPT_S``: a slow but healthy server needs a read timeout of seconds.
    """
    for attempts in range(MAX_ATTEMPTS, 0, -1):
        backoff = sum(min(2.0**i, 20.0) + 5.0 for i in range(attempts - 1))
        per_attempt = (timeout_s - backoff) / attempts
        if per_attempt >= MIN_ATTEMPT_S or attempts == 1:
            break
    connect = min(3.0, per_attempt / 4)
    return attempts, connect, per_attempt - connect - CONTINUE_WAIT_S


def make_client(
    endpoint_url: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    *,
    region: str,
    attempts: int,
    connect_timeout: float,
    read_timeout: float,
    pool: int,
) -> Any:
    """A boto3 S3 client that retries ``attempts`` times within the given socket timeouts."""
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
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=pool,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region,
        config=config,
    )


def describe(
    exc: BotoCoreError | ClientError, *, endpoint: str, attempts: int, timeout_s: float
) -> str:
    """What a botocore error means, in words, naming the endpoint and the setting to change."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in AUTH_CODES:
            return (
                f"the S3 server at {endpoint} refused the credentials ({code}); check "
                f"{S3_KEY_VARIABLES} and the key's permissions"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{code}: {message}" if message else code
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return f"no S3 credentials for {endpoint} ({type(exc).__name__}); set {S3_KEY_VARIABLES}"
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        server = f"the S3 server at {endpoint}"
        what = (
            f"could not connect to {server}"
            if isinstance(exc, ConnectTimeoutError)
            else f"{server} did not answer"
        )
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        return (
            f"{what} within the {timeout_s:g} s deadline ({tries}); check that it is "
            "healthy, or raise HEIMDALL_S3_TIMEOUT_S if it is only slow"
        )
    if isinstance(exc, EndpointConnectionError) and "refused" in str(exc.kwargs.get("error")):
        return (
            f"nothing listens at {endpoint}; start the S3 server there or point "
            "MLFLOW_S3_ENDPOINT_URL at it"
        )
    if isinstance(exc, BotoConnectionError):
        return f"cannot reach the S3 server at {endpoint}; is it running?"
    if isinstance(exc, HTTPClientError):
        return (
            f"lost the connection to the S3 server at {endpoint} "
            f"({type(exc).__name__}); is it still running?"
        )
    return f"{type(exc).__name__}: {exc}"


def error_code(exc: ClientError) -> str:
    code = exc.response.get("Error", {}).get("Code")
    if code:
        return str(code)
    return str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown"))


def if_absent_args(if_absent: bool) -> dict[str, str]:
    """The conditional-write argument of a PUT, copy or multipart completion."""
    return {"IfNoneMatch": "*"} if if_absent else {}


def abort_rule(days: int) -> dict[str, Any]:
    """The bucket-wide lifecycle rule that aborts multipart uploads unfinished after ``days``."""
    return {
        "ID": LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
    }


def aborts_incomplete(rule: Mapping[str, Any], days: int) -> bool:
    """Whether a lifecycle rule aborts every unfinished multipart upload within ``days``."""
    whole_bucket = rule.get("Filter", {"Prefix": rule.get("Prefix", "")}) in ({}, {"Prefix": ""})
    after = rule.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation")
    return rule.get("Status") == "Enabled" and whole_bucket and after is not None and after <= days


def without_legacy_prefix(rule: Mapping[str, Any]) -> dict[str, Any]:
    # Some servers echo the deprecated top-level Prefix next to Filter; S3 refuses both at once.
    return {k: v for k, v in rule.items() if not (k == "Prefix" and "Filter" in rule)}


class FilePart:
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

    def __enter__(self) -> FilePart:
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
