"""Aliases: move them behind the integrity gates, roll back, show a model.

Every move happens while holding the model's registry lock (``client.model_lock``), so the
holder read before a move is the real previous holder; the move is appended to the alias's
history (``history``) and, for ``production`` and ``staging``, MLflow's stage follows
(``stages``, unless ``Settings.sync_stages`` is off) under the same lock. :func:`rollback`
replays the history to find the previous holder whose bytes are still intact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import structlog
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from heimdall.config import DEFAULT_ALIAS, Settings, load_settings
from heimdall.errors import InputError, RegistryError
from heimdall.objects import ObjectStore
from heimdall.registry.client import call, model_lock, search_versions, session
from heimdall.registry.history import (
    HISTORY_TAG,
    AliasEvent,
    holders_of,
    parse_history,
    record_move,
)
from heimdall.registry.integrity import Gate, failed_gates, passed_gates
from heimdall.registry.names import PRODUCTION, check_alias, check_name, check_version
from heimdall.registry.records import RegisteredVersion, aliases_of, get_version, to_version
from heimdall.registry.stages import STAGE_OF_ALIAS, StageMove, sync_stages

log = structlog.get_logger(__name__)

ALTERED_HOLDER = "previous holder failed its integrity check"


@dataclass(frozen=True)
class AliasChange:
    """Where an alias points after a move, where it pointed before, and what moved with it.

    ``previous_problem``: why the previous holder was not judged against (its bytes failed
    their check); ``skipped``: earlier holders a rollback passed over, and why; ``stages``:
    MLflow stages moved to follow the alias.
    """

    name: str
    alias: str
    version: str
    previous: str | None
    action: str
    gates: tuple[Gate, ...] = ()
    stages: tuple[StageMove, ...] = ()
    previous_problem: str | None = None
    skipped: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "gates": [g.to_dict() for g in self.gates],
            "stages": [s.to_dict() for s in self.stages],
            "skipped": dict(self.skipped),
        }

    def line(self) -> str:
        """``name@alias: version 1 → version 2`` (or ``unchanged``, or ``none → …``)."""
        if self.action == "unchanged":
            return f"{self.name}@{self.alias}: version {self.version} (unchanged)"
        was = "none" if self.previous is None else f"version {self.previous}"
        return f"{self.name}@{self.alias}: {was} → version {self.version}"


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
    previous_problem: str | None = None,
    read_bytes: bool = False,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> AliasChange:
    """Move ``alias`` to ``version`` behind the integrity gates, holding the model's lock.

    ``expected_previous`` (a version or None) makes the move conditional: if another process
    moved the alias since the caller decided, AliasMovedError is raised and nothing moves.
    ``gates`` are the caller's own verdicts (all passed, or overridden with a ``reason``),
    reported with the integrity gates; the ``reason`` goes into the history and a version tag.
    ``previous_problem`` says why the caller did not judge against the previous holder (its
    bytes failed their check); it goes into the history. ``read_bytes`` reads the stored
    ``model.onnx`` back from ``store``, which it needs.
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
        target = get_version(client, name, version)
        with model_lock(client, name, wait_s=_lock_wait(settings)):
            current = aliases_of(call(client.get_registered_model, name)).get(alias)
            if expected_previous is not _ANY and current != expected_previous:
                raise AliasMovedError(
                    f"{name}@{alias} moved to version {current} while version {target.version} "
                    f"was judged against version {expected_previous}"
                )
            if current == target.version:  # a stage left behind (sync was off) catches up
                stages = _follow(client, settings, name, alias)
                return AliasChange(name, alias, current, current, "unchanged", stages=stages)
            move = f"move {alias!r} of {name} to version {target.version}"
            checked = passed_gates(target, move, store if read_bytes else None)
            if reason:
                tag = f"heimdall.forced.{alias}"
                call(client.set_model_version_tag, name, target.version, tag, reason)
            why = "; ".join(
                w
                for w in (previous_problem and f"{ALTERED_HOLDER}: {previous_problem}", reason)
                if w
            )
            record_move(client, name, alias, target.version, action, why or None)
            stages = _follow(client, settings, name, alias)
    log.info(
        "registry.alias_moved", name=name, alias=alias, version=target.version, previous=current
    )
    gated = (*checked, *gates)
    return AliasChange(
        name, alias, target.version, current, action, gated, stages, previous_problem
    )


def _lock_wait(settings: Settings) -> float:
    return max(4 * settings.mlflow_timeout_s, 60.0)


def _follow(
    client: MlflowClient, settings: Settings, name: str, alias: str
) -> tuple[StageMove, ...]:
    """Move MLflow's stages after a move of a stage alias (lock held), when sync is on."""
    if not settings.sync_stages or alias not in STAGE_OF_ALIAS:
        return ()
    return sync_stages(client, name)


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
    """Return ``alias`` to the latest earlier holder that passes the integrity gates (its
    bytes read back from ``store``); holders whose bytes fail are passed over, and said."""
    check_name(name)
    check_alias(alias)
    settings = settings or load_settings()
    with session(settings, f"roll back {alias!r} of {name}") as client:
        model = call(client.get_registered_model, name)
        if aliases_of(model).get(alias) is None:
            raise RegistryError(f"{name} has no alias {alias!r}; nothing to roll back")
        with model_lock(client, name, wait_s=_lock_wait(settings)):
            model = call(client.get_registered_model, name)
            current = aliases_of(model).get(alias)
            holders = holders_of(parse_history(model.tags).get(alias, ()))
            target, gates, skipped = _earlier_intact(client, (name, alias), current, holders, store)
            note = "; ".join(f"skipped version {v}: {why}" for v, why in skipped.items())
            record_move(client, name, alias, target.version, "rollback", note or None)
            stages = _follow(client, settings, name, alias)
    log.info(
        "registry.rolled_back",
        name=name,
        alias=alias,
        version=target.version,
        previous=current,
        skipped=list(skipped),
    )
    return AliasChange(
        name, alias, target.version, current, "rollback", gates, stages, skipped=skipped
    )


def _earlier_intact(
    client: MlflowClient,
    where: tuple[str, str],
    current: str | None,
    holders: list[str],
    store: ObjectStore,
) -> tuple[RegisteredVersion, tuple[Gate, ...], dict[str, str]]:
    """The latest earlier holder that passes every integrity gate, and those passed over."""
    name, alias = where
    skipped: dict[str, str] = {}
    for number in dict.fromkeys(reversed(holders)):  # latest first, each once
        if number == current or number in skipped:
            continue
        candidate = get_version(client, name, number)
        gates, failures = failed_gates(candidate, store)
        if not failures:
            return candidate, tuple(gates), skipped
        log.warning("registry.rollback_skipped", name=name, version=number, problem=failures)
        skipped[number] = failures
    if not skipped:
        raise RegistryError(
            f"{name}@{alias} (version {current}) has no earlier holder in its history; "
            f"move it explicitly with promote"
        )
    passed_over = "; ".join(f"version {v}: {why}" for v, why in skipped.items())
    raise RegistryError(
        f"{name}@{alias} stays at version {current}: no earlier holder passes its checks "
        f"({passed_over}); move it explicitly with promote"
    )


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
