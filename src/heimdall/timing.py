"""The timing loop behind every latency figure: warm-up, shuffled rounds, statistics.

Engines are plain calls, so the loop needs neither torch nor a model: ``bench`` gives it
PyTorch and ONNX Runtime calls, ``benchmarks/tune_sessions.py`` session candidates. Each
engine warms up until the median of consecutive windows stops moving; then the engines run in
rounds, once per engine per round in a shuffled order, so slow drift (other processes, thermal
state) hits every engine alike, and ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from heimdall.contract import INPUT_NAME, Progress
from heimdall.runtime import SessionSettings

PYTORCH = "pytorch"
# Idle time after each timed call, so the next engine does not share the cores with busy-waiting
# workers (measured with getrusage): PyTorch's OpenMP (libgomp) workers spin ~7-8 ms after a
# parallel region; ONNX Runtime's spin ~40 ms after a run unless
# SessionSettings.stop_spinning_after_run puts them to sleep at once.
DEFAULT_GAP_S = 0.015
SPINNING_GAP_S = 0.06
_WARMUP_WINDOW = 5
_WARMUP_TOLERANCE = 0.05
_WARMUP_SHARE = 0.3
# Progress units per batch size: ``measure`` reports each tenth of its rounds or budget.
MEASURE_STEPS = 10


def seconds_of(call: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


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


def gap_after(settings: SessionSettings | None, gap_s: float) -> float:
    """The idle time after a call: longer after a session whose workers spin between runs."""
    if settings is not None and settings.allow_spinning and not settings.stop_spinning_after_run:
        return max(gap_s, SPINNING_GAP_S)
    return gap_s


def ort_call(session: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
    """One timed call: the session run on ``x``."""
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
            window.append(seconds_of(call))
            runs += 1
        median = statistics.median(window)
        if previous is not None and abs(median - previous) <= _WARMUP_TOLERANCE * previous:
            return runs, True
        if time.perf_counter() - started > limit_s:
            return runs, False
        previous = median


def measure(
    calls: Mapping[str, Callable[[], object]],
    batch: int,
    flops: int,
    budget_s: float,
    iterations: tuple[int, int],
    gaps: Mapping[str, float],
    *,
    progress: Progress | None = None,
) -> list[Timing]:
    """Warm each call up, then time them in shuffled rounds until ``budget_s`` has passed.

    ``iterations`` is (at least, at most) the number of rounds; ``gaps`` the idle time after
    each call of an engine; ``flops`` per sample (0: no GFLOP/s). ``progress(done,
    MEASURE_STEPS)`` follows the rounds: done is the share of the budget or of the rounds
    that ends the loop, whichever is further, in tenths.
    """
    started = time.perf_counter()
    min_iterations, max_iterations = iterations
    names = list(calls)
    warm = {
        name: _warm_up(call, _WARMUP_SHARE * budget_s / len(names)) for name, call in calls.items()
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    order = np.random.default_rng(0)  # a fresh order each round: no engine always follows another
    rounds = reported = 0
    while rounds < max_iterations and (
        rounds < min_iterations or time.perf_counter() - started < budget_s
    ):
        for index in order.permutation(len(names)):
            name = names[index]
            times[name].append(seconds_of(calls[name]))
            if gaps[name]:
                time.sleep(gaps[name])
        rounds += 1
        if progress is not None:
            # The loop ends once both shares reach 1 or the rounds reach max_iterations.
            spent = (time.perf_counter() - started) / budget_s
            share = max(min(rounds / min_iterations, spent), rounds / max_iterations)
            step = min(int(share * MEASURE_STEPS), MEASURE_STEPS - 1)
            if step > reported:
                reported = step
                progress(step, MEASURE_STEPS)
    if progress is not None:
        progress(MEASURE_STEPS, MEASURE_STEPS)
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
