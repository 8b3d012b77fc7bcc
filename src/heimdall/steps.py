"""The publish steps on the local file: export, validate, verify, variants, benchmark, held-out.

Each step reads what earlier ones left in :class:`Work` and adds its own; :class:`Run` times and
records every step for the report and the progress display. ``heimdall.pipeline`` runs them,
then uploads, registers and aliases what they checked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
import torch

from heimdall.bench import DEFAULT_BATCH_SIZES as DEFAULT_BENCH_BATCH_SIZES
from heimdall.bench import BenchmarkResult, benchmark
from heimdall.checkpoint import LoadedCheckpoint
from heimdall.config import Settings, scrub_secrets
from heimdall.contract import FP32, StepRecord
from heimdall.errors import HeimdallError, InputError, PublishError, VerificationError
from heimdall.export import ExportResult, export_checkpoint_isolated, export_to_onnx
from heimdall.heldout import HeldOut, HeldOutSet, score
from heimdall.machine import is_busy
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.optimize import Variant, VariantResult, build_variant
from heimdall.registry import (
    check_registration,
)
from heimdall.registry.names import canonical_stage, check_override
from heimdall.storage import check_bucket
from heimdall.validate import ValidationResult, validate_onnx_model
from heimdall.verify import DEFAULT_BATCH_SIZES as DEFAULT_VERIFY_BATCH_SIZES
from heimdall.verify import ParityResult, Reference, record_torch_reference, verify_parity

log = structlog.get_logger(__name__)

BENCH_BATCH_SIZES = DEFAULT_BENCH_BATCH_SIZES
VERIFY_BATCH_SIZES = DEFAULT_VERIFY_BATCH_SIZES
# A checkpoint file with more weights than this is exported in a process of its own (the
# exporter's peak is ~3 more copies of the weights); below it, a process start costs more.
ISOLATED_EXPORT_BYTES = 256 * 2**20
# Linux's limits on a path and on one name in it (PATH_MAX, NAME_MAX), in bytes.
_PATH_MAX, _NAME_MAX = 4096, 255

# Called with (step, status, detail); status is "start", then "ok", "reused", "skipped" or
# "failed".
StepProgress = Callable[[str, str, str], None]
BytesProgress = Callable[[int, int], None]


class Run:
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
    def step(self, name: str) -> Iterator[Run]:
        self.status, self.detail = "ok", ""
        self._emit(name, "start", "")
        started = time.perf_counter()
        try:
            yield self
        except Exception as exc:  # every failure names its step and what already exists
            seconds = round(time.perf_counter() - started, 3)
            text = str(exc) if isinstance(exc, HeimdallError) else f"{type(exc).__name__}: {exc}"
            reason = scrub_secrets(text, self.secrets)  # what a third-party message quoted
            self.records.append(StepRecord(name, "failed", seconds, reason))
            self._emit(name, "failed", reason)
            log.info("publish.step_failed", step=name, error=type(exc).__name__, reason=reason)
            raise PublishError(
                name, reason, dict(self.existing), [r.to_dict() for r in self.records]
            ) from exc
        seconds = round(time.perf_counter() - started, 3)
        return_freed_memory()
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


def return_freed_memory() -> None:
    """Hand the memory a step freed back to the system before the next step starts.

    glibc keeps freed heap memory for reuse: after ConvNeXt-Large's validation or verify about
    0.55 GB of freed parse and session buffers stayed resident, and raised every later peak.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class PublishOptions:
    """What one publish is asked to do; every argument is checked before the first byte."""

    name: str
    alias: str | None
    stage: str | None
    variants: tuple[Variant, ...]
    calibration: int
    output_dir: Path | None
    create_bucket: bool
    run_id: str | None
    bench: bool
    bench_budget_s: float
    verify_batch_sizes: tuple[int, ...]
    force: bool
    reason: str | None

    def check(self, settings: Settings) -> None:
        check_registration(self.name, self.alias, self.stage)
        if settings.sync_stages and self.stage:
            # Stages follow the staging/production aliases: any other would disagree with them.
            implied = "Staging" if self.alias == "staging" else None
            if canonical_stage(self.stage) != implied:
                raise InputError(
                    f"--stage {self.stage} with alias {self.alias!r}: MLflow stages follow the "
                    "staging and production aliases (Staging is set with --alias staging); "
                    "leave --stage out, or set HEIMDALL_SYNC_STAGES=false to set stages by hand"
                )
        check_bucket(settings.bucket)
        check_override(self.force, self.reason)
        for variant in self.variants:
            if self.alias is not None:
                check_registration(self.name, f"{self.alias}-{variant}")
        if not 0 < self.bench_budget_s < math.inf:
            raise InputError(f"bench_budget_s must be positive, got {self.bench_budget_s}")
        if not self.verify_batch_sizes or min(self.verify_batch_sizes) < 1:
            raise InputError(
                f"verify batch sizes must be positive, got {list(self.verify_batch_sizes)}"
            )
        if self.calibration < 1:
            raise InputError(f"calibration must be at least 1 sample, got {self.calibration}")
        # The default folder, one per checkpoint, is named by 16 hex digits of its sha256.
        check_report_path(
            self.output_dir or settings.resolved_data_dir / "exports" / ("0" * 16), self.name
        )


