"""`heimdall verify`: lineage is checked before any comparison, and said in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heimdall.checkpoint import LoadedCheckpoint, save_checkpoint
from heimdall.export import ExportResult, export_to_onnx
from heimdall.model import LocalizationNet, ModelConfig
from tests.unit.test_cli import Home, failed_cleanly

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "data", "heimdall-verify-cli")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A checkpoint of another backbone: comparing it would fail on every number."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("other") / "femto.safetensors"
    return path, save_checkpoint(LocalizationNet(ModelConfig(backbone="femto")), path)


def test_verify_against_another_checkpoint_exits_1_with_one_lineage_line(
    home: Home,
    atto_onnx: ExportResult,
    atto_checkpoint: LoadedCheckpoint,
    other_checkpoint: tuple[Path, str],
) -> None:
    path, sha256 = other_checkpoint

    message = failed_cleanly(home.run("verify", atto_onnx.path, "--checkpoint", path))

    assert "VerificationError" in message
    assert atto_checkpoint.sha256[:12] in message and sha256[:12] in message
    assert "export this checkpoint again" in message
    assert "disagrees" not in message and "@ batch" not in message


def test_verify_json_error_for_another_checkpoint_is_one_line(
    home: Home, atto_onnx: ExportResult, other_checkpoint: tuple[Path, str]
) -> None:
    result = home.run("verify", atto_onnx.path, "--checkpoint", other_checkpoint[0], "--json")

    failed_cleanly(result)
    error = json.loads(result.stdout)
    assert error["error"] == "VerificationError"
    assert "\n" not in error["message"] and other_checkpoint[1][:12] in error["message"]


def test_verify_json_records_matched_lineage(
    home: Home, atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    data = home.json(
        "verify", atto_onnx.path, "--checkpoint", atto_checkpoint.path, "--batch-sizes", "1"
    )

    assert (data["passed"], data["lineage"]) == (True, "matched")


def test_verify_of_a_file_without_lineage_warns_and_passes(
    home: Home, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    exported = export_to_onnx(atto_checkpoint.model, tmp_path / "m.onnx")

    result = home.run(
        "verify", exported.path, "--checkpoint", atto_checkpoint.path, "--batch-sizes", "1"
    )

    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "records no checkpoint sha256; its lineage was not checked" in output
    assert "parity passed" in output
