"""heimdall.legacy: the seed's names, argument order and dict shapes over the typed library."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import onnx
import pytest
import torch
from mlflow import MlflowClient

import heimdall
from heimdall import legacy
from heimdall.bench import BenchmarkResult, benchmark
from heimdall.checkpoint import LoadedCheckpoint
from heimdall.config import Settings
from heimdall.errors import InputError
from heimdall.export import ExportResult
from heimdall.export import export_to_onnx as typed_export_to_onnx
from heimdall.machine import is_busy
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.storage import LocalStore, S3Store
from heimdall.validate import get_model_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENDPOINT = "http://127.0.0.1:9"  # nothing listens: these tests must not reach a server
# The seed's ONNXExporter methods and parameters (001_*.txt, 004_*.txt), in order.
SEED_METHODS = {
    "__init__": ["s3_client", "mlflow_tracker"],
    "export_to_onnx": ["model", "output_path", "opset_version", "do_constant_folding"],
    "validate_onnx_model": ["onnx_path"],
    "test_onnx_inference": ["onnx_path", "pytorch_model", "num_batches", "batch_size", "tolerance"],
    "upload_to_minio": ["onnx_path", "bucket_name", "object_name"],
    "get_model_metadata": ["onnx_path", "pytorch_model", "run_id", "inference_metrics"],
    "register_with_mlflow": ["model_name", "s3_uri", "metadata", "stage"],
}
SEED_WORKFLOW = [
    "pytorch_model",
    "run_id",
    "s3_client",
    "mlflow_tracker",
    "output_dir",
    "model_name",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No heimdall/MLflow/AWS settings from the developer's shell; a scratch data directory."""
    for name in list(os.environ):
        if name.startswith(("HEIMDALL_", "MLFLOW_", "AWS_")) and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path / "data"))
    # botocore would otherwise look for credentials in ~/.aws and the EC2 metadata service.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def no_ambient_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3 also finds keys in the environment and in ~/.aws: none may leak into these tests."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def s3_client(**credentials: str) -> object:
    # A session of its own: boto3's default session caches the first credentials it resolves,
    # and other tests' MLflow S3 calls may have resolved some.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=ENDPOINT, region_name="eu-west-1", **credentials)


def keyed_client() -> object:
    return s3_client(aws_access_key_id="AKID", aws_secret_access_key="SECRET-KEY")


def parameters(function: object) -> list[str]:
    names = list(inspect.signature(function).parameters)  # type: ignore[arg-type]
    return [n for n in names if n != "self"]


# --- names and argument order -----------------------------------------------------------------


def test_exporter_has_the_seeds_seven_methods_with_its_parameters_in_order() -> None:
    for method, expected in SEED_METHODS.items():
        assert parameters(getattr(legacy.ONNXExporter, method))[: len(expected)] == expected


def test_workflow_takes_the_seeds_parameters_in_order_and_is_the_packages_export() -> None:
    assert parameters(legacy.export_and_register_model) == SEED_WORKFLOW
    assert heimdall.export_and_register_model is legacy.export_and_register_model
    assert heimdall.ONNXExporter is legacy.ONNXExporter


