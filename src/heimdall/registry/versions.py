"""Model versions: register (one version per sha256 and name), find, resolve, list, show.

A version is reused only when the bytes stored at its source still hash to its ``sha256`` tag
(streamed read, never trusted from the tags alone). A version whose bytes changed is tagged
``heimdall.integrity`` and never reused; the same bytes then get a new version. Registration
looks for a reusable version, writes a folder of its own (see ``model_dir``), then, holding the
model's registry lock, looks again and creates the version only if no other process did: the
same bytes published by N processes at once give one version, and the others report it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from heimdall.config import DEFAULT_MODEL_NAME, Settings, load_settings
from heimdall.errors import InputError, RegistryError
from heimdall.objects import ObjectStore
from heimdall.registry.client import call, model_lock, search_versions, session
from heimdall.registry.integrity import INTEGRITY_TAG, mark_altered
from heimdall.registry.lineage import describe, facts_of, lineage_run, verification_of
from heimdall.registry.model_dir import (
    StagedModel,
    Validator,
    changed_bytes,
    check_upload,
    remove_staged,
    stage_model_dir,
)
from heimdall.registry.names import (
    canonical_stage,
    check_name,
    check_sha256,
    check_version,
)
from heimdall.registry.records import (
    RegisteredVersion,
    Registration,
    get_version,
    to_version,
)
from heimdall.registry.stages import transition_stage
from heimdall.retry import Backoff, retry, wait_for

log = structlog.get_logger(__name__)

REGISTRATION_TAG = "heimdall.registration_id"
_READY_TIMEOUT_S = 60.0
RESERVED_TAGS = {
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
    INTEGRITY_TAG,
    REGISTRATION_TAG,
}


# --- registering ------------------------------------------------------------------------------


def register_model(
    onnx_uri: str,
    *,
    store: ObjectStore,
    validator: Validator,
    sha256: str | None = None,
    name: str = DEFAULT_MODEL_NAME,
    metadata: Mapping[str, Any] | None = None,
    stage: str | None = None,
    run_id: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    settings: Settings | None = None,
) -> Registration:
    """The version of ``name`` that holds the uploaded ONNX at ``onnx_uri``; made if none does.

    ``store`` holds ``onnx_uri`` (``storage.open_store(settings)``). The registration folder's
    ``model.onnx`` is read back and checked against ``sha256`` (default: the sha256 storage
    recorded and verified at upload) and by ``validator`` (``validate.validate_onnx_model``:
    LocalizationNet's IO contract; its result gives MLmodel's signature) before a version is
    created. ``run_id`` (else ``metadata["run_id"]``, else the ONNX file's training run) is the
    lineage run when this tracking server knows it. ``stage`` (e.g. ``"Staging"``) also sets
    MLflow's deprecated stage. Aliases are moved separately (``aliases.set_alias`` /
    ``promote``), behind their gates.
    """
    settings = settings or load_settings()
    meta = dict(metadata or {})
    legacy_stage = _checked_request(sha256, name, stage, tags)
    where = (
        f"; the model bytes are already stored at {onnx_uri}: register again once MLflow is "
        "back, nothing needs to be uploaded again"
    )
    action = f"register {onnx_uri} as a version of {name!r}"
    sha256, _ = check_upload(store, onnx_uri, sha256)
    with session(settings, action, stored=where) as client:
        found, altered = _intact_version(client, store, name, sha256)
        if found is not None:
            return _reuse(client, found, legacy_stage, altered)

    staged = stage_model_dir(
        store,
        onnx_uri,
        sha256,
        validator,
        lambda checked, digest: {"sha256": digest, "onnx_uri": onnx_uri, **facts_of(meta, checked)},
    )
    facts = facts_of(meta, staged.validation)
    described = _described(onnx_uri, staged.sha256, meta, facts, tags, description)
    lineage = (run_id or facts.get("training_run_id"), meta)
    outcome = _create_once(settings, (action, where), store, name, staged, lineage, described)
    return _registration(settings, action, outcome, legacy_stage)


def _registration(
    settings: Settings,
    action: str,
    outcome: tuple[ModelVersion | None, RegisteredVersion | None, tuple[str, ...]],
    stage: str | None,
) -> Registration:
    """The created version (with its legacy ``stage``), or the one another process created."""
    created, found, altered = outcome
    with session(settings, action) as client:
        if created is None:  # another process registered these bytes while we staged
            assert found is not None
            return _reuse(client, found, stage, altered)
        if stage is not None:
            transition_stage(client, created.name, created.version, stage)
        version = get_version(client, created.name, created.version)
    log.info(
        "registry.registered",
        name=version.name,
        version=version.version,
        source=version.source,
        sha256=version.sha256,
        stage=stage,
        run_id=version.run_id,
    )
    return Registration(version, created=True, altered=altered)


def _described(
    onnx_uri: str,
    sha256: str,
    meta: Mapping[str, Any],
    facts: Mapping[str, str],
    tags: Mapping[str, str] | None,
    description: str | None,
) -> tuple[dict[str, str], str]:
    """The new version's tags (verified facts first, the caller's own after) and description."""
    version_tags = {
        "framework": "pytorch",
        "format": "onnx",
        "sha256": sha256,
        "onnx_uri": onnx_uri,
        "verification": verification_of(meta),
        **facts,
        **(tags or {}),
    }
    return version_tags, description or describe(facts, sha256)


def _checked_request(
    sha256: str | None, name: str, stage: str | None, tags: Mapping[str, str] | None
) -> str | None:
    """Refuse a bad sha256, name, stage or reserved tag before any work; the canonical stage."""
    if sha256 is not None:
        check_sha256(sha256)
    check_name(name)
    reserved = sorted(set(tags or {}) & RESERVED_TAGS)
    if reserved:
        raise InputError(f"tags {reserved} are set by heimdall from the verified bytes")
    return canonical_stage(stage) if stage is not None else None


def _create_once(
    settings: Settings,
    action: tuple[str, str],
    store: ObjectStore,
    name: str,
    staged: StagedModel,
    lineage: tuple[str | None, Mapping[str, Any]],
    described: tuple[dict[str, str], str],
) -> tuple[ModelVersion | None, RegisteredVersion | None, tuple[str, ...]]:
    """Under the model's lock: create the version of the staged folder unless an intact one
    of these bytes exists; the folder is removed unless a version may point at it.
    ``action`` is the session's (what is being done, what is already stored). Returns
    (created, found, altered)."""
    created: ModelVersion | None = None
    creating = False  # from here on a version may exist that points at the staged folder
    try:
        with session(settings, action[0], stored=action[1]) as client:
            _ensure_registered_model(client, name)
            with model_lock(client, name, wait_s=_lock_wait(settings)):
                found, altered = _intact_version(client, store, name, staged.sha256)
                if found is None:
                    training_run, meta = lineage
                    run = lineage_run(client, settings, training_run, staged.sha256, meta)
                    creating = True
                    created = _create_version(client, name, staged.source, run, *described)
                    _await_ready(client, created)
    finally:
        if not creating:
            remove_staged(store, staged.source, staged.keys)
    return created, found, altered


def _lock_wait(settings: Settings) -> float:
    return max(4 * settings.mlflow_timeout_s, 60.0)


def _reuse(
    client: MlflowClient, found: RegisteredVersion, stage: str | None, altered: tuple[str, ...]
) -> Registration:
    if stage is not None and found.stage != stage:
        transition_stage(client, found.name, found.version, stage)
        found = get_version(client, found.name, found.version)
    log.info("registry.reused", name=found.name, version=found.version, sha256=found.sha256)
    return Registration(found, created=False, altered=altered)


def _intact_version(
    client: MlflowClient, store: ObjectStore, name: str, sha256: str
) -> tuple[RegisteredVersion | None, tuple[str, ...]]:
    """The oldest READY version of these bytes whose stored bytes still match, and the altered.

    A version whose bytes changed is tagged ``heimdall.integrity`` so no one reuses it again; a
    version stored in another object store is skipped, untagged; a failed read raises (it says
    nothing about the bytes, so it must not mark them).
    """
    altered: list[str] = []
    for mv in _versions_of(client, name, sha256):
        version = to_version(mv)
        if version.tags.get(INTEGRITY_TAG) or version.status != "READY":
            altered += [version.version] if version.tags.get(INTEGRITY_TAG) else []
            continue
        try:
            problem = changed_bytes(store, version.source, sha256)
        except InputError:  # its source is in another object store: not reusable from here
            continue
        if problem is None:
            return version, tuple(altered)
        mark_altered(client, name, version.version, problem)
        altered.append(version.version)
    return None, tuple(altered)


def _versions_of(client: MlflowClient, name: str, sha256: str) -> list[ModelVersion]:
    try:
        found = search_versions(client, f"name = '{name}' and tags.sha256 = '{sha256}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def find_version_by_sha256(
    name: str,
    sha256: str,
    *,
    store: ObjectStore,
    settings: Settings | None = None,
) -> RegisteredVersion | None:
    """The oldest READY version of ``name`` whose bytes in ``store`` still have this sha256."""
    check_name(name)
    check_sha256(sha256)
    settings = settings or load_settings()
    with session(settings, f"search {name!r} for sha256 {sha256}") as client:
        return _intact_version(client, store, name, sha256)[0]


def set_stage(
    name: str, version: str | int, stage: str, *, settings: Settings | None = None
) -> RegisteredVersion:
    """Set MLflow's legacy stage of ``version`` (the original API's ``stage='Staging'``)."""
    check_name(name)
    version = check_version(version)
    canonical = canonical_stage(stage)
    settings = settings or load_settings()
    with session(settings, f"set stage {canonical!r} of {name} version {version}") as client:
        target = get_version(client, name, str(version))
        if target.stage != canonical:
            transition_stage(client, name, target.version, canonical)
            target = get_version(client, name, target.version)
    return target


def tag_version(
    name: str, version: str, tags: Mapping[str, str], *, settings: Settings | None = None
) -> None:
    """Add tags to a version (facts about it, never the verified ones it was registered with)."""
    check_name(name)
    version = check_version(version)
    reserved = sorted(set(tags) & RESERVED_TAGS)
    if reserved:
        raise InputError(f"tags {reserved} are set by heimdall from the verified bytes")
    settings = settings or load_settings()
    with session(settings, f"tag {name} version {version}") as client:
        for key, value in tags.items():
            call(client.set_model_version_tag, name, version, key, value)


# --- MLflow calls -----------------------------------------------------------------------------


MODEL_DESCRIPTION = (
    "LocalizationNet (ConvNeXt backbone, two heads) as ONNX, published by heimdall: input "
    "mel_spectrogram float32 (B, 3, 128, 32); outputs positions (B, 2) [lat, lon] in degrees "
    "and uncertainties (B, 2) in normalized region units. Every version's bytes are sha256 "
    "checked; aliases move only behind heimdall's quality gates."
)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        call(client.create_registered_model, name, description=MODEL_DESCRIPTION)
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

    def create() -> ModelVersion:
        try:
            return call(
                client.create_model_version,
                name,
                source,
                run_id=run_id,
                tags=tagged,
                description=description,
            )
        except MlflowException:
            landed = search_versions(
                client, f"name = '{name}' and tags.`{REGISTRATION_TAG}` = '{token}'"
            )
            if landed:
                return landed[0]
            raise

    return retry(
        create,
        retryable=lambda exc: (
            isinstance(exc, MlflowException) and "Model Version creation error" in str(exc)
        ),
        attempts=5,
        backoff=Backoff(first_s=0.2, max_s=1.0),
        on_retry=lambda n, _: log.warning("registry.create_version.retry", name=name, attempt=n),
    )


def _await_ready(client: MlflowClient, created: ModelVersion) -> None:
    status = [created.status]  # the last one seen, for the timeout message

    def ready() -> ModelVersion | None:
        version = call(client.get_model_version, created.name, created.version)
        status.append(version.status)
        if version.status == "FAILED_REGISTRATION":
            raise RegistryError(
                f"MLflow marked {created.name} version {created.version} FAILED_REGISTRATION: "
                f"{version.status_message}"
            )
        return version if version.status == "READY" else None

    if created.status != "READY":
        wait_for(
            ready,
            deadline_s=_READY_TIMEOUT_S,
            timeout=lambda: RegistryError(
                f"{created.name} version {created.version} is still {status[-1]} after "
                f"{_READY_TIMEOUT_S:.0f} s"
            ),
            backoff=Backoff(first_s=0.2, max_s=1.0),
        )
