"""Follow a registry alias: resolve it, load verified bytes, warm up, swap atomically.

A :class:`Follower` holds the model served now (:attr:`Follower.current`), a plain reference
that readers take without a lock: a request keeps the :class:`Served` it started with, so a swap
never changes a model under a running batch, and the old one is released when its last request
ends. Only ``models:/NAME@ALIAS`` is followed; any other URI is served as loaded.

A version that fails any check (sha256 against the registered tag, ONNX Runtime's load, the
model's IO, the warm-up) is never served: the current model stays, ``on_refused`` is told once
and one line is logged. The refused (version, sha256) is not downloaded again on every poll: it
is retried when the alias moves away and back, or after a back-off that grows to ten minutes
(a repaired object store, a registry that was briefly down), never in a hot loop.

No HTTP and no asyncio here: the single-machine server and each Ray Serve replica use it alike.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

import numpy as np
import structlog

from heimdall.config import Settings, redact_uri
from heimdall.contract import INPUT_SHAPE
from heimdall.errors import (
    HeimdallError,
    InputError,
    RegistryError,
    StorageError,
    ValidationError,
)
from heimdall.inference import LocalizationModel
from heimdall.registry import MODEL_FILE, resolve_model_uri
from heimdall.registry.client import first_line
from heimdall.registry.names import parse_models_uri
from heimdall.retry import Backoff
from heimdall.serving.backend import Served

log = structlog.get_logger(__name__)

# A refused version is tried again after a back-off: the poll interval but at least 10 s (a
# short interval must not re-download a bad version every second), doubling to 600 s.
REFUSED_MIN_S = 10.0
REFUSED_MAX_S = 600.0
_JITTER = 0.1  # ± of the poll interval, so replicas started together do not poll together


@dataclass(frozen=True)
class Refusal:
    """A version the follower would not serve, and why."""

    version: str
    sha256: str | None
    reason: str  # sha256 | invalid | registry | storage | load
    detail: str
    failures: int
    retry_at: float  # time.monotonic() after which the same version is tried again

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "reason": self.reason,
            "detail": self.detail,
        }


class Follower:
    """The verified model a URI names now; for ``models:/NAME@ALIAS``, kept in step with it."""

    def __init__(
        self,
        uri: str,
        *,
        settings: Settings,
        providers: Sequence[str] | None = None,
        poll_interval_s: float = 10.0,
        warm_batch: int = 32,
        on_swap: Callable[[Served], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        if not poll_interval_s > 0:
            raise InputError(f"poll interval must be above 0 s, got {poll_interval_s}")
        if warm_batch < 1:
            raise InputError(f"warm-up batch must be at least 1, got {warm_batch}")
        self.uri = uri
        self.source = redact_uri(uri)
        self.settings = settings
        self.providers = list(providers) if providers else None
        self.poll_interval_s = poll_interval_s
        self.warm_batch = warm_batch
        self.on_swap = on_swap
        self.on_refused = on_refused
        self.name, self.alias = _followed(uri)
        self._served: Served | None = None
        self._refused: Refusal | None = None
        self._missing: str | None = None  # why the alias cannot be resolved, logged once
        self._refresh_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Served | None:
        """The model served now; None until :meth:`load` succeeded."""
        return self._served

    @property
    def follows(self) -> bool:
        """Whether the URI names an alias (``models:/NAME@ALIAS``), the one kind followed."""
        return self.alias is not None

    @property
    def refused(self) -> Refusal | None:
        """The last version refused and not yet served since, if any."""
        return self._refused

    def load(self) -> Served:
        """The first verified, warmed-up load; HeimdallError (one line) if it fails."""
        with self._refresh_lock:
            if self.alias is not None:
                found = resolve_model_uri(self.uri, settings=self.settings)
                served = self._open_version(found.version)
            else:
                served = self._open_fixed()
            self._swap(served)
            return served

    def refresh(self) -> bool:
        """Check the alias once; True if a new version was loaded, verified and swapped in."""
        if self.alias is None:
            return False
        with self._refresh_lock:
            target = self._resolve()
            if target is None or self._still_refused(target.version, target.sha256):
                return False
            if self._is_served(target.version, target.sha256):
                return False
            try:
                served = self._open_version(target.version)
            except Exception as exc:  # any failure means: do not serve it
                self._refuse(target.version, target.sha256, exc)
                return False
            self._swap(served)
            return True

    def start(self) -> None:
        """Poll the alias every ``poll_interval_s`` (jittered) on a daemon thread."""
        if self.alias is None or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._poll, name="heimdall-follower", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Check the alias now (a webhook said it moved); calls during a check merge into one."""
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling; a download in progress is left to finish on its daemon thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # --- internals --------------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stopping.is_set():
            jitter = random.uniform(1 - _JITTER, 1 + _JITTER)
            self._wake.wait(self.poll_interval_s * jitter)
            self._wake.clear()  # a notify during the check below wakes the next wait at once
            if self._stopping.is_set():
                return
            try:
                self.refresh()
            except Exception as exc:  # the poll thread outlives any one check
                log.error("serving.follow_failed", uri=self.source, error=first_line(str(exc)))

    def _resolve(self) -> _Target | None:
        """Where the alias points now; None (logged once per cause) when it cannot be read."""
        try:
            found = resolve_model_uri(self.uri, settings=self.settings)
        except HeimdallError as exc:
            problem = "alias_missing" if _missing_alias(exc) else "registry_unreachable"
            if problem != self._missing:
                served = self._served.version if self._served else None
                log.warning(
                    f"serving.{problem}",
                    uri=self.source,
                    serving=served,
                    error=first_line(str(exc)),
                )
            self._missing = problem
            return None
        self._missing = None
        return _Target(found.version, found.sha256)

    def _is_served(self, version: str, sha256: str | None) -> bool:
        served = self._served
        return served is not None and (served.version, served.sha256) == (version, sha256)

    def _still_refused(self, version: str, sha256: str | None) -> bool:
        refused = self._refused
        if refused is None or (refused.version, refused.sha256) != (version, sha256):
            self._refused = None  # the alias moved on: a later move back is tried afresh
            return False
        return time.monotonic() < refused.retry_at

    def _refuse(self, version: str, sha256: str | None, exc: Exception) -> None:
        earlier = self._refused
        again = earlier is not None and (earlier.version, earlier.sha256) == (version, sha256)
        failures = earlier.failures + 1 if again and earlier is not None else 1
        first = max(self.poll_interval_s, REFUSED_MIN_S)
        backoff = Backoff(first_s=first, max_s=max(REFUSED_MAX_S, first), jitter=0.2)
        self._refused = Refusal(
            version=version,
            sha256=sha256,
            reason=_reason(exc),
            detail=first_line(str(exc)),
            failures=failures,
            retry_at=time.monotonic() + backoff.delay(failures),
        )
        if again:
            return  # told once per version: retries that fail the same way stay quiet
        log.error(
            "serving.version_refused",
            uri=self.source,
            version=version,
            reason=self._refused.reason,
            serving=self._served.version if self._served else None,
            error=self._refused.detail,
        )
        if self.on_refused is not None:
            self.on_refused(self._refused.reason)

    def _open_version(self, version: str) -> Served:
        """Load the registered version by number (so an alias move mid-load changes nothing);
        the load refuses a version without a sha256 tag, whose bytes nothing could check."""
        uri = f"models:/{self.name}/{version}"
        model = LocalizationModel.load(uri, providers=self.providers, settings=self.settings)
        self._warm_up(model)
        return Served(
            model=model,
            name=str(self.name),
            version=version,
            sha256=model.sha256,
            alias=self.alias,
            source=self.source,
        )

    def _open_fixed(self) -> Served:
        model = LocalizationModel.load(self.uri, providers=self.providers, settings=self.settings)
        self._warm_up(model)
        return Served(
            model=model,
            name=self.name or _stem(self.uri),
            version=model.version or "",
            sha256=model.sha256,
            alias=None,
            source=self.source,
        )

    def _warm_up(self, model: LocalizationModel) -> None:
        """Run the first batch and the largest before the model takes requests: ONNX Runtime
        plans memory for a shape on its first run, which would otherwise land on a request."""
        try:
            for size in sorted({1, self.warm_batch}):
                model.predict(np.zeros((size, *INPUT_SHAPE), dtype=np.float32))
        except Exception as exc:  # ONNX Runtime raises its own types
            raise ValidationError(
                f"{self.source}: warm-up failed on version {model.version or model.sha256[:12]}: "
                f"{first_line(str(exc))}"
            ) from exc

    def _swap(self, served: Served) -> None:
        previous, self._served = self._served, served
        self._refused = None
        log.info(
            "serving.swapped",
            name=served.name,
            version=served.version,
            sha256=served.sha256,
            alias=served.alias,
            previous=previous.version if previous else None,
        )
        if self.on_swap is not None:
            self.on_swap(served)