def test_export_to_onnx_returns_the_path_the_seed_uses(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    target = tmp_path / "model.onnx"

    onnx_path = legacy.ONNXExporter(LocalStore(tmp_path / "objects")).export_to_onnx(
        atto_checkpoint.model, target
    )

    assert isinstance(onnx_path, Path)
    assert onnx_path == target and onnx_path.is_file()


def test_export_to_onnx_takes_opset_and_constant_folding_positionally(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    seed = legacy.export_to_onnx(atto_checkpoint.model, tmp_path / "seed.onnx", 14, True)
    typed = typed_export_to_onnx(atto_checkpoint.model, tmp_path / "typed.onnx", 14, True)

    opsets = [o.version for o in onnx.load(str(seed)).opset_import if o.domain in ("", "ai.onnx")]
    assert opsets == [14]
    assert isinstance(typed, ExportResult) and typed.opset_version == 14


def test_validate_onnx_model_result_reads_as_the_seeds_dict(atto_onnx: ExportResult) -> None:
    model_info = legacy.validate_onnx_model(atto_onnx.path)

    assert model_info["inputs"][0]["name"] == "mel_spectrogram"
    assert model_info["inputs"][0]["shape"] == ["batch_size", 3, 128, 32]
    assert [o["name"] for o in model_info["outputs"]] == ["positions", "uncertainties"]
    assert model_info["opset_version"] == 17


def test_get_model_metadata_stores_the_fourth_argument_as_inference_metrics(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    metrics = {"speedup": 1.7, "mae": 1e-7, "parity": {"passed": True}}

    metadata = legacy.get_model_metadata(atto_onnx.path, atto_checkpoint.model, "run-1", metrics)

    assert metadata["inference_metrics"] == metrics
    assert metadata["checkpoint_sha256"] is None
    assert metadata["parity"] == {"passed": True}  # what the registry records as verification
    assert metadata["run_id"] == "run-1"


def test_typed_get_model_metadata_refuses_a_fourth_positional_argument(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    with pytest.raises(TypeError):
        get_model_metadata(atto_onnx.path, atto_checkpoint.model, "run-1", {"speedup": 2.0})  # type: ignore[misc, arg-type]


# --- test_onnx_inference ----------------------------------------------------------------------


def test_onnx_inference_returns_accuracy_timings_and_speedup(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    metrics = legacy.test_onnx_inference(
        atto_onnx.path, atto_checkpoint.model, 2, 4, 1e-5, budget_s=0.2
    )

    assert metrics["mae"] <= 1e-5 and metrics["max_abs_diff"] >= metrics["mae"]
    assert metrics["onnx_inference_ms"] > 0 and metrics["pytorch_inference_ms"] > 0
    assert metrics["speedup"] > 0  # median of paired rounds: not exactly the ratio of medians
    assert (metrics["num_batches"], metrics["batch_size"], metrics["tolerance"]) == (2, 4, 1e-5)
    assert metrics["parity"]["passed"] is True


def test_onnx_inference_speedup_is_benchs_interleaved_measurement_with_its_busy_flag(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[BenchmarkResult] = []

    def spy(*args: Any, **kwargs: Any) -> BenchmarkResult:
        measured.append(benchmark(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(legacy, "benchmark", spy)
    metrics = legacy.test_onnx_inference(
        atto_onnx.path, atto_checkpoint.model, 3, 2, 1e-5, budget_s=0.2
    )

    assert len(measured) == 1  # one measurement: no second timing loop of its own
    timing = measured[0].timing("onnx", 2)
    assert metrics["speedup"] == timing.speedup_vs_pytorch  # median of paired rounds
    assert metrics["rounds"] == timing.iterations >= 3
    assert metrics["machine_busy"] is is_busy(measured[0].environment)


def test_onnx_inference_raises_an_assertion_error_past_the_tolerance(
    atto_onnx: ExportResult,
) -> None:
    torch.manual_seed(123)
    other = LocalizationNet(ModelConfig(backbone="atto"))

    with pytest.raises(AssertionError, match="tolerance"):
        legacy.test_onnx_inference(atto_onnx.path, other, 1, 2, 1e-5)


def test_onnx_inference_is_not_collected_as_a_test_where_it_is_imported() -> None:
    assert legacy.test_onnx_inference.__test__ is False  # type: ignore[attr-defined]


# --- the clients the seed passes --------------------------------------------------------------


def test_a_boto3_client_opens_an_s3_store_for_its_endpoint_and_credentials() -> None:
    settings, store = legacy.open_backends(keyed_client())

    assert isinstance(store, S3Store)
    assert (store.endpoint_url, store.region) == (ENDPOINT, "eu-west-1")
    assert settings.s3_endpoint_url == ENDPOINT
    assert settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None
    assert settings.s3_access_key_id.get_secret_value() == "AKID"
    assert settings.s3_secret_access_key.get_secret_value() == "SECRET-KEY"


def test_an_mlflow_client_gives_its_tracking_uri(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'tracker.db'}"

    settings, store = legacy.open_backends(None, MlflowClient(tracking_uri=uri))

    assert settings.resolved_tracking_uri == uri
    assert settings.resolved_registry_uri == uri
    assert isinstance(store, LocalStore)


def test_settings_and_object_stores_pass_through(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "mine")
    store = LocalStore(tmp_path / "objects")

    assert legacy.open_backends(store, settings) == (settings, store)


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ((object(), None), "s3_client must be a boto3 S3 client or a heimdall.storage"),
        (("s3://bucket", None), "got str"),
        ((None, object()), "mlflow_tracker must be an mlflow.MlflowClient"),
        ((None, "http://mlflow:5000"), "mlflow_tracker must be"),
    ],
)
def test_unusable_clients_are_refused_naming_the_argument(
    clients: tuple[object, object], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        legacy.open_backends(*clients)


def test_a_boto3_client_of_another_service_is_refused() -> None:
    sqs = boto3.client(
        "sqs", region_name="eu-west-1", aws_access_key_id="a", aws_secret_access_key="b"
    )

    with pytest.raises(InputError, match="boto3 S3 client"):
        legacy.open_backends(sqs)


def test_a_boto3_client_without_credentials_is_refused() -> None:
    with pytest.raises(InputError, match="s3_client has no credentials"):
        legacy.open_backends(s3_client())


def test_a_boto3_client_with_a_session_token_is_refused() -> None:
    client = s3_client(aws_access_key_id="a", aws_secret_access_key="b", aws_session_token="t")

    with pytest.raises(InputError, match="session token"):
        legacy.open_backends(client)


# --- export_and_register_model ----------------------------------------------------------------


@pytest.mark.parametrize(
    "clients",
    [
        lambda: {"s3_client": object()},
        lambda: {"mlflow_tracker": object()},
        lambda: {"s3_client": s3_client()},  # no credentials
    ],
    ids=["object-as-s3-client", "object-as-tracker", "boto3-without-credentials"],
)
def test_workflow_refuses_unusable_clients_in_the_dict_before_any_work(
    clients: Callable[[], dict[str, Any]], atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    result = legacy.export_and_register_model(
        atto_checkpoint.model, "run-1", output_dir=out, **clients()
    )

    assert set(result) >= set(legacy.SEED_RESULT_KEYS)
    assert result["success"] is False
    assert result["error"] and "\n" not in result["error"]
    assert {k: result[k] for k in ("s3_uri", "registration", "inference_metrics")} == dict.fromkeys(
        ("s3_uri", "registration", "inference_metrics")
    )
    assert not out.exists() and not (tmp_path / "data").exists()


def test_workflow_returns_a_dict_when_the_library_raises_something_unexpected(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise AttributeError("'NoneType' object has no attribute 'version'")

    monkeypatch.setattr(legacy.pipeline, "publish", broken)

    result = legacy.export_and_register_model(
        atto_checkpoint.model, None, LocalStore(tmp_path / "objects")
    )

    assert result["success"] is False
    assert result["error"] == "AttributeError: 'NoneType' object has no attribute 'version'"


def test_an_unexpected_failure_keeps_secrets_out_of_the_dict_and_the_log(
    atto_checkpoint: LoadedCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-key-value")

    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError(
            "cannot reach postgresql://heimdall:hunter2pass@db/mlflow with s3cr3t-key-value"
        )

    monkeypatch.setattr(legacy.pipeline, "publish", broken)

    result = legacy.export_and_register_model(
        atto_checkpoint.model, None, LocalStore(tmp_path / "objects")
    )

    out, err = capfd.readouterr()
    assert result["success"] is False
    assert "RuntimeError: cannot reach postgresql://" in result["error"]
    for secret in ("hunter2pass", "s3cr3t-key-value"):
        assert secret not in result["error"]
        assert secret not in out + err
    assert "legacy.export_and_register_failed" in err
