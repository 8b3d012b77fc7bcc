"""The registry against a real ``mlflow server`` (PostgreSQL + SeaweedFS) and embedded SQLite."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from structlog.testing import capture_logs

from heimdall import inference, registry
from heimdall.config import Settings
from heimdall.data import generate
from heimdall.errors import RegistryError
from heimdall.export import ExportResult, export_to_onnx
from heimdall.files import sha256_file
from heimdall.inference import LocalizationModel
from heimdall.legacy import register_with_mlflow
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.runtime import RECOMMENDED_SESSION_SETTINGS
from heimdall.storage import ObjectStore, upload_model
from heimdall.validate import get_model_metadata, validate_onnx_model
from tests.fixtures.mlflow_server import MlflowBackend
from tests.fixtures.process import ManagedProcess, free_port, http_ok, unavailable
from tests.integration.test_gates import tamper

pytestmark = pytest.mark.integration

CONCURRENT = 8


@dataclass(frozen=True)
class Export:
    """One atto export, its metadata record and the features to compare predictions on."""

    result: ExportResult
    metadata: dict[str, Any]
    features: np.ndarray
    expected: list[np.ndarray]


@pytest.fixture(scope="module")
def atto(tmp_path_factory: pytest.TempPathFactory) -> Export:
    torch.manual_seed(1)
    model = LocalizationNet(ModelConfig(backbone="atto")).eval()
    path = tmp_path_factory.mktemp("registry-onnx") / "atto.onnx"
    result = export_to_onnx(model, path, checkpoint_sha256="c" * 64)
    metadata = get_model_metadata(path, model, run_id=None, parity={"passed": True})
    features, _ = generate(4, seed=3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Export(result, metadata, features, session.run(None, {"mel_spectrogram": features}))


@pytest.fixture(params=["embedded", "server"])
def backend(request: pytest.FixtureRequest) -> MlflowBackend:
    fixture = "embedded_mlflow" if request.param == "embedded" else "mlflow_server"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name of the test's own, so tests sharing a backend never meet."""
    return f"heimdall-{request.node.name.split('[')[0][5:30]}-{os.urandom(3).hex()}"


def distinct(export: Export, tmp: Path, tag: str) -> Export:
    """The same weights in other bytes (one more metadata property): another sha256."""
    proto = onnx.load(str(export.result.path))
    onnx.helper.set_model_props(
        proto,
        {**{p.key: p.value for p in proto.metadata_props}, "heimdall.test_variant": tag},
    )
    path = tmp / f"{tag}.onnx"
    onnx.save(proto, str(path))
    result = replace(export.result, path=path, sha256=sha256_file(path))
    return replace(export, result=result, metadata={**export.metadata, "sha256": result.sha256})


def upload(store: ObjectStore, backend: MlflowBackend, export: Export, key: str) -> str:
    """Store the export under its own key (an explicit key is never deduplicated)."""
    result = upload_model(export.result.path, store, backend.bucket, key, create_bucket=True)
    return result.uri


def register_uri(
    export: Export,
    uri: str,
    name: str,
    settings: Settings,
    store: ObjectStore,
    passed: bool = True,
) -> registry.RegisteredVersion:
    """Register as publish does: the version, then ``staging`` on it when verification passed."""
    version = registry.register_model(
        uri,
        sha256=export.result.sha256,
        name=name,
        metadata={**export.metadata, "parity": {"passed": passed}},
        settings=settings,
        store=store,
        validator=validate_onnx_model,
    ).version
    if passed:
        registry.set_alias(name, version.version, "staging", settings=settings, store=store)
    return version


def register(
    backend: MlflowBackend, export: Export, name: str, key: str, passed: bool = True
) -> registry.RegisteredVersion:
    store = backend.store()
    uri = upload(store, backend, export, key)
    return register_uri(export, uri, name, backend.settings(), store, passed)