@dataclass(frozen=True)
class _Target:
    version: str
    sha256: str | None


def _followed(uri: str) -> tuple[str | None, str | None]:
    """(registered name, alias) of a ``models:/`` URI (alias None unless it names one)."""
    if not uri.startswith("models:/"):
        return None, None
    name, alias, _ = parse_models_uri(uri)
    return name, alias


def _stem(uri: str) -> str:
    """What a path or ``s3://`` URI calls its model: the file's stem, or its folder's name."""
    path = PurePosixPath(unquote(urlparse(uri).path) if "://" in uri else uri)
    if path.name == MODEL_FILE or not path.suffix:
        path = path.parent if path.name == MODEL_FILE else path
        return path.name or "model"
    return path.stem


def _missing_alias(exc: HeimdallError) -> bool:
    cause = getattr(exc.__cause__, "error_code", None)
    return cause in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _reason(exc: Exception) -> str:
    """A short, fixed label for a refusal (a metric label: a handful of values only)."""
    # The bytes' checks (registry tag, store metadata, a missing tag) all name the sha256; no
    # exception type tells them apart from other registry or storage failures.
    if "sha256" in str(exc):
        return "sha256"
    if isinstance(exc, InputError | ValidationError):
        return "invalid"
    if isinstance(exc, RegistryError):
        return "registry"
    if isinstance(exc, StorageError):
        return "storage"
    return "load"
