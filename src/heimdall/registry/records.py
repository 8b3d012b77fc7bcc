"""What heimdall records of MLflow's registry entities (versions, registrations, models), and
finding them: one version, what a ``models:/`` URI names, every model in the store.

A lookup that finds nothing says where it looked (the registry URI, password redacted) and
what is there instead: the model's aliases, or the command that lists the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from heimdall.config import Settings, load_settings
from heimdall.errors import RegistryError
from heimdall.registry.client import call, is_lock, paged, registry_where, search_versions, session
from heimdall.registry.names import parse_models_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version as heimdall sees it."""

    name: str
    version: str
    status: str
    source: str
    onnx_uri: str | None
    sha256: str | None
    run_id: str | None
    aliases: tuple[str, ...]
    stage: str | None
    verification: str | None
    created_at: str
    description: str | None
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        data["tags"] = dict(self.tags)
        data["uri"] = self.uri
        return data


@dataclass(frozen=True)
class Registration:
    """The version that holds some bytes, and whether this call created it."""

    version: RegisteredVersion
    created: bool
    # Earlier versions of these bytes whose stored bytes no longer match (never reused).
    altered: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSummary:
    """A registered model in :func:`list_models`."""

    name: str
    description: str | None
    latest_version: str | None
    aliases: Mapping[str, str]
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "aliases": dict(self.aliases)}


def aliases_of(model: Any) -> dict[str, str]:
    """``{alias: version}`` of a RegisteredModel, sorted by alias."""
    return {alias: str(version) for alias, version in sorted(model.aliases.items())}


def get_version(client: MlflowClient, name: str, version: str) -> RegisteredVersion:
    try:
        return to_version(call(client.get_model_version, name, version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{name} has no version {version}") from exc
        raise


def to_version(mv: ModelVersion) -> RegisteredVersion:
    tags = dict(mv.tags)
    stage = mv.current_stage if mv.current_stage and mv.current_stage != "None" else None
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        status=str(mv.status),
        source=str(mv.source),
        onnx_uri=tags.get("onnx_uri"),
        sha256=tags.get("sha256"),
        run_id=mv.run_id or None,
        aliases=tuple(sorted(mv.aliases)),
        stage=stage,
        verification=tags.get("verification"),
        created_at=iso(mv.creation_timestamp),
        description=mv.description or None,
        tags=dict(sorted(tags.items())),
    )


def iso(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")


# --- finding ----------------------------------------------------------------------------------


def resolve_model_uri(uri: str, *, settings: Settings | None = None) -> RegisteredVersion:
    """The version that ``models:/NAME@alias``, ``models:/NAME/VERSION`` or ``…/latest`` names."""
    name, alias, number = parse_models_uri(uri)
    settings = settings or load_settings()
    with session(settings, f"resolve {uri}") as client:
        if alias is not None:
            number = _alias_version(client, settings, uri, (name, alias))
        elif number == "latest":
            versions = search_versions(client, f"name = '{name}'")
            if not versions:
                _check_exists(client, settings, uri, name)
                raise RegistryError(f"{uri}: model {name!r} has no versions")
            number = str(max(int(v.version) for v in versions))
        else:
            _check_exists(client, settings, uri, name)
        return get_version(client, name, str(number))


def _alias_version(
    client: MlflowClient, settings: Settings, uri: str, where: tuple[str, str]
) -> str:
    """The version an alias names; else RegistryError listing the aliases the model has."""
    name, alias = where
    try:
        return str(call(client.get_model_version_by_alias, name, alias).version)
    except MlflowException as exc:
        aliases = aliases_of(_check_exists(client, settings, uri, name))
        if alias in aliases:
            raise  # not a missing alias: MLflow's own failure, told as such by the session
        held = ", ".join(f"{a} (version {v})" for a, v in aliases.items()) or "none"
        raise RegistryError(  # MLflow's error as the cause: its code says what is missing
            f"{uri}: {name} has no alias {alias!r}; its aliases: {held} "
            f"(heimdall models show {name})"
        ) from exc


def _check_exists(client: MlflowClient, settings: Settings, uri: str, name: str) -> object:
    """The registered model ``name``; RegistryError naming the store when it is not there."""
    try:
        return call(client.get_registered_model, name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(
            f"{uri}: no registered model {name!r} in {registry_where(settings)} "
            "(heimdall models list shows the models there)"
        ) from exc


def list_models(*, settings: Settings | None = None) -> list[ModelSummary]:
    """Every registered model with its aliases and newest version number."""
    settings = settings or load_settings()
    with session(settings, "list registered models") as client:
        models = [m for m in paged(client.search_registered_models) if not is_lock(m.name)]
        summaries = []
        for model in sorted(models, key=lambda m: m.name):
            versions = search_versions(client, f"name = '{model.name}'")
            latest = max((int(v.version) for v in versions), default=None)
            summaries.append(
                ModelSummary(
                    name=model.name,
                    description=model.description or None,
                    latest_version=str(latest) if latest is not None else None,
                    aliases=aliases_of(model),
                    updated_at=iso(model.last_updated_timestamp),
                )
            )
        return summaries
