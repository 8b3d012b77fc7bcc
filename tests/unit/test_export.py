"""export_to_onnx: contract, provenance, determinism, atomicity, external data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from heimdall.checkpoint import LoadedCheckpoint, sha256_file
from heimdall.errors import ExportError, InputError
from heimdall.export import (
    ExportResult,
    export_checkpoint,
    export_checkpoint_isolated,
    export_to_onnx,
)
from heimdall.model import INPUT_NAME, LocalizationNet
from heimdall.validate import validate_onnx_model
from heimdall.verify import verify_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def opset14(atto_checkpoint: LoadedCheckpoint, tmp_path_factory: pytest.TempPathFactory):
    """Opset 14 export of a model left in train mode, and that model afterwards."""
    model = atto_checkpoint.model
    model.train()
    try:
        result = export_to_onnx(model, tmp_path_factory.mktemp("o14") / "m.onnx", opset_version=14)
        yield result, model.training
    finally:
        model.eval()


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_batch_axis_is_symbolic_and_named_on_all_io(atto_onnx: ExportResult) -> None:
    spec = validate_onnx_model(atto_onnx.path)
    assert [t.shape[0] for t in (*spec.inputs, *spec.outputs)] == ["batch_size"] * 3


def test_batch_1_and_64_run_on_the_exported_file(atto_onnx: ExportResult) -> None:
    session = ort.InferenceSession(str(atto_onnx.path), providers=["CPUExecutionProvider"])
    for batch in (1, 64):
        positions, sigma = session.run(
            None, {INPUT_NAME: np.zeros((batch, 3, 128, 32), np.float32)}
        )
        assert positions.shape == sigma.shape == (batch, 2)


def test_provenance_is_stamped_in_metadata_props(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    meta = _metadata(atto_onnx.path)
    assert meta["heimdall.backbone"] == "atto"
    assert meta["heimdall.checkpoint_sha256"] == atto_checkpoint.sha256
    assert meta["heimdall.training_run_id"] == atto_checkpoint.training_run_id
    assert meta["heimdall.version"]
    assert json.loads(meta["heimdall.normalization"]) == {
        "center": [45.0, 8.5],
        "scale": [1.0, 1.5],
    }
    assert json.loads(meta["heimdall.uncertainty_clamp"]) == {"min": 0.01, "max": 1.0}
    io_spec = json.loads(meta["heimdall.io_spec"])
    assert io_spec["mel_spectrogram"] == {"dtype": "float32", "shape": ["batch_size", 3, 128, 32]}


def test_same_checkpoint_exported_twice_is_byte_identical(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    again = export_checkpoint(atto_checkpoint.path, tmp_path / "again.onnx")
    assert again.sha256 == atto_onnx.sha256 == sha256_file(tmp_path / "again.onnx")


def test_an_isolated_export_writes_the_same_bytes_and_refuses_a_changed_checkpoint(
    atto_checkpoint: LoadedCheckpoint, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    isolated = export_checkpoint_isolated(
        atto_checkpoint.path, tmp_path / "m.onnx", checkpoint_sha256=atto_checkpoint.sha256
    )

    assert isolated.path == tmp_path / "m.onnx"
    assert isolated.sha256 == sha256_file(isolated.path) == atto_onnx.sha256
    with pytest.raises(ExportError, match="changed after it was loaded"):
        export_checkpoint_isolated(
            atto_checkpoint.path, tmp_path / "other.onnx", checkpoint_sha256="0" * 64
        )
    assert not (tmp_path / "other.onnx").exists()


def test_opset_14_export_validates_and_matches_pytorch(
    opset14: tuple[ExportResult, bool], atto_checkpoint: LoadedCheckpoint
) -> None:
    result, _ = opset14
    assert validate_onnx_model(result.path).opset_version == 14
    verify_parity(
        result.path, atto_checkpoint.model, batch_sizes=(1, 3), task_samples=0, intra_op_threads=1
    )


def test_export_restores_the_train_mode_it_found(opset14: tuple[ExportResult, bool]) -> None:
    _, was_training_after = opset14
    assert was_training_after


def test_forced_external_data_is_one_unit_that_moves_together(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    result = export_to_onnx(atto_checkpoint.model, tmp_path / "a" / "m.onnx", external_data=True)
    assert result.data_files == (tmp_path / "a" / "m.onnx.data",)
    assert result.data_files[0].stat().st_mode == result.path.stat().st_mode
    moved = tmp_path / "b"
    moved.mkdir()
    for file in (result.path, *result.data_files):
        file.rename(moved / file.name)
    assert validate_onnx_model(moved / "m.onnx").external_data_files == (moved / "m.onnx.data",)


def test_reexport_without_external_data_removes_the_stale_data_file(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    target = tmp_path / "m.onnx"
    export_to_onnx(atto_checkpoint.model, target, external_data=True)
    result = export_to_onnx(atto_checkpoint.model, target, external_data=False)
    assert result.data_files == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_export_leaves_the_target_untouched(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="exporter exploded"):
        export_to_onnx(atto_checkpoint.model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_dynamo_exporter_below_opset_18_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="opset 14"):
        export_to_onnx(LocalizationNet(), tmp_path / "m.onnx", exporter="dynamo", opset_version=14)
    assert not (tmp_path / "m.onnx").exists()


def test_output_path_must_end_in_onnx(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.onnx"):
        export_to_onnx(LocalizationNet(), tmp_path / "m.bin")


@pytest.mark.slow  # ~7 s alone, 30 s on a loaded 2-core machine
def test_dynamo_exporter_writes_the_same_contract(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    result = export_to_onnx(atto_checkpoint.model, tmp_path / "m.onnx", exporter="dynamo")
    spec = validate_onnx_model(result.path)
    assert (spec.opset_version, spec.outputs[0].shape) == (20, ("batch_size", 2))
    verify_parity(
        result.path, atto_checkpoint.model, batch_sizes=(1, 3), task_samples=0, intra_op_threads=1
    )
