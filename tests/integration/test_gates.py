"""Quality gates before alias moves, against the embedded store and mlflow server + SeaweedFS.

The models are constant predictors, so their held-out errors are known without training: the
``centre`` model always answers the region centre (its error *is* the centre baseline), the
``offset`` model a point away from it (worse than the baseline).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch

from heimdall import gates, registry
from heimdall.checkpoint import save_checkpoint
from heimdall.config import Settings
from heimdall.errors import GateError, PublishError
from heimdall.export import export_to_onnx
from heimdall.inference import evaluate_heldout
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.pipeline import publish
from tests.fixtures import registered
from tests.fixtures.mlflow_server import MlflowBackend

pytestmark = pytest.mark.integration


def constant_model(offset: tuple[float, float]) -> LocalizationNet:
    """Predicts ``centre + offset × scale`` whatever the input."""
    torch.manual_seed(0)
    model = LocalizationNet(ModelConfig(backbone="atto")).eval()
    with torch.no_grad():
        model.position_head[-1].weight.zero_()
        model.position_head[-1].bias.copy_(torch.tensor(offset))
    return model


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gate-models")
    offsets = {"centre": (0.0, 0.0), "centre-again": (0.0, 1e-7), "offset": (0.4, 0.4)}
    files = {}
    for label, offset in offsets.items():
        files[label] = export_to_onnx(constant_model(offset), folder / f"{label}.onnx").path
    return files


@pytest.fixture(params=["embedded", "server"])
def backend(request: pytest.FixtureRequest) -> MlflowBackend:
    fixture = "embedded_mlflow" if request.param == "embedded" else "mlflow_server"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


def settings_for(backend: MlflowBackend, fraction: float = 0.5) -> Settings:
    """Real thresholds (the fixtures open the gates for tests of other behaviour)."""
    return backend.settings(gate_baseline_fraction=fraction, gate_champion_tolerance=0.02)


def register(backend: MlflowBackend, settings: Settings, path: Path, name: str) -> str:
    return registered.publish(path, name, settings, backend.store())


def served(settings: Settings) -> gates.Evaluator:
    """How the CLI and publish measure a model by URI: ONNX Runtime on the held-out set."""
    return partial(evaluate_heldout, settings=settings)


def unique(label: str) -> str:
    return f"gates-{label}-{os.urandom(3).hex()}"


def test_a_model_no_better_than_the_centre_gets_a_version_and_no_alias(
    backend: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    settings, name = settings_for(backend), unique("baseline")
    version = register(backend, settings, onnx_files["centre"], name)

    with pytest.raises(GateError, match=r"did not pass the baseline gate for 'staging'"):
        gates.move_alias_gated(
            name, version, "staging", evaluate=served(settings), settings=settings
        )

    shown = registry.show_model(name, settings=settings)
    assert [v.version for v in shown.versions] == [version]  # the work is kept
    assert shown.aliases == {}
    failed = json.loads(shown.versions[0].tags[f"{gates.GATE_TAG}staging"])
    assert [g["name"] for g in failed] == ["baseline"] and "limit" in failed[0]["detail"]


def test_a_challenger_worse_than_the_champion_gets_no_alias_unless_forced_with_a_reason(
    backend: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    # A lenient baseline so the centre model may hold the alias; the champion gate still bites.
    settings, name = settings_for(backend, fraction=2.0), unique("champion")
    champion = register(backend, settings, onnx_files["centre"], name)
    gates.move_alias_gated(name, champion, "staging", evaluate=served(settings), settings=settings)
    worse = register(backend, settings, onnx_files["offset"], name)

    with pytest.raises(GateError, match=r"champion gate .*champion version " + champion):
        gates.move_alias_gated(name, worse, "staging", evaluate=served(settings), settings=settings)
    assert registry.alias_holder(name, "staging", settings=settings) == champion

    change = gates.move_alias_gated(
        name,
        worse,
        "staging",
        evaluate=served(settings),
        settings=settings,
        force=True,
        reason="field test of the offset",
    )

    assert (change.version, change.previous) == (worse, champion)
    assert any(g.name == "champion" and not g.passed for g in change.gates)
    shown = registry.show_model(name, settings=settings)
    assert shown.aliases["staging"] == worse
    assert shown.alias_history["staging"][-1].reason == "field test of the offset"
    tags = registry.show_model(name, worse, settings=settings).versions[0].tags
    assert tags["heimdall.forced.staging"] == "field test of the offset"


def test_an_equal_challenger_passes_within_the_tolerance(
    embedded_mlflow: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    settings, name = settings_for(embedded_mlflow, fraction=2.0), unique("equal")
    champion = register(embedded_mlflow, settings, onnx_files["centre"], name)
    gates.move_alias_gated(name, champion, "staging", evaluate=served(settings), settings=settings)
    equal = register(embedded_mlflow, settings, onnx_files["centre-again"], name)

    change = gates.move_alias_gated(
        name, equal, "staging", evaluate=served(settings), settings=settings
    )

    assert change.version == equal and all(g.passed for g in change.gates)


def test_promote_applies_the_same_gates(
    embedded_mlflow: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    """The same gate code as publish (both backends above); the embedded store is enough."""
    backend = embedded_mlflow
    settings, name = settings_for(backend, fraction=2.0), unique("promote")
    good = register(backend, settings, onnx_files["centre"], name)
    worse = register(backend, settings, onnx_files["offset"], name)
    assert gates.promote(name, good, evaluate=served(settings), settings=settings).version == good

    with pytest.raises(GateError, match="champion gate for 'production'"):
        gates.promote(name, worse, evaluate=served(settings), settings=settings)
    with pytest.raises(GateError, match="baseline gate for 'canary'"):
        strict = settings_for(backend, fraction=0.5)
        gates.promote(name, good, evaluate=served(strict), settings=strict, to="canary")

    assert registry.alias_holder(name, "production", settings=settings) == good


def test_publish_keeps_a_model_that_fails_its_gates_and_moves_nothing(
    embedded_mlflow: MlflowBackend, tmp_path: Path
) -> None:
    settings = embedded_mlflow.settings(
        data_dir=tmp_path / "data", gate_baseline_fraction=0.5, gate_champion_tolerance=0.02
    )
    checkpoint = tmp_path / "centre.safetensors"
    save_checkpoint(constant_model((0.0, 0.0)), checkpoint)
    name = unique("publish")

    with pytest.raises(PublishError, match=r"at step 'alias'.*baseline gate") as failure:
        publish(
            checkpoint,
            settings=settings,
            name=name,
            bench=False,
            stage="Staging",
            verify_batch_sizes=(1,),
        )

    assert "version 1" in str(failure.value)
    (version,) = registry.show_model(name, settings=settings).versions
    assert version.aliases == () and version.stage is None
    assert version.tags["heldout.set"].startswith("synthetic-v1/")
    assert float(version.tags["heldout.median_km"]) == pytest.approx(
        float(version.tags["heldout.baseline_km"]), rel=1e-3
    )


def test_force_needs_a_reason_before_any_work(tmp_path: Path) -> None:
    from heimdall.errors import InputError

    with pytest.raises(InputError, match="--force needs --reason"):
        publish(tmp_path / "missing.safetensors", force=True)
    with pytest.raises(InputError, match="only used with --force"):
        gates.check_override(False, "why not")


def tamper(backend: MlflowBackend, settings: Settings, name: str, version: str) -> None:
    """Alter the stored model.onnx of a version as an outsider would: bytes flipped in the
    file under the object store's folder, or the object overwritten in SeaweedFS with boto3."""
    source = registry.show_model(name, version, settings=settings).versions[0].source
    store = backend.store()
    bucket, key = store.locate(f"{source}/model.onnx")
    if backend.seaweedfs is None:
        path = Path(store.root) / bucket / key  # type: ignore[attr-defined]
        with path.open("r+b") as fh:
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return
    s3 = backend.seaweedfs.client()
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])


