"""One-command publish: checkpoint → verified ONNX → object store → MLflow registry, with a report.

Steps, each timed and named in any failure: load → export → validate → verify → variants →
benchmark → heldout → upload → metadata → register → alias → report. Nothing is uploaded before
parity passes, and a registry version is only created for bytes that storage read back and
checked. Every step is safe to repeat: the export is deterministic, storage finds bytes it
already holds by sha256, and the registry is searched by sha256 before a version is created, so
re-running after any failure finishes the job without a second upload or a duplicate version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import structlog

from heimdall.bench import BenchmarkResult
from heimdall.checkpoint import LoadedCheckpoint, load_checkpoint
from heimdall.config import Settings, load_settings
from heimdall.errors import CheckpointError, GateError, InputError
from heimdall.gates import GatePolicy, judge, move_alias_gated
from heimdall.heldout import HeldOut
from heimdall.inference import evaluate_heldout
from heimdall.machine import software
from heimdall.model import LocalizationNet
from heimdall.optimize import DEFAULT_CALIBRATION, VARIANTS, Variant
from heimdall.preflight import preflight
from heimdall.registry import (
    DEFAULT_ALIAS,
    AliasChange,
    Gate,
    RegisteredVersion,
    Registration,
    Validated,
    log_run_files,
    log_run_metrics,
    register_model,
    set_stage,
)
from heimdall.report import write_report
from heimdall.results import (
    FP32,
    PublishedModel,
    PublishResult,
    bench_tags,
    report_document,
    timing_summary,
)
from heimdall.steps import BENCH_BATCH_SIZES as BENCH_BATCH_SIZES
from heimdall.steps import ISOLATED_EXPORT_BYTES as ISOLATED_EXPORT_BYTES
from heimdall.steps import (
    VERIFY_BATCH_SIZES,
    BytesProgress,
    PublishOptions,
    Run,
    StepProgress,
    Work,
    bench_step,
    export_step,
    heldout_of,
    heldout_step,
    validate_step,
    variants_step,
    verify_step,
)
from heimdall.storage import ObjectStore, UploadResult, open_store, upload_model
from heimdall.validate import ValidationResult, get_model_metadata, validate_onnx_model
from heimdall.verify import ParityResult

log = structlog.get_logger(__name__)


def publish(
    source: Path | str | LoadedCheckpoint | LocalizationNet,
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
    name: str | None = None,
    alias: str | None = DEFAULT_ALIAS,
    stage: str | None = None,
    variants: Sequence[str] | str = (FP32,),
    calibration: int = DEFAULT_CALIBRATION,
    output_dir: Path | str | None = None,
    create_bucket: bool | None = None,
    run_id: str | None = None,
    bench: bool = True,
    bench_budget_s: float = 2.0,
    verify_batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
    progress: StepProgress | None = None,
    upload_progress: BytesProgress | None = None,
    force: bool = False,
    reason: str | None = None,
) -> PublishResult:
    """Export, verify, benchmark, upload and register a LocalizationNet checkpoint.

    ``source`` is a checkpoint path (or a loaded one, or a model). ``variants`` lists what to
    publish: ``fp32`` always, plus ``int8``/``fp16``, each registered as its own version (tag
    ``variant``, alias ``<alias>-<variant>``) only when it passes its gates. ``create_bucket``
    defaults to True for the local store and False for S3. An alias (or stage) moves only to a
    version that passes the quality gates (``heimdall.gates``); ``force`` with a ``reason``
    overrides them, recorded. Raises PublishError naming the failed step and what already
    exists; re-running finishes the job.
    """
    settings = settings or load_settings()
    options = PublishOptions(
        name=name or settings.model_name,
        alias=alias,
        stage=stage,
        variants=tuple(_check_variants(variants)),
        calibration=calibration,
        output_dir=Path(output_dir) if output_dir else None,
        create_bucket=(not settings.uses_s3) if create_bucket is None else create_bucket,
        run_id=run_id,
        bench=bench,
        bench_budget_s=bench_budget_s,
        verify_batch_sizes=tuple(verify_batch_sizes),
        force=force,
        reason=reason,
    )
    options.check(settings)
    run = Run(progress, settings.secret_values())
    if isinstance(source, str | Path) and not Path(source).is_file():
        with run.step("load"):  # before the preflight, which may create a bucket or probe
            raise CheckpointError(f"checkpoint not found: {source}")
    # The stores answer, accept the keys and hold the bucket, before any heavy step.
    preflight(settings, bucket=settings.bucket, create_bucket=options.create_bucket, store=store)
    loaded = _load_step(run, source)
    work = Work(options, settings, run, source, loaded, _output_dir(options, settings, loaded))
    del loaded  # work holds the only reference: the export step may free the weights
    for step in (export_step, validate_step, verify_step, variants_step, bench_step, heldout_step):
        step(work)
    shared = _Shared.of(work, store or open_store(settings), upload_progress)
    return _report(work, _publish_versions(work, shared))


def _load_step(
    run: Run, source: Path | str | LoadedCheckpoint | LocalizationNet
) -> LoadedCheckpoint:
    with run.step("load"):
        loaded = _load(source)
        run.note(f"{loaded.config.backbone} backbone, checkpoint sha256 {loaded.sha256}")
    return loaded


def _publish_versions(work: Work, shared: _Shared) -> list[PublishedModel]:
    """Upload, register and alias fp32, then each variant that passed its gates."""
    assert work.exported is not None and work.parity is not None and work.heldout is not None
    exported = work.exported
    published = [
        _publish_one(
            work.run,
            shared,
            FP32,
            (exported.path, exported.sha256),
            work.parity,
            work.heldout,
            stage=work.options.stage,
            validation=work.validation,
        )
    ]
    for built in (v for v in work.variants if v.passed):
        with work.run.step(f"heldout[{built.variant}]"):
            assert built.parity is not None  # a variant passed its parity check
            evaluation = heldout_of(built.parity, built.sha256)
            work.run.note(f"median error {evaluation.median_error_km:.1f} km")
        published.append(
            _publish_one(
                work.run,
                shared,
                built.variant,
                (built.path, built.sha256),
                built.parity,
                evaluation,
            )
        )
    return published


def _report(work: Work, published: list[PublishedModel]) -> PublishResult:
    """The report of this (model name, version), written once and logged to the version's run."""
    assert work.validation is not None and work.parity is not None and work.heldout is not None
    run, name = work.run, work.options.name
    result = PublishResult(
        name=name,
        checkpoint_sha256=work.loaded.sha256,
        published=tuple(published),
        validation=work.validation,
        parity=work.parity,
        variants=work.variants,
        benchmark=work.timings,
        heldout=work.heldout,
        steps=(),
        report=None,
    )
    with run.step("report"):
        document = report_document(result, run.records)
        primary = result.primary.version
        # One report per (model name, version), never overwritten by a later publish.
        paths = write_report(document, work.out / "reports" / name / f"v{primary.version}")
        if not paths.created:
            run.note(
                f"{paths.html} (kept: written by the publish that made this version)", "reused"
            )
        else:
            if primary.run_id:
                log_run_files(
                    primary.run_id,
                    [paths.json, paths.html],
                    f"report/{name}/v{primary.version}",
                    settings=work.settings,
                )
            run.note(str(paths.html))
    result = replace(result, steps=tuple(run.records), report=paths)
    log.info(
        "publish.done",
        name=name,
        version=result.primary.version.version,
        sha256=result.primary.upload.sha256,
        uri=result.primary.upload.uri,
    )
    return result


