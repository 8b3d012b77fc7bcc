"""`heimdall upload` stores only what `heimdall validate` accepts, with the files it refers to."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from heimdall.export import ExportResult
from heimdall.storage import LocalStore, download_model
from tests.unit.test_cli import Home, failed_cleanly


def stored_files(home: Home) -> list[Path]:
    return [p for p in (home.data_dir / "objects").rglob("*") if p.is_file()]


def onnx_with_external_data_at(path: Path, location: str) -> Path:
    """An ONNX file whose one initializer says its bytes are at ``location``."""
    weights = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for name, value in {"location": location, "offset": "0", "length": "64"}.items():
        weights.external_data.add(key=name, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weights],
    )
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "data", "unused")


def test_a_text_file_named_onnx_is_refused_with_one_line_and_nothing_is_stored(
    home: Home, tmp_path: Path
) -> None:
    bogus = tmp_path / "x.onnx"
    bogus.write_text("this is not a model\n")

    result = home.run("upload", bogus, "--create-bucket", "--json")

    failed_cleanly(result)
    document = json.loads(result.stdout)
    assert document["error"] == "ValidationError"
    assert "\n" not in document["message"]
    assert str(bogus) in document["message"]
    assert stored_files(home) == []


@pytest.mark.parametrize("where", ["parent", "absolute-existing", "absolute-passwd"])
def test_external_data_outside_the_model_folder_is_refused_and_nothing_is_stored(
    home: Home, tmp_path: Path, where: str
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(64))
    location = {
        "parent": "../../../../etc/passwd",
        "absolute-existing": str(outside),
        "absolute-passwd": "/etc/passwd",
    }[where]
    model = onnx_with_external_data_at(folder / "model.onnx", location)

    result = home.run("upload", model, "--create-bucket")

    message = failed_cleanly(result)
    assert "ValidationError" in message
    assert "external data" in message
    assert stored_files(home) == []


def test_a_valid_model_is_uploaded_with_the_external_data_file_it_names(
    home: Home, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    model = folder / "model.onnx"
    onnx.save_model(
        onnx.load(str(atto_onnx.path)),
        model,
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )

    document = home.json("upload", model, "--create-bucket")

    assert [f["name"] for f in document["files"]] == ["model.onnx", "weights.bin"]
    store = LocalStore(home.data_dir / "objects")
    downloaded = download_model(store, document["uri"], tmp_path / "down")
    restored = downloaded.parent / "weights.bin"
    digest = hashlib.sha256(restored.read_bytes()).hexdigest()
    assert digest == hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest()
    onnx.checker.check_model(str(downloaded), full_check=True)


def test_an_upload_whose_stored_bytes_changed_is_sent_again_and_named(
    home: Home, atto_onnx: ExportResult
) -> None:
    first = home.json("upload", atto_onnx.path, "--create-bucket")
    stored = home.data_dir / "objects" / first["bucket"] / first["key"]
    stored.write_bytes(bytes(b ^ 0xFF for b in stored.read_bytes()))  # same size, metadata kept

    again = home.json("upload", atto_onnx.path)

    assert (again["key"] != first["key"], again["reused"]) == (True, False)
    assert again["replaced_stale"] == first["key"]
    assert again["sha256"] == first["sha256"]
