"""publish() on the embedded default (SQLite MLflow store, local object store): no servers."""

from __future__ import annotations

import gc
import json
import os
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from heimdall import machine, pipeline
from heimdall.checkpoint import LoadedCheckpoint, save_checkpoint, sha256_file
from heimdall.config import Settings
from heimdall.data import HELDOUT_SEED, generate
from heimdall.errors import ConfigError, InputError, PublishError
from heimdall.heldout import HELDOUT_SAMPLES
from heimdall.inference import evaluate_heldout
from heimdall.legacy import export_and_register_model
from heimdall.machine import software
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.optimize import METADATA_KEY_VARIANT
from heimdall.pipeline import publish
from heimdall.registry import AliasChange, Gate
from heimdall.report import REPORT_SCHEMA_VERSION
from heimdall.results import PublishResult
from heimdall.storage import open_store
from heimdall.verify import Reference, verify_parity
from tests.fixtures.mlflow_server import MlflowBackend

PREFIX = "models/localization"
STEPS = (
    "load",
    "export",
    "validate",
    "verify",
    "variants",
    "benchmark",
    "heldout",
    "upload",
    "metadata",
    "register",
    "alias",
    "report",
)
SEED_KEYS = {
    "success",
    "s3_uri",
    "model_info",
    "metadata",
    "inference_metrics",
    "registration",
    "error",
}
FAST = {"verify_batch_sizes": (1, 3)}


def unique(label: str) -> str:
    return f"heimdall-{label}-{os.urandom(3).hex()}"


def client_for(settings: Settings) -> MlflowClient:
    return MlflowClient(
        tracking_uri=settings.resolved_tracking_uri, registry_uri=settings.resolved_registry_uri
    )


def versions_of(settings: Settings, name: str) -> list[str]:
    found = client_for(settings).search_model_versions(f"name = '{name}'")
    return sorted(str(v.version) for v in found)


def stored_keys(settings: Settings) -> list[str]:
    """Every object under the models prefix of the settings' bucket (none when no bucket)."""
    store = open_store(settings)
    if not store.bucket_exists(settings.bucket):
        return []
    return sorted(o.key for o in store.list_objects(settings.bucket, PREFIX))


def nan_model() -> LocalizationNet:
    torch.manual_seed(5)
    model = LocalizationNet(ModelConfig(backbone="atto"))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    return model


@dataclass(frozen=True)
class Published:
    """The same checkpoint published twice into one fresh embedded data directory."""

    settings: Settings
    name: str
    checkpoint: LoadedCheckpoint
    first: PublishResult
    second: PublishResult
    events: list[tuple[str, str]]
    keys_after_first: list[str]
    report_json: str  # the first run's report, read before the second run
    report_html: str


@pytest.fixture(scope="module")
def published(
    embedded_mlflow: MlflowBackend,
    atto_checkpoint: LoadedCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    one_torch_thread: None,
) -> Published:
    settings = embedded_mlflow.settings(data_dir=tmp_path_factory.mktemp("publish-embedded"))
    name = unique("publish")
    events: list[tuple[str, str]] = []
    first = publish(
        atto_checkpoint.path,
        settings=settings,
        name=name,
        bench_budget_s=0.2,
        progress=lambda step, status, _detail: events.append((step, status)),
        **FAST,
    )
    assert first.report is not None
    report = (first.report.json.read_text(), first.report.html.read_text())
    keys_after_first = stored_keys(settings)
    second = publish(atto_checkpoint.path, settings=settings, name=name, bench=False, **FAST)
    return Published(
        settings, name, atto_checkpoint, first, second, events, keys_after_first, *report
    )


def test_publish_records_every_step_in_order_with_its_status(published: Published) -> None:
    steps = [(s.name, s.status) for s in published.first.steps]

    # fp32 only, so there are no variants to build
    assert steps == [(name, "skipped" if name == "variants" else "ok") for name in STEPS]
    assert all(s.seconds >= 0 for s in published.first.steps)
    expected_events = [
        event for name, status in steps for event in ((name, "start"), (name, status))
    ]
    assert published.events == expected_events


