"""PyTorch eager vs ONNX Runtime latency, measured in one process on the same inputs.

Every engine (PyTorch and each ONNX variant) runs with the same thread count on the same
synthetic RF batch, timed by ``heimdall.timing`` (warm-up until stable, shuffled rounds,
ratios as medians of per-round ratios). FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on the PyTorch model (2 FLOPs per
multiply-accumulate of convolutions and matmuls; normalization, GELU and elementwise ops are
not counted), so int8 and fp16 variants report fp32-equivalent GFLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog
import torch

from heimdall.contract import Progress, part
from heimdall.data import generate
from heimdall.errors import InputError
from heimdall.machine import Environment, fingerprint, is_busy, load_average, physical_cores
from heimdall.model import LocalizationNet
from heimdall.roofline import (
    PeakEstimate,
    count_flops,
    estimate_peak,
    eval_mode,
    torch_threads,
)
from heimdall.runtime import (
    RECOMMENDED_SESSION_SETTINGS,
    SessionSettings,
    open_session,
    preferred_providers,
    select_providers,
)
from heimdall.timing import DEFAULT_GAP_S as DEFAULT_GAP_S
from heimdall.timing import MEASURE_STEPS, PYTORCH, Timing, gap_after, measure, ort_call

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 32)
FLOP_COUNTER = (
    "torch.utils.flop_counter.FlopCounterMode on the PyTorch model: 2 FLOPs per multiply-"
    "accumulate of conv/matmul/linear; norms, GELU and elementwise ops not counted"
)


@dataclass(frozen=True)
class Engine:
    """What ran: the PyTorch model or an ONNX file with its session settings and providers."""

    name: str
    path: str | None
    providers: tuple[str, ...]
    device: str
    load_seconds: float
    settings: dict[str, object] | None


@dataclass(frozen=True)
class BenchmarkResult:
    """Everything one ``benchmark`` call measured, JSON-serialisable through ``to_dict``."""

    backbone: str
    flops_per_sample: int
    flop_counter: str
    weight_bytes: int
    threads: int
    budget_s: float
    batch_sizes: tuple[int, ...]
    engines: tuple[Engine, ...]
    timings: tuple[Timing, ...]
    environment: Environment
    load_average_after: tuple[float, float, float]
    peak: PeakEstimate | None

    def timing(self, engine: str, batch_size: int) -> Timing:
        for t in self.timings:
            if t.engine == engine and t.batch_size == batch_size:
                return t
        raise KeyError(f"no timing for {engine!r} at batch {batch_size}")

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        for timing, raw in zip(self.timings, data["timings"], strict=True):
            raw["speedup_vs_pytorch"] = timing.speedup_vs_pytorch
        return data

    def rows(self) -> list[dict[str, str]]:
        """The performance table: one row per engine and batch size, values as printed."""
        reference = next((e.name for e in self.engines if e.name != PYTORCH), None)
        peak = self.peak.measured_gflops if self.peak else None
        return [
            {
                "engine": t.engine,
                "batch": str(t.batch_size),
                "p50 ms": f"{t.p50_ms:.2f}",
                "p90 ms": f"{t.p90_ms:.2f}",
                "p99 ms": f"{t.p99_ms:.2f}",
                "mean ± sd ms": f"{t.mean_ms:.2f} ± {t.stdev_ms:.2f}",
                "samples/s": f"{t.throughput:.1f}",
                "GFLOP/s": f"{t.gflops:.1f}",
                "% peak": _pct(t.gflops, peak),
                "× PyTorch latency": _num(t.ratios.get(PYTORCH)),
                "speedup vs PyTorch": _num(t.speedup_vs_pytorch),
                f"× {reference} latency": _num(t.ratios.get(reference) if reference else None),
            }
            for t in sorted(self.timings, key=lambda t: (t.batch_size, self._order(t.engine)))
        ]

    def to_markdown(self) -> str:
        """The performance table (:meth:`rows`) in Markdown, for reports."""
        rows = self.rows()
        header = list(rows[0]) if rows else ["engine", "batch"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row.values()) + " |" for row in rows])

    def _order(self, engine: str) -> int:
        return next(i for i, e in enumerate(self.engines) if e.name == engine)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _pct(value: float, peak: float | None) -> str:
    return "—" if not peak else f"{100 * value / peak:.0f}%"


def benchmark(
    model: LocalizationNet,
    onnx_models: Mapping[str, Path | str] | Path | str,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    threads: int | None = None,
    budget_s: float = 10.0,
    settings: SessionSettings | Mapping[str, SessionSettings] = RECOMMENDED_SESSION_SETTINGS,
    providers: Sequence[str] | None = None,
    include_pytorch: bool = True,
    min_iterations: int = 5,
    max_iterations: int = 5000,
    gap_s: float = DEFAULT_GAP_S,
    seed: int = 0,
    peak: bool = True,
    progress: Progress | None = None,
) -> BenchmarkResult:
    """Time ``model`` in PyTorch eager and each ONNX file in ONNX Runtime, interleaved.

    ``onnx_models`` maps an engine name (``"fp32"``, ``"int8"``, ...) to a file; a bare path is
    named ``"onnx"``. ``settings`` applies to every file or maps names to their own; the thread
    count (``threads``, else the settings' intra-op threads, else the physical cores) is used for
    PyTorch and ONNX Runtime alike. ``budget_s`` is the wall time per batch size, warm-up
    included; at least ``min_iterations`` rounds run whatever the budget. ``gap_s`` of idle time
    follows each call (``SPINNING_GAP_S`` after sessions that spin between runs) so the previous
    engine's busy-waiting threads are asleep before the next engine starts. ``peak=True`` also
    measures the machine's FLOP peak (about two seconds). ``progress(done, total)`` follows
    each tenth of every batch size's rounds (``MEASURE_STEPS``) and the peak measurement.
    """
    variants, per_variant = _engines_asked(onnx_models, settings)
    check_args(
        variants, batch_sizes, budget_s, min_iterations, max_iterations, include_pytorch, threads
    )
    n_threads = threads or _common_threads(per_variant.values())
    chosen = select_providers(preferred_providers() if providers is None else providers)
    device = "cuda" if _wants_cuda(chosen) else "cpu"
    flops = count_flops(model)
    environment = _fingerprint_warned(n_threads)
    with torch_threads(n_threads), eval_mode(model):
        torch_model = model.to(device)
        sessions, engines = _open_sessions(variants, per_variant, n_threads, chosen)
        if include_pytorch:
            engines.insert(0, Engine(PYTORCH, None, (), device, 0.0, None))
        timings: list[Timing] = []
        total = len(batch_sizes) * MEASURE_STEPS + int(peak)
        iterations = (min_iterations, max_iterations)
        for index, batch in enumerate(batch_sizes):
            reference = torch_model if include_pytorch else None
            calls = _round_calls(reference, sessions, generate(batch, seed=seed)[0], device)
            gaps = {name: gap_after(per_variant.get(name), gap_s) for name in calls}
            step = part(progress, index * MEASURE_STEPS, total)
            timings += measure(calls, batch, flops, budget_s, iterations, gaps, progress=step)
        estimate = _peak(n_threads, progress, total) if peak else None
    return _result(
        model, flops, n_threads, budget_s, batch_sizes, engines, timings, environment, estimate
    )


def _peak(threads: int, progress: Progress | None, total: int) -> PeakEstimate:
    """The machine's FLOP peak, the last unit of ``benchmark``'s progress."""
    estimate = estimate_peak(threads)
    if progress is not None:
        progress(total, total)
    return estimate


def _result(
    model: LocalizationNet,
    flops: int,
    threads: int,
    budget_s: float,
    batch_sizes: Sequence[int],
    engines: Sequence[Engine],
    timings: Sequence[Timing],
    environment: Environment,
    peak: PeakEstimate | None,
) -> BenchmarkResult:
    """What ``benchmark`` measured, logged as one event."""
    result = BenchmarkResult(
        backbone=model.config.backbone,
        flops_per_sample=flops,
        flop_counter=FLOP_COUNTER,
        weight_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        threads=threads,
        budget_s=budget_s,
        batch_sizes=tuple(batch_sizes),
        engines=tuple(engines),
        timings=tuple(timings),
        environment=environment,
        load_average_after=load_average(),
        peak=peak,
    )
    log.info(
        "benchmark_done",
        backbone=result.backbone,
        threads=threads,
        engines=[e.name for e in engines],
        p50_ms={f"{t.engine}@{t.batch_size}": round(t.p50_ms, 3) for t in timings},
    )
    return result


def _engines_asked(
    onnx_models: Mapping[str, Path | str] | Path | str,
    settings: SessionSettings | Mapping[str, SessionSettings],
) -> tuple[dict[str, Path], dict[str, SessionSettings]]:
    """Each ONNX engine's file and session settings (a bare path is the engine ``onnx``)."""
    variants = (
        {"onnx": Path(onnx_models)}
        if isinstance(onnx_models, str | Path)
        else {name: Path(p) for name, p in onnx_models.items()}
    )
    per_variant = {
        name: settings.get(name, RECOMMENDED_SESSION_SETTINGS)
        if isinstance(settings, Mapping)
        else settings
        for name in variants
    }
    return variants, per_variant


def _fingerprint_warned(threads: int) -> Environment:
    """The machine now; a warning when other processes keep its cores busy."""
    environment = fingerprint(threads)
    if is_busy(environment):
        log.warning(
            "benchmark_machine_busy",
            load_average=environment.load_average,
            cores=environment.physical_cores,
            hint="other processes compete for the cores; timings will be noisy and slow",
        )
    return environment


def _round_calls(
    model: torch.nn.Module | None,
    sessions: Mapping[str, ort.InferenceSession],
    x: np.ndarray,
    device: str,
) -> dict[str, Callable[[], object]]:
    """One timed call per engine on the same batch: PyTorch (if given) and each session."""
    return {
        **({PYTORCH: _torch_call(model, x, device)} if model is not None else {}),
        **{name: ort_call(session, x) for name, session in sessions.items()},
    }


def _open_sessions(
    variants: Mapping[str, Path],
    settings: Mapping[str, SessionSettings],
    threads: int,
    providers: Sequence[str],
) -> tuple[dict[str, ort.InferenceSession], list[Engine]]:
    sessions, engines = {}, []
    for name, path in variants.items():
        started = time.perf_counter()
        session = open_session(path, settings[name], threads=threads, providers=providers)
        sessions[name] = session
        engines.append(
            Engine(
                name=name,
                path=str(path),
                providers=tuple(session.get_providers()),
                device=session.get_providers()[0],
                load_seconds=round(time.perf_counter() - started, 4),
                settings=settings[name].to_dict(),
            )
        )
    return sessions, engines


def check_args(
    variants: Mapping[str, Path],
    batch_sizes: Sequence[int],
    budget_s: float,
    min_iterations: int,
    max_iterations: int,
    include_pytorch: bool,
    threads: int | None = None,
) -> None:
    """Raise InputError for missing files, an engine named like PyTorch, or bad counts."""
    if not variants and not include_pytorch:
        raise InputError("nothing to benchmark: give at least one ONNX file or include PyTorch")
    if PYTORCH in variants:
        raise InputError(f"{PYTORCH!r} names the PyTorch engine; pick another ONNX engine name")
    missing = [str(p) for p in variants.values() if not p.is_file()]
    if missing:
        raise InputError(f"ONNX file(s) not found: {', '.join(missing)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not 0 < budget_s < math.inf:
        raise InputError(f"budget_s must be a positive number of seconds, got {budget_s}")
    if threads is not None and threads < 0:
        raise InputError(f"threads must be positive (0: one per physical core), got {threads}")
    if not 1 <= min_iterations <= max_iterations:
        raise InputError(
            f"need 1 <= min_iterations <= max_iterations, got {min_iterations}, {max_iterations}"
        )


def _common_threads(settings: Iterable[SessionSettings]) -> int:
    values = {s.intra_op_threads for s in settings} - {0}
    if len(values) > 1:
        raise InputError(
            f"session settings ask for different thread counts {sorted(values)}; "
            "pass threads= so PyTorch and every session use the same count"
        )
    return values.pop() if values else physical_cores()


def _wants_cuda(providers: Sequence[str]) -> bool:
    gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    return bool(providers) and providers[0] in gpu and torch.cuda.is_available()


def _torch_call(model: torch.nn.Module, x: np.ndarray, device: str) -> Callable[[], object]:
    tensor = torch.from_numpy(x).to(device)
    if device == "cpu":
        return lambda: model(tensor)

    def call() -> object:
        out = model(tensor)
        torch.cuda.synchronize()
        return out

    return call
