"""Serving needs no torch: load by alias, predict and list models with ``import torch`` blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from heimdall.data import generate
from heimdall.registry import set_alias
from tests.fixtures.mlflow_server import MlflowBackend
from tests.fixtures.registered import publish_random

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Runs heimdall's CLI in a fresh interpreter where any import of torch fails, as it would in an
# environment installed from the `serve` extra only.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: serving must not need it")
sys.meta_path.insert(0, NoTorch())
from heimdall.cli import app
app()
"""


@pytest.fixture(scope="module")
def published(embedded_mlflow: MlflowBackend, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``models:/NAME@staging`` of an atto export registered on the embedded store."""
    settings, store = embedded_mlflow.settings(), embedded_mlflow.store()
    name, folder = f"serving-{os.urandom(3).hex()}", tmp_path_factory.mktemp("serving")
    version = publish_random(folder, name, settings, store, seed=11)
    set_alias(name, version, "staging", settings=settings, store=store)
    return f"models:/{name}@staging"


def heimdall_without_torch(
    backend: MlflowBackend, *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEIMDALL_"))}
    env.update({"HEIMDALL_DATA_DIR": str(backend.data_dir), "PYTHONPATH": str(ROOT)})
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_and_models_commands_work_without_torch(
    embedded_mlflow: MlflowBackend, published: str, tmp_path: Path
) -> None:
    features, _ = generate(3, seed=5)
    np.save(tmp_path / "features.npy", features)
    started = time.monotonic()

    predicted = heimdall_without_torch(
        embedded_mlflow,
        "predict",
        published,
        str(tmp_path / "features.npy"),
        "--json",
        cwd=tmp_path,
    )

    cold_start_s = time.monotonic() - started
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    answer = json.loads(predicted.stdout)
    assert np.asarray(answer["positions"]).shape == (3, 2)
    name = published.removeprefix("models:/").partition("@")[0]
    listed = heimdall_without_torch(embedded_mlflow, "models", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert name in listed.stdout
    shown = heimdall_without_torch(embedded_mlflow, "models", "show", name, "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert json.loads(shown.stdout)["aliases"] == {"staging": "1"}
    print(f"cold start, process start to first prediction by alias: {cold_start_s:.1f} s")
