"""Opening the object store that settings, a ``file://`` URI or a directory points at."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from heimdall.config import Settings, redact_uri
from heimdall.errors import InputError
from heimdall.objects import ObjectStore
from heimdall.storage.local import LocalStore
from heimdall.storage.s3 import S3Store


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
