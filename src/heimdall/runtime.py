"""ONNX Runtime sessions: settings as data, the provider policy, and one way to open a session.

``RECOMMENDED_SESSION_SETTINGS`` is what ``benchmarks/bench_inference.py --tune`` measured best
on the reference machine; loaders should build their sessions with :func:`open_session` or
:func:`session_options`. No torch here: serving imports this module alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort
import structlog
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from heimdall.errors import InputError

log = structlog.get_logger(__name__)

OptimizationLevel = Literal["disable", "basic", "extended", "all"]
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CPU = "CPUExecutionProvider"
# Preferred order when present; CPU is always the fallback.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
METADATA_KEY_SESSION = "heimdall.ort_session"
# What ONNX Runtime raises when it cannot load or run a model: its own exception types share no
# base class but Exception, and its Python layer raises the builtins.
ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoModel,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EPFail,
)


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options as data: JSON-able, storable in ONNX metadata.

    ``intra_op_threads=0`` lets ONNX Runtime use one thread per physical core.
    ``allow_spinning`` lets idle workers busy-wait for the next op of a run;
    ``stop_spinning_after_run`` (``session.force_spinning_stop``) puts them to sleep when the
    run ends: without it, one worker per thread keeps a core busy between runs.
    """

    graph_optimization_level: OptimizationLevel = "all"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    parallel_execution: bool = False
    allow_spinning: bool = True
    stop_spinning_after_run: bool = True
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    denormal_as_zero: bool = False

    def __post_init__(self) -> None:
        if self.graph_optimization_level not in _LEVELS:
            raise InputError(
                f"unknown graph optimization level {self.graph_optimization_level!r}; "
                f"choose one of {', '.join(_LEVELS)}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise InputError("thread counts must be >= 0 (0 means ONNX Runtime's default)")

    def to_session_options(self, threads: int | None = None) -> ort.SessionOptions:
        """A fresh ``ort.SessionOptions``; ``threads`` overrides ``intra_op_threads``."""
        options = ort.SessionOptions()
        options.graph_optimization_level = _LEVELS[self.graph_optimization_level]
        options.intra_op_num_threads = self.intra_op_threads if threads is None else threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if self.parallel_execution
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        options.enable_mem_pattern = self.enable_mem_pattern
        options.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        for key, value in self.config_entries().items():
            options.add_session_config_entry(key, value)
        return options

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def config_entries(self) -> dict[str, str]:
        """The settings ONNX Runtime takes as session config entries rather than attributes."""
        flag = {True: "1", False: "0"}
        return {
            "session.intra_op.allow_spinning": flag[self.allow_spinning],
            "session.inter_op.allow_spinning": flag[self.allow_spinning],
            "session.force_spinning_stop": flag[self.stop_spinning_after_run],
            "session.set_denormal_as_zero": flag[self.denormal_as_zero],
        }

    def to_mlflow_options(self) -> dict[str, object]:
        """The settings as MLflow's ONNX flavor ``onnx_session_options``.

        MLflow's loader applies thread counts, execution mode, the optimization level and
        ``extra_session_config`` only (it skips zeros: 0 threads and level "disable" read as
        ONNX Runtime's defaults); memory pattern and arena are left at ONNX Runtime's default.
        """
        return {
            "graph_optimization_level": int(_LEVELS[self.graph_optimization_level]),
            "intra_op_num_threads": self.intra_op_threads,
            "inter_op_num_threads": self.inter_op_threads,
            "execution_mode": "parallel" if self.parallel_execution else "sequential",
            "extra_session_config": self.config_entries(),
        }

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY_SESSION: json.dumps(self.to_dict(), sort_keys=True)}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> SessionSettings | None:
        """The settings stored in an ONNX file's ``metadata_props``, or None when absent."""
        raw = props.get(METADATA_KEY_SESSION)
        if raw is None:
            return None
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"{METADATA_KEY_SESSION} metadata is not valid settings: {exc}"
            ) from exc


# Measured with benchmarks/bench_inference.py --tune (tiny, fp32, batch 1, 2-core AMD EPYC;
# latency relative to this, see benchmarks/README.md): "extended" 1.5-1.9× and "basic"
# 1.6-2.0× (no NCHWc kernels for the 7×7 depthwise convs); no spinning 1.2-1.4×; parallel
# execution 2.0-2.2× (the graph is a chain); memory pattern, arena, denormals as zero and
# spinning between runs within noise. Stopping the spin after a run frees the core a worker
# would keep busy for ~40 ms after every request.
RECOMMENDED_SESSION_SETTINGS = SessionSettings()


def recorded_settings(props: Mapping[str, str]) -> SessionSettings:
    """The settings a model records in its metadata (variants do), else the recommendation."""
    return SessionSettings.from_metadata(props) or RECOMMENDED_SESSION_SETTINGS


def session_options(
    threads: int | None = None, settings: SessionSettings = RECOMMENDED_SESSION_SETTINGS
) -> ort.SessionOptions:
    """Session options to serve LocalizationNet with (the measured recommendation by default)."""
    return settings.to_session_options(threads=threads)


def preferred_providers(available: Sequence[str] | None = None) -> list[str]:
    """Installed execution providers in preference order: TensorRT, CUDA, OpenVINO, then CPU."""
    present = set(ort.get_available_providers() if available is None else available)
    return [p for p in PROVIDER_PREFERENCE if p in present or p == CPU]


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Requested providers this onnxruntime build offers, in order, with CPU last as the fallback.

    Missing ones are logged and skipped; ``None`` means CPU only.
    """
    available = set(ort.get_available_providers())
    wanted = list(requested or [CPU])
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("runtime.providers_unavailable", missing=missing, available=sorted(available))
    return [*(p for p in wanted if p in available and p != CPU), CPU]


def open_session(
    model: Path | str | bytes,
    settings: SessionSettings | ort.SessionOptions = RECOMMENDED_SESSION_SETTINGS,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    name: str | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session for a file (or serialized bytes) on :func:`select_providers`.

    ``settings`` may be ready-made ``ort.SessionOptions`` (e.g. with profiling enabled), in which
    case ``threads`` is ignored. ``name`` is what errors call the model (default: the path);
    InputError, in one line, when ONNX Runtime cannot load it.
    """
    options = (
        settings
        if isinstance(settings, ort.SessionOptions)
        else settings.to_session_options(threads=threads)
    )
    label = name or (f"a {len(model)}-byte model" if isinstance(model, bytes) else str(model))
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=select_providers(providers))
    except ORT_ERRORS as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"{label}: ONNX Runtime cannot load the model: {reason}") from exc
