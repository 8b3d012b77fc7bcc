"""What heimdall records of MLflow's registry entities: versions, registrations, models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from heimdall.errors import RegistryError
from heimdall.registry.client import call

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