def check_report_path(out: Path, name: str) -> None:
    """Refuse now an output folder under which the report path would be too long.

    The report is written last, after the upload and the registration: a path the file system
    refuses then ('File name too long') would fail every re-run after the bytes are stored.
    """
    deepest = out.absolute() / "reports" / name / f"v{'9' * 10}" / "report.html"
    encoded = os.fsencode(deepest)
    if len(encoded) >= _PATH_MAX or max(map(len, encoded.split(b"/"))) > _NAME_MAX:
        raise InputError(
            f"the report would go to a path of {len(encoded)} bytes under {out}, longer than "
            f"the file system takes ({_PATH_MAX - 1} bytes, {_NAME_MAX} a name); choose a "
            "shorter --output-dir or --name"
        )


@dataclass
class Work:
    """One publish as it goes: each step reads what earlier steps left here and adds its own."""

    options: PublishOptions
    settings: Settings
    run: Run
    source: object  # what the caller passed: a file may be exported by a process of its own
    loaded: LoadedCheckpoint
    out: Path
    recorded: Reference | None = None
    exported: ExportResult | None = None
    validation: ValidationResult | None = None
    parity: ParityResult | None = None
    variants: tuple[VariantResult, ...] = ()
    timings: BenchmarkResult | None = None
    heldout: HeldOut | None = None

    @property
    def training_run(self) -> str | None:
        return self.options.run_id or self.loaded.training_run_id


def export_step(work: Work) -> None:
    """The checkpoint as ONNX; a large model's export runs in a process of its own."""
    run, loaded, options = work.run, work.loaded, work.options
    with run.step("export"):
        if exports_apart(work.source, loaded.model):
            if not options.bench and not options.variants:  # verify is the model's last use
                work.recorded = record_torch_reference(loaded.model, options.verify_batch_sizes)
                work.loaded = replace(loaded, model=weightless(loaded.config))  # weights freed
                return_freed_memory()  # before the export process needs the memory
            exported = export_checkpoint_isolated(
                loaded.path,
                work.out / "model.onnx",
                checkpoint_sha256=loaded.sha256,
                training_run_id=work.training_run,
            )
        else:
            exported = export_to_onnx(
                loaded.model,
                work.out / "model.onnx",
                checkpoint_sha256=loaded.sha256,
                training_run_id=work.training_run,
            )
        work.exported = exported
        run.existing["onnx_file"] = str(exported.path)
        run.note(
            f"{exported.path} ({exported.size_bytes / 2**20:.1f} MiB, opset "
            f"{exported.opset_version})"
            + ("; PyTorch's outputs for verify recorded first" if work.recorded else "")
        )


