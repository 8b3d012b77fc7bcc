"""A local directory as an :class:`ObjectStore`: the embedded default, ``file://`` URIs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog

from heimdall.config import redact_uri
from heimdall.errors import InputError, StorageError
from heimdall.files import iter_file
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

log = structlog.get_logger(__name__)

# File names are at most 255 bytes on common filesystems, less the metadata's ".json".
_MAX_NAME_BYTES = 255 - len(".json")


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
        check_bucket(bucket)
        return (self.root / bucket).is_dir()

    def create_bucket(self, bucket: str) -> None:
        """Create the bucket's directory (no lifecycle: :meth:`abort_incomplete` cleans up)."""
        check_bucket(bucket)
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
            with self._errors(f"storing {self.uri(bucket, key)}"), tmp.open("wb") as out:
                done = 0
                for chunk in iter_file(Path(path)):
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
        with self._errors(f"reading {self.uri(bucket, key)}"):
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
        with self._errors(f"reading {self.uri(bucket, key)}"):
            yield from iter_file(path, MiB)

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
        check_bucket(bucket)
        check_key(key)
        # Each key part is a file name here, and its metadata file adds ".json".
        longest = max(key.split("/"), key=lambda part: len(part.encode()))
        if len(longest.encode()) > _MAX_NAME_BYTES:
            raise InputError(
                f"object key part {longest[:40]!r}… is {len(longest.encode())} bytes; the local "
                f"store keeps each '/'-separated part to {_MAX_NAME_BYTES} bytes (a file name): "
                "choose a shorter key (--key)"
            )
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
