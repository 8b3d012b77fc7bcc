"""The demo: train a small model, publish it, load it back by alias, predict held-out samples."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from heimdall.config import DEFAULT_ALIAS, Settings, load_settings
from heimdall.data import HELDOUT_SEED
from heimdall.errors import InputError
from heimdall.heldout import HELDOUT_SAMPLES
from heimdall.inference import evaluate_heldout
from heimdall.pipeline import BytesProgress, StepProgress, publish
from heimdall.registry import check_registration
from heimdall.results import PublishResult
from heimdall.train import TrainConfig, TrainResult, train

DEMO_SEED = HELDOUT_SEED + 1  # demo predictions use samples no gate and no training run has seen
# Seconds of timing per batch size: half of publish's default. The demo's speed-up figure is
# a first look; `heimdall bench` measures properly. Every gate still runs in full.
DEMO_BENCH_BUDGET_S = 1.0


def train_with_settings(
    config: TrainConfig,
    output: Path,
    settings: Settings,
    *,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> TrainResult:
    """Train and log the run to the tracking store and experiment that ``settings`` name."""
    return train(
        config,
        output,
        tracking_uri=settings.resolved_tracking_uri,
        experiment_name=settings.experiment_name,
        artifact_location=settings.experiment_artifact_location,
        progress=progress,
        timeout_s=settings.mlflow_timeout_s,
    )


@dataclass(frozen=True)
class DemoResult:
    """What ``heimdall demo`` did, end to end."""

    training: TrainResult
    publish: PublishResult
    served_uri: str
    served_version: str | None
    served_median_error_km: float
    served_samples: int
    seconds: float

    def summary(self) -> dict[str, object]:
        primary = self.publish.primary
        worst = max(d.max_abs for d in self.publish.parity.diffs)
        return {
            "model": self.served_uri,
            "version": self.served_version,
            "stored_at": primary.upload.uri,
            "sha256": primary.upload.sha256,
            "parity": f"passed (max abs diff {worst:.1e} normalized region units)",
            "speedup_batch1": _rounded(self.publish.speedup(1)),
            "median_error_km": round(self.served_median_error_km, 1),
            "baseline_median_error_km": round(self.publish.heldout.baseline_median_error_km, 1),
            "gates": {g.name: "passed" if g.passed else "failed" for g in primary.gates},
            "report": str(self.publish.report.html) if self.publish.report else None,
            "seconds": round(self.seconds, 1),
        }

    def to_dict(self) -> dict[str, object]:
        return {"summary": self.summary(), "publish": self.publish.to_dict()}


def run_demo(
    *,
    settings: Settings | None = None,
    config: TrainConfig | None = None,
    alias: str = DEFAULT_ALIAS,
    samples: int = HELDOUT_SAMPLES,
    train_progress: Callable[[int, int, float, float], None] | None = None,
    progress: StepProgress | None = None,
    upload_progress: BytesProgress | None = None,
) -> DemoResult:
    """Train the demo model, publish it, load it back by alias and predict held-out samples."""
    if samples < 1:
        raise InputError(f"samples must be at least 1, got {samples}")
    started = time.perf_counter()
    settings = settings or load_settings()
    config = config or TrainConfig()
    check_registration(settings.model_name, alias)
    checkpoint = demo_checkpoint(settings, config.backbone)
    trained = train_with_settings(config, checkpoint, settings, progress=train_progress)
    published = publish(
        trained.checkpoint,
        settings=settings,
        alias=alias,
        create_bucket=True,
        bench_budget_s=DEMO_BENCH_BUDGET_S,
        progress=progress,
        upload_progress=upload_progress,
    )
    uri = f"models:/{published.name}@{alias}"
    served = evaluate_heldout(uri, samples=samples, seed=DEMO_SEED, settings=settings)
    return DemoResult(
        training=trained,
        publish=published,
        served_uri=uri,
        served_version=served.version,
        served_median_error_km=served.median_error_km,
        served_samples=served.samples,
        seconds=time.perf_counter() - started,
    )


def demo_checkpoint(settings: Settings, backbone: str) -> Path:
    """A checkpoint path of its own for one demo run: two demos in one data dir (at once, or
    one after the other) never overwrite each other's file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"demo-{backbone}-{stamp}-{secrets.token_hex(3)}.safetensors"
    return settings.resolved_data_dir / "checkpoints" / name


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
