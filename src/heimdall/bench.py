"""PyTorch eager vs ONNX Runtime latency, measured in one process on the same inputs.

Every engine (PyTorch and each ONNX variant) runs with the same thread count on the same
synthetic RF batch. After a warm-up that lasts until the median of consecutive windows stops
moving, the engines run in rounds, each round once per engine in a shuffled order, so slow
drift (other processes, thermal state) hits every engine alike; ratios are the median of the
per-round ratios. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the PyTorch
model (2 FLOPs per multiply-accumulate of convolutions and matmuls; normalization, GELU and
elementwise ops are not counted), so int8 and fp16 variants report fp32-equivalent GFLOP/s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import structlog
import torch
from torch.utils.flop_counter import FlopCounterMode

from heimdall.data import generate
from heimdall.errors import InputError
from heimdall.model import INPUT_NAME, INPUT_SHAPE, LocalizationNet
from heimdall.optimize import (
    RECOMMENDED_SESSION_SETTINGS,
    SESSION_CANDIDATES,
    SessionSettings,
    preferred_providers,
)

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 32)
PYTORCH = "pytorch"
FLOP_COUNTER = (
    "torch.utils.flop_counter.FlopCounterMode on the PyTorch model: 2 FLOPs per multiply-"
    "accumulate of conv/matmul/linear; norms, GELU and elementwise ops not counted"
)
# ISA extensions that decide which MLAS/oneDNN kernels run (fp32 FMA width, int8 dot products).
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
)
# Idle time after each timed call, so the next engine does not share the cores with busy-waiting
# workers (measured with getrusage): PyTorch's OpenMP (libgomp) workers spin ~7-8 ms after a
# parallel region; ONNX Runtime's spin ~40 ms after a run unless
# SessionSettings.stop_spinning_after_run puts them to sleep at once.
DEFAULT_GAP_S = 0.015
SPINNING_GAP_S = 0.06
_WARMUP_WINDOW = 5
_WARMUP_TOLERANCE = 0.05
_WARMUP_SHARE = 0.3
PEAK_GEMM_SIZE = 2048
_PEAK_READ_BYTES = 512 * 2**20
_PROFILE_WARMUP = 3


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one engine at one batch size; ratios are medians of paired rounds.

    ``ratios[name]`` is the median over rounds of ``this engine's time / name's time`` (below 1
    means this engine is faster); ``speedup_vs_pytorch`` is ``1 / ratios["pytorch"]``.
    """

    engine: str
    batch_size: int
    iterations: int
    warmup_iterations: int
    warmup_stable: bool
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    throughput: float
    gflops: float
    ratios: dict[str, float]
    samples_ms: tuple[float, ...] = ()  # every timed call, in run order (for plots)

    @property
    def speedup_vs_pytorch(self) -> float | None:
        ratio = self.ratios.get(PYTORCH)
        return None if ratio is None else 1.0 / ratio


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
class Environment:
    """The machine and software a benchmark ran on."""

    cpu_model: str
    physical_cores: int
    logical_cpus: int
    isa_flags: tuple[str, ...]
    memory_gib: float
    threads: int
    platform: str
    python: str
    versions: dict[str, str]
    torch_backends: dict[str, bool]
    ort_providers: tuple[str, ...]
    load_average: tuple[float, float, float]  # 1, 5, 15 min, when the benchmark started


