"""MLflow Model Registry for LocalizationNet ONNX exports: register, alias, promote, roll back.

Where the bytes live, for an export that storage uploaded to ``<root>/models/localization/vX.onnx``
(``<root>`` is ``s3://heimdall-models`` with an S3 endpoint, else the local object store
``file://<data_dir>/objects/heimdall-models``)::

    <root>/models/localization/vX.onnx     the upload: canonical bytes, sha256 in its metadata
    <root>/models/localization/vX/         the MLflow model, which is the version's ``source``
        model.onnx                         a copy made inside the object store (sha256 checked)
        MLmodel, conda.yaml, python_env.yaml, requirements.txt,
        input_example.json, serving_input_example.json      small files written from here

An MLflow model is a directory, so the payload is stored twice, but it crosses the network once
(the upload); the copy is server-side. External-data files are copied into the directory under
the names the ONNX file refers to. The metadata JSON is an artifact of the lineage run
(``onnx_metadata/<sha256[:12]>.json``): the training run when it is known to this tracking
server, else a new ``export`` run.

Aliases are the primary mechanism (``staging`` at registration, ``production`` by
:func:`promote`); the legacy stage is still set when asked, for the original API. Every alias
move adds a registered-model tag ``heimdall.alias_history.<alias>.<UTC time>.<id>`` holding the
event as JSON (the last 100 per alias are kept); :func:`rollback` replays them to find the
previous holder. A tag per event keeps concurrent registrations from overwriting each other's.

MLflow reads its HTTP retry policy and S3 credentials from ``os.environ`` only, so calls run
with those variables set from :class:`Settings` (see ``config.MLFLOW_ENVIRONMENT``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow.onnx
import numpy as np
import onnx
import requests
import structlog
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec
from sqlalchemy.exc import SQLAlchemyError

from heimdall.checkpoint import heimdall_version, sha256_file
from heimdall.config import (
    DEFAULT_ALIAS,
    DEFAULT_MODEL_NAME,
    MLFLOW_ENVIRONMENT,
    QUIET_MLFLOW,
    Settings,
    load_settings,
    redact_uri,
)
from heimdall.data import generate
from heimdall.errors import HeimdallError, InputError, RegistryError
from heimdall.storage import ObjectStore, open_store
from heimdall.validate import TensorSpec, ValidationResult, validate_onnx_model

log = structlog.get_logger(__name__)

PRODUCTION = "production"
MODEL_FILE = "model.onnx"
HISTORY_TAG = "heimdall.alias_history."
REGISTRATION_TAG = "heimdall.registration_id"
STAGES = {"staging": "Staging", "production": "Production", "archived": "Archived", "none": "None"}
# MLflow's own default is 7 retries with a 2 s backoff factor (minutes when the server is down).
HTTP_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_HISTORY_LIMIT = 100  # events kept per alias
_LOCK_RETRIES = 12
_READY_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ALIAS = re.compile(r"[A-Za-z0-9_\-]+")
_RESERVED_TAGS = {
    "framework",
    "format",
    "sha256",
    "onnx_uri",
    "verification",
    "opset",
    "heimdall_version",
    "checkpoint_sha256",
    "backbone",
    "training_run_id",
}
_T = TypeVar("_T")


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
class AliasEvent:
    """One move of an alias, as kept in the registered model's history tag."""

    version: str
    action: str  # register | set | promote | rollback
    at: str
    previous: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """One promotion check and why it passed or failed."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AliasChange:
    """Where an alias points after :func:`promote` or :func:`rollback`, and where it pointed."""

    name: str
    alias: str
    version: str
    previous: str | None
    action: str
    gates: tuple[Gate, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gates": [g.to_dict() for g in self.gates]}


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


@dataclass(frozen=True)
class _Staged:
    """The MLflow model directory written for an upload, and what its bytes say about them."""

    source: str
    sha256: str
    facts: Mapping[str, str]  # opset, heimdall_version, and where known checkpoint_sha256,
    # backbone, training_run_id


# --- public API -------------------------------------------------------------------------------


def register_model(
    onnx_uri: str,
    *,
    sha256: str | None = None,
    name: str = DEFAULT_MODEL_NAME,
    metadata: Mapping[str, Any] | None = None,
    alias: str | None = DEFAULT_ALIAS,
    stage: str | None = None,
    run_id: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> RegisteredVersion:
    """Register the uploaded ONNX at ``onnx_uri`` as a new version of ``name``; set ``alias``.

    The MLflow model directory is written next to the upload and its ``model.onnx`` is read back
    and checked against ``sha256`` (default: the sha256 storage recorded and verified at upload)
    and LocalizationNet's IO contract before the version is created. ``run_id`` (else
    ``metadata["run_id"]``, else the ONNX file's training run) is the lineage run when this
    tracking server knows it. ``stage`` (e.g. ``"Staging"``) also sets MLflow's deprecated
    stage. Every registration makes a new version; to reuse one for the same bytes, look it up
    first with :func:`find_version_by_sha256`.
    """
    settings = settings or load_settings()
    meta = dict(metadata or {})
    if sha256 is not None:
        _check_sha256(sha256)
    _check_name(name)
    if alias is not None:
        _check_alias(alias)
    legacy_stage = _canonical_stage(stage) if stage is not None else None
    reserved = sorted(set(tags or {}) & _RESERVED_TAGS)
    if reserved:
        raise InputError(f"tags {reserved} are set by heimdall from the verified bytes")
    store = store or open_store(settings)
    staged = _stage_model_dir(store, onnx_uri, sha256, meta)
    sha256 = staged.sha256
    training_run = run_id or staged.facts.get("training_run_id")
    tags = {
        "framework": "pytorch",
        "format": "onnx",
        "sha256": sha256,
        "onnx_uri": onnx_uri,
        "verification": _verification(meta),
        **staged.facts,
        **(tags or {}),
    }
    text = description or _describe(staged.facts, sha256)
    action = f"register {staged.source} as a version of {name!r}"
    where = (
        f"; the model bytes are already stored at {onnx_uri} (MLflow model at {staged.source}): "
        "register again once MLflow is back, nothing needs to be uploaded again"
    )
    with _mlflow(settings, action, stored=where) as client:
        lineage = _lineage_run(client, settings, training_run, sha256, meta)
        _ensure_registered_model(client, name)
        created = _create_version(client, name, staged.source, lineage, tags, text)
        _await_ready(client, created)
        if alias is not None:
            _move_alias(client, name, alias, created.version, "register")
        if legacy_stage is not None:
            _transition_stage(client, name, created.version, legacy_stage)
        version = _version(client, name, created.version)
    log.info(
        "registry.registered",
        name=name,
        version=version.version,
        source=staged.source,
        sha256=sha256,
        alias=alias,
        stage=legacy_stage,
        run_id=lineage,
    )
    return version


def register_with_mlflow(
    model_name: str,
    s3_uri: str,
    metadata: Mapping[str, Any],
    stage: str = "Staging",
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """The original API: register ``s3_uri`` (expected sha256 from ``metadata``) as a dict.

    Sets the legacy ``stage`` as asked and the ``staging`` alias; the ``production`` alias is
    only ever moved by :func:`promote`, behind its gates.
    """
    version = register_model(
        s3_uri,
        sha256=_text(metadata.get("sha256")),
        name=model_name,
        metadata=metadata,
        stage=stage,
        settings=settings,
        store=store,
    )
    return {
        **version.to_dict(),
        "model_name": version.name,
        "model_version": version.version,
        "s3_uri": s3_uri,
    }


def find_version_by_sha256(
    name: str, sha256: str, *, settings: Settings | None = None
) -> RegisteredVersion | None:
    """The oldest READY version of ``name`` registered for these bytes, or None."""
    _check_name(name)
    _check_sha256(sha256)
    settings = settings or load_settings()
    with _mlflow(settings, f"search {name!r} for sha256 {sha256}") as client:
        found = _search_versions(client, f"name = '{name}' and tags.sha256 = '{sha256}'")
        ready = sorted((v for v in found if v.status == "READY"), key=lambda v: int(v.version))
        return _version(client, name, ready[0].version) if ready else None


def resolve_model_uri(uri: str, *, settings: Settings | None = None) -> RegisteredVersion:
    """The version that ``models:/NAME@alias``, ``models:/NAME/VERSION`` or ``…/latest`` names."""
    name, alias, number = _parse_models_uri(uri)
    settings = settings or load_settings()
    with _mlflow(settings, f"resolve {uri}") as client:
        if alias is not None:
            number = _call(client.get_model_version_by_alias, name, alias).version
        elif number == "latest":
            versions = _search_versions(client, f"name = '{name}'")
            if not versions:
                raise RegistryError(f"{uri}: model {name!r} has no versions")
            number = str(max(int(v.version) for v in versions))
        return _version(client, name, str(number))


def promote(
    name: str,
    version: str | int,
    *,
    to: str = PRODUCTION,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> AliasChange:
    """Point alias ``to`` at ``version`` if every gate passes, else raise RegistryError.

    Gates: the version is READY, its verification was recorded as passed, and the stored
    ``model.onnx`` still has the registered sha256 (read back in full).
    """
    _check_name(name)
    _check_alias(to)
    settings = settings or load_settings()
    store = store or open_store(settings)
    with _mlflow(settings, f"promote {name} version {version} to {to!r}") as client:
        target = _version(client, name, str(version))
        current = _aliases(_call(client.get_registered_model, name)).get(to)
        if current == target.version:
            return AliasChange(name, to, target.version, current, "unchanged")
        gates = _passed_gates(store, target, f"move {to!r} of {name} to version {target.version}")
        _move_alias(client, name, to, target.version, "promote")
    log.info("registry.promoted", name=name, alias=to, version=target.version, previous=current)
    return AliasChange(name, to, target.version, current, "promote", gates)


def rollback(
    name: str,
    *,
    alias: str = PRODUCTION,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> AliasChange:
    """Return ``alias`` to the version that held it before the current one (gates re-checked)."""
    _check_name(name)
    _check_alias(alias)
    settings = settings or load_settings()
    store = store or open_store(settings)
    with _mlflow(settings, f"roll back {alias!r} of {name}") as client:
        model = _call(client.get_registered_model, name)
        current = _aliases(model).get(alias)
        if current is None:
            raise RegistryError(f"{name} has no alias {alias!r}; nothing to roll back")
        holders = _holders(_parse_history(model.tags).get(alias, ()))
        while holders and holders[-1] == current:
            holders.pop()
        if not holders:
            raise RegistryError(
                f"{name}@{alias} (version {current}) has no earlier holder in its history; "
                f"move it explicitly with promote"
            )
        target = _version(client, name, holders[-1])
        gates = _passed_gates(
            store, target, f"roll {name}@{alias} back to version {target.version}"
        )
        _move_alias(client, name, alias, target.version, "rollback")
    log.info(
        "registry.rolled_back", name=name, alias=alias, version=target.version, previous=current
    )
    return AliasChange(name, alias, target.version, current, "rollback", gates)


def set_alias(
    name: str, version: str | int, alias: str = DEFAULT_ALIAS, *, settings: Settings | None = None
) -> AliasChange:
    """Point ``alias`` at ``version`` (a version heimdall registered, so already verified).

    For ``production`` use :func:`promote`, which re-checks the gates first.
    """
    _check_name(name)
    _check_alias(alias)
    if alias == PRODUCTION:
        raise InputError(f"move {PRODUCTION!r} with promote, which checks the gates first")
    settings = settings or load_settings()
    with _mlflow(settings, f"set alias {alias!r} of {name} to version {version}") as client:
        target = _version(client, name, str(version))
        if target.status != "READY" or target.verification != "passed":
            raise RegistryError(
                f"{name} version {target.version} is {target.status} with verification "
                f"{target.verification!r}; only READY, verified versions get an alias"
            )
        current = _aliases(_call(client.get_registered_model, name)).get(alias)
        if current == target.version:
            return AliasChange(name, alias, target.version, current, "unchanged")
        _move_alias(client, name, alias, target.version, "set")
    log.info("registry.alias_set", name=name, alias=alias, version=target.version)
    return AliasChange(name, alias, target.version, current, "set")


def set_stage(
    name: str, version: str | int, stage: str, *, settings: Settings | None = None
) -> RegisteredVersion:
    """Set MLflow's legacy stage of ``version`` (the original API's ``stage='Staging'``)."""
    _check_name(name)
    canonical = _canonical_stage(stage)
    settings = settings or load_settings()
    with _mlflow(settings, f"set stage {canonical!r} of {name} version {version}") as client:
        target = _version(client, name, str(version))
        if target.stage != canonical:
            _transition_stage(client, name, target.version, canonical)
            target = _version(client, name, target.version)
    return target


def check_registration(name: str, alias: str | None = None, stage: str | None = None) -> None:
    """Raise InputError now for a name, alias or stage that registering would refuse later."""
    _check_name(name)
    if alias is not None:
        _check_alias(alias)
    if stage is not None:
        _canonical_stage(stage)


def log_run_files(
    run_id: str, paths: Sequence[Path], artifact_path: str, *, settings: Settings | None = None
) -> None:
    """Attach local files (e.g. a publish report) to an MLflow run as artifacts."""
    if not run_id:
        raise InputError("run_id must not be empty")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise InputError(f"cannot log {missing} to run {run_id}: not files")
    settings = settings or load_settings()
    with _mlflow(settings, f"log {len(paths)} file(s) to run {run_id}") as client:
        for path in paths:
            _call(client.log_artifact, run_id, str(path), artifact_path)


def list_models(*, settings: Settings | None = None) -> list[ModelSummary]:
    """Every registered model with its aliases and newest version number."""
    settings = settings or load_settings()
    with _mlflow(settings, "list registered models") as client:
        models: list[RegisteredModel] = _paged(client.search_registered_models)
        summaries = []
        for model in sorted(models, key=lambda m: m.name):
            versions = _search_versions(client, f"name = '{model.name}'")
            latest = max((int(v.version) for v in versions), default=None)
            summaries.append(
                ModelSummary(
                    name=model.name,
                    description=model.description or None,
                    latest_version=str(latest) if latest is not None else None,
                    aliases=_aliases(model),
                    updated_at=_iso(model.last_updated_timestamp),
                )
            )
        return summaries


def show_model(
    name: str, version: str | int | None = None, *, settings: Settings | None = None
) -> ModelDetails:
    """A registered model: aliases, alias history and versions (only ``version`` when given)."""
    _check_name(name)
    settings = settings or load_settings()
    with _mlflow(settings, f"show model {name!r}") as client:
        model = _call(client.get_registered_model, name)
        if version is not None:
            versions = [_version(client, name, str(version))]
        else:
            found = _search_versions(client, f"name = '{name}'")
            versions = [_to_version(v) for v in sorted(found, key=lambda v: -int(v.version))]
        tags = dict(model.tags)
        return ModelDetails(
            name=model.name,
            description=model.description or None,
            aliases=_aliases(model),
            versions=tuple(versions),
            alias_history=_parse_history(tags),
            tags={k: v for k, v in sorted(tags.items()) if not k.startswith(HISTORY_TAG)},
        )


def model_dir_uri(onnx_uri: str) -> str:
    """The MLflow model directory that belongs to an uploaded ``….onnx`` object."""
    if not onnx_uri.endswith(".onnx") or onnx_uri.endswith("/.onnx"):
        raise InputError(
            f"expected the URI of an uploaded .onnx object, got {redact_uri(onnx_uri)!r}"
        )
    return onnx_uri.removesuffix(".onnx")


def stored_sha256(store: ObjectStore, uri: str) -> str | None:
    """The sha256 of the bytes stored at ``uri`` (streamed, never held whole), None if absent."""
    bucket, key = store.locate(uri)
    if store.head(bucket, key) is None:
        return None
    digest = hashlib.sha256()
    for chunk in store.iter_bytes(bucket, key):
        digest.update(chunk)
    return digest.hexdigest()


# --- object store side of registration -------------------------------------------------------


def _stage_model_dir(
    store: ObjectStore, onnx_uri: str, sha256: str | None, metadata: Mapping[str, Any]
) -> _Staged:
    """Copy the upload into its MLflow model directory, read it back, write the small files."""
    source = model_dir_uri(onnx_uri)
    bucket, key = store.locate(onnx_uri)
    _, dir_key = store.locate(source)
    info = store.head(bucket, key)
    if info is None:
        raise RegistryError(f"{onnx_uri} does not exist; upload the model before registering it")
    recorded = info.metadata.get("sha256")
    sha256 = sha256 or recorded
    if sha256 is None:
        raise RegistryError(f"{onnx_uri} has no recorded sha256; pass the one of the file uploaded")
    if recorded is not None and recorded != sha256:
        raise RegistryError(
            f"{onnx_uri} was stored with sha256 {recorded}, not {sha256}: it holds other bytes"
        )
    copies = {key: f"{dir_key}/{MODEL_FILE}"}
    for suffix, name in external_data(info.metadata).items():
        copies[key + suffix] = f"{dir_key}/{name}"
    for src, dst in copies.items():
        _copy_once(store, bucket, src, dst)
    with tempfile.TemporaryDirectory(prefix="heimdall-register-") as tmp:
        local = Path(tmp) / "read-back"
        local.mkdir()
        for src, dst in copies.items():
            path = store.get(bucket, dst, local / dst.rpartition("/")[2])
            expected = sha256 if src == key else _recorded_sha256(store, bucket, src)
            digest = sha256_file(path)
            if digest != expected:
                raise RegistryError(
                    f"{store.uri(bucket, dst)} read back with sha256 {digest}, expected "
                    f"{expected}; the object store altered or lost the bytes. Nothing was "
                    "registered."
                )
        checked = validate_onnx_model(local / MODEL_FILE)
        facts = _facts(metadata, checked)
        model_dir = Path(tmp) / "mlflow-model"
        _write_mlflow_model(model_dir, checked, {"sha256": sha256, "onnx_uri": onnx_uri, **facts})
        # MLmodel last: a directory without it is not an MLflow model, never a half-written one.
        names = [*sorted(p.name for p in model_dir.iterdir() if p.name != "MLmodel"), "MLmodel"]
        for name in names:
            store.put_bytes(
                bucket,
                f"{dir_key}/{name}",
                (model_dir / name).read_bytes(),
                content_type="application/json" if name.endswith(".json") else "text/plain",
                if_absent=False,
            )
    log.info("registry.model_dir_written", source=source, sha256=sha256)
    return _Staged(source=source, sha256=sha256, facts=facts)


def external_data(metadata: Mapping[str, str]) -> dict[str, str]:
    """``{key suffix: file name the ONNX refers to}`` that storage records for external data."""
    names: dict[str, str] = json.loads(metadata.get("external-data", "{}"))
    for name in names.values():
        if Path(name).name != name or name in {"", ".", "..", MODEL_FILE}:
            raise RegistryError(f"unsafe external-data file name {name!r} in object metadata")
    return names


def _copy_once(store: ObjectStore, bucket: str, src: str, dst: str) -> None:
    """Server-side copy, skipped when ``dst`` already holds the same recorded bytes."""
    source, target = store.head(bucket, src), store.head(bucket, dst)
    if source is None:
        raise RegistryError(f"{store.uri(bucket, src)} does not exist; upload the model again")
    recorded = source.metadata.get("sha256")
    if target is None or target.size != source.size or target.metadata.get("sha256") != recorded:
        store.copy(bucket, src, dst, if_absent=False)


def _recorded_sha256(store: ObjectStore, bucket: str, key: str) -> str | None:
    info = store.head(bucket, key)
    return info.metadata.get("sha256") if info is not None else None


def _facts(metadata: Mapping[str, Any], checked: ValidationResult) -> dict[str, str]:
    """Lineage facts from the metadata, else from what the exporter stamped into the file."""
    props = checked.metadata_props
    facts = {
        "opset": str(checked.opset_version),
        "heimdall_version": _text(metadata.get("heimdall_version"))
        or props.get("heimdall.version")
        or heimdall_version(),
        "checkpoint_sha256": _text(metadata.get("checkpoint_sha256"))
        or props.get("heimdall.checkpoint_sha256"),
        "backbone": _text(metadata.get("backbone")) or props.get("heimdall.backbone"),
        "training_run_id": _text(metadata.get("run_id")) or props.get("heimdall.training_run_id"),
    }
    return {k: v for k, v in facts.items() if v}


def _write_mlflow_model(path: Path, checked: ValidationResult, info: Mapping[str, str]) -> None:
    """MLflow's own ONNX-flavor writer for everything but the payload, which is copied instead.

    ``mlflow.onnx.save_model`` gets an empty ModelProto, so it writes MLmodel (flavors,
    signature from the file's IO spec, input example), the environment files and a placeholder
    ``model.onnx`` that is dropped here: the real one is the server-side copy beside these files.
    """
    signature = ModelSignature(
        inputs=Schema([_mlflow_spec(s) for s in checked.inputs]),
        outputs=Schema([_mlflow_spec(s) for s in checked.outputs]),
    )
    example, _ = generate(1, seed=0)
    mlflow.onnx.save_model(
        onnx.ModelProto(),
        str(path),
        signature=signature,
        input_example=example,
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        metadata={"heimdall": dict(info)},
    )
    (path / MODEL_FILE).unlink()
    model = Model.load(str(path / "MLmodel"))
    small = sum(p.stat().st_size for p in path.iterdir())
    model.model_size_bytes = small + checked.total_size_bytes
    model.save(str(path / "MLmodel"))


def _mlflow_spec(spec: TensorSpec) -> MlflowTensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in spec.shape)
    return MlflowTensorSpec(np.dtype(spec.dtype), shape, spec.name)


# --- tags, lineage and versions --------------------------------------------------------------


def _verification(metadata: Mapping[str, Any]) -> str:
    """``passed`` or ``failed`` from ``metadata["parity"]`` (as ``get_model_metadata`` writes)."""
    parity = metadata.get("parity")
    passed = parity.get("passed") if isinstance(parity, Mapping) else None
    if passed is None:
        return "missing"
    return "passed" if passed is True else "failed"


def _describe(facts: Mapping[str, str], sha256: str) -> str:
    return (
        f"LocalizationNet ({facts.get('backbone', 'unknown')} backbone) as ONNX opset "
        f"{facts['opset']}, sha256 {sha256}. Input mel_spectrogram float32 (B, 3, 128, 32); "
        "outputs positions (B, 2) [lat, lon] in degrees and uncertainties (B, 2)."
    )


def _lineage_run(
    client: MlflowClient,
    settings: Settings,
    training_run: str | None,
    sha256: str,
    metadata: Mapping[str, Any],
) -> str:
    """The training run if this server knows it, else a new export run; log the metadata there."""
    artifact = f"onnx_metadata/{sha256[:12]}.json"
    text = json.dumps(metadata, indent=2, sort_keys=True, default=str)
    if training_run and _run_exists(client, training_run):
        _call(client.log_text, training_run, text, artifact)
        return training_run
    if training_run:
        log.warning("registry.training_run_unknown", run_id=training_run)
    experiment = _experiment_id(client, settings)
    tags = {"heimdall.kind": "export", "heimdall.sha256": sha256}
    if training_run:
        tags["heimdall.training_run_id"] = training_run
    run = _call(client.create_run, experiment, run_name=f"export-{sha256[:12]}", tags=tags)
    run_id = str(run.info.run_id)
    _call(client.log_text, run_id, text, artifact)
    _call(client.set_terminated, run_id)
    return run_id


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        _call(client.get_run, run_id)
    except MlflowException as exc:  # unknown here, or not even an MLflow run id
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    name = settings.experiment_name
    experiment = _call(client.get_experiment_by_name, name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(
            _call(
                client.create_experiment,
                name,
                artifact_location=settings.experiment_artifact_location,
            )
        )
    except MlflowException as exc:  # another registration created it first
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = _call(client.get_experiment_by_name, name)
    if experiment is None:
        raise RegistryError(f"experiment {name!r} vanished while it was being created")
    return str(experiment.experiment_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        _call(client.create_registered_model, name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _create_version(
    client: MlflowClient,
    name: str,
    source: str,
    run_id: str,
    tags: Mapping[str, str],
    description: str,
) -> ModelVersion:
    """Create the version; after a failed attempt, look for it by a token before trying again.

    The token keeps a retried request whose first attempt did land from making a second version.
    """
    token = uuid.uuid4().hex
    tagged = {**tags, REGISTRATION_TAG: token}
    attempts = 5
    for attempt in range(1, attempts + 1):
        try:
            return _call(
                client.create_model_version,
                name,
                source,
                run_id=run_id,
                tags=tagged,
                description=description,
            )
        except MlflowException as exc:
            landed = _search_versions(
                client, f"name = '{name}' and tags.`{REGISTRATION_TAG}` = '{token}'"
            )
            if landed:
                return landed[0]
            if attempt == attempts or "Model Version creation error" not in str(exc):
                raise
            log.warning("registry.create_version.retry", name=name, attempt=attempt)
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _await_ready(client: MlflowClient, created: ModelVersion) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    version = created
    while version.status != "READY":
        if version.status == "FAILED_REGISTRATION":
            raise RegistryError(
                f"MLflow marked {created.name} version {created.version} FAILED_REGISTRATION: "
                f"{version.status_message}"
            )
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{created.name} version {created.version} is still {version.status} after "
                f"{_READY_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.5)
        version = _call(client.get_model_version, created.name, created.version)


def _transition_stage(client: MlflowClient, name: str, version: str, stage: str) -> None:
    # Stages are deprecated since MLflow 2.9 (FutureWarning on every call); the original API
    # still asks for one, so the transition is made and the warning replaced by our own event.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _call(
            client.transition_model_version_stage,
            name,
            version,
            stage,
            archive_existing_versions=False,
        )
    log.info("registry.legacy_stage_set", name=name, version=version, stage=stage)


def _version(client: MlflowClient, name: str, version: str) -> RegisteredVersion:
    try:
        return _to_version(_call(client.get_model_version, name, version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{name} has no version {version}") from exc
        raise


def _to_version(mv: ModelVersion) -> RegisteredVersion:
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
        created_at=_iso(mv.creation_timestamp),
        description=mv.description or None,
        tags=dict(sorted(tags.items())),
    )


def _search_versions(client: MlflowClient, filter_string: str) -> list[ModelVersion]:
    return _paged(client.search_model_versions, filter_string)


def _paged(search: Callable[..., Any], *args: Any) -> list[Any]:
    """Every result of an MLflow search, page by page."""
    found: list[Any] = []
    token = None
    while True:
        page = _call(search, *args, max_results=200, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


# --- aliases and their history ---------------------------------------------------------------


def _aliases(model: RegisteredModel) -> dict[str, str]:
    return {alias: str(version) for alias, version in sorted(model.aliases.items())}


def _move_alias(client: MlflowClient, name: str, alias: str, version: str, action: str) -> None:
    """Point ``alias`` at ``version`` and record the move as one new history tag."""
    model = _call(client.get_registered_model, name)
    previous = model.aliases.get(alias)
    _call(client.set_registered_model_alias, name, alias, version)
    now = datetime.now(UTC)
    event = AliasEvent(
        version=str(version),
        action=action,
        at=now.isoformat(timespec="seconds"),
        previous=str(previous) if previous is not None else None,
    )
    # One tag per event, never a shared list: concurrent moves each add a key of their own
    # instead of overwriting (or racing to insert) the same one.
    key = f"{HISTORY_TAG}{alias}.{now:%Y%m%dT%H%M%S.%fZ}.{uuid.uuid4().hex[:6]}"
    _call(client.set_registered_model_tag, name, key, json.dumps(event.to_dict()))
    stale = sorted(k for k in model.tags if k.startswith(f"{HISTORY_TAG}{alias}."))
    for old in stale[: max(0, len(stale) + 1 - _HISTORY_LIMIT)]:
        try:
            _call(client.delete_registered_model_tag, name, old)
        except MlflowException as exc:  # a concurrent move pruned it first
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


def _parse_history(tags: Mapping[str, str]) -> dict[str, tuple[AliasEvent, ...]]:
    """Events per alias, oldest first, from ``heimdall.alias_history.<alias>.<UTC time>.<id>``."""
    history: dict[str, list[AliasEvent]] = {}
    for key, value in sorted(tags.items()):
        if not key.startswith(HISTORY_TAG):
            continue
        alias = key.removeprefix(HISTORY_TAG).partition(".")[0]
        try:
            event = AliasEvent(**json.loads(value))
        except (ValueError, TypeError) as exc:
            raise RegistryError(
                f"registered-model tag {key!r} is not an alias event: {exc}"
            ) from exc
        history.setdefault(alias, []).append(event)
    return {alias: tuple(events) for alias, events in history.items()}


def _holders(events: tuple[AliasEvent, ...]) -> list[str]:
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


def _passed_gates(store: ObjectStore, version: RegisteredVersion, move: str) -> tuple[Gate, ...]:
    """The gates of ``version``, all passed; else RegistryError naming every failure."""
    gates = _gates(store, version)
    failed = [g for g in gates if not g.passed]
    if failed:
        reasons = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        raise RegistryError(f"refusing to {move}: {reasons}")
    return tuple(gates)


def _gates(store: ObjectStore, version: RegisteredVersion) -> list[Gate]:
    gates = [
        Gate("ready", version.status == "READY", f"status is {version.status}"),
        Gate(
            "verification",
            version.verification == "passed",
            f"parity verification recorded as {version.verification or 'missing'}",
        ),
    ]
    if version.sha256 is None:
        gates.append(Gate("sha256", False, "the version has no sha256 tag"))
        return gates
    uri = f"{version.source}/{MODEL_FILE}"
    try:
        digest = stored_sha256(store, uri)
    except HeimdallError as exc:
        gates.append(Gate("sha256", False, f"cannot read {uri}: {exc}"))
        return gates
    if digest is None:
        gates.append(Gate("sha256", False, f"{uri} is missing"))
    elif digest != version.sha256:
        gates.append(
            Gate("sha256", False, f"{uri} now has sha256 {digest}, registered {version.sha256}")
        )
    else:
        gates.append(Gate("sha256", True, f"{uri} still has sha256 {digest}"))
    return gates


# --- talking to MLflow ------------------------------------------------------------------------


@contextmanager
def _mlflow(settings: Settings, action: str, *, stored: str = "") -> Iterator[MlflowClient]:
    """An MlflowClient for ``settings``; MLflow, database and HTTP failures become RegistryError."""
    # A user's own MLFLOW_HTTP_* settings win over ours.
    policy = {k: os.environ.get(k, v) for k, v in HTTP_POLICY.items()}
    with MLFLOW_ENVIRONMENT.applied({**settings.mlflow_s3_env(), **policy, **QUIET_MLFLOW}):
        if reason := _unreachable_database(settings):
            raise RegistryError(f"cannot {action}: {reason}{stored}")
        try:
            yield MlflowClient(
                tracking_uri=settings.resolved_tracking_uri,
                registry_uri=settings.resolved_registry_uri,
            )
        except (MlflowException, SQLAlchemyError, requests.RequestException, OSError) as exc:
            retries = policy["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
            raise RegistryError(_explain(settings, action, exc, retries) + stored) from exc


def _unreachable_database(settings: Settings, attempts: int = 3) -> str | None:
    """Why a database tracking URI's host refuses connections, or None when it accepts them.

    MLflow retries creating its database engine ten times with exponential backoff (about
    100 s) before it gives up; HTTP servers get the bounded HTTP_POLICY instead.
    """
    parsed = urlparse(settings.resolved_tracking_uri)
    scheme = parsed.scheme.split("+")[0]
    default_ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
    if scheme not in default_ports or not parsed.hostname:
        return None
    for attempt in range(1, attempts + 1):
        try:
            address = (parsed.hostname, parsed.port or default_ports[scheme])
            socket.create_connection(address, timeout=3).close()
            return None
        except OSError as exc:
            if attempt == attempts:
                where = redact_uri(settings.tracking_uri or settings.resolved_tracking_uri)
                return (
                    f"the MLflow database at {where} refuses connections "
                    f"({exc.strerror or exc}, {attempts} attempts); is it running?"
                )
            time.sleep(0.5 * attempt)
    return None


def _explain(settings: Settings, action: str, exc: BaseException, retries: str) -> str:
    where = redact_uri(settings.tracking_uri or settings.resolved_tracking_uri)
    message = str(exc)
    if "Max retries exceeded" in message or "Connection refused" in message:
        reason = f"the MLflow server at {where} did not answer ({retries} retries); is it running?"
    elif isinstance(exc, SQLAlchemyError) or "OperationalError" in message:
        reason = f"the MLflow database at {where} failed: {_first_line(message)}"
    else:
        reason = f"MLflow at {where} said: {_first_line(message)}"
    text = f"cannot {action}: {reason}"
    for secret in settings.secret_values():
        text = text.replace(secret, "***")
    return redact_uri(text)


def _first_line(message: str, limit: int = 400) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    return line if len(line) <= limit else line[:limit] + "…"


def _call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call an MlflowClient method, retrying while SQLite reports the database locked.

    SQLite answers "database is locked" at once when two processes upgrade read transactions
    to writes; the statement did not run, so trying again is safe. MLflow's SQL store sets an
    alias by looking for its row, then inserting one: a concurrent writer's insert in between
    breaks the unique constraint, and trying again updates the row that now exists.
    """
    alias_race = getattr(fn, "__name__", "") == "set_registered_model_alias"
    for attempt in range(1, _LOCK_RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except (MlflowException, SQLAlchemyError) as exc:
            text = str(exc)
            duplicate = "UNIQUE constraint failed" in text or "duplicate key value" in text
            retry = "database is locked" in text or (alias_race and duplicate)
            if not retry or attempt == _LOCK_RETRIES:
                raise
            time.sleep(min(0.05 * 2**attempt, 1.0))
    raise AssertionError("unreachable")


# --- small checks -----------------------------------------------------------------------------


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    body = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if body and "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, alias, None
    if body and body.count("/") == 1:
        name, number = body.split("/")
        if name and (number.isdigit() or number == "latest"):
            return name, None, number
    raise InputError(
        f"not a registry URI: {uri!r}; use models:/NAME@alias, models:/NAME/VERSION or "
        "models:/NAME/latest"
    )


def _check_sha256(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InputError(f"sha256 must be 64 lowercase hex characters, got {sha256!r}")


def _check_name(name: str) -> None:
    if not name or "'" in name or "/" in name or "@" in name:
        raise InputError(f"invalid registered model name {name!r}: no quotes, '/' or '@'")


def _check_alias(alias: str) -> None:
    if not _ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias):
        raise InputError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' or 'v<N>')"
        )


def _canonical_stage(stage: str) -> str:
    canonical = STAGES.get(stage.lower())
    if canonical is None:
        raise InputError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES.values())}")
    return canonical


def _text(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


def _iso(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")
