"""ONNX Runtime session tuning and per-op profiling: the measurements behind the recommendation.

``bench_inference.py --tune`` times :data:`heimdall.optimize.SESSION_CANDIDATES` against each
other with :func:`tune_session`; ``--profile`` shows where the kernel time goes with
:func:`profile_ops`. ``heimdall.runtime.RECOMMENDED_SESSION_SETTINGS`` is what they measured.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import structlog

from heimdall.bench import check_args
from heimdall.contract import INPUT_NAME
from heimdall.data import generate
from heimdall.errors import InputError
from heimdall.machine import physical_cores
from heimdall.optimize import SESSION_CANDIDATES
from heimdall.runtime import RECOMMENDED_SESSION_SETTINGS, SessionSettings, open_session
from heimdall.timing import DEFAULT_GAP_S, Timing, gap_after, measure, ort_call

log = structlog.get_logger(__name__)

_PROFILE_WARMUP = 3


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
    check_args({"candidate": path}, [batch_size], budget_s, 1, 1, include_pytorch=False)
    if not candidates:
        raise InputError("no session candidates to compare")
    n_threads = threads or physical_cores()
    x, _ = generate(batch_size, seed=seed)
    calls, loads = {}, {}
    for name, candidate in candidates.items():
        started = time.perf_counter()
        session = open_session(path, candidate, threads=n_threads)
        loads[name] = round(time.perf_counter() - started, 4)
        calls[name] = ort_call(session, x)
    gaps = {name: gap_after(candidates[name], gap_s) for name in calls}
    timings = measure(calls, batch_size, 0, budget_s, (5, 5000), gaps)
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
        session = open_session(path, options)
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