def test_a_holder_whose_bytes_were_altered_does_not_lock_its_alias(
    backend: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    """Issue 20, 1: every publish to ``staging`` used to fail on the holder's integrity error."""
    settings, name = settings_for(backend, fraction=2.0), unique("altered")
    holder = register(backend, settings, onnx_files["centre"], name)
    for alias in ("staging", "staging-int8"):  # a variant alias goes the same way
        gates.move_alias_gated(name, holder, alias, evaluate=served(settings), settings=settings)
    tamper(backend, settings, name, holder)
    challenger = register(backend, settings, onnx_files["centre-again"], name)

    for alias in ("staging", "staging-int8"):
        change = gates.move_alias_gated(
            name, challenger, alias, evaluate=served(settings), settings=settings
        )

        assert (change.previous, change.version) == (holder, challenger)
        assert change.previous_problem is not None and "sha256" in change.previous_problem
        (champion,) = [g for g in change.gates if g.name == "champion"]
        assert champion.passed and champion.detail.startswith(f"skipped: version {holder}")
        event = registry.show_model(name, settings=settings).alias_history[alias][-1]
        assert event.reason is not None
        assert event.reason.startswith("previous holder failed its integrity check")
    tags = registry.show_model(name, holder, settings=settings).versions[0].tags
    assert "now has sha256" in tags[registry.INTEGRITY_TAG]


def test_promote_and_force_move_past_an_altered_production_holder(
    embedded_mlflow: MlflowBackend, onnx_files: dict[str, Path]
) -> None:
    backend = embedded_mlflow
    settings, name = settings_for(backend, fraction=2.0), unique("altered-prod")
    first = register(backend, settings, onnx_files["centre"], name)
    second = register(backend, settings, onnx_files["centre-again"], name)
    worse = register(backend, settings, onnx_files["offset"], name)
    gates.promote(name, first, evaluate=served(settings), settings=settings)
    tamper(backend, settings, name, first)

    assert gates.promote(name, second, evaluate=served(settings), settings=settings).version == (
        second
    )
    tamper(backend, settings, name, second)
    strict = settings_for(backend, fraction=0.5)  # the offset model fails the baseline gate
    forced = gates.promote(
        name, worse, evaluate=served(strict), settings=strict, force=True, reason="field test"
    )

    assert (forced.previous, forced.version) == (second, worse)
    event = registry.show_model(name, settings=settings).alias_history["production"][-1]
    assert event.reason is not None and event.reason.endswith("; field test")
