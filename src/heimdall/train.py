"""Train LocalizationNet on synthetic RF data with a Gaussian negative log-likelihood loss."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog
import torch
from torch import nn

from heimdall.checkpoint import load_torchvision_weights, save_checkpoint
from heimdall.config import MLFLOW_ENVIRONMENT, QUIET_MLFLOW, redact_uri
from heimdall.data import SAMPLE_BYTES, RFScenario, generate, haversine_km
from heimdall.errors import InputError, RegistryError
from heimdall.machine import check_memory, memory_errors
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.tracking import open_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = structlog.get_logger(__name__)

# Called after each epoch with (epoch, epochs, train_loss, val_median_km).
Progress = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the demo's.

    Four epochs on 3072 samples (one-cycle schedule, no dropout, gradient norm clipped at 1)
    reach 0.24-0.26 of the centre baseline's held-out median error on seeds 0-2, with AVX-512
    and AVX2, on one thread and two; the previous defaults (six epochs, dropout 0.2, no
    clipping) reached 0.22-0.25 at 1.5 times the cost. ``python -m benchmarks.demo_time``
    measures the demo.
    """

    backbone: str = "atto"
    train_samples: int = 3072
    val_samples: int = 512
    epochs: int = 4
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    dropout: float = 0.0  # in the heads, while training (inference never drops)
    clip_grad_norm: float | None = 1.0  # the high-lr phase diverges less with it
    seed: int = 0
    threads: int | None = None  # PyTorch's intra-op threads while training; None: its default
    backbone_weights: Path | None = None  # torchvision convnext_* ImageNet state dict, by path

    def __post_init__(self) -> None:
        for name in ("train_samples", "val_samples", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1")
        if self.learning_rate <= 0:
            raise InputError("learning_rate must be positive")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise InputError("clip_grad_norm must be positive (or None: no clipping)")
        if not 0 <= self.dropout < 1:
            raise InputError("dropout must be at least 0 and below 1")


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    checkpoint_sha256: str
    run_id: str | None
    median_error_km: float
    baseline_median_error_km: float
    seconds: float
    epochs: int
    data_seconds: float = 0.0  # of ``seconds``: generating the training and validation sets


def check_training_memory(config: TrainConfig, *, available: int | None = None) -> None:
    """Refuse now a training and validation set that would not fit in memory.

    Both sets stay in memory while training; the batches and the model are small next to them.
    """
    check_memory(
        f"training on {config.train_samples} + {config.val_samples} samples",
        config.train_samples + config.val_samples,
        SAMPLE_BYTES,
        fix="use fewer samples (--samples)",
        available=available,
    )


def evaluate_km(
    model: LocalizationNet, x: np.ndarray, y: np.ndarray, batch: int = 256
) -> np.ndarray:
    """Per-sample localization error in km of ``model`` on features ``x`` with labels ``y``."""
    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            preds.append(model(torch.from_numpy(x[i : i + batch]))[0].numpy())
    return haversine_km(np.concatenate(preds).astype(np.float64), y.astype(np.float64))


@dataclass(frozen=True)
class _Run:
    """One MLflow run written through its own client: no process-wide MLflow state changes."""

    client: MlflowClient
    run_id: str

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment_name: str,
        artifact_location: str | None,
        run_name: str,
        timeout_s: float,
    ) -> _Run:
        # The first use of a SQLite store creates it under a lock (concurrent first uses race).
        client = open_client(tracking_uri, None, timeout_s=timeout_s)
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(experiment_name, artifact_location=artifact_location)
        )
        return cls(client, client.create_run(experiment_id, run_name=run_name).info.run_id)

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def end(self, status: str) -> None:
        with MLFLOW_ENVIRONMENT.applied(QUIET_MLFLOW):
            self.client.set_terminated(self.run_id, status=status)


