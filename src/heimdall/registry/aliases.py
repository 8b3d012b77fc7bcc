"""Aliases: move them behind gates, keep their history, roll back, show a model.

Every move happens while holding the model's registry lock (``client.model_lock``), so the
holder read before a move is the real previous holder, and the history is one registered-model
tag per alias, ``heimdall.alias_history.<alias>``, holding the last events as a JSON list
(read, appended, written under the same lock). :func:`rollback` replays it to find the previous
holder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from heimdall.config import DEFAULT_ALIAS, Settings, load_settings
from heimdall.errors import InputError, RegistryError
from heimdall.objects import ObjectStore
from heimdall.registry.client import call, model_lock, search_versions, session
from heimdall.registry.model_dir import version_bytes_problem
from heimdall.registry.names import PRODUCTION, check_alias, check_name, check_version
from heimdall.registry.records import RegisteredVersion, aliases_of, get_version, to_version

log = structlog.get_logger(__name__)

HISTORY_TAG = "heimdall.alias_history."
_HISTORY_CHARS = 4500  # MLflow caps a tag value at 5000 characters; the oldest events go first


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias, as kept in the registered model's history tag."""

    version: str
    action: str  # register | set | promote | rollback
    at: str
    previous: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "previous"}


@dataclass(frozen=True)
class Gate:
    """One check before an alias moves, and why it passed or failed."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AliasChange:
    """Where an alias points after a move, and where it pointed before."""

    name: str
    alias: str
    version: str
    previous: str | None
    action: str
    gates: tuple[Gate, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gates": [g.to_dict() for g in self.gates]}


@dataclass(frozen=True)
class ModelDetails:
    """A registered model with its versions (newest first), aliases and alias history."""

    name: str
    description: str | None
    aliases: Mapping[str, str]
    versions: tuple[RegisteredVersion, ...]
    alias_history: Mapping[str, tuple[AliasEvent, ...]]
    tags: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "aliases": dict(self.aliases),
            "versions": [v.to_dict() for v in self.versions],
            "alias_history": {
                alias: [e.to_dict() for e in events] for alias, events in self.alias_history.items()
            },
            "tags": dict(self.tags),
        }


class AliasMovedError(RegistryError):
    """The alias changed holder between a caller's decision and the move; decide again."""


_ANY = object()  # expected_previous: move whatever holds the alias now


def set_alias(
    name: str,
    version: str | int,
    alias: str = DEFAULT_ALIAS,
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
    action: str = "set",
) -> AliasChange:
    """Point ``alias`` at ``version`` if it is READY and verified.

    Its bytes are not read again (``store`` is not needed): registration has just verified
    them. For ``production`` use :func:`promote`, which does. Quality gates live above the
    registry (``heimdall.gates``).
    """
    check_name(name)
    version = check_version(version)
    check_alias(alias)
    if alias == PRODUCTION:
        raise InputError(f"move {PRODUCTION!r} with promote, which checks the gates first")
    return move_alias(name, version, alias, action=action, settings=settings, store=store)


def promote(
    name: str,
    version: str | int,
    *,
    store: ObjectStore,
    to: str = PRODUCTION,
    settings: Settings | None = None,
) -> AliasChange:
    """Point alias ``to`` at ``version`` if every gate passes, else raise RegistryError.

    Gates: the version is READY, its verification was recorded as passed, and the stored
    ``model.onnx`` still has the registered sha256 (read back in full from ``store``).
    """
    return move_alias(
        name, version, to, action="promote", read_bytes=True, settings=settings, store=store
    )