@pytest.fixture
def fluent_mlflow(backend: MlflowBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point MLflow's own API at the backend as a user would, by environment; undone after."""
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    for key, value in backend.env().items():
        monkeypatch.setenv(key, value)


def test_registered_version_is_an_onnx_mlflow_model_equal_to_onnxruntime(
    backend: MlflowBackend,
    atto: Export,
    model_name: str,
    fluent_mlflow: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = backend.store()
    uri = upload(store, backend, atto, f"models/localization/{model_name}.onnx")
    registered = register_with_mlflow(
        model_name, uri, atto.metadata, settings=backend.settings(), store=store
    )

    assert registered["model_version"] == "1"
    assert registered["stage"] == "Staging"
    assert registered["aliases"] == ["staging"]
    assert registered["source"].startswith(uri.removesuffix(".onnx") + "/")
    tags = registered["tags"]
    assert {k: tags[k] for k in ("framework", "format", "sha256", "onnx_uri", "verification")} == {
        "framework": "pytorch",
        "format": "onnx",
        "sha256": atto.result.sha256,
        "onnx_uri": uri,
        "verification": "passed",
    }
    assert tags["opset"] == str(atto.result.opset_version)
    assert tags["checkpoint_sha256"] == "c" * 64
    assert tags["heimdall_version"]

    client = mlflow.MlflowClient()
    run = client.get_run(registered["run_id"])
    assert run.data.tags["heimdall.kind"] == "export"
    logged = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id,
                artifact_path=f"onnx_metadata/{atto.result.sha256[:12]}.json",
            )
        ).read_text()
    )
    assert logged["sha256"] == atto.result.sha256

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@staging"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"onnx", "python_function"}
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {
            "name": "mel_spectrogram",
            "type": "tensor",
            "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 128, 32]},
        }
    ]
    assert [o["name"] for o in json.loads(mlmodel["signature"]["outputs"])] == [
        "positions",
        "uncertainties",
    ]
    assert (local / "input_example.json").is_file()

    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_name}@staging")
    predicted = pyfunc.predict(atto.features)
    assert np.abs(predicted["positions"] - atto.expected[0]).max() <= 1e-6
    assert np.abs(predicted["uncertainties"] - atto.expected[1]).max() <= 1e-6

    hashed: list[Path] = []  # local files hashed after their download
    real_sha256_file = inference.sha256_file
    monkeypatch.setattr(
        inference, "sha256_file", lambda path: hashed.append(path) or real_sha256_file(path)
    )
    loaded = LocalizationModel.load(f"models:/{model_name}@staging", settings=backend.settings())
    assert loaded.version == "1" and loaded.sha256 == atto.result.sha256
    assert np.abs(loaded.predict(atto.features).positions - atto.expected[0]).max() <= 1e-6
    for direct in (uri, registered["source"]):  # the upload itself, the MLflow model directory
        loaded = LocalizationModel.load(direct, settings=backend.settings())
        assert loaded.sha256 == atto.result.sha256
        assert np.abs(loaded.predict(atto.features).positions - atto.expected[0]).max() <= 1e-6
    if uri.startswith("s3://"):
        assert hashed == []  # each download was hashed as its bytes arrived


def test_direct_postgresql_tracking_uri_registers_and_loads(
    mlflow_server: MlflowBackend, atto: Export, model_name: str
) -> None:
    """The original design's MLFLOW_TRACKING_URI=postgresql://… with MLFLOW_ARTIFACT_URI=s3://…."""
    assert mlflow_server.seaweedfs is not None and mlflow_server.backend_store_uri is not None
    settings = mlflow_server.settings(
        tracking_uri=mlflow_server.backend_store_uri,
        artifact_uri=f"s3://{mlflow_server.bucket}/mlflow-direct",
        experiment_name=f"direct-{model_name}",
    )
    store = mlflow_server.store()
    uri = upload(store, mlflow_server, atto, f"models/localization/{model_name}.onnx")

    version = register_uri(atto, uri, model_name, settings, store)

    assert version.status == "READY"
    run_artifacts = mlflow_server.seaweedfs.client().list_objects_v2(
        Bucket=mlflow_server.bucket, Prefix="mlflow-direct/"
    )
    assert any(o["Key"].endswith(".json") for o in run_artifacts.get("Contents", []))
    loaded = LocalizationModel.load(f"models:/{model_name}@staging", settings=settings)
    assert np.abs(loaded.predict(atto.features).positions - atto.expected[0]).max() <= 1e-6


