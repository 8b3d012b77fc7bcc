"""File helpers every layer may use: streamed sha256 and a cross-process lock (no torch)."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from heimdall.errors import LockTimeoutError
from heimdall.retry import Backoff, wait_for

CHUNK = 8 * 1024 * 1024


def sha256_chunks(chunks: Iterable[bytes]) -> tuple[str, int]:
    """(sha256 hex, byte count) of a stream of chunks, never held whole."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def iter_file(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
    """A file's bytes in chunks."""
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            yield block


def sha256_file(path: Path) -> str:
    """Streamed sha256 of a file (never reads it whole)."""
    return sha256_chunks(iter_file(path))[0]


@contextmanager
def file_lock(path: Path, *, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) across processes.

    The kernel drops the lock when its holder dies, so a killed process never leaves it held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:

        def take() -> bool | None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return None

        wait_for(
            take,
            deadline_s=timeout_s,
            timeout=lambda: LockTimeoutError(
                f"waited {timeout_s:.0f} s for {what} (lock file {path}); another "
                "heimdall process holds it: let it finish, or raise HEIMDALL_MLFLOW_TIMEOUT_S"
            ),
            backoff=Backoff(first_s=0.02, max_s=0.1),
        )
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
