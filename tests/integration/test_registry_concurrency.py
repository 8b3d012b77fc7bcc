"""Several processes publishing at once: one version per sha256, a store that never breaks.

Every writer is a separate process (``tests.fixtures.publish_worker``), as separate
``heimdall publish`` runs are: each opens its own MLflow stores and connections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import pytest

from heimdall import registry
from heimdall.files import sha256_file
from heimdall.inference import LocalizationModel
from tests.fixtures.mlflow_server import MlflowBackend

pytestmark = pytest.mark.integration

WRITERS = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def onnx_files(atto_onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``WRITERS`` files with the same weights and distinct bytes (one metadata property)."""
    folder = tmp_path_factory.mktemp("distinct-onnx")
    files = []
    for i in range(WRITERS):
        proto = onnx.load(str(atto_onnx_path))
        onnx.helper.set_model_props(
            proto, {**{p.key: p.value for p in proto.metadata_props}, "heimdall.test": str(i)}
        )
        onnx.save(proto, str(folder / f"m{i}.onnx"))
        files.append(folder / f"m{i}.onnx")
    return files


@pytest.fixture(scope="module")
def atto_onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from heimdall.export import export_to_onnx
    from heimdall.model import LocalizationNet, ModelConfig

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("atto-onnx") / "atto.onnx"
    export_to_onnx(LocalizationNet(ModelConfig(backbone="atto")).eval(), path)
    return path


def backend_env(backend: MlflowBackend, data_dir: Path) -> dict[str, str]:
    """The environment a user sets for this backend, and nothing from the developer's shell."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEIMDALL_", "AWS_"))
    }
    env.update({"HEIMDALL_DATA_DIR": str(data_dir), "HEIMDALL_BUCKET": backend.bucket})
    env["PYTHONPATH"] = str(ROOT)
    if backend.kind == "server":
        env.update(backend.env())
    return env


@dataclass(frozen=True)
class Wave:
    """What ``WRITERS`` processes, started at once, answered: each published its own file under
    one name and the same file under another, so both races run against each other."""

    backend: MlflowBackend
    distinct: str
    same: str
    answers: dict[str, list[dict[str, object]]]


def publish_at_once(jobs: list[list[str]], env: dict[str, str]) -> list[dict[str, object]]:
    """Start one worker per job (``[path, name, path, name, ...]``), all at once; every answer."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.publish_worker", *job],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    answers: list[dict[str, object]] = []
    for worker, job in zip(workers, jobs, strict=True):
        stdout, stderr = worker.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert worker.returncode == 0, f"worker failed:\n{stdout}\n{stderr[-3000:]}"
        assert len(lines) == len(job) // 2, f"worker answered {lines}"
        answers.extend(json.loads(line) for line in lines)
    return answers


@pytest.fixture(scope="module", params=["embedded", "server"])
def wave(
    request: pytest.FixtureRequest,
    onnx_files: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Wave:
    """The server, or an embedded data dir that does not exist yet: every writer races to
    create its SQLite store (and the first use must leave it whole)."""
    if request.param == "server":
        backend: MlflowBackend = request.getfixturevalue("mlflow_server")
    else:
        embedded: MlflowBackend = request.getfixturevalue("embedded_mlflow")
        backend = replace(embedded, data_dir=tmp_path_factory.mktemp("wave") / "never-used")
    token = os.urandom(3).hex()
    distinct, same = f"concurrent-distinct-{token}", f"concurrent-same-{token}"
    shared = str(onnx_files[0])
    # Half the writers start with their own file, half with the shared one.
    jobs = [
        [str(path), distinct, shared, same] if i % 2 else [shared, same, str(path), distinct]
        for i, path in enumerate(onnx_files)
    ]
    answers = publish_at_once(jobs, backend_env(backend, backend.data_dir))
    by_name = {name: [a for a in answers if a["name"] == name] for name in (distinct, same)}
    return Wave(backend, distinct, same, by_name)


def test_distinct_models_published_at_once_each_get_a_version_and_a_true_alias_history(
    wave: Wave, onnx_files: list[Path]
) -> None:
    settings, name, answers = wave.backend.settings(), wave.distinct, wave.answers[wave.distinct]

    versions = sorted(int(str(a["version"])) for a in answers)
    assert versions == list(range(1, WRITERS + 1)) and all(a["created"] for a in answers)
    assert name in [m.name for m in registry.list_models(settings=settings)]
    shown = registry.show_model(name, settings=settings)
    assert {v.status for v in shown.versions} == {"READY"}
    assert {v.sha256 for v in shown.versions} == {sha256_file(p) for p in onnx_files}
    for version in shown.versions:
        assert LocalizationModel.load(version.uri, settings=settings).sha256 == version.sha256
    events = shown.alias_history["staging"]
    assert len(events) == WRITERS
    # Each move names the version that really held the alias just before it.
    assert [e.previous for e in events] == [None, *(e.version for e in events[:-1])]
    assert shown.aliases["staging"] == events[-1].version


def test_the_same_bytes_published_at_once_give_exactly_one_version(
    wave: Wave, onnx_files: list[Path]
) -> None:
    settings, name, answers = wave.backend.settings(), wave.same, wave.answers[wave.same]

    assert len(answers) == WRITERS
    assert {a["version"] for a in answers} == {"1"}
    assert sum(bool(a["created"]) for a in answers) == 1  # the others report the winner's version
    shown = registry.show_model(name, settings=settings)
    assert [v.version for v in shown.versions] == ["1"]
    assert [(e.version, e.previous) for e in shown.alias_history["staging"]] == [("1", None)]
    assert LocalizationModel.load(f"models:/{name}@staging", settings=settings).sha256 == (
        sha256_file(onnx_files[0])
    )
