"""Opening MLflow safely: one client factory for training and the registry (no torch).

MLflow leaves three things to its callers, and this module does them once:

- a SQLite store is created and migrated by whichever process touches it first, with no lock:
  several first uses at once race inside alembic and leave a half-migrated file. Here the first
  use of a SQLite store happens under a file lock next to it, and the store is switched to WAL
  so that several processes can read while one writes;
- a half-migrated or unopenable SQLite file is reported in one line at once (MLflow would retry
  its engine for about 100 s, then fail with alembic's text);
- HTTP retries and timeouts come from environment variables only: :func:`http_policy` turns one
  deadline into them;
- a failed call comes back as text that hides what happened (a 500 after retries reads
  "Max retries exceeded", like a dead server): :func:`describe_failure` and
  :func:`describe_response` say it in words, and :func:`quiet_retries` keeps urllib3's
  "Retrying" warnings off the user's terminal.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from heimdall.config import S3_KEY_VARIABLES, redact_uri
from heimdall.errors import RegistryError
from heimdall.files import file_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Creating a store runs dozens of migrations; on a loaded 2-core machine that took 20 s.
_INIT_WAIT_FACTOR = 4
_HTTP_RETRIES = 2


def http_policy(timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP settings for one request that, retries included, ends within ``timeout_s``.

    Three attempts of ``(timeout_s - 3) / 3`` seconds each, plus urllib3's back-off (0 s, then
    1-1.5 s), stay under the deadline.
    """
    per_attempt = max(1, int((timeout_s - 3) / (_HTTP_RETRIES + 1)))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(_HTTP_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(per_attempt),
        # libpq (PostgreSQL URIs) waits forever for a server that accepts and never answers.
        "PGCONNECT_TIMEOUT": str(per_attempt),
    }


def describe_failure(message: str, where: str) -> str | None:
    """What the text of a failed MLflow call says happened at ``where`` (redacted): a status
    the server answered, nothing listening, or no S3 credentials; None when it says none."""
    if "Unable to locate credentials" in message or "NoCredentialsError" in message:
        return f"no S3 credentials: set {S3_KEY_VARIABLES}"
    status = re.search(r"too many (\d{3}) error responses", message)
    if status:
        return (
            f"the MLflow server at {where} answered HTTP {status.group(1)} to every attempt; "
            "its log says why"
        )
    answered = re.search(r"error code (\d{3}) != 200\. Response body: '(.*)'", message, re.S)
    if answered:
        return describe_response(int(answered.group(1)), answered.group(2), where)
    if "Connection refused" in message or "NewConnectionError" in message:
        return (
            f"nothing listens at {where}; start the MLflow server there or fix MLFLOW_TRACKING_URI"
        )
    return None


def describe_response(status: int, body: str, where: str) -> str:
    """``the MLflow server at <where> answered HTTP <status>: <its message>``, in one line."""
    try:
        message = json.loads(body).get("message", "") if body.strip().startswith("{") else ""
    except (ValueError, AttributeError):
        message = ""
    # An HTML error page: its title ("500 Internal Server Error") is the message.
    title = re.search(r"<title>(?:\s*\d{3}\b)?(.*?)</title>", body, re.IGNORECASE | re.DOTALL)
    message = message or (title.group(1) if title else re.sub(r"<[^>]+>", " ", body))
    words = " ".join(message.split())[:300] or "(no message)"
    return f"the MLflow server at {where} answered HTTP {status}: {words}"


@contextmanager
def quiet_retries() -> Iterator[None]:
    """Hold back urllib3's "Retrying ..." warnings while MLflow calls run: the one-line error
    afterwards says what happened (a filter of this call's own, so concurrent calls never leave
    the logger changed)."""
    pool = logging.getLogger("urllib3.connectionpool")
    quiet = logging.Filter()
    quiet.filter = lambda record: not str(record.msg).startswith("Retrying")  # type: ignore[method-assign]
    pool.addFilter(quiet)
    try:
        yield
    finally:
        pool.removeFilter(quiet)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, or None for any other store."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path == "/:memory:":
        return None
    # sqlite:///relative.db and sqlite:////absolute.db: the path after the third slash.
    return Path(unquote(parsed.path)[1:])


def open_client(tracking_uri: str, registry_uri: str | None, *, timeout_s: float) -> MlflowClient:
    """An MlflowClient whose SQLite stores exist, are fully migrated, and use WAL."""
    from mlflow import MlflowClient

    uris = [tracking_uri] if registry_uri is None else [tracking_uri, registry_uri]
    paths = list(dict.fromkeys(p for p in map(sqlite_path, uris) if p))
    for path in paths:
        _check_folder(path)
        _check_sqlite(path)
    if not paths:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    # One lock for the first store is enough: every process takes the same one first.
    with file_lock(
        paths[0].with_name(f"{paths[0].name}.lock"),
        timeout_s=timeout_s * _INIT_WAIT_FACTOR,
        what=f"the MLflow store {paths[0]} to be created",
    ):
        # MLflow creates and migrates a store when it first opens it, once per process.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        _ = client._tracking_client.store
        _ = client._get_registry_client().store
        for path in paths:
            _use_wal(path)
    return client


def _check_folder(path: Path) -> None:
    """Raise RegistryError when the store's folder cannot be written, found by trying
    (permission bits say nothing to root or on a read-only mount).

    Even to read, SQLite writes its ``-wal`` and ``-shm`` files next to a WAL store and
    heimdall its creation lock; a folder that refuses them is said to be read-only.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise RegistryError(
            f"the MLflow store {path} is in a read-only folder ({exc.strerror or exc}): SQLite "
            "and heimdall write their lock and journal files next to it, even to read; make "
            f"{path.parent} writable, or copy the store into a writable HEIMDALL_DATA_DIR"
        ) from None


def _check_sqlite(path: Path) -> None:
    """Raise RegistryError when ``path`` exists but is not a complete MLflow store."""
    if not path.exists():
        return
    what = f"the MLflow store {path}"
    read_only = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(read_only, uri=True, timeout=5)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
    except sqlite3.Error as exc:
        if _is_sqlite_file(path):  # a database that cannot be opened here: never move it aside
            raise RegistryError(
                f"cannot open {what}: {exc}; it is an SQLite file: check that this user may "
                "read and write it, or restore it from a backup"
            ) from None
        raise RegistryError(
            f"cannot open {what}: {exc}; it is not a readable SQLite database. Point "
            "HEIMDALL_DATA_DIR (or MLFLOW_TRACKING_URI) at a valid store, or move the file aside"
        ) from None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        raise RegistryError(
            f"{what} is half-migrated (left-over tables {', '.join(leftovers)}): an MLflow schema "
            "migration was interrupted. Restore it from a backup, or if it holds nothing to keep, "
            "move it aside and run again to create a fresh one"
        )


def _is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _use_wal(path: Path) -> None:
    """Switch the store to write-ahead logging (persistent in the file; readers never block)."""
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            db.execute("pragma journal_mode=wal")
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot switch {redact_uri(str(path))} to WAL: {exc}") from None
