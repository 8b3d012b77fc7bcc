"""Parity between PyTorch and ONNX Runtime: per-output numbers and a task-level check, gated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from heimdall.data import generate, haversine_km
from heimdall.errors import InputError, VerificationError
from heimdall.model import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES, LocalizationNet
from heimdall.validate import check_external_data

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 3, 8, 64)
# Held-out set: train.py draws seed (default 0) and seed + 1_000_003; this is neither.
HELDOUT_SEED = 917_401
HELDOUT_SAMPLES = 256
INPUT_KINDS = ("synthetic", "normal", "zeros", "large")
LARGE_SCALE = 1e3
# Relative diffs are taken against |PyTorch| floored here, so exact zeros do not divide by 0.
REL_FLOOR = 1e-6
_CHUNK = 64
_ORT_ERRORS = (
    RuntimeError,
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


@dataclass(frozen=True)
class Gates:
    """Pass/fail thresholds; defaults are fp32's, ``None`` means reported but not gated.

    A quantized variant loosens them, e.g. int8:
    ``Gates(mae=..., max_abs=..., mean_distance_m=None, median_error_increase_rel=0.02)``.
    """

    mae: float | None = 1e-5
    max_abs: float | None = 1e-4
    max_rel: float | None = None
    mean_distance_m: float | None = 1.0
    median_error_increase_rel: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OutputDiff:
    """ONNX vs PyTorch for one output at one batch size, over every input kind."""

    output: str
    batch_size: int
    max_abs: float
    max_rel: float
    mae: float
    worst_input: str
    finite: bool

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

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParityResult:
    """Every number measured, the gates applied, and what failed."""

    onnx_path: Path
    gates: Gates
    diffs: tuple[OutputDiff, ...]
    task: TaskCheck | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, object]:
        return {
            "onnx_path": str(self.onnx_path),
            "passed": self.passed,
            "gates": self.gates.to_dict(),
            "diffs": [d.to_dict() for d in self.diffs],
            "task": self.task.to_dict() if self.task else None,
            "failures": list(self.failures),
        }


def verify_parity(
    onnx_path: Path | str,
    model: LocalizationNet,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    gates: Gates | None = None,
    task_samples: int = HELDOUT_SAMPLES,
    task_seed: int = HELDOUT_SEED,
    input_seed: int = 0,
    intra_op_threads: int = 0,
    raise_on_failure: bool = True,
) -> ParityResult:
    """Run the same inputs through ``model`` and ONNX Runtime (CPU) and gate the differences.

    Raises VerificationError listing every failed gate with its numbers, unless
    ``raise_on_failure`` is False; ``task_samples=0`` skips the task-level check.
    """
    path = Path(onnx_path)
    gates = gates or Gates()
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError(f"batch sizes must be positive, got {list(batch_sizes)}")
    check_external_data(path)
    session = _session(path, intra_op_threads)
    with _eval(model):
        ort_run = _ort_runner(session, path)
        pool = _inputs(max(batch_sizes), input_seed)
        diffs = tuple(
            diff
            for batch in batch_sizes
            for diff in _compare(model, ort_run, {k: x[:batch] for k, x in pool.items()}, batch)
        )
        task = _task_check(model, ort_run, task_samples, task_seed) if task_samples else None
    result = ParityResult(
        onnx_path=path, gates=gates, diffs=diffs, task=task, failures=_failures(diffs, task, gates)
    )
    log.info("onnx_parity", path=str(path), passed=result.passed, failures=len(result.failures))
    if raise_on_failure and not result.passed:
        raise VerificationError(
            f"{path}: ONNX Runtime disagrees with PyTorch: " + "; ".join(result.failures)
        )
    return result


@contextmanager
def _eval(model: LocalizationNet) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        raise VerificationError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise VerificationError(
            f"{path}: IO is {inputs} → {outputs}, expected [{INPUT_NAME!r}] → {list(OUTPUT_NAMES)}"
        )
    return session


OrtRun = Callable[[np.ndarray], list[np.ndarray]]


def _ort_runner(session: ort.InferenceSession, path: Path) -> OrtRun:
    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            return list(session.run(list(OUTPUT_NAMES), {INPUT_NAME: x}))
        except _ORT_ERRORS as exc:
            raise VerificationError(
                f"{path}: ONNX Runtime failed on a batch of shape {x.shape}: {exc}"
            ) from exc

    return run


def _torch_run(model: LocalizationNet, x: np.ndarray) -> list[np.ndarray]:
    return [t.numpy() for t in model(torch.from_numpy(x))]


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
    model: LocalizationNet, ort_run: OrtRun, inputs: dict[str, np.ndarray], batch: int
) -> list[OutputDiff]:
    outs = {kind: (_torch_run(model, x), ort_run(x)) for kind, x in inputs.items()}
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


def _task_check(model: LocalizationNet, ort_run: OrtRun, samples: int, seed: int) -> TaskCheck:
    x, labels = generate(samples, seed=seed)
    chunks = range(0, samples, _CHUNK)
    torch_pos = np.concatenate([_torch_run(model, x[i : i + _CHUNK])[0] for i in chunks])
    onnx_pos = np.concatenate([ort_run(x[i : i + _CHUNK])[0] for i in chunks])
    distance_m = haversine_km(torch_pos.astype(np.float64), onnx_pos.astype(np.float64)) * 1e3
    err_torch = float(np.median(haversine_km(torch_pos.astype(np.float64), labels)))
    err_onnx = float(np.median(haversine_km(onnx_pos.astype(np.float64), labels)))
    change = err_onnx - err_torch
    return TaskCheck(
        samples=samples,
        seed=seed,
        mean_distance_m=float(distance_m.mean()),
        max_distance_m=float(distance_m.max()),
        median_error_km_torch=err_torch,
        median_error_km_onnx=err_onnx,
        median_error_change_km=change,
        median_error_change_rel=change / err_torch if err_torch > 0 else float(change != 0),
        finite=bool(np.isfinite(torch_pos).all() and np.isfinite(onnx_pos).all()),
    )


def _failures(
    diffs: tuple[OutputDiff, ...], task: TaskCheck | None, gates: Gates
) -> tuple[str, ...]:
    failures = []
    for d in diffs:
        where = f"{d.output} @ batch {d.batch_size}"
        if not d.finite:
            failures.append(f"{where}: NaN or Inf in the outputs")
            continue
        for label, value, gate in (
            ("MAE", d.mae, gates.mae),
            ("max abs diff", d.max_abs, gates.max_abs),
            ("max rel diff", d.max_rel, gates.max_rel),
        ):
            if gate is not None and not value <= gate:
                failures.append(
                    f"{where}: {label} {value:.3g} > {gate:.3g} (worst on {d.worst_input} inputs)"
                )
    if task is not None:
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
    return tuple(failures)