def validate_step(work: Work) -> None:
    assert work.exported is not None
    with work.run.step("validate"):
        validation = work.validation = validate_onnx_model(work.exported.path)
        work.run.note(
            f"IR {validation.ir_version}, opset {validation.opset_version}, batch axis symbolic"
        )


def verify_step(work: Work) -> None:
    assert work.exported is not None
    with work.run.step("verify"):
        parity = work.parity = verify_parity(
            work.exported.path,
            work.recorded or work.loaded.model,
            work.options.verify_batch_sizes,
            checkpoint_sha256=work.loaded.sha256,
            # On cores other processes keep busy, spinning PyTorch threads cost 4× the CPU for
            # the same numbers: one thread then.
            intra_op_threads=1 if is_busy() else 0,
        )
        worst = max(d.max_abs for d in parity.diffs)
        task = parity.task
        work.run.note(
            f"max abs {worst:.1e}"
            + (f", held-out mean distance {task.mean_distance_m:.2g} m" if task else "")
        )


def variants_step(work: Work) -> None:
    assert work.exported is not None
    with work.run.step("variants"):
        work.variants = tuple(
            build_variant(
                variant,
                work.exported.path,
                work.out / f"model.{variant}.onnx",
                work.loaded.model,
                calibration=work.options.calibration,
            )
            for variant in work.options.variants
        )
        if not work.variants:
            work.run.note("fp32 only", "skipped")
        else:
            work.run.note("; ".join(f"{v.variant}: {v.reason}" for v in work.variants))


def bench_step(work: Work) -> None:
    assert work.exported is not None
    with work.run.step("benchmark"):
        if not work.options.bench:
            work.run.note("not asked for", "skipped")
            return
        passing = {v.variant: v.path for v in work.variants if v.passed}
        timings = work.timings = benchmark(
            work.loaded.model,
            {FP32: work.exported.path, **passing},
            batch_sizes=BENCH_BATCH_SIZES,
            budget_s=work.options.bench_budget_s,
            peak=False,
        )
        speedup = timings.timing(FP32, 1).speedup_vs_pytorch
        busy = " (machine busy: not a reliable figure)" if is_busy(timings.environment) else ""
        work.run.note(f"batch 1: ONNX Runtime {speedup:.2f}× PyTorch eager{busy}")


def heldout_step(work: Work) -> None:
    """fp32's held-out score, from the predictions verify's task check made (not run again)."""
    assert work.exported is not None and work.parity is not None
    with work.run.step("heldout"):
        heldout = work.heldout = heldout_of(work.parity, work.exported.sha256)
        work.run.note(f"median error {heldout.median_error_km:.1f} km on {heldout.samples} samples")


def heldout_of(parity: ParityResult, sha256: str) -> HeldOut:
    """The held-out score of the file ``parity`` checked, from its task check's predictions.

    The task check ran ONNX Runtime on the held-out seed's first samples, at least as many as
    the set holds (variants: more; a shorter ``data.generate`` draw is a prefix of a longer one),
    so the set's predictions are its first rows: scored as ``inference.evaluate_heldout`` scores
    a served model's, with the same numbers (``tests/unit/test_pipeline.py`` compares them).
    """
    heldout, task = HeldOutSet(), parity.task
    positions, labels = parity.task_positions, parity.task_labels
    ran = task is not None and task.seed == heldout.seed and task.samples >= heldout.size
    if not ran or positions is None or labels is None:
        raise VerificationError(
            f"{parity.onnx_path}: its parity check ran no task check on the first "
            f"{heldout.size} samples of seed {heldout.seed}, so there is no held-out score"
        )
    first = slice(heldout.size)
    return score(positions[first], labels[first], heldout, version=None, sha256=sha256)


def exports_apart(source: object, model: LocalizationNet) -> bool:
    """Whether to export in a process of its own: a large model that a file holds."""
    if not isinstance(source, str | Path):
        return False
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) >= (
        ISOLATED_EXPORT_BYTES
    )


def weightless(config: ModelConfig) -> LocalizationNet:
    """The model's structure without weights: config and parameter counts for the metadata."""
    with torch.device("meta"):
        return LocalizationNet(config)
