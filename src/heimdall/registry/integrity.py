"""Whether a version's stored bytes are still the registered ones, and the gates built on it.

A version whose ``model.onnx`` no longer hashes to its ``sha256`` tag is tagged
``heimdall.integrity`` (what changed, when): registration never reuses it, rollback never
returns to it, and it never blocks the alias it holds (``heimdall.gates`` judges a challenger
on the baseline gate alone when the holder fails this check).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from heimdall.config import Settings, load_settings
from heimdall.errors import RegistryError
from heimdall.objects import ObjectStore
from heimdall.registry.client import call, session
from heimdall.registry.model_dir import changed_bytes, version_bytes_problem
from heimdall.registry.names import check_name, check_version
from heimdall.registry.records import RegisteredVersion, get_version

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = structlog.get_logger(__name__)

INTEGRITY_TAG = "heimdall.integrity"


@dataclass(frozen=True)
class Gate:
    """One check before an alias moves, and why it passed or failed."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bytes_problem(
    name: str, version: str | int, *, store: ObjectStore, settings: Settings | None = None
) -> str | None:
    """How the stored bytes of ``version`` differ from its registered sha256 (None: they don't).

    A difference is recorded on the version (``heimdall.integrity``); a failed read raises, as it
    says nothing about the bytes.
    """
    check_name(name)
    number = check_version(version)
    settings = settings or load_settings()
    with session(settings, f"check the stored bytes of {name} version {number}") as client:
        found = get_version(client, name, number)
        if found.sha256 is None:
            return "the version has no sha256 tag"
        problem = changed_bytes(store, found.source, found.sha256)
        if problem is not None:
            mark_altered(client, name, number, problem)
    return problem


def mark_altered(client: MlflowClient, name: str, version: str, problem: str) -> None:
    """Tag a version whose stored bytes changed, so it is never reused nor returned to."""
    log.warning("registry.version_bytes_changed", name=name, version=version, problem=problem)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    call(client.set_model_version_tag, name, version, INTEGRITY_TAG, f"{problem} ({now})")


def failed_gates(version: RegisteredVersion, store: ObjectStore | None) -> tuple[list[Gate], str]:
    """The gates of ``version`` and, when some failed, one line naming each failure."""
    gates = integrity_gates(version, store)
    return gates, "; ".join(f"{g.name}: {g.detail}" for g in gates if not g.passed)


def passed_gates(
    version: RegisteredVersion, move: str, store: ObjectStore | None
) -> tuple[Gate, ...]:
    """The gates of ``version``, all passed; else RegistryError naming every failure."""
    gates, failures = failed_gates(version, store)
    if failures:
        altered = any(g.name == "sha256" and not g.passed for g in gates)
        # Registering again would find the same altered bytes; a publish uploads fresh ones.
        fix = "; publish the checkpoint again to store fresh bytes as a new version" * altered
        raise RegistryError(f"refusing to {move}: {failures}{fix}")
    return tuple(gates)


def integrity_gates(version: RegisteredVersion, store: ObjectStore | None) -> list[Gate]:
    """READY, parity verification passed, and (given the ``store``) stored bytes unchanged."""
    gates = [
        Gate("ready", version.status == "READY", f"status is {version.status}"),
        Gate(
            "verification",
            version.verification == "passed",
            f"parity verification recorded as {version.verification or 'missing'}",
        ),
    ]
    if store is None:
        return gates
    if version.sha256 is None:
        return [*gates, Gate("sha256", False, "the version has no sha256 tag")]
    problem = version_bytes_problem(store, version.source, version.sha256)
    detail = problem or f"model.onnx still has sha256 {version.sha256}"
    return [*gates, Gate("sha256", problem is None, detail)]
