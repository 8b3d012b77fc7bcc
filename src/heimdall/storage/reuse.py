"""Finding bytes already stored: a key's state, and the sha256 index beside the uploads.

Recorded metadata only says what was stored once, so every answer of "these bytes are at that
key" comes from streaming the stored bytes back and hashing them. The index object
``<prefix>/.sha256/<hex>.json`` names the key of the bytes with that sha256; a missing or wrong
entry only costs a listing (and the entry is written again).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from heimdall.errors import StorageError
from heimdall.files import iter_file, sha256_chunks
from heimdall.objects import ObjectStore

log = structlog.get_logger(__name__)

INDEX_DIR = ".sha256"


@dataclass(frozen=True)
class LocalFile:
    """A file to upload, hashed once."""

    path: Path
    suffix: str  # appended to the model's key: "" for the model, ".data" for model.onnx.data
    sha256: str
    size: int


def hash_local(path: Path, suffix: str) -> LocalFile:
    digest, size = sha256_chunks(iter_file(path))
    return LocalFile(path=path, suffix=suffix, sha256=digest, size=size)


def key_state(
    store: ObjectStore, bucket: str, key: str, files: Sequence[LocalFile], stale: list[str]
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
        digest, size = sha256_chunks(store.iter_bytes(bucket, key + f.suffix))
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


def find_indexed(
    store: ObjectStore, bucket: str, prefix: str, files: Sequence[LocalFile], stale: list[str]
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
    if key_state(store, bucket, key, files, stale) == "same":
        return key
    return _find_unindexed(store, bucket, prefix, files, stale)


def _find_unindexed(
    store: ObjectStore, bucket: str, prefix: str, files: Sequence[LocalFile], stale: list[str]
) -> str | None:
    """An upload of these bytes that the index does not point at, by size and sha256.

    The writer may have been killed between upload and index write; the entry is repaired.
    """
    start = f"{prefix}/" if prefix else ""
    for info in store.list_objects(bucket, start):
        name = info.key[len(start) :]
        if "/" in name or info.size != files[0].size or info.key in stale:
            continue
        if key_state(store, bucket, info.key, files, stale) == "same":
            write_index(store, bucket, prefix, info.key, files)
            return info.key
    return None


def write_index(
    store: ObjectStore, bucket: str, prefix: str, key: str, files: Sequence[LocalFile]
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
