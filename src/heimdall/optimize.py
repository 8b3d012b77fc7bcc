"""Faster variants of an exported LocalizationNet: int8 and fp16 copies gated against PyTorch.

Variants are new ONNX files next to the fp32 export, float32 IO kept, each gated against the
PyTorch model by ``parity.measure_parity`` (what ``verify.verify_parity`` runs) before anyone
may publish it:

- ``int8``: static QDQ quantization (uint8 activations, int8 per-channel weights) calibrated
  on synthetic RF samples from ``heimdall.data.generate``.
- ``fp16``: weights and activations in float16, for GPUs; the ops that compute the outputs
  from the head's last Gemm stay float32 so degrees are not rounded to fp16's 0.03° step.

Each variant records the session settings it should run with (``heimdall.runtime``) in its
metadata, where serving and the registry read them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import structlog
from google.protobuf.message import DecodeError
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from heimdall.contract import INPUT_NAME, Progress, part
from heimdall.data import SAMPLE_BYTES, generate
from heimdall.errors import ExportError, InputError, ValidationError
from heimdall.files import sha256_file
from heimdall.machine import check_memory, memory_errors
from heimdall.model import BACKBONES, LocalizationNet, ModelConfig, torch_reference
from heimdall.optimize_graph import output_tail, quantizable_nodes, sort_topologically
from heimdall.parity import Gates, ParityResult, measure_parity, parity_steps
from heimdall.runtime import (
    RECOMMENDED_SESSION_SETTINGS,
    OptimizationLevel,
    SessionSettings,
    open_session,
)

log = structlog.get_logger(__name__)

Variant = Literal["int8", "fp16"]
VARIANTS: tuple[Variant, ...] = ("int8", "fp16")
METADATA_KEY_VARIANT = "heimdall.variant"
METADATA_KEY_SOURCE = "heimdall.variant_source_sha256"
METADATA_KEY_RECIPE = "heimdall.variant_recipe"
# Not train.py's seeds (seed, seed + 1_000_003) nor verify's held-out seed: calibration data
# must not be the data the gate judges the variant on.
CALIBRATION_SEED = 2_000_029
DEFAULT_CALIBRATION = 256
_CALIBRATION_BATCH = 16
_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
# The held-out set a variant is judged on. On 256 samples the median error of a trained atto
# moved +1.2 % for fp16 and +2.3 % for an int8 variant that moves it +0.1 % on 2048 samples:
# the median of a few hundred samples is too noisy for a 2 % gate (benchmarks/README.md).
VARIANT_TASK_SAMPLES = 2048
_VARIANT_BATCH_SIZES = (1, 8)
# Localization error may grow at most 2 % (issue 7); elementwise parity is reported, not gated.
VARIANT_GATES = Gates(
    mae=None, max_abs=None, max_rel=None, mean_distance_m=None, median_error_increase_rel=0.02
)


# The candidates --tune measures; each differs from the recommendation in one setting
# (parallel execution comes with the inter-op threads it needs).
SESSION_CANDIDATES: dict[str, SessionSettings] = {
    "recommended": RECOMMENDED_SESSION_SETTINGS,
    "extended": dataclasses.replace(
        RECOMMENDED_SESSION_SETTINGS, graph_optimization_level="extended"
    ),
    "basic": dataclasses.replace(RECOMMENDED_SESSION_SETTINGS, graph_optimization_level="basic"),
    "no-spinning": dataclasses.replace(RECOMMENDED_SESSION_SETTINGS, allow_spinning=False),
    "spin-between-runs": dataclasses.replace(
        RECOMMENDED_SESSION_SETTINGS, stop_spinning_after_run=False
    ),
    "no-mem-pattern": dataclasses.replace(RECOMMENDED_SESSION_SETTINGS, enable_mem_pattern=False),
    "no-arena": dataclasses.replace(RECOMMENDED_SESSION_SETTINGS, enable_cpu_mem_arena=False),
    "parallel": dataclasses.replace(
        RECOMMENDED_SESSION_SETTINGS, parallel_execution=True, inter_op_threads=2
    ),
    "denormal-as-zero": dataclasses.replace(RECOMMENDED_SESSION_SETTINGS, denormal_as_zero=True),
}


@dataclass(frozen=True)
class VariantResult:
    """A variant file and whether it passed its gates; a failed variant must not be published."""

    variant: str
    path: Path
    source: Path
    passed: bool
    reason: str
    sha256: str
    size_bytes: int
    seconds: float
    recipe: dict[str, object]
    parity: ParityResult | None

    def to_dict(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "path": str(self.path),
            "source": str(self.source),
            "passed": self.passed,
            "reason": self.reason,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "seconds": self.seconds,
            "recipe": self.recipe,
            "parity": self.parity.to_dict() if self.parity else None,
        }


class _RFCalibration(CalibrationDataReader):  # type: ignore[misc]
    """Synthetic RF feature batches for the calibrator, generated once and replayed.

    A request for the next batch means the calibrator is done with the previous one: that is
    when ``progress`` hears of it, once per batch even if the calibrator rewinds.
    """

    def __init__(self, samples: int, seed: int, progress: Progress | None = None) -> None:
        features, _ = generate(samples, seed=seed)
        self._batches = [
            features[i : i + _CALIBRATION_BATCH] for i in range(0, samples, _CALIBRATION_BATCH)
        ]
        self._iter: Iterator[tuple[int, np.ndarray]] = enumerate(self._batches)
        self._progress = progress
        self._reported = 0

    def get_next(self) -> dict[str, object] | None:
        index, batch = next(self._iter, (len(self._batches), None))
        if self._progress is not None and index > self._reported:
            self._reported = index
            self._progress(index, len(self._batches))
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._iter = enumerate(self._batches)


# The calibrator keeps every batch's activations until it computes the ranges: measured on
# atto (40 channels in its first stage) about 160 KiB a sample, besides the features.
_CALIBRATION_BYTES_PER_CHANNEL = 4 * 2**10


def check_calibration_memory(
    config: ModelConfig, calibration: int, *, available: int | None = None
) -> None:
    """Refuse now a calibration set whose features and activations would not fit in memory."""
    check_memory(
        f"--calibration {calibration}",
        calibration,
        SAMPLE_BYTES + _CALIBRATION_BYTES_PER_CHANNEL * BACKBONES[config.backbone][0][0],
        fix="use fewer calibration samples",
        available=available,
    )


def calibration_batches(calibration: int) -> int:
    """The units of work ``quantize_int8`` reports to its progress callback."""
    return math.ceil(calibration / _CALIBRATION_BATCH)


def quantize_int8(
    onnx_path: Path | str,
    output_path: Path | str,
    *,
    calibration: int = DEFAULT_CALIBRATION,
    seed: int = CALIBRATION_SEED,
    per_channel: bool = True,
    reduce_range: bool = False,
    scope: Literal["blocks", "all"] = "blocks",
    method: Literal["minmax", "percentile", "entropy"] = "minmax",
    progress: Progress | None = None,
) -> Path:
    """Write a static QDQ int8 copy of ``onnx_path`` calibrated on ``calibration`` RF samples.

    Activations are uint8 and weights int8, the combination ONNX Runtime's x86 kernels run
    fastest; ``reduce_range`` (7-bit weights) avoids the ``vpmaddubsw`` saturation of CPUs
    without VNNI at some accuracy cost. ``scope="blocks"`` quantizes the ConvNeXt blocks only
    (depthwise convs and the MLP MatMuls: almost all FLOPs and weights) and keeps the stem,
    downsampling convs and heads float32, which measurably protects accuracy (see
    benchmarks/README.md); ``"all"`` quantizes every Conv, MatMul and Gemm.
    ``progress(done, total)`` follows each calibration batch (``calibration_batches``).
    """
    source, output = _paths(onnx_path, output_path)
    _check_int8_options(calibration, scope, method)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staged = Path(tmp) / output.name
        quantized = _quantize(
            source,
            Path(tmp) / "prepared.onnx",
            staged,
            scope=scope,
            method=method,
            per_channel=per_channel,
            reduce_range=reduce_range,
            calibration=calibration,
            seed=seed,
            progress=progress,
        )
        recipe = {
            "format": "QDQ",
            "activations": "uint8",
            "weights": "int8",
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "scope": scope,
            "quantized_nodes": quantized,
            "calibration_samples": calibration,
            "calibration_seed": seed,
            "calibration_method": method,
        }
        _stamp(staged, source, "int8", recipe)
        staged.replace(output)
    log.info("int8_variant_written", source=str(source), path=str(output), **recipe)
    return output


def _check_int8_options(calibration: int, scope: str, method: str) -> None:
    """Refuse fewer than one calibration sample, or an unknown calibration method or scope."""
    if calibration < 1:
        raise InputError(f"calibration needs at least 1 sample, got {calibration}")
    if method not in _CALIBRATION_METHODS:
        raise InputError(
            f"unknown calibration method {method!r}; choose one of {list(_CALIBRATION_METHODS)}"
        )
    if scope not in ("blocks", "all"):
        raise InputError(f"unknown quantization scope {scope!r}; choose 'blocks' or 'all'")


def _quantize(
    source: Path,
    prepared: Path,
    staged: Path,
    *,
    scope: str,
    method: str,
    per_channel: bool,
    reduce_range: bool,
    calibration: int,
    seed: int,
    progress: Progress | None,
) -> int:
    """Write ``source`` shape-inferred to ``prepared``, then quantized to ``staged``.

    Returns the number of nodes quantized; ``quantize_int8`` documents the options.
    """
    try:
        quant_pre_process(str(source), str(prepared))
        nodes = quantizable_nodes(onnx.load(str(prepared)).graph, scope)
        quantize_static(
            str(prepared),
            str(staged),
            _RFCalibration(calibration, seed, progress),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted({op for op, _ in nodes}),
            nodes_to_quantize=[name for _, name in nodes],
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_CALIBRATION_METHODS[method],
        )
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"int8 quantization of {source} failed: {exc}") from exc
    return len(nodes)


def convert_fp16(
    onnx_path: Path | str, output_path: Path | str, *, progress: Progress | None = None
) -> Path:
    """Write a float16 copy of ``onnx_path`` with float32 inputs and outputs (for GPUs).

    The chain of elementwise ops between the last matrix op and each output stays float32.
    ``progress(1, 1)`` follows the conversion, one unit of work.
    """
    source, output = _paths(onnx_path, output_path)
    model = onnx.load(str(source))
    kept = output_tail(model.graph)
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, node_block_list=sorted(kept)
        )
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"fp16 conversion of {source} failed: {exc}") from exc
    sort_topologically(converted.graph)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staged = Path(tmp) / output.name
        onnx.save_model(converted, str(staged))
        recipe = {"keep_io_types": True, "float32_nodes": sorted(kept)}
        _stamp(staged, source, "fp16", recipe)
        staged.replace(output)
    log.info("fp16_variant_written", source=str(source), path=str(output), float32_nodes=len(kept))
    if progress is not None:
        progress(1, 1)
    return output


def save_optimized(
    onnx_path: Path | str, output_path: Path | str, *, level: OptimizationLevel = "basic"
) -> Path:
    """Save ONNX Runtime's graph optimizations of ``onnx_path`` at ``level`` to ``output_path``.

    ``basic`` keeps standard ONNX ops only, so the result passes the ONNX checker; ``extended``
    adds com.microsoft fused ops (ONNX Runtime only); ``all`` adds NCHWc layouts that are
    specific to this CPU. Loading a saved model skips those passes at session start only:
    kernels, hence latency, are the same (see benchmarks/README.md).
    """
    source, output = _paths(onnx_path, output_path)
    settings = SessionSettings(graph_optimization_level=level)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staged = Path(tmp) / output.name
        options = settings.to_session_options()
        options.optimized_model_filepath = str(staged)
        open_session(source, options)
        _stamp(staged, source, f"optimized-{level}", {"graph_optimization_level": level})
        staged.replace(output)
    log.info("optimized_model_written", source=str(source), path=str(output), level=level)
    return output


def verify_variant(
    variant_path: Path | str,
    model: LocalizationNet,
    *,
    variant: str,
    source: Path | str,
    gates: Gates = VARIANT_GATES,
    batch_sizes: Sequence[int] = _VARIANT_BATCH_SIZES,
    task_samples: int = VARIANT_TASK_SAMPLES,
    seconds: float = 0.0,
    intra_op_threads: int = 0,
    progress: Progress | None = None,
) -> VariantResult:
    """Gate ``variant_path`` against ``model`` (the fp32 PyTorch reference) on the held-out set.

    ``intra_op_threads`` (0: each library's default) applies to ONNX Runtime and PyTorch alike,
    as in ``verify.verify_parity``; ``progress(done, total)`` follows the parity check
    (``parity.parity_steps``).
    """
    path = Path(variant_path)
    with torch_reference(model, intra_op_threads) as reference:
        parity = measure_parity(
            path,
            reference,
            batch_sizes,
            gates=gates,
            task_samples=task_samples,
            intra_op_threads=intra_op_threads,
            raise_on_failure=False,
            progress=progress,
        )
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    result = VariantResult(
        variant=variant,
        path=path,
        source=Path(source),
        passed=parity.passed,
        reason="passed its gates" if parity.passed else "; ".join(parity.failures),
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        seconds=round(seconds, 3),
        recipe=json.loads(props.get(METADATA_KEY_RECIPE, "{}")),
        parity=parity,
    )
    log.info("variant_verified", variant=variant, path=str(path), passed=result.passed)
    return result


def build_variant(
    variant: Variant,
    onnx_path: Path | str,
    output_path: Path | str,
    model: LocalizationNet,
    *,
    calibration: int = DEFAULT_CALIBRATION,
    seed: int = CALIBRATION_SEED,
    gates: Gates = VARIANT_GATES,
    task_samples: int = VARIANT_TASK_SAMPLES,
    intra_op_threads: int = 0,
    progress: Progress | None = None,
) -> VariantResult:
    """Make the ``int8`` or ``fp16`` variant of ``onnx_path`` and gate it against ``model``.

    A variant that fails its gates comes back with ``passed=False`` and the reason; its file
    is kept for inspection, never to be published. ``intra_op_threads`` as in
    ``verify_variant``; ``progress(done, total)`` follows the
    calibration batches (int8) or the conversion (fp16), then the parity check.
    """
    started = time.perf_counter()
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    building = calibration_batches(calibration) if variant == "int8" else 1
    total = building + parity_steps(_VARIANT_BATCH_SIZES, task_samples)
    if variant == "int8":
        check_calibration_memory(model.config, calibration)
        with memory_errors("int8 calibration", "use fewer calibration samples"):
            path = quantize_int8(
                onnx_path,
                output_path,
                calibration=calibration,
                seed=seed,
                progress=part(progress, 0, total),
            )
    else:
        path = convert_fp16(onnx_path, output_path, progress=part(progress, 0, total))
    return verify_variant(
        path,
        model,
        variant=variant,
        source=onnx_path,
        gates=gates,
        task_samples=task_samples,
        seconds=time.perf_counter() - started,
        intra_op_threads=intra_op_threads,
        progress=part(progress, building, total),
    )


def _paths(onnx_path: Path | str, output_path: Path | str) -> tuple[Path, Path]:
    source, output = Path(onnx_path), Path(output_path)
    if not source.is_file():
        raise InputError(f"ONNX file not found: {source}")
    _check_onnx(source)
    if output.suffix != ".onnx":
        raise InputError(f"output path must end in .onnx, got {output.name}")
    if output.resolve() == source.resolve():
        raise InputError(f"output {output} would overwrite its source; pick another name")
    output.parent.mkdir(parents=True, exist_ok=True)
    return source, output


def _check_onnx(source: Path) -> None:
    """Refuse a file that is not an ONNX model before quantizers fail on it in their own words."""
    try:
        graph = onnx.load(str(source), load_external_data=False).graph
    except DecodeError:
        graph = None
    if graph is None or not graph.node:
        raise ValidationError(
            f"{source} is not an ONNX model (no graph could be read from it); pass the .onnx "
            "file `heimdall export` wrote"
        )


def _stamp(path: Path, source: Path, variant: str, recipe: Mapping[str, object]) -> None:
    """Carry the source's metadata over and record what this variant is and came from."""
    model = onnx.load(str(path))
    props = {
        p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props
    }
    props.update(
        {
            METADATA_KEY_VARIANT: variant,
            METADATA_KEY_SOURCE: sha256_file(source),
            METADATA_KEY_RECIPE: json.dumps(recipe, sort_keys=True),
            **RECOMMENDED_SESSION_SETTINGS.to_metadata(),
        }
    )
    del model.metadata_props[:]
    for key in sorted(props):
        model.metadata_props.add(key=key, value=props[key])
    onnx.save_model(model, str(path))