@dataclass(frozen=True)
class _Shared:
    """What every variant's upload, registration and alias move share within one publish."""

    loaded: LoadedCheckpoint
    training_run: str | None
    timings: BenchmarkResult | None
    settings: Settings
    store: ObjectStore
    name: str
    alias: str | None
    create_bucket: bool
    upload_progress: BytesProgress | None
    force: bool
    reason: str | None
    # package versions and the git commit of the code that ran: looked up once per publish
    software_tags: dict[str, str]

    @classmethod
    def of(cls, work: Work, store: ObjectStore, upload_progress: BytesProgress | None) -> _Shared:
        options = work.options
        return cls(
            loaded=work.loaded,
            training_run=work.training_run,
            timings=work.timings,
            settings=work.settings,
            store=store,
            name=options.name,
            alias=options.alias,
            create_bucket=options.create_bucket,
            upload_progress=upload_progress,
            force=options.force,
            reason=options.reason,
            software_tags=software(git_commit=work.settings.git_commit).tags(),
        )


def _publish_one(
    run: Run,
    shared: _Shared,
    variant: str,
    file: tuple[Path, str],
    parity: ParityResult | None,
    evaluation: HeldOut,
    stage: str | None = None,
    validation: ValidationResult | None = None,
) -> PublishedModel:
    """Upload (verified), describe and register one variant; move its alias behind the gates.

    ``file`` is the ONNX file and the sha256 its writer computed (not hashed again);
    ``validation`` is the file's validation when the caller has it (not read again).
    """
    path, sha256 = file
    label = "" if variant == FP32 else f"[{variant}]"
    uploaded = _upload_step(run, shared, variant, file, label)
    metadata = _metadata_step(run, shared, (variant, path), uploaded, parity, validation, label)
    # The registry's read-back copy of the bytes validated above is not validated again: the
    # upload's and the copy's read-backs showed both have the sha256 the export computed.
    validator = (
        validate_onnx_model
        if validation is None
        else Validated(sha256, validation, validate_onnx_model)
    )
    registration = _register_step(
        run, shared, variant, uploaded, metadata, evaluation, label, validator
    )
    target = _alias_for(shared.alias, variant)
    version, gates = _alias_step(
        run, shared, registration.version, (target, label), evaluation, stage
    )
    return PublishedModel(
        variant=variant,
        onnx_path=path,
        upload=uploaded,
        version=version,
        reused_version=not registration.created,
        alias=target,
        metadata=metadata,
        heldout=evaluation,
        gates=gates,
    )


