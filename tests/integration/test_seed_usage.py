"""The seed's usage examples (001 "Usage Examples", 003 "Core Methods" and "Usage Example"), run
against SeaweedFS and ``mlflow server``.

Adapted only where the seed names its own deployment: import paths (``src.onnx_export`` is
``heimdall.legacy``, ``src.models.localization_net`` is ``heimdall.model``), the endpoint, file
paths under the test's folder, and the model: an atto LocalizationNet with random weights
(``LocalizationNet(pretrained=True)`` would download ImageNet weights). ``initialize_mlflow``
is the seed's own helper; an ``mlflow.MlflowClient`` for the server stands in for its tracker.
The environment is the deployment's: AWS keys for boto3, the models bucket, and the baseline
gate loosened for an untrained model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from heimdall.legacy import ONNXExporter, export_and_register_model
from heimdall.model import LocalizationNet, ModelConfig
from tests.fixtures.mlflow_server import MlflowBackend

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

MODEL_NAME = "heimdall-localization-v2"  # the seed's
PREFIX = "models/localization/"


@pytest.fixture
def deployment(
    mlflow_server: MlflowBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[MlflowBackend]:
    """The training service's environment, and an active MLflow run on the server."""
    assert mlflow_server.seaweedfs is not None
    for name in list(os.environ):
        if name.startswith(("HEIMDALL_", "MLFLOW_", "AWS_")) and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", mlflow_server.seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", mlflow_server.seaweedfs.secret_key)
    monkeypatch.setenv("HEIMDALL_BUCKET", mlflow_server.bucket)
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HEIMDALL_GATE_BASELINE_FRACTION", "100")  # random weights
    # mlflow.set_tracking_uri sets a module global and the environment; both are put back.
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    with mlflow.start_run():
        yield mlflow_server


def test_the_seeds_usage_examples_run_as_written(
    deployment: MlflowBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deployment.seaweedfs is not None
    torch.manual_seed(0)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save(
        {"model_state_dict": LocalizationNet(ModelConfig(backbone="atto")).state_dict()},
        checkpoints / "best.pt",
    )

    # --- 001 "Basic Export" ---
    s3_client = boto3.client("s3", endpoint_url=deployment.seaweedfs.endpoint_url)
    mlflow_tracker = MlflowClient(tracking_uri=deployment.tracking_uri)
    exporter = ONNXExporter(s3_client, mlflow_tracker)

    model = LocalizationNet(ModelConfig(backbone="atto"))
    checkpoint = torch.load(checkpoints / "best.pt")
    model.load_state_dict(checkpoint["model_state_dict"])

    onnx_path = exporter.export_to_onnx(model, tmp_path / "model.onnx")

    # --- 003 "Core Methods", one after the other ---
    model_info = exporter.validate_onnx_model(onnx_path)
    metrics = exporter.test_onnx_inference(onnx_path, model)
    s3_uri = exporter.upload_to_minio(onnx_path)
    run_id = mlflow.active_run().info.run_id
    metadata = exporter.get_model_metadata(onnx_path, model, run_id, metrics)
    registered = exporter.register_with_mlflow(MODEL_NAME, s3_uri, metadata)

    # --- 001 "Full Workflow" and 003 "Usage Example" ---
    result = export_and_register_model(
        pytorch_model=model,
        run_id=mlflow.active_run().info.run_id,
        s3_client=s3_client,
        mlflow_tracker=mlflow_tracker,
        model_name=MODEL_NAME,
        output_dir=tmp_path / "onnx_exports",
    )

    if result["success"]:
        print("✅ Model exported!")
        print(f"   S3 URI: {result['s3_uri']}")
        print(f"   MLflow Version: {result['registration']['model_version']}")
        print(f"   Speedup: {result['inference_metrics']['speedup']:.2f}x")

    assert result["error"] is None and result["success"] is True
    printed = capsys.readouterr().out
    assert re.search(r"Speedup: \d+\.\d\dx", printed), printed

    assert isinstance(onnx_path, Path) and onnx_path.is_file()
    assert model_info["inputs"][0]["name"] == "mel_spectrogram"
    assert metrics["speedup"] > 0 and metrics["parity"]["passed"] is True
    # A speed-up comes with the flag that says whether it can be trusted.
    assert isinstance(metrics["machine_busy"], bool)
    assert isinstance(result["inference_metrics"]["machine_busy"], bool)
    for uri in (s3_uri, result["s3_uri"]):
        assert uri.startswith(f"s3://{deployment.bucket}/{PREFIX}")
        stored = deployment.seaweedfs.client().head_object(
            Bucket=deployment.bucket, Key=uri.removeprefix(f"s3://{deployment.bucket}/")
        )
        assert stored["ContentLength"] > 0
    assert (registered["model_name"], registered["model_version"]) == (MODEL_NAME, "1")
    assert registered["stage"] == "Staging" and registered["verification"] == "passed"
    assert metadata["run_id"] == run_id and metadata["inference_metrics"] == metrics

    # The workflow's export stamps lineage, so its bytes (and version) are its own.
    version = result["registration"]["model_version"]
    assert version == "2"
    served = mlflow_tracker.get_model_version_by_alias(MODEL_NAME, "staging")
    assert str(served.version) == version
    assert served.run_id == run_id
