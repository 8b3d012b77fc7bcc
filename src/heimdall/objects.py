"""The object store interface, its name rules, and verified downloads (no boto3, no torch).

What the registry and serving need from an object store, whichever backend holds the bytes:
:class:`ObjectStore` and :class:`ObjectInfo`, the bucket/key/metadata rules, and
:func:`download_model` / :func:`download_verified`, which check every file they fetch against
its recorded sha256. The backends and ``open_store`` live in ``heimdall.storage``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from heimdall.errors import InputError, StorageError
from heimdall.files import sha256_chunks

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
MAX_KEY_BYTES = 1024  # S3's limit, UTF-8 encoded
# There is no registered media type for ONNX; S3 servers and browsers handle opaque bytes well.
CONTENT_TYPE = "application/octet-stream"

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as an upload advances."""

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9\-]*")


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
        fetch(self, bucket, key, Path(dest))
        return Path(dest)


def fetch(store: ObjectStore, bucket: str, key: str, dest: Path) -> str:
    """Stream an object into ``dest`` via a temporary file; return the sha256 of what arrived."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        with tmp.open("wb") as out:

            def written() -> Iterator[bytes]:
                for chunk in store.iter_bytes(bucket, key):
                    out.write(chunk)
                    yield chunk

            digest, _ = sha256_chunks(written())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def check_bucket(bucket: str) -> None:
    """Raise InputError unless ``bucket`` is a valid S3 bucket name."""
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise InputError(
            f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, dots and hyphens"
        )


def check_key(key: str) -> None:
    """Raise InputError unless ``key`` is '/'-separated names without '.' or '..', at most
    1024 bytes (S3's limit)."""
    parts = key.split("/")
    if not key or "\\" in key or "\x00" in key or any(p in {"", ".", ".."} for p in parts):
        raise InputError(
            f"invalid object key {key!r}: use non-empty '/'-separated names without '.' or '..'"
        )
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InputError(
            f"object key {key[:40]!r}… is {len(key.encode())} bytes; keys are at most "
            f"{MAX_KEY_BYTES} bytes: choose a shorter key (--key)"
        )


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A copy of user metadata whose names and values S3 accepts; InputError otherwise."""
    for name, value in metadata.items():
        if not _METADATA_KEY.fullmatch(name) or not value.isascii() or not value.isprintable():
            raise InputError(
                f"invalid metadata {name!r}: names are lowercase letters, digits and hyphens, "
                "values printable ASCII"
            )
    return dict(metadata)


def download_model(store: ObjectStore, uri: str, dest_dir: Path | str) -> Path:
    """Download a model and its external-data files into ``dest_dir``, checking each sha256.

    The model keeps its key's file name; external-data files get the names the ONNX file
    refers to. Returns the model's local path.
    """
    return download_model_hashed(store, uri, dest_dir)[0]


def download_model_hashed(store: ObjectStore, uri: str, dest_dir: Path | str) -> tuple[Path, str]:
    """:func:`download_model`, and the sha256 of the model bytes as they arrived."""
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
    digests = [
        download_verified(store, bucket, target_key, path, target.metadata.get("sha256"))
        for target_key, path, target in targets
    ]
    return targets[0][1], digests[0]


def download_verified(
    store: ObjectStore, bucket: str, key: str, dest: Path, sha256: str | None
) -> str:
    """Stream an object to ``dest`` and check it against ``sha256``; return what arrived's sha256.

    On a mismatch ``dest`` is removed and StorageError says so; without a ``sha256`` to compare
    with, the download is kept and logged as unverified.
    """
    digest = fetch(store, bucket, key, dest)
    if sha256 is None:
        log.warning("storage.download.unverified", uri=store.uri(bucket, key))
    elif digest != sha256:
        dest.unlink(missing_ok=True)
        raise StorageError(
            f"downloaded bytes of {store.uri(bucket, key)} do not match its "
            f"recorded sha256 ({digest} != {sha256})"
        )
    return digest
