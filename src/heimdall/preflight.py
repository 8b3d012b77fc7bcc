"""Checks that the publish targets can take a model, before any heavy step.

Publish exports, verifies and benchmarks for seconds to minutes before its first remote write;
a missing bucket, a wrong secret, an MLflow server that refuses writes or a pairing no other host
could load from must fail before that, in one line each, within the settings' deadlines.
In order: the pairing (no network), the object store (reachable, credentials accepted, bucket
present or created), then each MLflow store (reachable, writable). Nothing is left behind but
an S3 bucket when asked for: a fresh embedded data directory stays as it was.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from heimdall.config import Settings, redact_uri, scrub_secrets
from heimdall.errors import ConfigError, HeimdallError, RegistryError, StorageError
from heimdall.registry.client import LOCK_PREFIX, call, session
from heimdall.storage import LocalStore, ObjectStore, S3Store, open_store
from heimdall.tracking import (
    describe_failure,
    describe_response,
    http_policy,
    quiet_retries,
    sqlite_path,
)

# The probe's name is a lock name (hidden from listings) of a model nobody publishes.
_PROBE = f"{LOCK_PREFIX}heimdall-preflight-"
_CREDENTIALS = (
    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and the "
    "user's permissions"
)


def preflight(
    settings: Settings,
    *,
    bucket: str,
    create_bucket: bool = False,
    store: ObjectStore | None = None,
) -> None:
    """Raise a one-line HeimdallError when the object store or the registry cannot take a
    publish: a server tracking URI with a local object store, an unreachable or refusing object
    store, a missing bucket (created with ``create_bucket``), an MLflow store that cannot be read
    or written. ``store`` is the one publish writes to (default: the settings')."""
    store = store or open_store(settings)
    check_pairing(settings, store)
    check_object_store(store, bucket, create_bucket=create_bucket)
    stores = dict.fromkeys((settings.resolved_tracking_uri, settings.resolved_registry_uri))
    servers = [uri for uri in stores if uri.startswith(("http://", "https://"))]
    for uri in servers:
        check_server(settings, uri)
    if len(servers) < len(stores):
        check_database(settings)


def check_pairing(settings: Settings, store: ObjectStore) -> None:
    """Refuse an MLflow server with a local object store: only this host could load the model."""
    servers = [
        uri
        for uri in (settings.resolved_tracking_uri, settings.resolved_registry_uri)
        if uri.startswith(("http://", "https://"))
    ]
    if servers and isinstance(store, LocalStore):
        raise ConfigError(
            f"the MLflow server at {redact_uri(servers[0])} would register models stored in "
            f"{store.root} on this host, so no other host could load the model; set "
            "MLFLOW_S3_ENDPOINT_URL (with MLFLOW_S3_ACCESS_KEY_ID and "
            "MLFLOW_S3_SECRET_ACCESS_KEY) to the object store the server's users share"
        )


def check_object_store(store: ObjectStore, bucket: str, *, create_bucket: bool) -> None:
    """The store answers, accepts the credentials and holds ``bucket`` (or creates it)."""
    if isinstance(store, LocalStore):
        _check_writable(store.root, StorageError, "the object store")
    if store.bucket_exists(bucket):  # the one request that needs the server and the keys
        return
    if not create_bucket:
        raise StorageError(
            f"bucket {bucket!r} does not exist {_where(store)}; create it, or pass "
            "--create-bucket (create_bucket=True)"
        )
    if not isinstance(store, LocalStore):  # a folder the upload makes: nothing to try first
        store.create_bucket(bucket)


def _where(store: ObjectStore) -> str:
    if isinstance(store, LocalStore):
        return f"in {store.root}"
    if isinstance(store, S3Store):
        return f"at {redact_uri(store.endpoint_url or 'the AWS default endpoint')}"
    return f"in {store!r}"


def check_server(settings: Settings, uri: str) -> None:
    """An MLflow server reads and writes its registry and reaches its own artifact store."""
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    probe = f"{_PROBE}{uuid.uuid4().hex[:12]}"
    registry = "/api/2.0/mlflow/registered-models"
    rest = _RestProbe(settings, creds, redact_uri(uri))
    rest("read its model registry", "GET", f"{registry}/search", params={"max_results": 1})
    rest("create a registered model", "POST", f"{registry}/create", json={"name": probe})
    rest("delete a registered model", "DELETE", f"{registry}/delete", json={"name": probe})
    # A server that proxies artifacts (the default) writes them with its own S3 credentials:
    # without them, the first artifact publish logs fails with HTTP 500.
    rest(
        "list its artifact store",
        "GET",
        "/api/2.0/mlflow-artifacts/artifacts",
        params={"path": probe.removeprefix(LOCK_PREFIX)},
        proxy=True,
    )


class _RestProbe:
    """One REST call to an MLflow server: no retry on a status (its message is the answer),
    one retry on a failed connection, within ``mlflow_timeout_s``."""

    def __init__(self, settings: Settings, creds: Any, where: str) -> None:
        policy = http_policy(settings.mlflow_timeout_s)
        self.timeout = int(policy["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        self.creds = creds
        self.where = where
        self.secrets = settings.secret_values()

    def __call__(
        self, action: str, method: str, endpoint: str, *, proxy: bool = False, **kwargs: Any
    ) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.rest_utils import http_request

        try:
            with quiet_retries():
                response = http_request(
                    self.creds,
                    endpoint,
                    method,
                    max_retries=1,
                    backoff_factor=0.5,
                    backoff_jitter=0.0,
                    retry_codes=(),
                    timeout=self.timeout,
                    raise_on_status=False,
                    **kwargs,
                )
        except MlflowException as exc:
            reason = describe_failure(exc.message, self.where) or (
                f"the MLflow server at {self.where} did not answer: {exc.message.splitlines()[0]}"
            )
            raise RegistryError(scrub_secrets(f"cannot {action}: {reason}", self.secrets)) from None
        if response.ok:
            return response
        if proxy and response.status_code == 503 and "--no-serve-artifacts" in response.text:
            return response  # no proxy: clients write artifacts with their own credentials
        why = self._why(response, proxy)  # the server's own words may quote a secret
        raise RegistryError(scrub_secrets(f"cannot {action}: {why}", self.secrets))

    def _why(self, response: Any, proxy: bool) -> str:
        answer = describe_response(response.status_code, response.text, self.where)
        if proxy and response.status_code >= 500:
            return (
                f"{answer}; the server's own artifact store failed: give `mlflow server` "
                "MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its "
                "environment (its log says more)"
            )
        if response.status_code in (401, 403):
            return f"{answer}; check {_CREDENTIALS}"
        return answer


def check_database(settings: Settings) -> None:
    """The settings' database stores open, answer a registry search and take (and drop) a probe
    model; a read-only SQLite file or folder fails here (``heimdall.tracking`` says which).

    SQLite stores that do not exist yet (a fresh data directory) are only checked for a folder
    they can be created in: a publish that fails before its upload leaves no store behind.
    """
    databases = [
        uri
        for uri in dict.fromkeys((settings.resolved_tracking_uri, settings.resolved_registry_uri))
        if not uri.startswith(("http://", "https://"))
    ]
    files = [path for path in map(sqlite_path, databases) if path is not None]
    for path in files:
        _check_writable(path.parent, RegistryError, "the MLflow store's folder")
    if len(files) == len(databases) and not any(path.exists() for path in files):
        return
    probe = f"{_PROBE}{uuid.uuid4().hex[:12]}"
    with session(settings, "check the MLflow registry") as client:
        call(client.search_registered_models, max_results=1)
        call(client.create_registered_model, probe)
        call(client.delete_registered_model, probe)


def _check_writable(folder: Path, error: type[HeimdallError], what: str) -> None:
    """Raise ``error`` when ``folder``, or the nearest folder above it that exists (where it
    would be made), cannot be written, found by trying: permission bits say nothing to root or
    on a read-only mount. Nothing is left behind."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise error(
            f"{what} at {folder} is not writable ({exc.strerror or exc}); publish writes there: "
            "make it writable, or point HEIMDALL_DATA_DIR at a writable directory"
        ) from None