def _metadata_step(
    run: Run,
    shared: _Shared,
    file: tuple[str, Path],
    uploaded: UploadResult,
    parity: ParityResult | None,
    validation: ValidationResult | None,
    label: str,
) -> dict[str, Any]:
    """What the registry records of this variant, from the checks already made."""
    variant, path = file
    with run.step(f"metadata{label}"):
        metadata = get_model_metadata(
            path,
            shared.loaded.model,
            shared.training_run,
            checkpoint_sha256=shared.loaded.sha256,
            parity=parity,
            timings=timing_summary(shared.timings, variant),
            validation=validation,
            # upload checked these files' stored bytes against their sha256: not read again
            sha256s={f.name: f.sha256 for f in uploaded.files},
        )
        metadata.update({"variant": variant, "s3_uri": uploaded.uri})
        run.note(f"sha256 {metadata['sha256']}")
    return metadata


def _alias_step(
    run: Run,
    shared: _Shared,
    version: RegisteredVersion,
    alias: tuple[str | None, str],
    evaluation: HeldOut,
    stage: str | None,
) -> tuple[RegisteredVersion, tuple[Gate, ...]]:
    """Move the alias (and the legacy stage) to ``version`` only behind the quality gates."""
    target, label = alias
    gates: tuple[Gate, ...] = ()
    with run.step(f"alias{label}"):
        if target is None:
            gates = _judge_without_alias(shared, evaluation, stage)
            run.note("no alias asked for", "skipped")
        else:
            change = move_alias_gated(
                shared.name,
                version.version,
                target,
                evaluate=partial(evaluate_heldout, settings=shared.settings),
                candidate=evaluation,
                settings=shared.settings,
                store=shared.store,
                force=shared.force,
                reason=shared.reason,
            )
            gates = change.gates
            version = replace(version, aliases=tuple(sorted({*version.aliases, target})))
            status = "reused" if change.action == "unchanged" else "ok"
            run.note(alias_note(change, shared.reason if shared.force else None), status)
        if stage is not None:  # the legacy stage moves behind the same gates
            version = set_stage(shared.name, version.version, stage, settings=shared.settings)
    return version, gates


def alias_note(change: AliasChange, forced: str | None) -> str:
    """The alias step's line: where the alias points, and which gates passed or were overruled."""
    failed = [g.name for g in change.gates if not g.passed]
    verdict = f"{', '.join(failed)} failed" if failed else "gates passed"
    why = f"{verdict}; forced: {forced}" if forced is not None else verdict
    return f"{change.line()} ({why})"


def _alias_for(alias: str | None, variant: str) -> str | None:
    if alias is None:
        return None
    return alias if variant == FP32 else f"{alias}-{variant}"


