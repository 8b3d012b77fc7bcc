"""The original design's API (``src/onnx_export.py``), as the training service calls it.

``from heimdall.legacy import ONNXExporter, export_and_register_model`` stands in for
``from src.onnx_export import ...``. Every name here is a thin shell over the typed library that
keeps the seed's argument names, order and result keys; the typed API stays beside it:

- ``export_to_onnx(model, output_path, opset_version, do_constant_folding)`` returns the file's
  ``Path``, as the seed does; :func:`heimdall.export.export_to_onnx` takes the same positional
  arguments and returns the typed ``ExportResult``. ``opset_version=None`` (the default) is the
  library's measured default, 17, rather than the seed's 14; pass 14 to get 14.
- ``validate_onnx_model`` and ``get_model_metadata`` return dicts; the library returns a
  ``ValidationResult`` and takes everything after ``run_id`` by keyword.
- ``test_onnx_inference`` is new: parity through :func:`heimdall.verify.verify_parity` (the
  library's gates, recorded under ``parity``) plus the seed's MAE ``tolerance``, and timing
  through :func:`heimdall.bench.benchmark`.
- ``export_and_register_model`` never raises: a dict with ``success`` and ``error``.

``s3_client`` may be a boto3 S3 client (its endpoint, region and credentials open a
:class:`~heimdall.storage.S3Store`), a heimdall ``ObjectStore``, or None (from the environment).
``mlflow_tracker`` may be an ``mlflow.MlflowClient`` or any object with a ``tracking_uri``
(the registry is that server's), heimdall ``Settings``, or None. Anything else is refused before
any work, in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from botocore.client import BaseClient
from pydantic import SecretStr

from heimdall import export, pipeline, validate
from heimdall.bench import PYTORCH, benchmark
from heimdall.config import (
    DEFAULT_ALIAS,
    DEFAULT_MODEL_NAME,
    Settings,
    load_settings,
    scrub_secrets,
)
from heimdall.errors import HeimdallError, InputError, PublishError, VerificationError
from heimdall.gates import move_alias_gated
from heimdall.inference import evaluate_heldout
from heimdall.machine import is_busy
from heimdall.model import LocalizationNet
from heimdall.registry import register_model, set_stage
from heimdall.results import FP32, timing_summary
from heimdall.storage import LocalStore, ObjectStore, open_store, upload_model
from heimdall.verify import verify_parity

log = structlog.get_logger(__name__)

SEED_RESULT_KEYS = (
    "success",
    "s3_uri",
    "model_info",
    "metadata",
    "inference_metrics",
    "registration",
    "error",
)
SPEEDUP_BATCH = 1  # the batch size of the seed's ``inference_metrics['speedup']``
BENCH_BUDGET_S = 2.0  # publish's own benchmark budget per batch size
_TIMED_ENGINE = "onnx"  # what benchmark() names a bare ONNX file


class ToleranceExceeded(VerificationError, AssertionError):
    """ONNX disagrees with PyTorch beyond ``tolerance``: the seed documents AssertionError."""


# --- the backends the seed passes in ---------------------------------------------------------


def open_backends(
    s3_client: object = None, mlflow_tracker: object = None
) -> tuple[Settings, ObjectStore]:
    """The settings and object store that the seed's two client objects stand for.

    Raises InputError naming the argument when either is of a kind heimdall cannot use.
    """
    if mlflow_tracker is None or isinstance(mlflow_tracker, Settings):
        settings = mlflow_tracker or load_settings()
    else:
        uri = getattr(mlflow_tracker, "tracking_uri", None)
        if not isinstance(uri, str) or not uri:
            raise InputError(
                "mlflow_tracker must be an mlflow.MlflowClient, an object with a tracking_uri, "
                f"or heimdall Settings; got {type(mlflow_tracker).__name__}"
            )
        settings = load_settings().model_copy(update={"tracking_uri": uri, "registry_uri": None})
    if s3_client is None:
        return settings, open_store(settings)
    if isinstance(s3_client, ObjectStore):
        return settings, s3_client
    if isinstance(s3_client, BaseClient) and s3_client.meta.service_model.service_name == "s3":
        settings = settings.model_copy(update=_s3_settings(s3_client))
        return settings, open_store(settings)
    raise InputError(
        "s3_client must be a boto3 S3 client or a heimdall.storage.ObjectStore; got "
        f"{type(s3_client).__name__}"
    )


def _s3_settings(client: BaseClient) -> dict[str, Any]:
    """Endpoint, region and credentials of a boto3 S3 client, as Settings fields."""
    try:
        # botocore has no public accessor for a client's credentials.
        credentials = client._get_credentials()
    except AttributeError:
        raise InputError(
            "cannot read the credentials of this boto3 client; pass a heimdall.storage.S3Store"
        ) from None
    frozen = credentials.get_frozen_credentials() if credentials is not None else None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise InputError(
            "s3_client has no credentials: create it with aws_access_key_id and "
            "aws_secret_access_key, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if frozen.token:
        raise InputError(
            "s3_client uses temporary credentials (a session token), which heimdall's S3 store "
            "does not take; pass a heimdall.storage.S3Store with long-lived keys"
        )
    return {
        "s3_endpoint_url": client.meta.endpoint_url,
        "s3_region": client.meta.region_name or "us-east-1",
        "s3_access_key_id": SecretStr(frozen.access_key),
        "s3_secret_access_key": SecretStr(frozen.secret_key),
    }


# --- the seed's methods, as functions ---------------------------------------------------------


def export_to_onnx(
    model: LocalizationNet,
    output_path: Path | str,
    opset_version: int | None = None,
    do_constant_folding: bool = True,
) -> Path:
    """Export ``model`` to ``output_path`` (symbolic batch axis); the written file's path."""
    return export.export_to_onnx(model, output_path, opset_version, do_constant_folding).path