@dataclass(frozen=True)
class PeakEstimate:
    """The machine's fp32 FLOP peak, measured and theoretical, and its memory bandwidth.

    ``measured_gflops``: best of repeated ``torch.mm`` on square fp32 matrices of side
    ``gemm_size`` with ``threads`` threads (the practical peak of a tuned BLAS).
    ``theoretical_gflops``: cores × clock × FLOPs per cycle, where FLOPs per cycle assumes two
    FMA pipes of the widest vector ISA (AVX2: 2 × 8 lanes × 2 = 32; AVX-512: 64). The clock is
    the maximum frequency the kernel reports, else the current one (a VM often shows only its
    base clock). ``memory_read_gbps``: best ``Tensor.sum`` over a buffer far larger than any
    cache, i.e. the rate at which weights stream from DRAM: at batch 1 every weight is read
    once per inference, so ``weight bytes / memory_read_gbps`` is a latency floor.
    """

    measured_gflops: float
    gemm_size: int
    theoretical_gflops: float | None
    clock_mhz: float | None
    clock_source: str
    flops_per_cycle_per_core: int | None
    cores: int
    memory_read_gbps: float
    threads: int


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

    def to_markdown(self) -> str:
        """The performance table: one row per engine and batch size."""
        reference = next((e.name for e in self.engines if e.name != PYTORCH), None)
        peak = self.peak.measured_gflops if self.peak else None
        header = (
            "| engine | batch | p50 ms | p90 ms | p99 ms | mean ± sd ms | samples/s | GFLOP/s "
            f"| % peak | × PyTorch latency | speedup vs PyTorch | × {reference} latency |"
        )
        lines = [header, "|" + "---|" * (header.count("|") - 1)]
        for t in sorted(self.timings, key=lambda t: (t.batch_size, self._order(t.engine))):
            speedup = t.speedup_vs_pytorch
            lines.append(
                f"| {t.engine} | {t.batch_size} | {t.p50_ms:.2f} | {t.p90_ms:.2f} | "
                f"{t.p99_ms:.2f} | {t.mean_ms:.2f} ± {t.stdev_ms:.2f} | {t.throughput:.1f} | "
                f"{t.gflops:.1f} | {_pct(t.gflops, peak)} | {_num(t.ratios.get(PYTORCH))} | "
                f"{_num(speedup)} | {_num(t.ratios.get(reference) if reference else None)} |"
            )
        return "\n".join(lines)

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
) -> BenchmarkResult:
    """Time ``model`` in PyTorch eager and each ONNX file in ONNX Runtime, interleaved.

    ``onnx_models`` maps an engine name (``"fp32"``, ``"int8"``, ...) to a file; a bare path is
    named ``"onnx"``. ``settings`` applies to every file or maps names to their own; the thread
    count (``threads``, else the settings' intra-op threads, else the physical cores) is used for
    PyTorch and ONNX Runtime alike. ``budget_s`` is the wall time per batch size, warm-up
    included; at least ``min_iterations`` rounds run whatever the budget. ``gap_s`` of idle time
    follows each call (``SPINNING_GAP_S`` after sessions that spin between runs) so the previous
    engine's busy-waiting threads are asleep before the next engine starts. ``peak=True`` also
    measures the machine's FLOP peak (about two seconds).
    """
    variants = (
        {"onnx": Path(onnx_models)}
        if isinstance(onnx_models, str | Path)
        else {name: Path(p) for name, p in onnx_models.items()}
    )
    _check_args(variants, batch_sizes, budget_s, min_iterations, max_iterations, include_pytorch)
    per_variant = {
        name: settings.get(name, RECOMMENDED_SESSION_SETTINGS)
        if isinstance(settings, Mapping)
        else settings
        for name in variants
    }
    n_threads = threads or _common_threads(per_variant.values())
    chosen = list(providers) if providers is not None else preferred_providers()
    device = "cuda" if _wants_cuda(chosen) else "cpu"
    flops = count_flops(model)
    environment = fingerprint(n_threads)
    if environment.load_average[0] > environment.physical_cores / 2:
        log.warning(
            "benchmark_machine_busy",
            load_average=environment.load_average,
            cores=environment.physical_cores,
            hint="other processes compete for the cores; timings will be noisy and slow",
        )
    with _torch_threads(n_threads), _eval(model):
        torch_model = model.to(device)
        sessions, engines = _open_sessions(variants, per_variant, n_threads, chosen)
        if include_pytorch:
            engines.insert(0, Engine(PYTORCH, None, (), device, 0.0, None))
        timings: list[Timing] = []
        for batch in batch_sizes:
            x, _ = generate(batch, seed=seed)
            calls = {
                **({PYTORCH: _torch_call(torch_model, x, device)} if include_pytorch else {}),
                **{name: _ort_call(s, x) for name, s in sessions.items()},
            }
            gaps = {name: _gap(per_variant.get(name), gap_s) for name in calls}
            timings.extend(
                _measure(calls, batch, flops, budget_s, (min_iterations, max_iterations), gaps)
            )
        estimate = estimate_peak(n_threads) if peak else None
    result = BenchmarkResult(
        backbone=model.config.backbone,
        flops_per_sample=flops,
        flop_counter=FLOP_COUNTER,
        weight_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        threads=n_threads,
        budget_s=budget_s,
        batch_sizes=tuple(batch_sizes),
        engines=tuple(engines),
        timings=tuple(timings),
        environment=environment,
        load_average_after=_load_average(),
        peak=estimate,
    )
    log.info(
        "benchmark_done",
        backbone=result.backbone,
        threads=n_threads,
        engines=[e.name for e in engines],
        p50_ms={f"{t.engine}@{t.batch_size}": round(t.p50_ms, 3) for t in timings},
    )
    return result