def test_publish_registers_a_verified_fp32_version_under_alias_staging(
    published: Published,
) -> None:
    primary = published.first.primary
    client = client_for(published.settings)

    held = client.get_model_version_by_alias(published.name, "staging")
    version = client.get_model_version(published.name, primary.version.version)

    assert str(held.version) == primary.version.version == "1"
    assert version.status == "READY"
    assert version.tags["variant"] == "fp32"
    assert version.tags["verification"] == "passed"
    assert version.tags["sha256"] == sha256_file(primary.onnx_path) == primary.upload.sha256
    assert version.tags["onnx_uri"] == primary.upload.uri
    assert version.tags["checkpoint_sha256"] == published.checkpoint.sha256
    # The code that published it: package versions, and the commit of the repository it ran in.
    assert "onnxruntime==" in version.tags["heimdall.packages"]
    assert version.tags.get("mlflow.source.git.commit") == software().git_commit
    assert primary.upload.uri.startswith(published.settings.object_store_uri + f"/{PREFIX}/")
    assert not primary.upload.reused and not primary.reused_version
    assert published.first.parity.passed
    assert published.first.speedup(1) is not None  # the benchmark ran


def test_publish_writes_the_report_and_logs_it_to_the_versions_run(
    published: Published, tmp_path: Path
) -> None:
    document = json.loads(published.report_json)
    page = published.report_html
    run_id = published.first.primary.version.run_id
    assert run_id is not None
    client = client_for(published.settings)

    folder = f"report/{published.name}/v1"  # one report per (model name, version)
    logged = {a.path for a in client.list_artifacts(run_id, folder)}
    downloaded = Path(client.download_artifacts(run_id, f"{folder}/report.json", str(tmp_path)))

    assert document["schema_version"] == REPORT_SCHEMA_VERSION
    assert document["success"] is True
    card = document["model_card"]
    assert card["version"] == "1" and card["name"] == published.name
    assert card["sha256"] == published.first.primary.upload.sha256
    assert [s["step"] for s in document["steps"]] == list(STEPS[:-1])  # all but the report itself
    assert document["latency_ms"] and document["heldout"]["samples"] == 256
    assert page.startswith("<!doctype html>") and "<svg" in page and published.name in page
    assert logged == {f"{folder}/report.json", f"{folder}/report.html"}
    assert json.loads(downloaded.read_text())["model_card"] == card


def test_publishing_the_same_checkpoint_again_reuses_the_upload_and_the_version(
    published: Published,
) -> None:
    first, second = published.first.primary, published.second.primary
    status = {s.name: s.status for s in published.second.steps}

    assert second.version.version == first.version.version
    assert second.upload.uri == first.upload.uri and second.upload.reused
    assert second.reused_version
    assert (status["upload"], status["register"], status["alias"]) == ("reused",) * 3
    assert versions_of(published.settings, published.name) == ["1"]
    assert stored_keys(published.settings) == published.keys_after_first


