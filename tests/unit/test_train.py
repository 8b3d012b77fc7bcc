"""Tests for heimdall.train: one small training run, its checkpoint and its MLflow record."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from heimdall import train as train_module
from heimdall.checkpoint import load_checkpoint
from heimdall.data import RFScenario, generate, haversine_km
from heimdall.errors import InputError
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.train import (
    TrainConfig,
    TrainResult,
    check_training_memory,
    evaluate_km,
    train,
)

# Small enough for a unit test on one CPU thread, trained enough to sit far below the test's
# bound (half the centre baseline) on any x86 CPU: training trajectories differ between
# instruction sets. With TrainConfig's dropout 0 and gradient clipping, three epochs reached
# 0.26-0.31 of the baseline on seeds 0 and 1 (validation and fresh set, AVX-512 and AVX2) in
# 33 CPU seconds; four epochs with dropout 0.2 and no clipping, the previous recipe, reached
# 0.30-0.34 in 42. `python -m benchmarks.train_margin` measures it on any machine.
FAST = TrainConfig(
    backbone="atto",
    train_samples=2048,
    val_samples=256,
    epochs=3,
    batch_size=32,
    learning_rate=2e-3,
    seed=0,
)
EXPERIMENT = "heimdall-unit-test"


@dataclass(frozen=True)
class Trained:
    result: TrainResult
    tracking_uri: str
    progress: list[tuple[int, int, float, float]]
    env_before: str | None
    env_after: str | None
    mlflow_uri_before: str
    mlflow_uri_after: str


@pytest.fixture(scope="module")
def trained(one_torch_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Train once with MLflow tracking into a scratch SQLite store; every test reads this run."""
    directory = tmp_path_factory.mktemp("train")
    tracking_uri = f"sqlite:///{directory}/mlflow.db"
    progress: list[tuple[int, int, float, float]] = []
    with pytest.MonkeyPatch.context() as mp:
        # Whatever train() does to process-wide MLflow state must not reach later tests.
        mp.chdir(directory)
        # setenv first so the context records, and later restores, the caller's value or absence.
        mp.setenv("MLFLOW_TRACKING_URI", "")
        mp.delenv("MLFLOW_TRACKING_URI")
        mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow_uri_before = mlflow.get_tracking_uri()
        result = train(
            FAST,
            directory / "model.safetensors",
            tracking_uri=tracking_uri,
            experiment_name=EXPERIMENT,
            progress=lambda *args: progress.append(args),
        )
        env_after = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow_uri_after = mlflow.get_tracking_uri()
    return Trained(
        result=result,
        tracking_uri=tracking_uri,
        progress=progress,
        env_before=env_before,
        env_after=env_after,
        mlflow_uri_before=mlflow_uri_before,
        mlflow_uri_after=mlflow_uri_after,
    )


@pytest.fixture(scope="module")
def client(trained: Trained) -> MlflowClient:
    return MlflowClient(tracking_uri=trained.tracking_uri)


def test_training_halves_the_centre_baseline_error_on_held_out_data(trained: Trained) -> None:
    result = trained.result
    assert result.median_error_km <= 0.5 * result.baseline_median_error_km


def test_saved_checkpoint_halves_the_centre_baseline_error_on_fresh_data(
    trained: Trained,
) -> None:
    model = load_checkpoint(trained.result.checkpoint).model
    x, y = generate(256, seed=424_242)
    center = np.broadcast_to(np.asarray(RFScenario().center), y.shape)
    baseline_km = np.median(haversine_km(center, y.astype(np.float64)))
    assert np.median(evaluate_km(model, x, y)) <= 0.5 * baseline_km


def test_reported_error_is_the_best_epochs_validation_error(trained: Trained) -> None:
    assert trained.result.median_error_km == min(km for *_, km in trained.progress)


def test_progress_is_reported_once_per_epoch(trained: Trained) -> None:
    assert [(epoch, total) for epoch, total, *_ in trained.progress] == [
        (epoch, FAST.epochs) for epoch in range(1, FAST.epochs + 1)
    ]
    assert trained.result.epochs == FAST.epochs


def test_checkpoint_file_is_written_with_its_sha256(trained: Trained) -> None:
    path = trained.result.checkpoint
    assert trained.result.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_records_the_mlflow_run_id(trained: Trained) -> None:
    assert trained.result.run_id
    assert load_checkpoint(trained.result.checkpoint).training_run_id == trained.result.run_id


def test_checkpoint_records_backbone_training_dropout_and_region_normalization(
    trained: Trained,
) -> None:
    config = load_checkpoint(trained.result.checkpoint).config
    scenario = RFScenario()
    assert config.backbone == FAST.backbone
    assert config.dropout == FAST.dropout
    assert config.center == pytest.approx(scenario.center)
    assert config.scale == pytest.approx(scenario.scale)


