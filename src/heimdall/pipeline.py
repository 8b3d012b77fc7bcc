"""One-command publish: checkpoint → verified ONNX → object store → MLflow registry, with a report.

Steps, each timed and named in any failure: load → export → validate → verify → variants →
benchmark → heldout → upload → metadata → register → alias → report. Nothing is uploaded before
parity passes, and a registry version is only created for bytes that storage read back and
checked. Every step is safe to repeat: the export is deterministic, storage finds bytes it
already holds by sha256, and the registry is searched by sha256 before a version is created, so
re-running after any failure finishes the job without a second upload or a duplicate version.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import structlog
import torch

from heimdall.bench import BenchmarkResult, benchmark
from heimdall.checkpoint import LoadedCheckpoint, load_checkpoint
from heimdall.config import Settings, load_settings, redact_uri
from heimdall.errors import GateError, HeimdallError, InputError, PublishError
from heimdall.export import export_checkpoint_isolated, export_to_onnx
from heimdall.gates import GatePolicy, check_override, judge, move_alias_gated
from heimdall.heldout import HeldOut
from heimdall.inference import evaluate_heldout
from heimdall.machine import is_busy, load_average, physical_cores, software
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.optimize import DEFAULT_CALIBRATION, VARIANTS, Variant, VariantResult, build_variant
from heimdall.registry import (
    DEFAULT_ALIAS,
    Gate,
    Registration,
    Validated,
    check_registration,
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
    StepRecord,
    bench_tags,
    report_document,
    timing_summary,
)
from heimdall.storage import ObjectStore, UploadResult, check_bucket, open_store, upload_model
from heimdall.validate import ValidationResult, get_model_metadata, validate_onnx_model
from heimdall.verify import ParityResult, Reference, record_torch_reference, verify_parity

log = structlog.get_logger(__name__)

BENCH_BATCH_SIZES = (1, 8, 32)
VERIFY_BATCH_SIZES = (1, 2, 3, 8, 64)
# A checkpoint file with more weights than this is exported in a process of its own (the
# exporter's peak is ~3 more copies of the weights); below it, a process start costs more.
ISOLATED_EXPORT_BYTES = 256 * 2**20
# Held-out samples per ONNX Runtime call: ConvNeXt-Large's activations cost ~6.4 MiB a sample
# (256 at once: +1.6 GB beyond its session; 32: +0.2 GB); the predictions are the same.
HELDOUT_CHUNK = 32

# Called with (step, status, detail); status is "start", then "ok", "reused", "skipped" or
# "failed".
StepProgress = Callable[[str, str, str], None]
BytesProgress = Callable[[int, int], None]


class _Run:
    """Times steps, reports progress, and turns a failing step into a PublishError."""

    def __init__(self, progress: StepProgress | None, secrets: Sequence[str] = ()) -> None:
        self.progress = progress
        self.secrets = [s for s in secrets if s]
        self.records: list[StepRecord] = []
        self.existing: dict[str, str] = {}  # what a failure leaves behind, for the message
        self.status = "ok"
        self.detail = ""

    def _emit(self, name: str, status: str, detail: str) -> None:
        if self.progress is not None:
            self.progress(name, status, detail)

    @contextmanager
    def step(self, name: str) -> Iterator[_Run]:
        self.status, self.detail = "ok", ""
        self._emit(name, "start", "")
        started = time.perf_counter()
        try:
            yield self
        except Exception as exc:  # every failure names its step and what already exists
            seconds = round(time.perf_counter() - started, 3)
            text = str(exc) if isinstance(exc, HeimdallError) else f"{type(exc).__name__}: {exc}"
            reason = redact_uri(text)
            for secret in self.secrets:  # whatever a third-party message may have quoted
                reason = reason.replace(secret, "***")
            self.records.append(StepRecord(name, "failed", seconds, reason))
            self._emit(name, "failed", reason)
            log.info("publish.step_failed", step=name, error=type(exc).__name__, reason=reason)
            raise PublishError(
                name, reason, dict(self.existing), [r.to_dict() for r in self.records]
            ) from exc
        seconds = round(time.perf_counter() - started, 3)
        _return_freed_memory()
        self.records.append(StepRecord(name, self.status, seconds, self.detail))
        self._emit(name, self.status, self.detail)
        log.info("publish.step", step=name, status=self.status, seconds=seconds)

    def note(self, detail: str, status: str = "ok") -> None:
        self.detail, self.status = detail, status


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hand the memory a step freed back to the system before the next step starts.

    glibc keeps freed heap memory for reuse: after ConvNeXt-Large's validation or verify about
    0.55 GB of freed parse and session buffers stayed resident, and raised every later peak.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    name = name or settings.model_name
    wanted = _check_variants(variants)
    check_registration(name, alias, stage)
    check_bucket(settings.bucket)
    check_override(force, reason)
    for variant in wanted:
        if alias is not None:
            check_registration(name, f"{alias}-{variant}")
    if bench_budget_s <= 0:
        raise InputError(f"bench_budget_s must be positive, got {bench_budget_s}")
    if not verify_batch_sizes or min(verify_batch_sizes) < 1:
        raise InputError(f"verify batch sizes must be positive, got {list(verify_batch_sizes)}")
    if calibration < 1:
        raise InputError(f"calibration must be at least 1 sample, got {calibration}")
    run = _Run(progress, settings.secret_values())

    with run.step("load"):
        loaded = _load(source)
        run.note(f"{loaded.config.backbone} backbone, checkpoint sha256 {loaded.sha256}")
    training_run = run_id or loaded.training_run_id
    out = Path(output_dir) if output_dir else _default_output_dir(settings, loaded)

    recorded: Reference | None = None
    with run.step("export"):
        if _exports_apart(source, loaded.model):
            if not bench and not wanted:  # verify is the model's last use: keep its outputs
                recorded = record_torch_reference(loaded.model, verify_batch_sizes)
                loaded = replace(loaded, model=_weightless(loaded.config))  # weights freed
                _return_freed_memory()  # before the export process needs the memory
            exported = export_checkpoint_isolated(
                loaded.path,
                out / "model.onnx",
                checkpoint_sha256=loaded.sha256,
                training_run_id=training_run,
            )
        else:
            exported = export_to_onnx(
                loaded.model,
                out / "model.onnx",
                checkpoint_sha256=loaded.sha256,
                training_run_id=training_run,
            )
        run.existing["onnx_file"] = str(exported.path)
        run.note(
            f"{exported.path} ({exported.size_bytes / 2**20:.1f} MiB, opset "
            f"{exported.opset_version})"
            + ("; PyTorch's outputs for verify recorded first" if recorded else "")
        )
    with run.step("validate"):
        validation = validate_onnx_model(exported.path)
        run.note(
            f"IR {validation.ir_version}, opset {validation.opset_version}, batch axis symbolic"
        )
    with run.step("verify"):
        model = loaded.model
        parity = verify_parity(
            exported.path,
            recorded or model,
            verify_batch_sizes,
            checkpoint_sha256=loaded.sha256,
            # On cores other processes keep busy, spinning PyTorch threads cost 4× the CPU for
            # the same numbers: one thread then.
            intra_op_threads=1 if load_average()[0] > physical_cores() / 2 else 0,
        )
        worst = max(d.max_abs for d in parity.diffs)
        task = parity.task
        run.note(
            f"max abs {worst:.1e}"
            + (f", held-out mean distance {task.mean_distance_m:.2g} m" if task else "")
        )

    variant_results: list[VariantResult] = []
    with run.step("variants"):
        for variant in wanted:
            built = build_variant(
                variant,
                exported.path,
                out / f"model.{variant}.onnx",
                model,
                calibration=calibration,
            )
            variant_results.append(built)
        passing = [v for v in variant_results if v.passed]
        if not variant_results:
            run.note("fp32 only", "skipped")
        else:
            run.note("; ".join(f"{v.variant}: {v.reason}" for v in variant_results))

    timings: BenchmarkResult | None = None
    with run.step("benchmark"):
        if bench:
            files = {FP32: exported.path, **{v.variant: v.path for v in passing}}
            timings = benchmark(
                model, files, batch_sizes=BENCH_BATCH_SIZES, budget_s=bench_budget_s, peak=False
            )
            speedup = timings.timing(FP32, 1).speedup_vs_pytorch
            busy = " (machine busy: not a reliable figure)" if is_busy(timings.environment) else ""
            run.note(f"batch 1: ONNX Runtime {speedup:.2f}× PyTorch eager{busy}")
        else:
            run.note("not asked for", "skipped")

    with run.step("heldout"):
        heldout = evaluate_heldout(exported.path, settings=settings, chunk=HELDOUT_CHUNK)
        run.note(f"median error {heldout.median_error_km:.1f} km on {heldout.samples} samples")

    shared = _Shared(
        model=model,
        loaded=loaded,
        training_run=training_run,
        timings=timings,
        settings=settings,
        store=store or open_store(settings),
        name=name,
        alias=alias,
        create_bucket=(not settings.uses_s3) if create_bucket is None else create_bucket,
        upload_progress=upload_progress,
        force=force,
        reason=reason,
    )
    published = [
        _publish_one(
            run,
            shared,
            FP32,
            (exported.path, exported.sha256),
            parity,
            heldout,
            stage=stage,
            validation=validation,
        )
    ]
    for built in passing:
        with run.step(f"heldout[{built.variant}]"):
            evaluation = evaluate_heldout(built.path, settings=settings, chunk=HELDOUT_CHUNK)
            run.note(f"median error {evaluation.median_error_km:.1f} km")
        published.append(
            _publish_one(
                run, shared, built.variant, (built.path, built.sha256), built.parity, evaluation
            )
        )

    partial = PublishResult(
        name=name,
        checkpoint_sha256=loaded.sha256,
        published=tuple(published),
        validation=validation,
        parity=parity,
        variants=tuple(variant_results),
        benchmark=timings,
        heldout=heldout,
        steps=(),
        report=None,
    )
    with run.step("report"):
        document = report_document(partial, run.records)
        primary = partial.primary.version
        # One report per (model name, version), never overwritten by a later publish.
        paths = write_report(document, out / "reports" / name / f"v{primary.version}")
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
                    settings=settings,
                )
            run.note(str(paths.html))
    result = replace(partial, steps=tuple(run.records), report=paths)
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

    model: LocalizationNet
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


def _publish_one(
    run: _Run,
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
    with run.step(f"metadata{label}"):
        metadata = get_model_metadata(
            path,
            shared.model,
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
    version = registration.version
    target = _alias_for(shared.alias, variant)
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
            run.note(
                f"{shared.name}@{target} → version {change.version} (gates passed"
                + (f"; forced: {shared.reason})" if shared.force else ")"),
                "reused" if change.action == "unchanged" else "ok",
            )
        if stage is not None:  # the legacy stage moves behind the same gates
            version = set_stage(shared.name, version.version, stage, settings=shared.settings)
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


def _alias_for(alias: str | None, variant: str) -> str | None:
    if alias is None:
        return None
    return alias if variant == FP32 else f"{alias}-{variant}"


def _upload_step(
    run: _Run, shared: _Shared, variant: str, file: tuple[Path, str], label: str
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
    run: _Run,
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
                # package versions and the git commit of the code that ran, when there is one
                **software(git_commit=shared.settings.git_commit).tags(),
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


def _exports_apart(source: object, model: LocalizationNet) -> bool:
    """Whether to export in a process of its own: a large model that a file holds."""
    if not isinstance(source, str | Path):
        return False
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) >= (
        ISOLATED_EXPORT_BYTES
    )


def _weightless(config: ModelConfig) -> LocalizationNet:
    """The model's structure without weights: config and parameter counts for the metadata."""
    with torch.device("meta"):
        return LocalizationNet(config)


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


def _default_output_dir(settings: Settings, loaded: LoadedCheckpoint) -> Path:
    # One folder per checkpoint: a re-run rewrites the same (deterministic) files.
    return settings.resolved_data_dir / "exports" / loaded.sha256[:16]


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
