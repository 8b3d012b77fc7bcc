"""Lineage of a registration: the facts its tags carry, the run its metadata is logged to,
and the files and metrics logged to that run."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from heimdall.config import Settings, heimdall_version, load_settings
from heimdall.errors import InputError, RegistryError
from heimdall.onnxfile import ValidationResult
from heimdall.registry.client import call, session

log = structlog.get_logger(__name__)


def facts_of(metadata: Mapping[str, Any], checked: ValidationResult) -> dict[str, str]:
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


def verification_of(metadata: Mapping[str, Any]) -> str:
    """``passed`` or ``failed`` from ``metadata["parity"]`` (as ``get_model_metadata`` writes)."""
    parity = metadata.get("parity")
    passed = parity.get("passed") if isinstance(parity, Mapping) else None
    if passed is None:
        return "missing"
    return "passed" if passed is True else "failed"


def describe(facts: Mapping[str, str], sha256: str) -> str:
    return (
        f"LocalizationNet ({facts.get('backbone', 'unknown')} backbone) as ONNX opset "
        f"{facts['opset']}, sha256 {sha256}. Input mel_spectrogram float32 (B, 3, 128, 32); "
        "outputs positions (B, 2) [lat, lon] in degrees and uncertainties (B, 2)."
    )


def lineage_run(
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
        call(client.log_text, training_run, text, artifact)
        return training_run
    if training_run:
        log.warning("registry.training_run_unknown", run_id=training_run)
    experiment = _experiment_id(client, settings)
    tags = {"heimdall.kind": "export", "heimdall.sha256": sha256}
    if training_run:
        tags["heimdall.training_run_id"] = training_run
    run = call(client.create_run, experiment, run_name=f"export-{sha256[:12]}", tags=tags)
    run_id = str(run.info.run_id)
    call(client.log_text, run_id, text, artifact)
    call(client.set_terminated, run_id)
    return run_id


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
    with session(settings, f"log {len(paths)} file(s) to run {run_id}") as client:
        for path in paths:
            call(client.log_artifact, run_id, str(path), artifact_path)


def log_run_metrics(
    run_id: str, metrics: Mapping[str, float], *, settings: Settings | None = None
) -> None:
    """Record numbers users filter on (held-out error, latency) as MLflow run metrics."""
    from mlflow.entities import Metric

    if not run_id:
        raise InputError("run_id must not be empty")
    settings = settings or load_settings()
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    with session(settings, f"log {len(entries)} metric(s) to run {run_id}") as client:
        call(client.log_batch, run_id, metrics=entries)


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        call(client.get_run, run_id)
    except MlflowException as exc:  # unknown here, or not even an MLflow run id
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    name = settings.experiment_name
    experiment = call(client.get_experiment_by_name, name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(
            call(
                client.create_experiment,
                name,
                artifact_location=settings.experiment_artifact_location,
            )
        )
    except MlflowException as exc:  # another registration created it first
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = call(client.get_experiment_by_name, name)
    if experiment is None:
        raise RegistryError(f"experiment {name!r} vanished while it was being created")
    return str(experiment.experiment_id)


def _text(value: object) -> str | None:
    return str(value) if value not in (None, "") else None
