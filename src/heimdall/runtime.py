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

from heimdall.errors import InputError

OptimizationLevel = Literal["disable", "basic", "extended", "all"]
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Preferred order when present; CPU is always the fallback.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
METADATA_KEY_SESSION = "heimdall.ort_session"


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
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        options.add_session_config_entry(
            "session.inter_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        options.add_session_config_entry(
            "session.force_spinning_stop", "1" if self.stop_spinning_after_run else "0"
        )
        options.add_session_config_entry(
            "session.set_denormal_as_zero", "1" if self.denormal_as_zero else "0"
        )
        return options

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

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


def session_options(
    threads: int | None = None, settings: SessionSettings = RECOMMENDED_SESSION_SETTINGS
) -> ort.SessionOptions:
    """Session options to serve LocalizationNet with (the measured recommendation by default)."""
    return settings.to_session_options(threads=threads)


def preferred_providers(available: Sequence[str] | None = None) -> list[str]:
    """Installed execution providers in preference order: TensorRT, CUDA, OpenVINO, then CPU."""
    present = set(ort.get_available_providers() if available is None else available)
    return [p for p in PROVIDER_PREFERENCE if p in present or p == "CPUExecutionProvider"]


def open_session(
    path: Path | str,
    settings: SessionSettings | ort.SessionOptions = RECOMMENDED_SESSION_SETTINGS,
    *,
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An ONNX Runtime session for ``path``; InputError when ONNX Runtime cannot load the file.

    ``settings`` may be ready-made ``ort.SessionOptions`` (e.g. with profiling enabled), in which
    case ``threads`` is ignored.
    """
    options = (
        settings
        if isinstance(settings, ort.SessionOptions)
        else settings.to_session_options(threads=threads)
    )
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise InputError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