def test_mlflow_run_holds_the_training_params(trained: Trained, client: MlflowClient) -> None:
    params = client.get_run(trained.result.run_id).data.params
    for key, value in asdict(FAST).items():
        assert params[key] == str(value)


def test_mlflow_run_holds_per_epoch_validation_metrics(
    trained: Trained, client: MlflowClient
) -> None:
    history = sorted(
        client.get_metric_history(trained.result.run_id, "val_median_km"), key=lambda m: m.step
    )
    assert [m.step for m in history] == [epoch for epoch, *_ in trained.progress]
    assert [m.value for m in history] == pytest.approx([km for *_, km in trained.progress])
    losses = client.get_metric_history(trained.result.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(1, FAST.epochs + 1))


def test_mlflow_run_records_best_error_and_checkpoint_hash(
    trained: Trained, client: MlflowClient
) -> None:
    run = client.get_run(trained.result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_median_km"] == pytest.approx(trained.result.median_error_km)
    assert run.data.tags["checkpoint_sha256"] == trained.result.checkpoint_sha256


def test_mlflow_run_is_filed_under_the_requested_experiment(
    trained: Trained, client: MlflowClient
) -> None:
    run = client.get_run(trained.result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT


def test_training_leaves_process_wide_tracking_uri_as_it_found_it(trained: Trained) -> None:
    # mlflow.set_tracking_uri() also writes os.environ["MLFLOW_TRACKING_URI"]: a later
    # Settings() in the same process would silently pick up this run's store.
    assert trained.env_after == trained.env_before, "train() changed MLFLOW_TRACKING_URI"
    assert trained.mlflow_uri_after == trained.mlflow_uri_before, "train() changed MLflow's URI"


def test_training_without_tracking_uri_logs_nowhere_and_records_no_run_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TrainConfig(train_samples=8, val_samples=4, epochs=1, batch_size=4)
    result = train(config, tmp_path / "out" / "model.safetensors")
    assert result.run_id is None
    assert load_checkpoint(result.checkpoint).training_run_id is None
    assert list(workdir.iterdir()) == []


def test_training_that_fails_marks_its_mlflow_run_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = TrainConfig(train_samples=8, val_samples=4, epochs=2, batch_size=4)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "model.safetensors", tracking_uri=tracking_uri, progress=interrupt)
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("heimdall-localization").experiment_id]
    )
    assert [run.info.status for run in runs] == ["FAILED"]
    assert not (tmp_path / "model.safetensors").exists()


def test_evaluate_km_is_the_distance_from_each_prediction_to_its_label() -> None:
    # A position head that always answers zero puts every prediction at the region centre.
    scenario = RFScenario()
    model = LocalizationNet(ModelConfig(center=scenario.center, scale=scenario.scale))
    with torch.no_grad():
        model.position_head[-1].weight.zero_()
        model.position_head[-1].bias.zero_()
    x, y = generate(6, seed=3)
    center = np.broadcast_to(np.asarray(scenario.center), y.shape)
    np.testing.assert_allclose(
        evaluate_km(model, x, y), haversine_km(center, y.astype(np.float64)), rtol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"train_samples": 0},
        {"val_samples": 0},
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"learning_rate": -1e-3},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"clip_grad_norm": 0.0},
    ],
)
def test_train_config_rejects_values_that_cannot_train(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError):
        TrainConfig(**kwargs)


def test_an_unreachable_tracking_server_is_a_registry_error_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heimdall.errors import RegistryError
    from tests.fixtures.process import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://user:pw-9c1e@127.0.0.1:{free_port()}"
    config = TrainConfig(train_samples=8, val_samples=8, epochs=1, batch_size=4)

    with pytest.raises(RegistryError, match="cannot start an MLflow run") as failure:
        train(config, tmp_path / "ckpt.safetensors", tracking_uri=uri)

    assert "pw-9c1e" not in str(failure.value)
    assert not (tmp_path / "ckpt.safetensors").exists()


def test_training_on_more_samples_than_memory_holds_is_refused_before_generating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_data(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the data was generated")

    monkeypatch.setattr(train_module, "generate", no_data)
    with pytest.raises(InputError, match=r"^training on 100000000 \+ 512 samples needs about"):
        train(TrainConfig(train_samples=10**8), tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_the_training_memory_estimate_counts_both_sets_at_96_kib_a_sample() -> None:
    config = TrainConfig(train_samples=1000, val_samples=24)

    with pytest.raises(InputError, match=r"needs about 96\.0 MiB \(96 KiB a sample"):
        check_training_memory(config, available=95 * 2**20)
    check_training_memory(config, available=97 * 2**20)
