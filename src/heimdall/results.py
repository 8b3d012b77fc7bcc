"""What a publish run made and measured, and the report document built from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heimdall.bench import PYTORCH, BenchmarkResult
from heimdall.contract import FP32 as FP32
from heimdall.contract import StepRecord as StepRecord
from heimdall.heldout import HeldOut
from heimdall.machine import is_busy
from heimdall.optimize import VariantResult
from heimdall.registry import Gate, RegisteredVersion
from heimdall.report import ReportPaths
from heimdall.storage import UploadResult
from heimdall.validate import ValidationResult
from heimdall.verify import ParityResult


@dataclass(frozen=True)
class PublishedModel:
    """One variant's verified bytes in the object store and its registry version."""

    variant: str
    onnx_path: Path
    upload: UploadResult
    version: RegisteredVersion
    reused_version: bool
    alias: str | None
    metadata: Mapping[str, Any]
    heldout: HeldOut
    gates: tuple[Gate, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "onnx_path": str(self.onnx_path),
            "uri": self.upload.uri,
            "sha256": self.upload.sha256,
            "size_bytes": self.upload.size,
            "uploaded": not self.upload.reused,
            "version": self.version.version,
            "model_uri": self.version.uri,
            "reused_version": self.reused_version,
            "alias": self.alias,
            "run_id": self.version.run_id,
            "heldout_median_error_km": self.heldout.median_error_km,
            "gates": [g.to_dict() for g in self.gates],
        }


@dataclass(frozen=True)
class PublishResult:
    """Everything a publish run made and measured; ``published[0]`` is the fp32 model."""

    name: str
    checkpoint_sha256: str
    published: tuple[PublishedModel, ...]
    validation: ValidationResult
    parity: ParityResult
    variants: tuple[VariantResult, ...]
    benchmark: BenchmarkResult | None
    heldout: HeldOut
    steps: tuple[StepRecord, ...]
    report: ReportPaths | None

    @property
    def primary(self) -> PublishedModel:
        return self.published[0]

    def speedup(self, batch_size: int = 1) -> float | None:
        """ONNX Runtime fp32 vs PyTorch eager at ``batch_size`` (above 1: ONNX is faster)."""
        if self.benchmark is None:
            return None
        return self.benchmark.timing(FP32, batch_size).speedup_vs_pytorch

    def to_dict(self) -> dict[str, object]:
        return {
            "success": True,
            "name": self.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "published": [p.to_dict() for p in self.published],
            "parity_passed": self.parity.passed,
            "speedup_batch1": self.speedup(1),
            "heldout_median_error_km": self.heldout.median_error_km,
            "variants": [v.to_dict() for v in self.variants],
            "steps": [s.to_dict() for s in self.steps],
            "report": str(self.report.html) if self.report else None,
        }


def report_document(result: PublishResult, steps: Sequence[StepRecord]) -> dict[str, Any]:
    """The report's content: model card, steps, parity, latency, throughput, held-out set."""
    primary = result.primary
    meta = primary.metadata
    card = {
        "name": result.name,
        "version": primary.version.version,
        "model_uri": primary.version.uri,
        "stored_at": primary.upload.uri,
        "sha256": primary.upload.sha256,
        "size_bytes": primary.upload.size,
        "backbone": meta.get("backbone"),
        "parameters": meta.get("parameters"),
        "inputs": meta.get("inputs"),
        "outputs": meta.get("outputs"),
        "opset": meta.get("opset_version"),
        "producer": meta.get("producer"),
        "checkpoint_sha256": result.checkpoint_sha256,
        "training_run_id": meta.get("run_id"),
        "lineage_run_id": primary.version.run_id,
        "variants": [p.variant for p in result.published],
    }
    document: dict[str, Any] = {
        "success": True,
        "model_card": card,
        "steps": [s.to_dict() for s in steps],
        "parity": [d.to_dict() for d in result.parity.diffs],
        "parity_task": result.parity.task.to_dict() if result.parity.task else None,
        "variants": [v.to_dict() for v in result.variants],
        "heldout": result.heldout.to_dict(),
        # The decision: every gate of every published variant, with threshold, value, verdict.
        "gates": [
            {"variant": p.variant, "alias": p.alias, **g.to_dict()}
            for p in result.published
            for g in p.gates
        ],
    }
    if result.benchmark is not None:
        bench = result.benchmark
        document["latency_ms"] = {t.engine: {} for t in bench.timings}
        document["throughput"] = {t.engine: {} for t in bench.timings}
        for t in bench.timings:
            document["latency_ms"][t.engine][str(t.batch_size)] = list(t.samples_ms)
            document["throughput"][t.engine][str(t.batch_size)] = t.throughput
        document["benchmark"] = [
            {
                "engine": t.engine,
                "batch": t.batch_size,
                "p50_ms": t.p50_ms,
                "p90_ms": t.p90_ms,
                "p99_ms": t.p99_ms,
                "samples_per_s": t.throughput,
                "speedup_vs_pytorch": t.speedup_vs_pytorch,
            }
            for t in bench.timings
        ]
        document["environment"] = bench.to_dict()["environment"]
        # A speed-up measured while other work held the cores is labelled, never a plain figure.
        document["machine_busy"] = is_busy(bench.environment)
    return document


def bench_tags(timings: BenchmarkResult | None, variant: str) -> dict[str, str]:
    """Batch-1 latency and speed-up as version tags, labelled when the machine was busy."""
    try:
        timing = timings.timing(variant, 1) if timings is not None else None
    except KeyError:  # not timed at batch 1
        timing = None
    if timings is None or timing is None or timing.speedup_vs_pytorch is None:
        return {}
    return {
        "bench.p50_ms_batch1": f"{timing.p50_ms:.3f}",
        "bench.speedup_batch1": f"{timing.speedup_vs_pytorch:.2f}",
        "bench.machine_busy": str(is_busy(timings.environment)).lower(),
    }


def timing_summary(timings: BenchmarkResult | None, variant: str) -> dict[str, object] | None:
    """p50 latencies of this variant and PyTorch, per batch size, for the metadata record."""
    if timings is None:
        return None
    rows = [t for t in timings.timings if t.engine in (variant, PYTORCH)]
    return {
        "threads": timings.threads,
        "machine_busy": is_busy(timings.environment),
        "p50_ms": {f"{t.engine}@{t.batch_size}": round(t.p50_ms, 3) for t in rows},
        "speedup_vs_pytorch": {
            str(t.batch_size): t.speedup_vs_pytorch for t in rows if t.engine == variant
        },
    }