def _upload_step(
    run: Run, shared: _Shared, variant: str, file: tuple[Path, str], label: str
) -> UploadResult:
    with run.step(f"upload{label}"):
        uploaded = upload_model(
            file[0],
            shared.store,
            shared.settings.bucket,
            create_bucket=shared.create_bucket,
            progress=shared.upload_progress,
            metadata={"variant": variant},
            sha256=file[1],  # the stored bytes are still read back and checked against it
        )
        run.existing[f"uploaded{label}"] = uploaded.uri
        run.note(
            f"{uploaded.uri} (already stored, not sent again)" if uploaded.reused else uploaded.uri,
            "reused" if uploaded.reused else "ok",
        )
    return uploaded


def _register_step(
    run: Run,
    shared: _Shared,
    variant: str,
    uploaded: UploadResult,
    metadata: dict[str, Any],
    evaluation: HeldOut,
    label: str,
    validator: Callable[[Path], ValidationResult],
) -> Registration:
    """The version holding these bytes (found or made), with its held-out numbers recorded."""
    name = shared.name
    with run.step(f"register{label}"):
        registration = register_model(
            uploaded.uri,
            store=shared.store,
            validator=validator,
            sha256=uploaded.sha256,
            name=name,
            metadata=metadata,
            run_id=shared.training_run,
            tags={
                "variant": variant,
                **evaluation.tags(),
                **bench_tags(shared.timings, variant),
                **shared.software_tags,
            },
            settings=shared.settings,
        )
        version = registration.version
        if registration.created and version.run_id:
            log_run_metrics(version.run_id, evaluation.metrics(), settings=shared.settings)
        altered = (
            f" (version(s) {', '.join(registration.altered)} of these bytes no longer hold them)"
            if registration.altered
            else ""
        )
        if not registration.created:
            run.note(f"{name} version {version.version} already holds these bytes", "reused")
        else:
            run.note(f"{name} version {version.version}{altered}")
        run.existing[f"version{label}"] = f"{name} version {version.version}"
    return registration


def _judge_without_alias(
    shared: _Shared, evaluation: HeldOut, stage: str | None
) -> tuple[Gate, ...]:
    """With no alias to move, a requested stage still moves only behind the baseline gate."""
    gates = judge(evaluation, None, GatePolicy.from_settings(shared.settings))
    failed = [g for g in gates if not g.passed]
    if stage is not None and failed and not shared.force:
        raise GateError(
            f"did not pass the {failed[0].name} gate: {failed[0].detail}; the stage did not "
            "move. Override with --force --reason TEXT"
        )
    return gates


def _load(source: Path | str | LoadedCheckpoint | LocalizationNet) -> LoadedCheckpoint:
    if isinstance(source, LoadedCheckpoint):
        return source
    if isinstance(source, LocalizationNet):
        # An in-memory model's "checkpoint" is its weights, hashed as safetensors bytes.
        weights = {k: v.detach().contiguous() for k, v in source.state_dict().items()}
        digest = hashlib.sha256(safetensors.torch.save(weights)).hexdigest()
        return LoadedCheckpoint(source, source.config, Path("(in memory)"), digest, None)
    if isinstance(source, str | Path):
        return load_checkpoint(Path(source))
    raise InputError(
        f"publish needs a checkpoint path or a LocalizationNet, got {type(source).__name__}"
    )


def _output_dir(options: PublishOptions, settings: Settings, loaded: LoadedCheckpoint) -> Path:
    # By default one folder per checkpoint: a re-run rewrites the same (deterministic) files.
    return options.output_dir or settings.resolved_data_dir / "exports" / loaded.sha256[:16]


def _check_variants(variants: Sequence[str] | str) -> list[Variant]:
    """fp32 first, then the asked-for variants once each; ``"fp32,int8"`` is accepted too."""
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    chosen: list[Variant] = []
    for raw in names:
        name = raw.strip().lower()
        if not name or name == FP32:
            continue
        variant = next((v for v in VARIANTS if v == name), None)
        if variant is None:
            raise InputError(f"unknown variant {raw!r}; choose from {FP32}, {', '.join(VARIANTS)}")
        if variant not in chosen:
            chosen.append(variant)
    return chosen
