"""Downloading a model and its external-data files, each checked against its recorded sha256."""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from heimdall.errors import StorageError
from heimdall.storage.base import ObjectStore, fetch

log = structlog.get_logger(__name__)


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
        download_verified(store, bucket, target_key, path, target.metadata.get("sha256"))
    return targets[0][1]


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