def train(
    config: TrainConfig,
    output: Path,
    scenario: RFScenario | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "heimdall-localization",
    artifact_location: str | None = None,
    progress: Progress | None = None,
    timeout_s: float = 30.0,
) -> TrainResult:
    """Train, keep the epoch with the lowest validation median error, save it to ``output``.

    With ``tracking_uri`` set (as MLflow takes it: ``Settings.resolved_tracking_uri``), params
    and per-epoch metrics go to an MLflow run whose id is written into the checkpoint; a new
    experiment keeps its artifacts at ``artifact_location`` (``None``: MLflow's default, which
    for a database store is ``./mlruns`` in the working directory).
    """
    check_training_memory(config)
    scenario = scenario or RFScenario()
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    with memory_errors("generating the training data", "use fewer samples (--samples)"):
        x_train, y_train = generate(config.train_samples, seed=config.seed, scenario=scenario)
        x_val, y_val = generate(config.val_samples, seed=config.seed + 1_000_003, scenario=scenario)
    data_seconds = time.perf_counter() - start
    center, scale = np.asarray(scenario.center), np.asarray(scenario.scale)
    t_train = torch.from_numpy(((y_train - center) / scale).astype(np.float32))
    x_train_t = torch.from_numpy(x_train)
    baseline = float(np.median(haversine_km(np.broadcast_to(center, y_val.shape), y_val)))

    model = LocalizationNet(
        ModelConfig(
            backbone=config.backbone,
            center=scenario.center,
            scale=scenario.scale,
            dropout=config.dropout,
        )
    )
    if config.backbone_weights is not None:
        load_torchvision_weights(model.backbone, config.backbone_weights)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps = config.epochs * ((config.train_samples + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=steps
    )
    loss_fn = nn.GaussianNLLLoss()

    run = None
    if tracking_uri:
        try:
            run = _Run.start(
                tracking_uri,
                experiment_name,
                artifact_location,
                f"train-{config.backbone}",
                timeout_s,
            )
        except Exception as exc:  # MLflow raises its own and SQLAlchemy's errors
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
            raise RegistryError(
                f"cannot start an MLflow run at {redact_uri(tracking_uri)}: {redact_uri(first)}; "
                "check MLFLOW_TRACKING_URI (or leave it unset for the embedded store)"
            ) from exc

    status = "FAILED"
    best_km, best_state = float("inf"), None
    generator = torch.Generator().manual_seed(config.seed)
    try:
        if run is not None:
            run.log_params({**asdict(config), "baseline_median_km": round(baseline, 3)})
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(len(x_train_t), generator=generator)
            total, count = 0.0, 0
            for i in range(0, len(order), config.batch_size):
                idx = order[i : i + config.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                pos, sigma = model.forward_normalized(x_train_t[idx])
                loss = loss_fn(pos, t_train[idx], sigma**2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            median_km = float(np.median(evaluate_km(model, x_val, y_val)))
            train_loss = total / max(count, 1)
            log.info(
                "epoch",
                epoch=epoch,
                train_loss=round(train_loss, 4),
                val_median_km=round(median_km, 2),
            )
            if run is not None:
                run.log_metrics({"train_loss": train_loss, "val_median_km": median_km}, step=epoch)
            if median_km < best_km:
                best_km = median_km
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if progress:
                progress(epoch, config.epochs, train_loss, median_km)
        assert best_state is not None
        model.load_state_dict(best_state)
        model.eval()
        sha = save_checkpoint(model, output, training_run_id=run.run_id if run else None)
        seconds = time.perf_counter() - start
        if run is not None:
            run.log_metrics({"best_val_median_km": best_km, "train_seconds": seconds})
            run.set_tags({"checkpoint_sha256": sha, "backbone": config.backbone})
        status = "FINISHED"
    finally:
        if run is not None:
            run.end(status)
    return TrainResult(
        checkpoint=Path(output),
        checkpoint_sha256=sha,
        run_id=run.run_id if run else None,
        median_error_km=best_km,
        baseline_median_error_km=baseline,
        seconds=seconds,
        epochs=config.epochs,
        data_seconds=data_seconds,
    )