def test_mlflow_models_serve_answers_invocations(
    mlflow_server: MlflowBackend, atto: Export, model_name: str
) -> None:
    register(mlflow_server, atto, model_name, f"models/localization/{model_name}.onnx")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    server = ManagedProcess(
        "mlflow-models-serve",
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{model_name}@staging",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**mlflow_server.env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    ).start()
    try:
        if not server.wait_until(http_ok(f"http://127.0.0.1:{port}/ping"), timeout=120):
            unavailable(f"mlflow models serve did not start:\n{server.log_tail()}")
        body = json.dumps({"inputs": atto.features[:3].tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        server.stop(keep_log=sys.exc_info()[0] is not None)  # the log only when it failed

    positions = np.asarray(answer["predictions"]["positions"])
    uncertainties = np.asarray(answer["predictions"]["uncertainties"])
    assert positions.shape == (3, 2) and uncertainties.shape == (3, 2)
    assert np.abs(positions - atto.expected[0][:3]).max() <= 1e-5


def test_promote_refuses_failing_gates_and_rollback_restores_previous_holder(
    backend: MlflowBackend, atto: Export, model_name: str, tmp_path: Path
) -> None:
    settings, store = backend.settings(), backend.store()
    prefix = f"models/localization/{model_name}"
    v1, v2, v3, v4 = (distinct(atto, tmp_path, str(i)) for i in range(1, 5))
    v1 = register(backend, v1, model_name, f"{prefix}-1.onnx")
    v2 = register(backend, v2, model_name, f"{prefix}-2.onnx")
    unverified = register(backend, v3, model_name, f"{prefix}-3.onnx", passed=False)
    altered = register(backend, v4, model_name, f"{prefix}-4.onnx")
    bucket, key = store.locate(f"{altered.source}/model.onnx")
    store.put_bytes(bucket, key, b"not the registered bytes", if_absent=False)

    assert registry.promote(model_name, v1.version, settings=settings, store=store).previous is None
    change = registry.promote(model_name, v2.version, settings=settings, store=store)
    assert (change.version, change.previous) == (v2.version, v1.version)
    assert all(g.passed for g in change.gates)

    with pytest.raises(RegistryError, match="verification: parity verification recorded as failed"):
        registry.promote(model_name, unverified.version, settings=settings, store=store)
    with pytest.raises(RegistryError, match=r"sha256: .*model\.onnx now has sha256"):
        registry.promote(model_name, altered.version, settings=settings, store=store)
    with pytest.raises(RegistryError, match="altered after registration"):
        LocalizationModel.load(altered.uri, settings=settings)
    assert (
        registry.resolve_model_uri(f"models:/{model_name}@production", settings=settings).version
        == v2.version
    )

    back = registry.rollback(model_name, settings=settings, store=store)

    assert (back.version, back.previous, back.action) == (v1.version, v2.version, "rollback")
    assert (
        registry.resolve_model_uri(f"models:/{model_name}@production", settings=settings).version
        == v1.version
    )
    with pytest.raises(RegistryError, match="no earlier holder"):
        registry.rollback(model_name, settings=settings, store=store)
    shown = registry.show_model(model_name, settings=settings)
    assert shown.aliases["production"] == v1.version
    assert [(e.action, e.version) for e in shown.alias_history["production"]] == [
        ("promote", v1.version),
        ("promote", v2.version),
        ("rollback", v1.version),
    ]
    assert [v.version for v in shown.versions] == ["4", "3", "2", "1"]
    listed = {m.name: m for m in registry.list_models(settings=settings)}
    assert listed[model_name].latest_version == "4"
    assert listed[model_name].aliases == {"production": v1.version, "staging": altered.version}


def test_the_same_bytes_under_another_key_reuse_their_version(
    embedded_mlflow: MlflowBackend, atto: Export, model_name: str
) -> None:
    settings, store = embedded_mlflow.settings(), embedded_mlflow.store()
    assert (
        registry.find_version_by_sha256(
            model_name, atto.result.sha256, settings=settings, store=store
        )
        is None
    )
    first = register(embedded_mlflow, atto, model_name, f"models/localization/{model_name}-a.onnx")
    again = register(embedded_mlflow, atto, model_name, f"models/localization/{model_name}-b.onnx")

    found = registry.find_version_by_sha256(
        model_name, atto.result.sha256, settings=settings, store=store
    )

    assert again.version == first.version
    assert found is not None and found.version == first.version
    description = registry.show_model(model_name, settings=settings).description
    assert description is not None and description.startswith("LocalizationNet")
    assert [v.version for v in registry.show_model(model_name, settings=settings).versions] == ["1"]
    assert (
        registry.find_version_by_sha256(model_name, "0" * 64, settings=settings, store=store)
        is None
    )


def test_a_second_model_name_gets_its_own_folder_and_never_rewrites_the_first(
    backend: MlflowBackend, atto: Export, model_name: str
) -> None:
    store, settings = backend.store(), backend.settings()
    uri = upload(store, backend, atto, f"models/localization/{model_name}.onnx")
    first = register_uri(atto, uri, model_name, settings, store)
    bucket, key = store.locate(first.source)
    before = {o.key: store.read_bytes(bucket, o.key) for o in store.list_objects(bucket, key + "/")}

    other = register_uri(atto, uri, f"{model_name}-other", settings, store)

    assert other.source != first.source
    after = {o.key: store.read_bytes(bucket, o.key) for o in store.list_objects(bucket, key + "/")}
    assert after == before
    for version in (first, other):
        loaded = LocalizationModel.load(version.uri, settings=settings)
        assert loaded.sha256 == atto.result.sha256


def test_a_version_whose_bytes_changed_is_never_reused(
    backend: MlflowBackend, atto: Export, model_name: str
) -> None:
    store, settings = backend.store(), backend.settings()
    first = register(backend, atto, model_name, f"models/localization/{model_name}-a.onnx")
    bucket, key = store.locate(f"{first.source}/model.onnx")
    size = atto.result.path.stat().st_size
    store.put_bytes(bucket, key, b"x" * size, if_absent=False)  # same size, other bytes

    again = register(backend, atto, model_name, f"models/localization/{model_name}-b.onnx")

    assert again.version != first.version
    assert LocalizationModel.load(again.uri, settings=settings).sha256 == atto.result.sha256
    tags = registry.show_model(model_name, first.version, settings=settings).versions[0].tags
    assert "now has sha256" in tags[registry.INTEGRITY_TAG]
    found = registry.find_version_by_sha256(
        model_name, atto.result.sha256, settings=settings, store=store
    )
    assert found is not None and found.version == again.version


def test_mlflow_down_fails_fast_naming_the_uploaded_uri_and_no_password(
    mlflow_server: MlflowBackend, atto: Export, model_name: str
) -> None:
    password = "s3cr3t-tracking-pw"
    settings = mlflow_server.settings(
        tracking_uri=f"http://heimdall:{password}@127.0.0.1:{free_port()}"
    )
    store = mlflow_server.store()
    uri = upload(store, mlflow_server, atto, f"models/localization/{model_name}.onnx")

    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(RegistryError) as failure:
        register_uri(atto, uri, model_name, settings, store)
    elapsed = time.monotonic() - started

    message = str(failure.value)
    assert "nothing listens at http://***@127.0.0.1:" in message
    assert uri in message and "nothing needs to be uploaded again" in message
    assert password not in message and password not in json.dumps(logs, default=str)
    assert elapsed < 30, f"gave up after {elapsed:.1f} s"


def test_an_export_with_external_data_registers_and_loads_as_one_unit(
    embedded_mlflow: MlflowBackend,
    atto: Export,
    model_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(1)  # the same weights as `atto`, stored beside the graph this time
    model = LocalizationNet(ModelConfig(backbone="atto")).eval()
    result = export_to_onnx(model, tmp_path / "external.onnx", external_data=True)
    assert result.data_files
    store, settings = embedded_mlflow.store(), embedded_mlflow.settings()
    key = f"models/localization/{model_name}.onnx"
    uploaded = upload_model(result.path, store, embedded_mlflow.bucket, key, create_bucket=True)

    version = registry.register_model(
        uploaded.uri,
        name=model_name,
        metadata={"parity": {"passed": True}},
        settings=settings,
        store=store,
        validator=validate_onnx_model,
    ).version

    assert version.sha256 == result.sha256
    loaded = LocalizationModel.load(version.uri, settings=settings)
    assert np.abs(loaded.predict(atto.features).positions - atto.expected[0]).max() <= 1e-6
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", embedded_mlflow.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(version.uri)
    assert np.abs(pyfunc.predict(atto.features)["positions"] - atto.expected[0]).max() <= 1e-6


def test_the_registered_mlmodel_carries_the_recommended_session_settings(
    embedded_mlflow: MlflowBackend,
    atto: Export,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = register(embedded_mlflow, atto, model_name, f"models/localization/{model_name}.onnx")
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", embedded_mlflow.tracking_uri)

    local = Path(mlflow.artifacts.download_artifacts(version.uri))
    options = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["onnx"][
        "onnx_session_options"
    ]
    assert options == RECOMMENDED_SESSION_SETTINGS.to_mlflow_options()
    assert options["graph_optimization_level"] == int(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert options["extra_session_config"]["session.force_spinning_stop"] == "1"

    pyfunc = mlflow.pyfunc.load_model(version.uri)
    session = pyfunc.get_raw_model()
    assert (
        session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    )
    predicted = pyfunc.predict(atto.features)
    np.testing.assert_array_equal(predicted["positions"], atto.expected[0])
    np.testing.assert_array_equal(predicted["uncertainties"], atto.expected[1])


def test_rollback_never_returns_to_a_version_whose_bytes_were_altered(
    backend: MlflowBackend, atto: Export, model_name: str, tmp_path: Path
) -> None:
    """It passes over such a holder, says so, and stops with one line when none is left."""
    store, settings = backend.store(), backend.settings()
    versions = [
        register(backend, distinct(atto, tmp_path, tag), model_name, f"{model_name}-{tag}.onnx")
        for tag in ("a", "b", "c")
    ]
    first, second, third = (v.version for v in versions)
    for version in (first, second, third):
        registry.promote(model_name, version, settings=settings, store=store)
    tamper(backend, settings, model_name, second)

    rolled = registry.rollback(model_name, settings=settings, store=store)

    assert (rolled.previous, rolled.version) == (third, first)
    assert list(rolled.skipped) == [second] and "sha256" in rolled.skipped[second]
    event = registry.show_model(model_name, settings=settings).alias_history["production"][-1]
    assert event.reason is not None and event.reason.startswith(f"skipped version {second}: ")

    registry.promote(model_name, third, settings=settings, store=store)
    tamper(backend, settings, model_name, first)
    with pytest.raises(RegistryError, match=rf"stays at version {third}: .*version {first}: "):
        registry.rollback(model_name, settings=settings, store=store)
    assert registry.alias_holder(model_name, "production", settings=settings) == third
