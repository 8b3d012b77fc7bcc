"""validate_onnx_model and get_model_metadata: contract checks, corrupt files, unsafe data paths."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from heimdall.checkpoint import LoadedCheckpoint, sha256_file
from heimdall.errors import ValidationError
from heimdall.export import ExportResult, export_to_onnx
from heimdall.model import INPUT_NAME, OUTPUT_NAMES
from heimdall.validate import get_model_metadata, validate_onnx_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def external(atto_checkpoint: LoadedCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export whose weights live in ``m.onnx.data``."""
    folder = tmp_path_factory.mktemp("ext")
    return export_to_onnx(atto_checkpoint.model, folder / "m.onnx", external_data=True).path


def _structure(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _write(proto: onnx.ModelProto, path: Path) -> Path:
    # Serialize as-is: onnx.save would try to resolve external data on the way out.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def _relocate(external: Path, target: Path, location: str) -> Path:
    proto = _structure(external)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return _write(proto, target)


def test_io_spec_has_named_symbolic_dims_and_dtype_names(atto_onnx: ExportResult) -> None:
    result = validate_onnx_model(atto_onnx.path)
    assert [(t.name, t.dtype, t.shape) for t in result.inputs] == [
        (INPUT_NAME, "float32", ("batch_size", 3, 128, 32))
    ]
    assert [(t.name, t.dtype, t.shape) for t in result.outputs] == [
        (name, "float32", ("batch_size", 2)) for name in OUTPUT_NAMES
    ]
    assert result.opset_version == atto_onnx.opset_version
    assert result.producer_name == "pytorch"
    assert result.file_size_bytes == atto_onnx.path.stat().st_size
    assert result.external_data_files == ()


def test_result_serialises_to_json(atto_onnx: ExportResult) -> None:
    data = json.loads(json.dumps(validate_onnx_model(atto_onnx.path).to_dict()))
    assert data["inputs"][0]["shape"] == ["batch_size", 3, 128, 32]
    assert data["metadata_props"]["heimdall.backbone"] == "atto"


def test_export_with_a_fixed_batch_axis_is_refused(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(
        atto_checkpoint.model,
        (torch.zeros(1, 3, 128, 32),),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=17,
    )
    with pytest.raises(ValidationError, match=r"'mel_spectrogram' has no symbolic batch axis"):
        validate_onnx_model(path)


def test_input_dim_edited_to_1_is_refused(atto_onnx: ExportResult, tmp_path: Path) -> None:
    proto = _structure(atto_onnx.path)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ValidationError, match=r"shape \(1, 3, 128, 32\)"):
        validate_onnx_model(_write(proto, tmp_path / "m.onnx"))


def test_graph_that_computes_a_fixed_batch_is_refused(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    proto = _structure(atto_onnx.path)
    node = next(n for n in proto.graph.node if "positions" in n.output)
    node.output[0] = "positions_raw"
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "fixed_shape")
    )
    proto.graph.node.append(
        helper.make_node("Reshape", ["positions_raw", "fixed_shape"], ["positions"])
    )
    with pytest.raises(ValidationError, match="specialized it inside the graph"):
        validate_onnx_model(_write(proto, tmp_path / "m.onnx"))


def test_wrong_io_names_are_refused(atto_onnx: ExportResult, tmp_path: Path) -> None:
    proto = _structure(atto_onnx.path)
    for node in proto.graph.node:
        node.output[:] = ["coords" if o == "positions" else o for o in node.output]
    proto.graph.output[0].name = "coords"
    with pytest.raises(ValidationError, match=r"IO names .*'coords'"):
        validate_onnx_model(_write(proto, tmp_path / "m.onnx"))


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_file_is_refused_with_a_clear_message(
    atto_onnx: ExportResult, tmp_path: Path, keep: float
) -> None:
    data = atto_onnx.path.read_bytes()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValidationError, match="truncated or corrupt") as info:
        validate_onnx_model(path)
    assert "re-download" in str(info.value)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not found"):
        validate_onnx_model(tmp_path / "nope.onnx")


