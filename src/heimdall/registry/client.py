"""Talking to MLflow: one session per operation, one retry policy, one deadline, one lock.

- :func:`session` opens a client (see ``heimdall.tracking``) with MLflow's HTTP policy derived
  from ``Settings.mlflow_timeout_s`` and turns MLflow, database and HTTP failures into one-line
  RegistryErrors that name the store (password redacted) and the setting to raise.
- :func:`call` retries what SQLite and MLflow's SQL store report as transient races.
- :func:`model_lock` serialises the registry writes of one model name across processes and
  machines with the one atomic primitive MLflow offers: creating a registered model whose name is
  taken fails. The lock is a registered model ``heimdall-lock.<name>`` that exists only while a
  writer holds it; a holder that died is detected (same host, dead pid) or expires.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlparse

import requests
import structlog
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from heimdall.config import MLFLOW_ENVIRONMENT, QUIET_MLFLOW, Settings, redact_uri, scrub_secrets
from heimdall.errors import LockTimeoutError, RegistryError
from heimdall.retry import Backoff, retry, wait_for
from heimdall.tracking import describe_failure, http_policy, open_client, quiet_retries

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = structlog.get_logger(__name__)

LOCK_PREFIX = "heimdall-lock."
# A holder on another machine that stopped without releasing is presumed dead after this long.
LOCK_EXPIRY_S = 600.0
# Jittered back-off from 0.1 s up to 1 s: about 8 s of waiting in all before giving up.
_LOCK_RETRIES = 15
_T = TypeVar("_T")


@contextmanager
def session(settings: Settings, action: str, *, stored: str = "") -> Iterator[MlflowClient]:
    """An MlflowClient for ``settings``; MLflow, database and HTTP failures become RegistryError."""
    policy = http_policy(settings.mlflow_timeout_s)
    environment = {**settings.mlflow_s3_env(), **policy, **QUIET_MLFLOW}
    # urllib3's "Retrying ..." lines would precede the one line that says what happened.
    with MLFLOW_ENVIRONMENT.applied(environment), quiet_retries():
        try:
            if reason := _unreachable_database(settings):
                raise RegistryError(f"cannot {action}: {reason}{stored}")
            yield open_client(
                settings.resolved_tracking_uri,
                settings.resolved_registry_uri,
                timeout_s=settings.mlflow_timeout_s,
            )
        except (MlflowException, SQLAlchemyError, requests.RequestException, OSError) as exc:
            raise RegistryError(explain(settings, action, exc) + stored) from exc
        except (RegistryError, LockTimeoutError) as exc:
            if stored and stored not in str(exc):
                raise type(exc)(f"{exc}{stored}") from exc
            raise


def _unreachable_database(settings: Settings, attempts: int = 3) -> str | None:
    """Why a database tracking URI's host refuses connections, or None when it accepts them.

    MLflow retries creating its database engine ten times with exponential backoff (about
    100 s) before it gives up; this answers within the deadline instead.
    """
    parsed = urlparse(settings.resolved_tracking_uri)
    scheme = parsed.scheme.split("+")[0]
    default_ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
    if scheme == "postgresql" and not parsed.hostname:
        return _missing_socket(parse_qs(parsed.query), parsed.port)
    if scheme not in default_ports or not parsed.hostname:
        return None
    address = (parsed.hostname, parsed.port or default_ports[scheme])
    per_attempt = max(1.0, settings.mlflow_timeout_s / (2 * attempts))
    try:
        retry(
            lambda: socket.create_connection(address, timeout=per_attempt).close(),
            retryable=lambda exc: isinstance(exc, OSError),
            attempts=attempts,
            deadline_s=settings.mlflow_timeout_s,
            backoff=Backoff(first_s=0.5, max_s=2.0),
        )
    except OSError as exc:
        return (
            f"the MLflow database at {_where(settings)} refuses connections "
            f"({exc.strerror or exc}, {attempts} attempts); is it running?"
        )
    return None


def _missing_socket(query: dict[str, list[str]], port: int | None) -> str | None:
    """Why PostgreSQL's Unix socket (``?host=/dir``) cannot be reached, or None."""
    folder = query.get("host", [""])[-1]
    given_port = query.get("port", ["5432"])[-1]
    if not folder.startswith("/") or not given_port.isdigit():
        return None  # libpq's default socket folder, or a host name: left to the driver
    socket_path = Path(folder) / f".s.PGSQL.{port or int(given_port)}"
    if socket_path.exists():
        return None
    return f"the MLflow database socket {socket_path} does not exist; is PostgreSQL running?"


def _where(settings: Settings) -> str:
    return redact_uri(settings.tracking_uri or settings.resolved_tracking_uri)


def registry_where(settings: Settings) -> str:
    """The model registry heimdall reads and writes, as a user set it (password redacted)."""
    return redact_uri(settings.registry_uri or _where(settings))


