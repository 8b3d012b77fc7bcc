"""One atto checkpoint and its ONNX export per session: exporting is the slow part."""

from __future__ import annotations

import pytest
import torch

from heimdall.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from heimdall.export import ExportResult, export_checkpoint
from heimdall.model import LocalizationNet, ModelConfig

RUN_ID = "run-unit-atto"


@pytest.fixture(scope="session")
def atto_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    """A random-weights atto LocalizationNet saved and loaded back as a checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "atto.safetensors"
    save_checkpoint(LocalizationNet(ModelConfig(backbone="atto")), path, training_run_id=RUN_ID)
    return load_checkpoint(path)


@pytest.fixture(scope="session")
def atto_onnx(
    atto_checkpoint: LoadedCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    """The atto checkpoint exported with the defaults."""
    return export_checkpoint(atto_checkpoint.path, tmp_path_factory.mktemp("onnx") / "atto.onnx")