def test_external_data_file_is_listed(external: Path) -> None:
    assert validate_onnx_model(external).external_data_files == (external.with_name("m.onnx.data"),)


def test_truncated_external_data_is_refused(external: Path, tmp_path: Path) -> None:
    model = shutil.copy(external, tmp_path / "m.onnx")
    data = external.with_name("m.onnx.data").read_bytes()
    (tmp_path / "m.onnx.data").write_bytes(data[:-100])
    with pytest.raises(ValidationError, match="truncated"):
        validate_onnx_model(model)


@pytest.fixture
def secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file outside the model's folder; opening it, or running the checker, fails the test."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"\0" * 64)
    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            assert Path(file).resolve() != path.resolve(), "the secret file was opened"
        return real_open(file, *args, **kwargs)

    def no_checker(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checker ran before the location was refused")

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(onnx.checker, "check_model", no_checker)
    return path


def test_absolute_external_data_location_is_refused(
    external: Path, tmp_path: Path, secret: Path
) -> None:
    model = _relocate(external, tmp_path / "model" / "m.onnx", str(secret))
    with pytest.raises(ValidationError, match="must be relative"):
        validate_onnx_model(model)


def test_dotdot_external_data_location_is_refused(
    external: Path, tmp_path: Path, secret: Path
) -> None:
    model = _relocate(external, tmp_path / "model" / "m.onnx", "../secret.bin")
    with pytest.raises(ValidationError, match=r"must not contain '\.\.'"):
        validate_onnx_model(model)


def test_symlink_out_of_the_model_folder_is_refused(
    external: Path, tmp_path: Path, secret: Path
) -> None:
    model = _relocate(external, tmp_path / "model" / "m.onnx", "m.onnx.data")
    (tmp_path / "model" / "m.onnx.data").symlink_to(secret)
    with pytest.raises(ValidationError, match="resolves outside the model's folder"):
        validate_onnx_model(model)


@dataclass(frozen=True)
class _Timings:
    p50_ms: float

    def to_dict(self) -> dict[str, object]:
        return {"p50_ms": self.p50_ms}


def test_metadata_is_json_with_schema_version_sha256_and_params(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    meta = get_model_metadata(
        atto_onnx.path,
        atto_checkpoint.model,
        run_id="r1",
        checkpoint_sha256=atto_checkpoint.sha256,
        parity={"passed": True},
        timings=_Timings(p50_ms=1.5),
    )
    data = json.loads(json.dumps(meta))
    assert data["schema_version"] == 1
    assert data["sha256"] == sha256_file(atto_onnx.path)
    assert data["parameters"]["total"] == atto_checkpoint.model.get_params_count().total
    assert data["backbone"] == "atto"
    assert data["checkpoint_sha256"] == atto_checkpoint.sha256
    assert data["parity"] == {"passed": True}
    assert data["timings"] == {"p50_ms": 1.5}
    assert data["inputs"][0]["shape"] == ["batch_size", 3, 128, 32]


def test_metadata_reuses_a_validation_and_hashes_it_is_given_without_reading_again(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    validation = validate_onnx_model(atto_onnx.path)

    def no_second_read(*_: object) -> None:
        raise AssertionError("the file was validated or hashed a second time")

    monkeypatch.setattr("heimdall.validate.validate_onnx_model", no_second_read)
    monkeypatch.setattr("heimdall.validate.sha256_file", no_second_read)

    meta = get_model_metadata(
        atto_onnx.path,
        atto_checkpoint.model,
        None,
        validation=validation,
        sha256s={atto_onnx.path.name: atto_onnx.sha256},
    )

    assert meta["sha256"] == atto_onnx.sha256
    assert meta["opset_version"] == validation.opset_version
