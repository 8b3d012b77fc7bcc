"""MLflow stages follow ``production`` and ``staging`` for stage-based loaders (issue 19, 5).

The upstream inference service's loader, as it is written there, must find exactly what
``@production`` names after every promote and rollback, on the embedded store and on
``mlflow server`` + PostgreSQL + SeaweedFS.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from heimdall import gates, registry
from heimdall.files import sha256_file
from tests.fixtures.mlflow_server import MlflowBackend
from tests.integration.test_gates import onnx_files as onnx_files  # a module fixture
from tests.integration.test_gates import register, served, unique

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "server"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> MlflowBackend:
    """The backend, with MLflow's own API pointed at it by environment as a user would."""
    fixture = "embedded_mlflow" if request.param == "embedded" else "mlflow_server"
    found: MlflowBackend = request.getfixturevalue(fixture)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    for key, value in found.env().items():
        monkeypatch.setenv(key, value)
    return found


def upstream_loader(name: str, tmp: Path) -> tuple[str, str]:
    """The upstream loader's lookup: the version in ``Production`` and its model.onnx's sha256."""
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    (production,) = [v for v in versions if v.current_stage == "Production"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/Production", dst_path=tmp))
    ort.InferenceSession(str(local / "model.onnx"), providers=["CPUExecutionProvider"])
    return str(production.version), sha256_file(local / "model.onnx")


def named_by_alias(name: str, alias: str) -> tuple[str, str]:
    version = MlflowClient().get_model_version_by_alias(name, alias)
    return str(version.version), version.tags["sha256"]


def stages(name: str) -> dict[str, str]:
    found = MlflowClient().search_model_versions(f"name='{name}'")
    return {str(v.version): v.current_stage for v in found}


def test_the_stage_loader_finds_what_production_names_after_promote_and_rollback(
    backend: MlflowBackend, onnx_files: dict[str, Path], tmp_path: Path
) -> None:
    settings, name = backend.settings(), unique("stages")
    first = register(backend, settings, onnx_files["centre"], name)
    second = register(backend, settings, onnx_files["centre-again"], name)
    evaluate = served(settings)

    gates.move_alias_gated(name, first, "staging", evaluate=evaluate, settings=settings)
    assert stages(name) == {first: "Staging", second: "None"}  # publish's alias step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        promoted = gates.promote(name, first, evaluate=evaluate, settings=settings)
    assert not [w for w in caught if "stage" in str(w.message).lower()]
    assert [(m.version, m.stage) for m in promoted.stages] == [(first, "Production")]
    assert upstream_loader(name, tmp_path / "1") == named_by_alias(name, "production")

    gates.move_alias_gated(name, second, "staging", evaluate=evaluate, settings=settings)
    assert stages(name) == {first: "Production", second: "Staging"}
    gates.promote(name, second, evaluate=evaluate, settings=settings)
    assert stages(name) == {first: "Archived", second: "Production"}
    assert upstream_loader(name, tmp_path / "2") == named_by_alias(name, "production")

    rolled = registry.rollback(name, settings=settings, store=backend.store())

    assert (rolled.previous, rolled.version) == (second, first)
    # The rolled-back version still holds @staging: it goes back to that stage, not the archive.
    assert stages(name) == {first: "Production", second: "Staging"}
    assert upstream_loader(name, tmp_path / "3") == named_by_alias(name, "production")


def test_variant_aliases_and_sync_off_move_no_stage(
    embedded_mlflow: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    backend = embedded_mlflow
    settings, name = backend.settings(), unique("nostage")
    first = register(backend, settings, onnx_files["centre"], name)
    second = register(backend, settings, onnx_files["centre-again"], name)
    store = backend.store()
    registry.promote(name, first, settings=settings, store=store)

    registry.set_alias(name, second, "staging-int8", settings=settings)
    registry.promote(name, second, to="production-int8", settings=settings, store=store)
    quiet = backend.settings(sync_stages=False)
    registry.set_alias(name, second, "staging", settings=quiet)
    unsynced = registry.promote(name, second, settings=quiet, store=store)

    assert unsynced.stages == ()
    shown = registry.show_model(name, settings=settings)
    assert {v.version: v.stage for v in shown.versions} == {first: "Production", second: None}

    caught_up = registry.promote(name, second, settings=settings, store=store)

    assert caught_up.action == "unchanged"
    assert [(m.version, m.stage) for m in caught_up.stages] == [
        (second, "Production"),
        (first, "Archived"),
    ]