def move_alias(
    name: str,
    version: str | int,
    alias: str,
    *,
    action: str,
    expected_previous: object = _ANY,
    gates: tuple[Gate, ...] = (),
    reason: str | None = None,
    read_bytes: bool = False,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> AliasChange:
    """Move ``alias`` to ``version`` behind the integrity gates, holding the model's lock.

    ``expected_previous`` (a version or None) makes the move conditional: if another process
    moved the alias since the caller decided, AliasMovedError is raised and nothing moves.
    ``gates`` are the caller's own verdicts (all passed, or overridden with a ``reason``),
    reported with the integrity gates; the ``reason`` goes into the history and a version tag.
    ``read_bytes`` reads the stored ``model.onnx`` back from ``store``, which it needs.
    """
    check_name(name)
    version = check_version(version)
    check_alias(alias)
    if read_bytes and store is None:
        raise InputError(
            f"moving {name}@{alias} with read_bytes reads the version's bytes: pass store= "
            "(heimdall.storage.open_store(settings))"
        )
    settings = settings or load_settings()
    with session(settings, f"move {alias!r} of {name} to version {version}") as client:
        target = get_version(client, name, str(version))
        with model_lock(client, name, wait_s=max(4 * settings.mlflow_timeout_s, 60.0)):
            current = aliases_of(call(client.get_registered_model, name)).get(alias)
            if expected_previous is not _ANY and current != expected_previous:
                raise AliasMovedError(
                    f"{name}@{alias} moved to version {current} while version {target.version} "
                    f"was judged against version {expected_previous}"
                )
            if current == target.version:
                return AliasChange(name, alias, target.version, current, "unchanged")
            move = f"move {alias!r} of {name} to version {target.version}"
            checked = passed_gates(target, move, store if read_bytes else None)
            if reason:
                tag = f"heimdall.forced.{alias}"
                call(client.set_model_version_tag, name, target.version, tag, reason)
            _record_move(client, name, alias, target.version, action, reason)
    log.info(
        "registry.alias_moved", name=name, alias=alias, version=target.version, previous=current
    )
    return AliasChange(name, alias, target.version, current, action, (*checked, *gates))


def alias_holder(name: str, alias: str, *, settings: Settings | None = None) -> str | None:
    """The version ``alias`` points at now, or None (also when the model does not exist)."""
    check_name(name)
    settings = settings or load_settings()
    with session(settings, f"read alias {alias!r} of {name}") as client:
        try:
            return aliases_of(call(client.get_registered_model, name)).get(alias)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise


def rollback(
    name: str,
    *,
    store: ObjectStore,
    alias: str = PRODUCTION,
    settings: Settings | None = None,
) -> AliasChange:
    """Return ``alias`` to the version that held it before the current one (gates re-checked,
    its bytes read back from ``store``)."""
    check_name(name)
    check_alias(alias)
    settings = settings or load_settings()
    with session(settings, f"roll back {alias!r} of {name}") as client:
        model = call(client.get_registered_model, name)
        if aliases_of(model).get(alias) is None:
            raise RegistryError(f"{name} has no alias {alias!r}; nothing to roll back")
        with model_lock(client, name, wait_s=max(4 * settings.mlflow_timeout_s, 60.0)):
            model = call(client.get_registered_model, name)
            current = aliases_of(model).get(alias)
            holders = holders_of(parse_history(model.tags).get(alias, ()))
            while holders and holders[-1] == current:
                holders.pop()
            if not holders:
                raise RegistryError(
                    f"{name}@{alias} (version {current}) has no earlier holder in its history; "
                    f"move it explicitly with promote"
                )
            target = get_version(client, name, holders[-1])
            gates = passed_gates(
                target, f"roll {name}@{alias} back to version {target.version}", store
            )
            _record_move(client, name, alias, target.version, "rollback")
    log.info(
        "registry.rolled_back", name=name, alias=alias, version=target.version, previous=current
    )
    return AliasChange(name, alias, target.version, current, "rollback", gates)


def show_model(
    name: str, version: str | int | None = None, *, settings: Settings | None = None
) -> ModelDetails:
    """A registered model: aliases, alias history and versions (only ``version`` when given)."""
    check_name(name)
    if version is not None:
        version = check_version(version)
    settings = settings or load_settings()
    with session(settings, f"show model {name!r}") as client:
        model = call(client.get_registered_model, name)
        if version is not None:
            versions = [get_version(client, name, str(version))]
        else:
            found = search_versions(client, f"name = '{name}'")
            versions = [to_version(v) for v in sorted(found, key=lambda v: -int(v.version))]
        aliases = aliases_of(model)
        # Searches leave a version's aliases empty on some stores: take them from the model.
        versions = [
            replace(v, aliases=tuple(sorted(a for a, n in aliases.items() if n == v.version)))
            for v in versions
        ]
        tags = dict(model.tags)
        return ModelDetails(
            name=model.name,
            description=model.description or None,
            aliases=aliases,
            versions=tuple(versions),
            alias_history=parse_history(tags),
            tags={k: v for k, v in sorted(tags.items()) if not k.startswith(HISTORY_TAG)},
        )


# --- history ----------------------------------------------------------------------------------


def _record_move(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    action: str,
    reason: str | None = None,
) -> None:
    """Point ``alias`` at ``version`` and append the move to its history (lock held)."""
    model = call(client.get_registered_model, name)
    previous = aliases_of(model).get(alias)
    call(client.set_registered_model_alias, name, alias, version)
    event = AliasEvent(
        version=str(version),
        action=action,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        previous=previous,
        reason=reason,
    )
    events = [e.to_dict() for e in parse_history(model.tags).get(alias, ())] + [event.to_dict()]
    text = json.dumps(events, separators=(",", ":"))
    while len(text) > _HISTORY_CHARS and len(events) > 1:
        events = events[1:]
        text = json.dumps(events, separators=(",", ":"))
    call(client.set_registered_model_tag, name, f"{HISTORY_TAG}{alias}", text)


def parse_history(tags: Mapping[str, str]) -> dict[str, tuple[AliasEvent, ...]]:
    """Events per alias, oldest first, from the ``heimdall.alias_history.<alias>`` tags."""
    history: dict[str, tuple[AliasEvent, ...]] = {}
    for key, value in sorted(tags.items()):
        if not key.startswith(HISTORY_TAG):
            continue
        alias = key.removeprefix(HISTORY_TAG)
        try:
            history[alias] = tuple(AliasEvent(**event) for event in json.loads(value))
        except (ValueError, TypeError) as exc:
            raise RegistryError(
                f"registered-model tag {key!r} is not an alias history: {exc}"
            ) from exc
    return history


def holders_of(events: tuple[AliasEvent, ...]) -> list[str]:
    """Replay the history as a stack: moves push the new holder, a rollback pops one."""
    stack: list[str] = []
    for event in events:
        if event.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != event.version:
                stack.append(event.version)
        else:
            stack.append(event.version)
    return stack


# --- gates ------------------------------------------------------------------------------------


def passed_gates(
    version: RegisteredVersion, move: str, store: ObjectStore | None
) -> tuple[Gate, ...]:
    """The gates of ``version``, all passed; else RegistryError naming every failure."""
    gates = integrity_gates(version, store)
    failed = [g for g in gates if not g.passed]
    if failed:
        reasons = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        raise RegistryError(f"refusing to {move}: {reasons}")
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