def validate_onnx_model(onnx_path: Path | str) -> dict[str, Any]:
    """Check ``onnx_path`` fully (or raise ValidationError); its IO, opset and sizes as a dict."""
    return validate.validate_onnx_model(onnx_path).to_dict()


def test_onnx_inference(
    onnx_path: Path | str,
    pytorch_model: LocalizationNet,
    num_batches: int = 5,
    batch_size: int = 8,
    tolerance: float = 1e-5,
    *,
    budget_s: float = BENCH_BUDGET_S,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch and time both; raise ToleranceExceeded past ``tolerance``.

    ``mae`` and ``max_abs_diff`` are the worst over both outputs and every input kind at
    ``batch_size`` (positions in normalized region units, before the de-normalisation);
    ``tolerance`` bounds ``mae``. ``parity`` is the library's full record, judged by its own
    stricter gates: the registry trusts that verdict, not ``tolerance``. Timing is
    ``heimdall bench``'s interleaved measurement (:func:`heimdall.bench.benchmark`) at
    ``batch_size``: at least ``num_batches`` rounds, more while ``budget_s`` lasts; the
    latencies are medians, ``speedup`` the median over rounds of PyTorch's time over ONNX
    Runtime's (above 1: ONNX is faster), ``rounds`` how many ran. ``machine_busy`` True means
    other processes held the cores: the speed-up is then not a reliable figure.
    """
    if num_batches < 1:
        raise InputError(f"num_batches must be at least 1, got {num_batches}")
    parity = verify_parity(onnx_path, pytorch_model, (batch_size,), raise_on_failure=False)
    mae = max(d.mae for d in parity.diffs)
    if not mae <= tolerance:
        raise ToleranceExceeded(
            f"{onnx_path}: ONNX Runtime differs from PyTorch by MAE {mae:.3g} > tolerance "
            f"{tolerance:.3g} at batch {batch_size}"
        )
    timed = benchmark(
        pytorch_model,
        onnx_path,
        batch_sizes=(batch_size,),
        budget_s=budget_s,
        min_iterations=num_batches,
        peak=False,
    )
    onnx_time = timed.timing(_TIMED_ENGINE, batch_size)
    return {
        "mae": mae,
        "max_abs_diff": max(d.max_abs for d in parity.diffs),
        "tolerance": tolerance,
        "onnx_inference_ms": onnx_time.p50_ms,
        "pytorch_inference_ms": timed.timing(PYTORCH, batch_size).p50_ms,
        "speedup": onnx_time.speedup_vs_pytorch,
        "rounds": onnx_time.iterations,
        "machine_busy": is_busy(timed.environment),
        "num_batches": num_batches,
        "batch_size": batch_size,
        "parity": parity.to_dict(),
    }


# Importing this function into a test module must not make pytest collect it as a test.
test_onnx_inference.__test__ = False  # type: ignore[attr-defined]


def get_model_metadata(
    onnx_path: Path | str,
    pytorch_model: LocalizationNet,
    run_id: str | None,
    inference_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata record of a validated ONNX file, with ``inference_metrics`` as given.

    A ``parity`` record among the metrics (``test_onnx_inference`` returns one) is the
    verification the registry records.
    """
    metrics = dict(inference_metrics) if inference_metrics is not None else None
    parity = metrics.get("parity") if metrics is not None else None
    record = validate.get_model_metadata(
        onnx_path,
        pytorch_model,
        run_id,
        parity=parity if isinstance(parity, Mapping) else None,
    )
    return {**record, "inference_metrics": metrics}


def register_with_mlflow(
    model_name: str,
    s3_uri: str,
    metadata: Mapping[str, Any],
    stage: str = "Staging",
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """Register ``s3_uri`` (expected sha256 from ``metadata``); the version as a dict.

    When parity verification passed, the ``staging`` alias and then the legacy ``stage`` move
    behind the quality gates (``heimdall.gates``; GateError when they refuse, the version
    kept); ``production`` moves only through ``promote``.
    """
    settings = settings or load_settings()
    registration = register_model(
        s3_uri,
        store=store or open_store(settings),
        validator=validate.validate_onnx_model,
        sha256=str(metadata["sha256"]) if metadata.get("sha256") else None,
        name=model_name,
        metadata=metadata,
        settings=settings,
    )
    version = registration.version
    if version.verification == "passed":
        move_alias_gated(
            model_name,
            version.version,
            DEFAULT_ALIAS,
            evaluate=partial(evaluate_heldout, settings=settings),
            settings=settings,
            store=store,
        )
        if stage:
            version = set_stage(model_name, version.version, stage, settings=settings)
        version = replace(version, aliases=tuple(sorted({*version.aliases, DEFAULT_ALIAS})))
    else:
        log.warning("legacy.alias_not_moved", name=model_name, version=version.version)
    return {
        **version.to_dict(),
        "model_name": version.name,
        "model_version": version.version,
        "s3_uri": s3_uri,
        "reused": not registration.created,
    }


# --- the seed's class and workflow ------------------------------------------------------------


class ONNXExporter:
    """The seed's exporter: ``__init__`` and six methods, over the functions above."""

    def __init__(self, s3_client: object = None, mlflow_tracker: object = None) -> None:
        self.s3_client = s3_client
        self.mlflow_tracker = mlflow_tracker
        self.settings, self.store = open_backends(s3_client, mlflow_tracker)

    export_to_onnx = staticmethod(export_to_onnx)
    validate_onnx_model = staticmethod(validate_onnx_model)
    test_onnx_inference = staticmethod(test_onnx_inference)
    get_model_metadata = staticmethod(get_model_metadata)

    def upload_to_minio(
        self,
        onnx_path: Path | str,
        bucket_name: str | None = None,
        object_name: str | None = None,
    ) -> str:
        """Upload (verified, idempotent by sha256); the stored object's URI.

        ``bucket_name=None`` is the configured bucket (``HEIMDALL_BUCKET``, default
        ``heimdall-models``, the seed's); only the local store creates a missing bucket.
        """
        bucket = bucket_name or self.settings.bucket
        create = isinstance(self.store, LocalStore)
        return upload_model(onnx_path, self.store, bucket, object_name, create_bucket=create).uri

    def register_with_mlflow(
        self, model_name: str, s3_uri: str, metadata: Mapping[str, Any], stage: str = "Staging"
    ) -> dict[str, Any]:
        """Register ``s3_uri`` on this exporter's tracking server; the version as a dict."""
        # The module's function: a method's body does not see the class's names.
        return register_with_mlflow(
            model_name, s3_uri, metadata, stage, settings=self.settings, store=self.store
        )


def export_and_register_model(
    pytorch_model: LocalizationNet,
    run_id: str | None,
    s3_client: object = None,
    mlflow_tracker: object = None,
    output_dir: Path = Path("/tmp/onnx_exports"),
    model_name: str = DEFAULT_MODEL_NAME,
) -> dict[str, Any]:
    """The seed's whole workflow (:func:`heimdall.pipeline.publish`) as a dict; never raises.

    The seed's keys, plus ``failed_step`` and ``steps``; ``inference_metrics['speedup']`` is
    ONNX Runtime over PyTorch eager at batch 1, ``inference_metrics['machine_busy']`` whether
    other processes held the cores meanwhile. Clients heimdall cannot use are refused before
    any work, with ``success`` False and the reason in ``error``.
    """
    try:
        settings, store = open_backends(s3_client, mlflow_tracker)
    except HeimdallError as exc:
        return _failed(str(exc))
    try:
        result = _publish_as_dict(
            pytorch_model, run_id, store, settings, Path(output_dir), model_name
        )
    except Exception as exc:  # the seed promises a dict, never a raise
        # No traceback in the log: its rendering shows local values, secrets among them.
        reason = scrub_secrets(f"{type(exc).__name__}: {exc}", settings.secret_values())
        log.error("legacy.export_and_register_failed", name=model_name, error=reason)
        return _failed(reason)
    metrics = result.get("inference_metrics")
    if isinstance(metrics, dict):
        timings = metrics.get("timings") or {}
        speedups = timings.get("speedup_vs_pytorch") or {}
        metrics["speedup"] = speedups.get(str(SPEEDUP_BATCH))
        metrics["machine_busy"] = timings.get("machine_busy")
    return result


def _failed(error: str) -> dict[str, Any]:
    return {
        **dict.fromkeys(SEED_RESULT_KEYS),
        "success": False,
        "error": error,
        "failed_step": None,
        "steps": [],
    }


def _publish_as_dict(
    pytorch_model: LocalizationNet,
    run_id: str | None,
    s3_client: ObjectStore | None = None,
    mlflow_tracker: Settings | None = None,
    output_dir: Path = Path("/tmp/onnx_exports"),
    model_name: str = DEFAULT_MODEL_NAME,
) -> dict[str, Any]:
    """Publish and answer in the seed's dict; heimdall's own errors become ``success: False``."""
    try:
        result = pipeline.publish(
            pytorch_model,
            settings=mlflow_tracker,
            store=s3_client,
            name=model_name,
            stage="Staging",
            output_dir=output_dir,
            run_id=run_id,
        )
    except HeimdallError as exc:
        failed = exc if isinstance(exc, PublishError) else None
        return {
            "success": False,
            "s3_uri": failed.existing.get("uploaded") if failed else None,
            "model_info": None,
            "metadata": None,
            "inference_metrics": None,
            "registration": None,
            "error": str(exc),
            "failed_step": failed.step if failed else None,
            "steps": failed.steps if failed else [],
        }
    primary = result.primary
    return {
        "success": True,
        "s3_uri": primary.upload.uri,
        "model_info": result.validation.to_dict(),
        "metadata": dict(primary.metadata),
        "inference_metrics": {
            "parity": result.parity.to_dict(),
            "timings": timing_summary(result.benchmark, FP32),
        },
        "registration": {
            **primary.version.to_dict(),
            "model_name": primary.version.name,
            "model_version": primary.version.version,
        },
        "error": None,
        "failed_step": None,
        "steps": [s.to_dict() for s in result.steps],
    }