def _open_sessions(
    variants: Mapping[str, Path],
    settings: Mapping[str, SessionSettings],
    threads: int,
    providers: Sequence[str],
) -> tuple[dict[str, ort.InferenceSession], list[Engine]]:
    sessions, engines = {}, []
    for name, path in variants.items():
        started = time.perf_counter()
        options = settings[name].to_session_options(threads=threads)
        session = _session(path, options, providers)
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


def _gap(settings: SessionSettings | None, gap_s: float) -> float:
    """The idle time after a call: longer after a session whose workers spin between runs."""
    if settings is not None and settings.allow_spinning and not settings.stop_spinning_after_run:
        return max(gap_s, SPINNING_GAP_S)
    return gap_s


def _session(
    path: Path, options: ort.SessionOptions, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise InputError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc


def _check_args(
    variants: Mapping[str, Path],
    batch_sizes: Sequence[int],
    budget_s: float,
    min_iterations: int,
    max_iterations: int,
    include_pytorch: bool,
) -> None:
    if not variants and not include_pytorch:
        raise InputError("nothing to benchmark: give at least one ONNX file or include PyTorch")
    if PYTORCH in variants:
        raise InputError(f"{PYTORCH!r} names the PyTorch engine; pick another ONNX engine name")
    missing = [str(p) for p in variants.values() if not p.is_file()]
    if missing:
        raise InputError(f"ONNX file(s) not found: {', '.join(missing)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if budget_s <= 0:
        raise InputError(f"budget_s must be positive, got {budget_s}")
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


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _eval(model: LocalizationNet) -> Iterator[None]:
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.to(device)
        model.train(was_training)


def _torch_call(model: torch.nn.Module, x: np.ndarray, device: str) -> Callable[[], object]:
    tensor = torch.from_numpy(x).to(device)
    if device == "cpu":
        return lambda: model(tensor)

    def call() -> object:
        out = model(tensor)
        torch.cuda.synchronize()
        return out

    return call


def _ort_call(session: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
    feed = {INPUT_NAME: x}
    return lambda: session.run(None, feed)


def _warm_up(call: Callable[[], object], limit_s: float) -> tuple[int, bool]:
    """Run until two consecutive windows have medians within 5 %, or ``limit_s`` passes."""
    started = time.perf_counter()
    previous: float | None = None
    runs = 0
    while True:
        window = []
        for _ in range(_WARMUP_WINDOW):
            window.append(_time(call))
            runs += 1
        median = statistics.median(window)
        if previous is not None and abs(median - previous) <= _WARMUP_TOLERANCE * previous:
            return runs, True
        if time.perf_counter() - started > limit_s:
            return runs, False
        previous = median


def _time(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _measure(
    calls: Mapping[str, Callable[[], object]],
    batch: int,
    flops: int,
    budget_s: float,
    iterations: tuple[int, int],
    gaps: Mapping[str, float],
) -> list[Timing]:
    started = time.perf_counter()
    min_iterations, max_iterations = iterations
    names = list(calls)
    warm = {
        name: _warm_up(call, _WARMUP_SHARE * budget_s / len(names)) for name, call in calls.items()
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    order = np.random.default_rng(0)  # a fresh order each round: no engine always follows another
    rounds = 0
    while rounds < max_iterations and (
        rounds < min_iterations or time.perf_counter() - started < budget_s
    ):
        for index in order.permutation(len(names)):
            name = names[index]
            times[name].append(_time(calls[name]))
            if gaps[name]:
                time.sleep(gaps[name])
        rounds += 1
    arrays = {name: np.asarray(t) for name, t in times.items()}
    return [_stats(name, batch, flops, arrays, warm[name]) for name in names]


def _stats(
    name: str,
    batch: int,
    flops: int,
    arrays: Mapping[str, np.ndarray],
    warm: tuple[int, bool],
) -> Timing:
    seconds = arrays[name]
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99])
    mean = float(seconds.mean())
    return Timing(
        engine=name,
        batch_size=batch,
        iterations=len(seconds),
        warmup_iterations=warm[0],
        warmup_stable=warm[1],
        p50_ms=float(p50) * 1e3,
        p90_ms=float(p90) * 1e3,
        p99_ms=float(p99) * 1e3,
        mean_ms=mean * 1e3,
        stdev_ms=float(seconds.std(ddof=1)) * 1e3 if len(seconds) > 1 else 0.0,
        min_ms=float(seconds.min()) * 1e3,
        throughput=batch / mean,
        gflops=flops * batch / float(p50) / 1e9,
        ratios={
            other: float(np.median(seconds / arrays[other])) for other in arrays if other != name
        },
        samples_ms=tuple(round(float(s) * 1e3, 4) for s in seconds),
    )


def count_flops(model: LocalizationNet) -> int:
    """FLOPs of one sample through ``model`` (see the module docstring for what counts)."""
    device = next(model.parameters()).device
    with _eval(model), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *INPUT_SHAPE, device=device))
    return int(counter.get_total_flops())


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not add fp32 FMA throughput)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    siblings = _cpuinfo_int("siblings")
    cores = _cpuinfo_int("cpu cores")
    per_core = siblings // cores if siblings and cores else 1
    return max(1, (logical or 1) // max(per_core, 1))


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpuinfo_int(key: str) -> int | None:
    value = _cpuinfo().get(key, "")
    return int(value) if value.isdigit() else None


def _memory_gib() -> float:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return round(pages / 2**30, 1)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def fingerprint(threads: int) -> Environment:
    """CPU, ISA flags, cores, versions, threads and providers of this machine, now."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return Environment(
        cpu_model=info.get("model name") or platform.processor() or platform.machine(),
        physical_cores=physical_cores(),
        logical_cpus=os.cpu_count() or 1,
        isa_flags=tuple(f for f in ISA_FLAGS if f in flags),
        memory_gib=_memory_gib(),
        threads=threads,
        platform=platform.platform(),
        python=platform.python_version(),
        versions={
            name: _version(name) for name in ("heimdall", "torch", "onnxruntime", "onnx", "numpy")
        },
        torch_backends={
            "mkldnn": torch.backends.mkldnn.is_available(),
            "mkl": torch.backends.mkl.is_available(),
            "cuda": torch.cuda.is_available(),
        },
        ort_providers=tuple(ort.get_available_providers()),
        load_average=_load_average(),
    )


def _load_average() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)


def _clock_mhz() -> tuple[float | None, str]:
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(cpufreq.read_text()) / 1e3, "cpufreq max"
    except (OSError, ValueError):
        pass
    mhz = _cpuinfo().get("cpu MHz")
    try:
        return (float(mhz), "/proc/cpuinfo cpu MHz") if mhz else (None, "unknown")
    except ValueError:
        return None, "unknown"


def _flops_per_cycle() -> int | None:
    flags = set(_cpuinfo().get("flags", "").split())
    if "avx512f" in flags:
        return 64
    if {"avx2", "fma"} <= flags:
        return 32
    if "avx" in flags:
        return 16
    return None


def estimate_peak(
    threads: int | None = None, *, repeats: int = 5, gemm_size: int = PEAK_GEMM_SIZE
) -> PeakEstimate:
    """Measure sgemm GFLOP/s and copy bandwidth with ``threads`` threads; add the theoretical."""
    n_threads = threads or physical_cores()
    n = gemm_size
    with _torch_threads(n_threads), torch.inference_mode():
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        gemm = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
        buffer = torch.ones(_PEAK_READ_BYTES // 4)
        buffer.sum()
        read = min(_time(buffer.sum) for _ in range(repeats))
    clock, source = _clock_mhz()
    per_cycle = _flops_per_cycle()
    cores = min(n_threads, physical_cores())
    return PeakEstimate(
        measured_gflops=2 * n**3 / gemm / 1e9,
        gemm_size=n,
        theoretical_gflops=cores * clock * per_cycle / 1e3 if clock and per_cycle else None,
        clock_mhz=clock,
        clock_source=source,
        flops_per_cycle_per_core=per_cycle,
        cores=cores,
        memory_read_gbps=_PEAK_READ_BYTES / read / 1e9,
        threads=n_threads,
    )


@dataclass(frozen=True)
class SessionTuning:
    """ONNX Runtime session candidates timed against each other on one model and batch size."""

    path: str
    batch_size: int
    threads: int
    best: str
    settings: dict[str, dict[str, object]]
    load_seconds: dict[str, float]
    timings: tuple[Timing, ...]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        header = "| candidate | p50 ms | p90 ms | mean ± sd ms | × best latency | session load s |"
        lines = [header, "|" + "---|" * (header.count("|") - 1)]
        for t in sorted(self.timings, key=lambda t: t.p50_ms):
            ratio = 1.0 if t.engine == self.best else t.ratios[self.best]
            lines.append(
                f"| {t.engine} | {t.p50_ms:.2f} | {t.p90_ms:.2f} | {t.mean_ms:.2f} ± "
                f"{t.stdev_ms:.2f} | {ratio:.3f} | {self.load_seconds[t.engine]:.2f} |"
            )
        return "\n".join(lines)


def tune_session(
    onnx_path: Path | str,
    candidates: Mapping[str, SessionSettings] = SESSION_CANDIDATES,
    *,
    batch_size: int = 1,
    threads: int | None = None,
    budget_s: float = 10.0,
    gap_s: float = DEFAULT_GAP_S,
    seed: int = 0,
) -> SessionTuning:
    """Time one session per candidate on the same input, interleaved; the lowest p50 wins.

    Timings carry no GFLOP/s (0.0): only their ratios matter here.
    """
    path = Path(onnx_path)
    _check_args({"candidate": path}, [batch_size], budget_s, 1, 1, include_pytorch=False)
    if not candidates:
        raise InputError("no session candidates to compare")
    n_threads = threads or physical_cores()
    x, _ = generate(batch_size, seed=seed)
    calls, loads = {}, {}
    for name, candidate in candidates.items():
        started = time.perf_counter()
        session = _session(path, candidate.to_session_options(threads=n_threads))
        loads[name] = round(time.perf_counter() - started, 4)
        calls[name] = _ort_call(session, x)
    gaps = {name: _gap(candidates[name], gap_s) for name in calls}
    timings = _measure(calls, batch_size, 0, budget_s, (5, 5000), gaps)
    best = min(timings, key=lambda t: t.p50_ms).engine
    log.info("session_tuned", path=str(path), best=best, threads=n_threads)
    return SessionTuning(
        path=str(path),
        batch_size=batch_size,
        threads=n_threads,
        best=best,
        settings={name: c.to_dict() for name, c in candidates.items()},
        load_seconds=loads,
        timings=tuple(timings),
    )


@dataclass(frozen=True)
class OpProfile:
    """Kernel time of one kind of op in ONNX Runtime's profile, per run."""

    op: str
    nodes: int
    ms_per_run: float
    share: float


def profile_ops(
    onnx_path: Path | str,
    *,
    settings: SessionSettings = RECOMMENDED_SESSION_SETTINGS,
    batch_size: int = 1,
    runs: int = 20,
    threads: int | None = None,
    seed: int = 0,
) -> tuple[OpProfile, ...]:
    """Where ONNX Runtime spends its kernel time, by op type, most expensive first.

    Convolutions are split by shape: ``Conv depthwise 7x7`` (weights ``(C, 1, 7, 7)``) and
    ``Conv 4x4``/``Conv 2x2`` for the stem and downsampling layers.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    if runs < 1:
        raise InputError(f"runs must be at least 1, got {runs}")
    x, _ = generate(batch_size, seed=seed)
    with tempfile.TemporaryDirectory(prefix="heimdall-profile-") as tmp:
        options = settings.to_session_options(threads=threads or physical_cores())
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = _session(path, options)
        for _ in range(_PROFILE_WARMUP + runs):
            session.run(None, {INPUT_NAME: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    # Kernel events after the end of the last warm-up run.
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    start = run_ends[_PROFILE_WARMUP - 1]
    conv_labels = _conv_labels(onnx.load(str(path), load_external_data=False).graph)
    total: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        op = _op_label(event["name"].removesuffix("_kernel_time"), event["args"], conv_labels)
        total[op] = total.get(op, 0.0) + event["dur"]
        nodes.setdefault(op, set()).add(event["name"])
    overall = sum(total.values()) or 1.0
    return tuple(
        OpProfile(
            op=op,
            nodes=len(nodes[op]),
            ms_per_run=us / runs / 1e3,
            share=us / overall,
        )
        for op, us in sorted(total.items(), key=lambda item: -item[1])
    )


def _conv_labels(graph: onnx.GraphProto) -> dict[str, str]:
    """``Conv depthwise 7x7`` / ``Conv 2x2``... for each Conv node of the file, by node name."""
    labels = {}
    for node in graph.node:
        if node.op_type != "Conv" or not node.name:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = "x".join(str(k) for k in attrs.get("kernel_shape", ()))
        kind = "depthwise " if attrs.get("group", 1) > 1 else ""
        labels[node.name] = f"{kind}{kernel}".strip()
    return labels


def _op_label(name: str, args: Mapping[str, object], conv_labels: Mapping[str, str]) -> str:
    """The op type; convolutions also say whether they are depthwise and their kernel.

    ONNX Runtime renames fused nodes (``<name>_token_<n>``) and prepacks weights, so the
    kind comes from the source node's name when it matches, else from the weight's shape.
    """
    op = str(args.get("op_name", "?"))
    if op not in ("Conv", "QLinearConv", "FusedConv"):
        return op
    match = max((n for n in conv_labels if name.startswith(n)), key=len, default=None)
    if match is not None:
        return f"{op} {conv_labels[match]}"
    shapes = args.get("input_type_shape")
    weight = (
        next(iter(shapes[1].values()), None) if isinstance(shapes, list) and shapes[1:] else None
    )
    if not isinstance(weight, list) or len(weight) != 4:
        return op
    kind = "depthwise " if weight[1] == 1 and weight[0] > 1 else ""
    return f"{op} {kind}{weight[2]}x{weight[3]}"