def test_a_large_checkpoint_is_exported_apart_and_verified_from_recorded_outputs(
    published: Published,
    embedded_mlflow: MlflowBackend,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import heimdall.steps as steps

    def not_in_process(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("exported in the publishing process")

    references: list[object] = []
    loaded_models: list[weakref.ref[LocalizationNet]] = []
    load = pipeline._load

    def loading(source: Any) -> LoadedCheckpoint:
        loaded = load(source)
        loaded_models.append(weakref.ref(loaded.model))
        return loaded

    def recording(path: Path, reference: object, *args: Any, **kwargs: Any) -> Any:
        gc.collect()
        references.append(reference)
        references.append([ref() is not None for ref in loaded_models])
        return verify_parity(path, reference, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "_load", loading)
    monkeypatch.setattr(steps, "ISOLATED_EXPORT_BYTES", 0)  # atto counts as large
    monkeypatch.setattr(steps, "export_to_onnx", not_in_process)
    monkeypatch.setattr(steps, "verify_parity", recording)
    settings = embedded_mlflow.settings(data_dir=tmp_path_factory.mktemp("publish-apart"))
    apart = publish(
        published.checkpoint.path, settings=settings, name=unique("apart"), bench=False, **FAST
    )

    first = published.first
    assert [type(r) for r in references] == [Reference, list]
    assert references[1] == [False]  # the checkpoint's weights were freed before the export
    assert apart.primary.upload.sha256 == first.primary.upload.sha256
    assert (apart.parity.diffs, apart.parity.task) == (first.parity.diffs, first.parity.task)
    assert apart.heldout == first.heldout
    assert apart.primary.metadata["parameters"] == first.primary.metadata["parameters"]
    assert apart.primary.metadata["model_config"] == first.primary.metadata["model_config"]


def test_nan_weights_fail_verification_and_nothing_is_stored_or_registered(
    embedded_mlflow: MlflowBackend, tmp_path: Path, one_torch_thread: None
) -> None:
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data")
    checkpoint = tmp_path / "nan.safetensors"
    save_checkpoint(nan_model(), checkpoint)
    name = unique("nan")

    with pytest.raises(PublishError) as failure:
        publish(checkpoint, settings=settings, name=name, bench=False, verify_batch_sizes=(1,))

    error = failure.value
    assert error.step == "verify"
    assert "NaN" in error.reason
    assert "uploaded" not in error.existing and "version" not in error.existing
    assert [(s["step"], s["status"]) for s in error.steps][-1] == ("verify", "failed")
    assert stored_keys(settings) == []
    assert versions_of(settings, name) == []


def _mismatched(path: Path, kind: str) -> Path:
    model = LocalizationNet(ModelConfig(backbone="atto"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if kind == "keys":
        state["head.extra.weight"] = state.pop("backbone.features.0.0.weight")
    else:
        state["backbone.features.0.0.weight"] = torch.zeros(7, 3, 4, 4)
    metadata = {"heimdall_config": json.dumps(model.config.to_dict(), sort_keys=True)}
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("keys", r"missing keys \(1\): backbone\.features\.0\.0\.weight.*unexpected keys"),
        ("shapes", r"shape mismatches \(1\): backbone\.features\.0\.0\.weight: checkpoint"),
    ],
    ids=["wrong-keys", "wrong-shapes"],
)
def test_a_checkpoint_that_does_not_fit_the_model_fails_at_load(
    kind: str, message: str, embedded_mlflow: MlflowBackend, tmp_path: Path
) -> None:
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data")
    checkpoint = _mismatched(tmp_path / f"{kind}.safetensors", kind)

    with pytest.raises(PublishError, match="publish failed at step 'load'") as failure:
        publish(checkpoint, settings=settings, name=unique("misfit"), bench=False)

    assert failure.value.step == "load"
    assert "does not fit the model" in failure.value.reason
    assert checkpoint.name in failure.value.reason
    assert failure.value.existing == {}
    # The preflight made the (empty) stores; nothing was exported, stored or registered.
    assert not (tmp_path / "data" / "exports").exists()
    assert stored_keys(settings) == []
    assert client_for(settings).search_registered_models() == []


def test_export_and_register_model_returns_the_seed_dict_on_success(
    embedded_mlflow: MlflowBackend, tmp_path: Path, one_torch_thread: None
) -> None:
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data")
    torch.manual_seed(9)
    model = LocalizationNet(ModelConfig(backbone="atto"))
    name = unique("seed")

    result = export_and_register_model(
        model, None, mlflow_tracker=settings, output_dir=tmp_path / "out", model_name=name
    )

    assert set(result) >= SEED_KEYS
    assert result["success"] is True and result["error"] is None
    uri = result["s3_uri"]
    assert uri.startswith(f"{settings.object_store_uri}/{PREFIX}/") and uri.endswith(".onnx")
    assert result["model_info"]["opset_version"] >= 17
    assert result["metadata"]["s3_uri"] == uri
    assert result["metadata"]["sha256"] == sha256_file(tmp_path / "out" / "model.onnx")
    assert result["inference_metrics"]["parity"]["passed"] is True
    assert result["inference_metrics"]["timings"]["p50_ms"]
    registration = result["registration"]
    assert (registration["model_name"], registration["model_version"]) == (name, "1")
    assert registration["stage"] == "Staging"
    assert registration["onnx_uri"] == uri
    # The version holds alias staging by the time the dict is returned; it must say so.
    assert str(client_for(settings).get_model_version_by_alias(name, "staging").version) == "1"
    assert registration["aliases"] == ["staging"]


def test_export_and_register_model_reports_a_failure_in_the_dict_without_raising(
    embedded_mlflow: MlflowBackend, tmp_path: Path, one_torch_thread: None
) -> None:
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data")
    name = unique("seedfail")

    result = export_and_register_model(
        nan_model(), "run-1", mlflow_tracker=settings, output_dir=tmp_path / "out", model_name=name
    )

    assert set(result) >= SEED_KEYS
    assert result["success"] is False
    assert "publish failed at step 'verify'" in result["error"] and "NaN" in result["error"]
    assert result["failed_step"] == "verify"
    nothing_made = SEED_KEYS - {"success", "error"}
    assert {k: result[k] for k in nothing_made} == dict.fromkeys(nothing_made)
    assert versions_of(settings, name) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variants": ("fp32", "fp8")}, "unknown variant 'fp8'"),
        ({"variants": ("bf16",)}, "unknown variant"),
        ({"variants": "fp32,fp8"}, "unknown variant 'fp8'"),
        ({"bench_budget_s": 0}, "bench_budget_s must be positive, got 0"),
        ({"bench_budget_s": -1.5}, "bench_budget_s must be positive, got -1.5"),
        ({"bench_budget_s": float("inf")}, "bench_budget_s must be positive, got inf"),
        ({"alias": "latest"}, "invalid alias 'latest'"),
        ({"alias": "v3"}, "invalid alias 'v3'"),
        ({"stage": "Prod"}, "unknown stage 'Prod'"),
        ({"name": "a/b"}, "invalid registered model name"),
        ({"verify_batch_sizes": ()}, "verify batch sizes must be positive"),
        ({"calibration": 0}, "calibration must be at least 1"),
        ({"alias": "production"}, "moved only by promote"),
        ({"bucket": "Not_A_Bucket"}, "invalid bucket name"),
    ],
    ids=[
        "unknown-variant",
        "only-unknown-variant",
        "unknown-variant-in-a-string",
        "zero-budget",
        "negative-budget",
        "infinite-budget",
        "reserved-alias",
        "version-like-alias",
        "unknown-stage",
        "name-with-slash",
        "no-batch-sizes",
        "no-calibration",
        "production-alias",
        "invalid-bucket",
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    options: dict[str, Any],
    message: str,
    embedded_mlflow: MlflowBackend,
    atto_checkpoint: LoadedCheckpoint,
    tmp_path: Path,
) -> None:
    bucket = options.pop("bucket", embedded_mlflow.bucket)
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data", bucket=bucket)

    with pytest.raises(InputError, match=message):
        publish(atto_checkpoint.path, settings=settings, **options)

    assert not (tmp_path / "data").exists()  # refused before exporting or storing anything


# Issue 20: each of these was accepted, then failed after bytes were uploaded or registered.
HOSTILE = {
    "600-char-name": ({"name": "n" * 600}, "invalid registered model name"),
    "name-with-slash": ({"name": "team/model"}, "invalid registered model name"),
    "name-with-control-char": ({"name": "bad\x07name"}, "invalid registered model name"),
    # What Python makes of a non-UTF-8 byte in argv (surrogateescape).
    "non-utf8-name": ({"name": "model\udcff"}, "not valid UTF-8"),
    "alias-V1": ({"alias": "V1"}, "invalid alias 'V1'"),
    "alias-latest": ({"alias": "latest"}, "invalid alias 'latest'"),
    "alias-LATEST": ({"alias": "LATEST"}, "invalid alias 'LATEST'"),
    "alias-Production": ({"alias": "Production"}, "moved only by promote"),
    "alias-PRODUCTION": ({"alias": "PRODUCTION"}, "moved only by promote"),
    "stage-Production": ({"stage": "Production"}, "only promote moves"),
    "bad-stage": ({"stage": "Prod"}, "unknown stage 'Prod'"),
    "variant-alias-too-long": (
        {"alias": "a" * 62, "variants": ("int8",)},
        "invalid alias 'aaaa",
    ),
    "report-path-too-long": ({"output_dir": "LONG"}, "report"),
    # With stages synced, Staging follows @staging: a second version there would disagree.
    "stage-of-another-alias": ({"alias": "candidate", "stage": "Staging"}, "stages follow"),
    "stage-other-than-the-alias": ({"stage": "Archived"}, "stages follow"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_arguments_are_one_line_before_anything_is_uploaded_or_registered(
    case: str,
    embedded_mlflow: MlflowBackend,
    atto_checkpoint: LoadedCheckpoint,
    tmp_path: Path,
) -> None:
    options, message = HOSTILE[case]
    if options.get("output_dir") == "LONG":  # folders that exist, whose report path cannot
        deep = tmp_path
        while len(str(deep)) < 3940:  # the folder itself is shorter than PATH_MAX (4096)
            deep /= "d" * 50
        deep.mkdir(parents=True)
        options = {"output_dir": deep, "name": "m" * 128}
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data")

    with pytest.raises(InputError) as refused:
        publish(atto_checkpoint.path, settings=settings, **options)

    assert message in str(refused.value)
    assert "\n" not in str(refused.value)
    # Neither the object store nor the registry database was created.
    assert not (tmp_path / "data").exists()


def test_publish_runs_the_preflight_before_loading_or_exporting(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tracking server with a local object store: refused by the pairing check, no network.
    settings = Settings(data_dir=tmp_path / "data", tracking_uri="http://127.0.0.1:9")
    monkeypatch.setattr(pipeline, "_load", lambda _source: pytest.fail("loaded before preflight"))

    with pytest.raises(ConfigError, match="no other host could load the model"):
        publish(atto_checkpoint.path, settings=settings)

    assert not (tmp_path / "data" / "exports").exists()


def test_a_missing_checkpoint_is_refused_before_the_preflight_touches_any_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The preflight may create a bucket (--create-bucket) or a probe model on a server.
    monkeypatch.setattr(pipeline, "preflight", lambda *a, **k: pytest.fail("preflight ran"))

    with pytest.raises(PublishError, match="checkpoint not found") as failure:
        publish(tmp_path / "missing.safetensors", settings=Settings(data_dir=tmp_path / "d"))

    assert failure.value.step == "load"


def test_evaluate_heldout_refuses_an_empty_sample(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="samples must be at least 1"):
        evaluate_heldout(tmp_path / "model.onnx", samples=0)


def test_demo_trains_publishes_and_serves_the_staging_alias(
    embedded_mlflow: MlflowBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heimdall.demo import run_demo
    from heimdall.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    settings = embedded_mlflow.settings(data_dir=tmp_path / "demo")
    config = TrainConfig(train_samples=96, val_samples=32, epochs=1, batch_size=32)

    demo = run_demo(settings=settings, config=config, samples=16)

    summary = demo.summary()
    assert demo.served_uri == f"models:/{settings.model_name}@staging"
    assert demo.served_version == demo.publish.primary.version.version == summary["version"]
    assert summary["sha256"] == sha256_file(demo.publish.primary.onnx_path)
    assert demo.served_samples == 16
    assert demo.training.checkpoint.is_file()
    assert summary["report"] is not None and Path(str(summary["report"])).is_file()
    assert json.loads(json.dumps(demo.to_dict()))["summary"]["version"] == summary["version"]
    # The training run created the experiment: its artifacts (the report) stay in the data dir.
    assert not (tmp_path / "mlruns").exists()
    run_id = demo.publish.primary.version.run_id
    assert run_id == demo.training.run_id
    report = f"{run_id}/artifacts/report/{settings.model_name}/v1/report.html"
    assert list((tmp_path / "demo").rglob(report))


@dataclass(frozen=True)
class WithInt8:
    """One publish of fp32 and int8, and how often ONNX Runtime ran each held-out sample."""

    settings: Settings
    name: str
    result: PublishResult
    heldout_runs: Counter[str]  # held-out samples run, per model file (its variant)
    git_calls: int  # `git` processes the publish started


@pytest.fixture(scope="module")
def with_int8(
    embedded_mlflow: MlflowBackend,
    atto_checkpoint: LoadedCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    one_torch_thread: None,
) -> WithInt8:
    settings = embedded_mlflow.settings(data_dir=tmp_path_factory.mktemp("publish-int8"))
    name = unique("variants")
    heldout = {row.tobytes() for row in generate(HELDOUT_SAMPLES, seed=HELDOUT_SEED)[0]}
    runs: Counter[str] = Counter()
    run = ort.InferenceSession.run
    git: list[tuple[str, ...]] = []
    real_git = machine._git

    def counting_git(where: Path | None, *args: str) -> str | None:
        git.append(args)
        return real_git(where, *args)

    def counting(session: ort.InferenceSession, names: Any, feeds: Any, *args: Any) -> Any:
        variant = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY_VARIANT, "fp32")
        runs[variant] += sum(row.tobytes() in heldout for row in next(iter(feeds.values())))
        return run(session, names, feeds, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort.InferenceSession, "run", counting)
        patch.setattr(machine, "_git", counting_git)
        result = publish(
            atto_checkpoint.path,
            settings=settings,
            name=name,
            variants="fp32,int8",
            calibration=16,
            bench=False,
            **FAST,
        )
    return WithInt8(settings, name, result, runs, len(git))


def test_a_publish_of_two_variants_asks_git_for_the_commit_once(with_int8: WithInt8) -> None:
    commits = {p.version.tags.get("heimdall.git_commit") for p in with_int8.result.published}

    assert len(commits) == 1
    assert with_int8.git_calls <= 2  # rev-parse, then status when there is a repository


def test_int8_variant_is_its_own_tagged_version_with_its_own_alias(with_int8: WithInt8) -> None:
    settings, name, result = with_int8.settings, with_int8.name, with_int8.result

    (int8,) = result.variants
    assert int8.passed, int8.reason
    assert [p.variant for p in result.published] == ["fp32", "int8"]
    client = client_for(settings)
    for published, alias in zip(result.published, ("staging", "staging-int8"), strict=True):
        version = client.get_model_version_by_alias(name, alias)
        assert str(version.version) == published.version.version
        assert version.tags["variant"] == published.variant
        assert version.tags["sha256"] == sha256_file(published.onnx_path)
    assert result.published[0].upload.sha256 != result.published[1].upload.sha256
    assert versions_of(settings, name) == ["1", "2"]


def test_publish_runs_each_model_file_over_the_heldout_samples_once(with_int8: WithInt8) -> None:
    assert with_int8.heldout_runs == {"fp32": HELDOUT_SAMPLES, "int8": HELDOUT_SAMPLES}


def test_published_heldout_figures_are_those_of_evaluate_heldout_on_the_same_file(
    with_int8: WithInt8,
) -> None:
    for published in with_int8.result.published:
        served = evaluate_heldout(published.onnx_path, settings=with_int8.settings)
        assert published.heldout == served, published.variant


def test_stage_is_set_and_kept_when_the_version_is_reused(
    embedded_mlflow: MlflowBackend, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    settings = embedded_mlflow.settings(data_dir=tmp_path / "data")
    name = unique("stage")
    options: dict[str, Any] = {"settings": settings, "name": name, "bench": False, **FAST}

    first = publish(atto_checkpoint.path, **options)
    again = publish(atto_checkpoint.path, stage="Staging", **options)

    assert first.primary.version.stage in (None, "None")
    assert again.primary.reused_version
    assert again.primary.version.stage == "Staging"
    assert client_for(settings).get_model_version(name, "1").current_stage == "Staging"


def test_a_failed_step_names_itself_and_never_quotes_a_secret() -> None:
    from heimdall.steps import Run as _Run

    run = _Run(None, ["s3cr3t-value"])

    with pytest.raises(PublishError) as failure, run.step("upload"):
        raise RuntimeError("server said s3cr3t-value is wrong at http://u:pw-77@host/x")

    text = str(failure.value)
    assert failure.value.step == "upload"
    assert failure.value.reason.startswith("RuntimeError: server said *** is wrong")
    assert "s3cr3t-value" not in text and "pw-77" not in text
    assert failure.value.steps[-1]["status"] == "failed"


@pytest.mark.parametrize(
    ("baseline_passed", "forced", "detail"),
    [
        (True, None, "(gates passed)"),
        (True, "re-run", "(gates passed; forced: re-run)"),
        (False, "field test", "(baseline failed; forced: field test)"),
    ],
)
def test_the_alias_step_says_which_gates_a_forced_move_overruled(
    baseline_passed: bool, forced: str | None, detail: str
) -> None:
    change = AliasChange(
        name="m",
        alias="staging",
        version="2",
        previous="1",
        action="moved",
        gates=(Gate("ready", True, ""), Gate("baseline", baseline_passed, "")),
    )

    assert pipeline.alias_note(change, forced) == f"m@staging: version 1 → version 2 {detail}"
