"""Parity between a reference model and ONNX Runtime: per-output numbers and a task check, gated.

Torch-free: the reference comes in as a function on numpy arrays (``model.torch_reference``
wraps the PyTorch model), so verify and optimize share the gates, the result types and the
comparison. The elementwise gates apply where the model's numbers live, in normalized region
units: positions before the region de-normalisation (the input of the graph's final
``× coord_scale + coord_center``, exposed as an extra output for the comparison) and
uncertainties. In degrees around 45° float32's own step is ~4e-6, which hid small export bugs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import structlog

from heimdall.contract import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES, Progress, counter
from heimdall.contract import Outputs as Outputs
from heimdall.contract import Reference as Reference
from heimdall.data import HELDOUT_SEED, generate, haversine_km
from heimdall.errors import InputError, VerificationError
from heimdall.heldout import HELDOUT_SAMPLES as HELDOUT_SAMPLES
from heimdall.onnxfile import METADATA_PREFIX, check_external_data, load_structure
from heimdall.parity_graph import NORMALIZED_OUTPUT, check_io, expose_normalized, weights_apart
from heimdall.runtime import ORT_ERRORS, open_session

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 3, 8, 64)
# Held-out set: train.py draws seed (default 0) and seed + 1_000_003; this is neither.
INPUT_KINDS = ("synthetic", "normal", "zeros", "large")
LARGE_SCALE = 1e3
# Relative diffs are taken against |reference| floored here, so exact zeros do not divide by 0.
REL_FLOOR = 1e-6
UNITS = "normalized region units"
LINEAGE_KEY = METADATA_PREFIX + "checkpoint_sha256"
_CHUNK = 64


class LineageWarning(UserWarning):
    """The ONNX file records no checkpoint sha256, so its lineage cannot be checked."""


@dataclass(frozen=True)
class Gates:
    """Pass/fail thresholds; defaults are fp32's, ``None`` means reported but not gated.

    ``mae``, ``max_abs`` and ``max_rel`` apply in normalized region units (see the module
    docstring; 4e-6 is 0.4 m at the default 1° scale). A trained model differs more than a
    random one: the demo model's clean export reached max abs 1.95e-6 and MAE 4.3e-7, so the
    fp32 defaults sit 2× above that, and still 1.4× below the weakest small export bug of
    tests/unit/test_verify_mutations.py (``benchmarks/verify_margins.py`` measures both).
    A quantized variant loosens them, e.g. int8:
    ``Gates(mae=..., max_abs=..., mean_distance_m=None, median_error_increase_rel=0.02)``.
    """

    mae: float | None = 1e-6
    max_abs: float | None = 4e-6
    max_rel: float | None = None
    mean_distance_m: float | None = 1.0
    median_error_increase_rel: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OutputDiff:
    """ONNX vs the reference for one output at one batch size, over every input kind."""

    output: str
    batch_size: int
    max_abs: float
    max_rel: float
    mae: float
    worst_input: str
    finite: bool
    passed: bool = True

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaskCheck:
    """Position agreement on a held-out synthetic set, in metres and kilometres."""

    samples: int
    seed: int
    mean_distance_m: float
    max_distance_m: float
    median_error_km_torch: float
    median_error_km_onnx: float
    median_error_change_km: float
    median_error_change_rel: float
    finite: bool
    passed: bool = True

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParityResult:
    """Every number measured, the gates applied, and what failed.

    ``lineage`` is ``matched`` (the file records the checkpoint's sha256), ``unrecorded``
    (it records none) or ``unchecked`` (no checkpoint sha256 was given).
    """

    onnx_path: Path
    gates: Gates
    diffs: tuple[OutputDiff, ...]
    task: TaskCheck | None
    failures: tuple[str, ...]
    lineage: str = "unchecked"
    # ONNX Runtime's positions on the task check's samples and their true positions, in order:
    # a held-out score of the file is computed from them, not run again (not serialized).
    task_positions: np.ndarray | None = field(default=None, repr=False, compare=False)
    task_labels: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, object]:
        return {
            "onnx_path": str(self.onnx_path),
            "passed": self.passed,
            "units": UNITS,
            "gates": self.gates.to_dict(),
            "diffs": [d.to_dict() for d in self.diffs],
            "task": self.task.to_dict() if self.task else None,
            "failures": list(self.failures),
            "lineage": self.lineage,
        }


def check_lineage(onnx_path: Path | str, checkpoint_sha256: str) -> str:
    """Compare the checkpoint sha256 recorded in ``onnx_path`` with ``checkpoint_sha256``.

    Returns ``matched``, or ``unrecorded`` (with a LineageWarning) when the file records none;
    raises VerificationError when it records another checkpoint.
    """
    path = Path(onnx_path)
    check_external_data(path)
    proto = onnx.load(str(path), load_external_data=False)
    return _lineage(proto, path, checkpoint_sha256, stacklevel=3)


def parity_steps(batch_sizes: Sequence[int], task_samples: int) -> int:
    """The units of work ``measure_parity`` reports to its progress callback."""
    return len(batch_sizes) * len(INPUT_KINDS) + math.ceil(task_samples / _CHUNK)


def record_reference(
    reference: Reference,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    task_samples: int = HELDOUT_SAMPLES,
    task_seed: int = HELDOUT_SEED,
    input_seed: int = 0,
) -> Reference:
    """``reference`` run now on every input ``measure_parity`` gives it with these arguments.

    The result answers from those outputs and refuses any other input, so the model behind
    ``reference`` can be freed before ONNX Runtime opens a large file beside it.
    """
    _check_batch_sizes(batch_sizes)
    pool = _inputs(max(batch_sizes), input_seed)
    inputs = [x[:batch] for batch in batch_sizes for x in pool.values()]
    if task_samples:
        x, _ = generate(task_samples, seed=task_seed)
        inputs += [x[i : i + _CHUNK] for i in range(0, task_samples, _CHUNK)]
    recorded = {_fingerprint(x): reference.run(x) for x in inputs}

    def run(x: np.ndarray) -> Outputs:
        found = recorded.get(_fingerprint(x))
        if found is None:
            raise InputError(
                f"no recorded reference output for this batch of shape {x.shape}; record with "
                "the batch sizes, samples and seeds the parity check is given"
            )
        return found

    return Reference(
        run=run, coord_center=reference.coord_center, coord_scale=reference.coord_scale
    )


def _fingerprint(x: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    return x.shape, x.dtype.str, hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _check_batch_sizes(batch_sizes: Sequence[int]) -> None:
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError(f"batch sizes must be positive, got {list(batch_sizes)}")


def measure_parity(
    onnx_path: Path | str,
    reference: Reference,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    gates: Gates | None = None,
    task_samples: int = HELDOUT_SAMPLES,
    task_seed: int = HELDOUT_SEED,
    input_seed: int = 0,
    intra_op_threads: int = 0,
    raise_on_failure: bool = True,
    checkpoint_sha256: str | None = None,
    progress: Progress | None = None,
) -> ParityResult:
    """Run the same inputs through ``reference`` and ONNX Runtime (CPU) and gate the differences.

    ``verify.verify_parity`` documents the arguments; ``progress(done, total)`` follows each
    input kind at each batch size and each chunk of the held-out set (``parity_steps``).
    """
    path = Path(onnx_path)
    gates = gates or Gates()
    _check_batch_sizes(batch_sizes)
    proto = load_structure(path)
    data_files = check_external_data(path, proto)
    # The warning points at the caller of verify.verify_parity, which wraps this function.
    lineage = (
        _lineage(proto, path, checkpoint_sha256, stacklevel=4) if checkpoint_sha256 else "unchecked"
    )
    check_io(proto, path)
    tail_failures = expose_normalized(proto, reference, path)
    with tempfile.TemporaryDirectory(prefix="heimdall-verify-") as tmp:
        model, folder = weights_apart(proto, path, bool(data_files), Path(tmp))
        del proto  # its weights are in files now: the session reads them there, not from here
        session = _session(model, folder, intra_op_threads, str(path))
    ort_run = _ort_runner(session, path)
    tick = counter(progress, parity_steps(batch_sizes, task_samples))
    diffs = _judged_diffs(reference, ort_run, batch_sizes, input_seed, gates, tick)
    task, positions, labels = _judged_task(reference, ort_run, task_samples, task_seed, gates, tick)
    failures = (
        *tail_failures,
        *(f for d in diffs for f in _diff_failures(d, gates)),
        *(_task_failures(task, gates) if task else ()),
    )
    result = ParityResult(
        onnx_path=path,
        gates=gates,
        diffs=diffs,
        task=task,
        failures=failures,
        lineage=lineage,
        task_positions=positions,
        task_labels=labels,
    )
    log.info("onnx_parity", path=str(path), passed=result.passed, failures=len(result.failures))
    if raise_on_failure and not result.passed:
        raise VerificationError(
            f"{path}: ONNX Runtime disagrees with PyTorch: " + "; ".join(result.failures)
        )
    return result


def _lineage(proto: onnx.ModelProto, path: Path, checkpoint_sha256: str, stacklevel: int) -> str:
    recorded = next((p.value for p in proto.metadata_props if p.key == LINEAGE_KEY), "")
    if not recorded:
        message = (
            f"{path} records no {LINEAGE_KEY}; cannot check that it was exported from the "
            f"checkpoint {checkpoint_sha256[:12]}"
        )
        log.warning("onnx_lineage_unrecorded", path=str(path), checkpoint=checkpoint_sha256)
        warnings.warn(message, LineageWarning, stacklevel=stacklevel)
        return "unrecorded"
    if recorded.lower() != checkpoint_sha256.lower():
        raise VerificationError(
            f"{path} was exported from checkpoint sha256 {recorded[:12]}…, not from the given "
            f"checkpoint {checkpoint_sha256[:12]}…; pass the checkpoint it was exported from, "
            "or export this checkpoint again"
        )
    return "matched"


def _session(model: bytes, folder: Path, threads: int, name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # The model travels as bytes: its external data files are found in ``folder``.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(folder)
    )
    return open_session(model, options, name=name)


OrtRun = Callable[[np.ndarray], list[np.ndarray]]


def _ort_runner(session: ort.InferenceSession, path: Path) -> OrtRun:
    """Positions in degrees, uncertainties, and positions in normalized units."""
    names = [*OUTPUT_NAMES, NORMALIZED_OUTPUT]

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            return list(session.run(names, {INPUT_NAME: x}))
        except ORT_ERRORS as exc:
            raise VerificationError(
                f"{path}: ONNX Runtime failed on a batch of shape {x.shape}: {exc}"
            ) from exc

    return run


def _inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
    """A batch of each input kind; the first rows of each serve the smaller batch sizes."""
    synthetic, _ = generate(batch, seed=seed)
    normal = np.random.default_rng(seed).standard_normal((batch, *INPUT_SHAPE), np.float32)
    return {
        "synthetic": synthetic,
        "normal": normal,
        "zeros": np.zeros_like(normal),
        "large": normal * np.float32(LARGE_SCALE),
    }


def _compare(
    reference: Reference,
    ort_run: OrtRun,
    inputs: dict[str, np.ndarray],
    batch: int,
    tick: Callable[[], None],
) -> list[OutputDiff]:
    outs = {}
    for kind, x in inputs.items():
        _, sigma, positions = reference.run(x)
        _, ort_sigma, ort_positions = ort_run(x)
        outs[kind] = ((positions, sigma), (ort_positions, ort_sigma))
        tick()
    diffs = []
    for i, name in enumerate(OUTPUT_NAMES):
        ref = {kind: pair[0][i].astype(np.float64) for kind, pair in outs.items()}
        got = {kind: pair[1][i].astype(np.float64) for kind, pair in outs.items()}
        abs_diff = {kind: np.abs(got[kind] - ref[kind]) for kind in outs}
        everything = np.concatenate([d.ravel() for d in abs_diff.values()])
        rel = np.concatenate(
            [(abs_diff[k] / np.maximum(np.abs(ref[k]), REL_FLOOR)).ravel() for k in outs]
        )
        finite = all(np.isfinite(a).all() for a in (*ref.values(), *got.values()))
        diffs.append(
            OutputDiff(
                output=name,
                batch_size=batch,
                max_abs=float(everything.max()),
                max_rel=float(rel.max()),
                mae=float(everything.mean()),
                worst_input=max(
                    abs_diff, key=lambda k: float(np.nan_to_num(abs_diff[k], nan=np.inf).max())
                ),
                finite=finite,
            )
        )
    return diffs


def _task_check(
    reference: Reference, ort_run: OrtRun, samples: int, seed: int, tick: Callable[[], None]
) -> tuple[TaskCheck, np.ndarray, np.ndarray]:
    """The task check, ONNX Runtime's positions and the true ones."""
    x, labels = generate(samples, seed=seed)
    reference_pos, onnx_pos = [], []
    for i in range(0, samples, _CHUNK):
        reference_pos.append(reference.run(x[i : i + _CHUNK])[0])
        onnx_pos.append(ort_run(x[i : i + _CHUNK])[0])
        tick()
    torch_pos = np.concatenate(reference_pos)
    ort_pos = np.concatenate(onnx_pos)
    distance_m = haversine_km(torch_pos.astype(np.float64), ort_pos.astype(np.float64)) * 1e3
    err_torch = float(np.median(haversine_km(torch_pos.astype(np.float64), labels)))
    err_onnx = float(np.median(haversine_km(ort_pos.astype(np.float64), labels)))
    change = err_onnx - err_torch
    check = TaskCheck(
        samples=samples,
        seed=seed,
        mean_distance_m=float(distance_m.mean()),
        max_distance_m=float(distance_m.max()),
        median_error_km_torch=err_torch,
        median_error_km_onnx=err_onnx,
        median_error_change_km=change,
        median_error_change_rel=change / err_torch if err_torch > 0 else float(change != 0),
        finite=bool(np.isfinite(torch_pos).all() and np.isfinite(ort_pos).all()),
    )
    return check, ort_pos, labels


def _judged_diffs(
    reference: Reference,
    ort_run: OrtRun,
    batch_sizes: Sequence[int],
    input_seed: int,
    gates: Gates,
    tick: Callable[[], None],
) -> tuple[OutputDiff, ...]:
    """Every output at every batch size over every input kind, each marked passed or not."""
    pool = _inputs(max(batch_sizes), input_seed)
    return tuple(
        dataclasses.replace(diff, passed=not _diff_failures(diff, gates))
        for batch in batch_sizes
        for diff in _compare(
            reference, ort_run, {k: x[:batch] for k, x in pool.items()}, batch, tick
        )
    )


def _judged_task(
    reference: Reference,
    ort_run: OrtRun,
    samples: int,
    seed: int,
    gates: Gates,
    tick: Callable[[], None],
) -> tuple[TaskCheck | None, np.ndarray | None, np.ndarray | None]:
    """The held-out task check marked passed or not, ONNX Runtime's positions and the true
    ones; Nones when ``samples`` is 0."""
    if not samples:
        return None, None, None
    task, positions, labels = _task_check(reference, ort_run, samples, seed, tick)
    return dataclasses.replace(task, passed=not _task_failures(task, gates)), positions, labels


def _diff_failures(d: OutputDiff, gates: Gates) -> list[str]:
    where = f"{d.output} @ batch {d.batch_size}"
    if not d.finite:
        return [f"{where}: NaN or Inf in the outputs"]
    return [
        f"{where}: {label} {value:.3g} > {gate:.3g} {UNITS} (worst on {d.worst_input} inputs)"
        for label, value, gate in (
            ("MAE", d.mae, gates.mae),
            ("max abs diff", d.max_abs, gates.max_abs),
            ("max rel diff", d.max_rel, gates.max_rel),
        )
        if gate is not None and not value <= gate
    ]


def _task_failures(task: TaskCheck, gates: Gates) -> list[str]:
    failures = []
    where = f"held-out set ({task.samples} samples, seed {task.seed})"
    if not task.finite:
        failures.append(f"{where}: NaN or Inf in the predicted positions")
    if gates.mean_distance_m is not None and not task.mean_distance_m <= gates.mean_distance_m:
        failures.append(
            f"{where}: mean distance between PyTorch and ONNX positions "
            f"{task.mean_distance_m:.3g} m > {gates.mean_distance_m:.3g} m"
        )
    limit = gates.median_error_increase_rel
    if limit is not None and not task.median_error_change_rel <= limit:
        failures.append(
            f"{where}: median localization error rose from {task.median_error_km_torch:.3f} km "
            f"to {task.median_error_km_onnx:.3f} km ({task.median_error_change_rel:+.2%} > "
            f"{limit:+.2%})"
        )
    return failures