def explain(settings: Settings, action: str, exc: BaseException) -> str:
    """One line: what failed, where (redacted), why, and the setting that bounds the wait."""
    where = _where(settings)
    message = str(exc)
    timed_out = isinstance(exc, requests.Timeout) or "timed out" in message.lower()
    # What the server answered (a status), or that nothing listens, before "no answer".
    described = None if timed_out else describe_failure(message, where)
    if described is not None:
        reason = described
    elif timed_out or "Max retries exceeded" in message:
        reason = (
            f"the MLflow server at {where} did not answer within the deadline "
            f"({settings.mlflow_timeout_s:g} s, retries included); is it running and reachable? "
            "Raise HEIMDALL_MLFLOW_TIMEOUT_S for a slow server"
        )
    elif isinstance(exc, SQLAlchemyError) or "OperationalError" in message:
        reason = f"the MLflow database at {where} failed: {first_line(message)}"
    else:
        reason = f"MLflow at {where} said: {first_line(message)}"
    return settings_scrub(settings, f"cannot {action}: {reason}")


def settings_scrub(settings: Settings, text: str) -> str:
    return scrub_secrets(text, settings.secret_values())


def first_line(message: str, limit: int = 400) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    return line if len(line) <= limit else line[:limit] + "…"


def call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call an MlflowClient method, retrying while SQLite reports the database locked.

    SQLite answers "database is locked" at once when two processes upgrade read transactions
    to writes; the statement did not run, so trying again is safe. MLflow's SQL store sets an
    alias by looking for its row, then inserting one: a concurrent writer's insert in between
    breaks the unique constraint, and trying again updates the row that now exists.
    """
    alias_race = getattr(fn, "__name__", "") == "set_registered_model_alias"

    def transient(exc: Exception) -> bool:
        if not isinstance(exc, MlflowException | SQLAlchemyError):
            return False
        text = str(exc)
        duplicate = "UNIQUE constraint failed" in text or "duplicate key value" in text
        return "database is locked" in text or (alias_race and duplicate)

    return retry(
        lambda: fn(*args, **kwargs),
        retryable=transient,
        attempts=_LOCK_RETRIES,
        backoff=Backoff(first_s=0.1, max_s=1.0),
    )


def paged(search: Callable[..., Any], *args: Any) -> list[Any]:
    """Every result of an MLflow search, page by page."""
    found: list[Any] = []
    token = None
    while True:
        page = call(search, *args, max_results=200, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def search_versions(client: MlflowClient, filter_string: str) -> list[ModelVersion]:
    return paged(client.search_model_versions, filter_string)


def is_lock(name: str) -> bool:
    return name.startswith(LOCK_PREFIX)


@contextmanager
def model_lock(client: MlflowClient, name: str, *, wait_s: float) -> Iterator[None]:
    """Hold the registry-wide write lock of model ``name`` (see the module docstring)."""
    lock = f"{LOCK_PREFIX}{name}"
    token = uuid.uuid4().hex
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": token}

    def take() -> bool | None:
        try:
            call(
                client.create_registered_model,
                lock,
                tags={"heimdall.lock": json.dumps(owner)},
                description=f"heimdall: a registration of {name} is in progress",
            )
            return True
        except MlflowException as exc:
            # Taken; or taken and released between MLflow's failed insert and its lookup of
            # the holder, which it reports as "not found".
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_if_abandoned(client, lock)
        return None

    wait_for(
        take,
        deadline_s=wait_s,
        timeout=lambda: LockTimeoutError(
            f"waited {wait_s:.0f} s for another registration of {name} to finish (its lock "
            f"is the registered model {lock!r}); if no heimdall process is running, delete "
            "that registered model, else raise HEIMDALL_MLFLOW_TIMEOUT_S"
        ),
        backoff=Backoff(first_s=0.1, max_s=0.3),
    )
    try:
        yield
    finally:
        _release(client, lock, token)


def _release(client: MlflowClient, lock: str, token: str) -> None:
    """Delete the lock if it is still ours (it may have expired and been taken by another)."""
    try:
        held = json.loads(call(client.get_registered_model, lock).tags.get("heimdall.lock", "{}"))
        if held.get("token") == token:
            call(client.delete_registered_model, lock)
            return
        log.warning("registry.lock.lost", lock=lock)
    except (MlflowException, ValueError) as exc:  # broken and released by another meanwhile
        log.warning("registry.lock.release_failed", lock=lock, error=first_line(str(exc)))


def _break_if_abandoned(client: MlflowClient, lock: str) -> None:
    """Delete the lock when its holder is a dead process on this host or the lock expired."""
    try:
        model = call(client.get_registered_model, lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # released meanwhile
            return
        raise
    try:
        owner = json.loads(model.tags.get("heimdall.lock", "{}"))
    except ValueError:
        owner = {}
    age_s = time.time() - (model.creation_timestamp or 0) / 1000
    dead_here = owner.get("host") == socket.gethostname() and not _alive(owner.get("pid"))
    if not dead_here and age_s < LOCK_EXPIRY_S:
        return
    log.warning("registry.lock.broken", lock=lock, owner=owner, age_s=round(age_s, 1))
    try:
        call(client.delete_registered_model, lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
