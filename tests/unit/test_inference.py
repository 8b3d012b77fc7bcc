"""Loading a LocalizationNet ONNX file by path and predicting with input checks (no servers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from benchmarks.serve_load import publish
from heimdall.config import Settings
from heimdall.data import generate
from heimdall.errors import InputError, RegistryError, ResourceError
from heimdall.export import ExportResult
from heimdall.inference import (
    LocalizationModel,
    Prediction,
    altered_bytes_error,
    check_features,
    load_features,
    predict_file,
)
from heimdall.runtime import CPU, SessionSettings
from heimdall.storage import open_store
from tests.unit.test_serving_follower import register_without_sha256


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return generate(3, seed=5)[0]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, tracking_uri=None, s3_endpoint_url=None)


def test_predict_matches_onnxruntime_on_the_same_file(
    atto_onnx: ExportResult, features: np.ndarray, settings: Settings
) -> None:
    session = ort.InferenceSession(str(atto_onnx.path), providers=[CPU])
    positions, uncertainties = session.run(None, {"mel_spectrogram": features})

    model = LocalizationModel.load(atto_onnx.path, settings=settings)
    prediction = model.predict(features)

    assert model.providers == [CPU]
    assert model.sha256 == atto_onnx.sha256
    np.testing.assert_array_equal(prediction.positions, positions)
    np.testing.assert_array_equal(prediction.uncertainties, uncertainties)


def test_float64_features_are_converted_to_float32(
    atto_onnx: ExportResult, features: np.ndarray, settings: Settings
) -> None:
    model = LocalizationModel.load(atto_onnx.path, settings=settings)

    as64 = model.predict(features.astype(np.float64))

    np.testing.assert_array_equal(as64.positions, model.predict(features).positions)


def test_an_mlflow_model_directory_loads_through_its_model_onnx(
    atto_onnx: ExportResult, tmp_path: Path, features: np.ndarray, settings: Settings
) -> None:
    folder = tmp_path / "mlflow-model"
    folder.mkdir()
    shutil.copy(atto_onnx.path, folder / "model.onnx")

    model = LocalizationModel.load(folder.as_uri(), settings=settings)

    assert model.predict(features).positions.shape == (3, 2)


def test_load_runs_the_recommended_session_settings(
    atto_onnx: ExportResult, settings: Settings
) -> None:
    model = LocalizationModel.load(atto_onnx.path, settings=settings)

    options = model.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_load_runs_the_session_settings_a_model_records(
    atto_onnx: ExportResult, tmp_path: Path, settings: Settings
) -> None:
    proto = onnx.load(str(atto_onnx.path))
    recorded = SessionSettings(graph_optimization_level="extended", stop_spinning_after_run=False)
    onnx.helper.set_model_props(
        proto,
        {**{p.key: p.value for p in proto.metadata_props}, **recorded.to_metadata()},
    )
    path = tmp_path / "recorded.onnx"
    onnx.save(proto, str(path))

    model = LocalizationModel.load(path, settings=settings)

    options = model.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.get_session_config_entry("session.force_spinning_stop") == "0"


def test_an_unloadable_file_is_one_input_error_line(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx file\n" * 4)

    with pytest.raises(InputError, match=r"broken\.onnx: ONNX Runtime cannot load the model") as e:
        LocalizationModel.load(path, settings=settings)
    assert "\n" not in str(e.value)


def test_a_model_with_other_inputs_and_outputs_is_refused(
    tmp_path: Path, settings: Settings
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    with pytest.raises(InputError, match="not a LocalizationNet export"):
        LocalizationModel.load(path, settings=settings)


def test_missing_model_and_unknown_scheme_are_clear_errors(
    tmp_path: Path, settings: Settings
) -> None:
    with pytest.raises(InputError, match="no ONNX model at"):
        LocalizationModel.load(tmp_path / "absent.onnx", settings=settings)
    with pytest.raises(InputError, match="models:/NAME@alias"):
        LocalizationModel.load("gs://bucket/model.onnx", settings=settings)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 128, 32), np.float32), r"got shape \(3, 128, 32\); add a batch axis"),
        (np.zeros((2, 3, 128, 16), np.float32), r"got shape \(2, 3, 128, 16\)"),
        (np.zeros((0, 3, 128, 32), np.float32), "empty batch"),
        (np.zeros((1, 3, 128, 32), np.int64), "got dtype int64"),
        ([[0.0]], "got list"),
    ],
)
def test_features_of_the_wrong_kind_are_refused(array: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_features(array)


def test_non_finite_features_are_refused_naming_the_samples() -> None:
    array = np.zeros((4, 3, 128, 32), np.float64)
    array[1, 0, 0, 0] = np.nan
    array[3, 2, 5, 5] = 1e300  # finite as float64, infinite as float32

    with pytest.raises(InputError, match=r"sample\(s\) \[1, 3\]"):
        check_features(array)


def test_predict_file_on_a_wrong_shape_file_names_the_file_and_shape(
    atto_onnx: ExportResult, tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "features.npy"
    np.save(path, np.zeros((2, 3, 64, 32), np.float32))

    with pytest.raises(InputError, match=r"features\.npy: .*got shape \(2, 3, 64, 32\)"):
        predict_file(str(atto_onnx.path), path, settings=settings)


def test_predict_file_refuses_pickled_and_missing_files(
    atto_onnx: ExportResult, tmp_path: Path, settings: Settings
) -> None:
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(InputError, match=r"not a readable \.npy array"):
        predict_file(str(atto_onnx.path), pickled, settings=settings)
    with pytest.raises(InputError, match="features file not found"):
        predict_file(str(atto_onnx.path), tmp_path / "absent.npy", settings=settings)


def test_predict_file_gives_json_ready_predictions(
    atto_onnx: ExportResult, tmp_path: Path, features: np.ndarray, settings: Settings
) -> None:
    path = tmp_path / "features.npy"
    np.save(path, features)

    prediction = predict_file(str(atto_onnx.path), path, settings=settings)

    assert isinstance(prediction, Prediction)
    data = json.loads(json.dumps(prediction.to_dict()))
    assert np.asarray(data["positions"]).shape == (3, 2)
    assert np.asarray(data["uncertainties"]).shape == (3, 2)


def test_importing_the_serving_side_loads_no_torch() -> None:
    code = (
        "import sys, heimdall.inference, heimdall.registry, heimdall.cli; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


class _CountingSession:
    """An ONNX Runtime session that records the batch size of every run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.batches.extend(len(v) for v in feed.values())
        return self._session.run(outputs, feed)


def test_predict_runs_a_large_batch_in_chunks_with_the_same_numbers(
    atto_onnx: ExportResult,
) -> None:
    features = generate(10, seed=7)[0]
    session = ort.InferenceSession(str(atto_onnx.path), providers=["CPUExecutionProvider"])
    whole = session.run(None, {"mel_spectrogram": features})
    counting = _CountingSession(session)
    model = LocalizationModel(counting, uri=str(atto_onnx.path), sha256="0" * 64)  # type: ignore[arg-type]

    prediction = model.predict(features, chunk_size=4)

    assert counting.batches == [4, 4, 2]
    assert np.abs(prediction.positions - whole[0]).max() <= 1e-5
    assert np.abs(prediction.uncertainties - whole[1]).max() <= 1e-5
    counting.batches.clear()
    model.predict(features[:3])
    assert counting.batches == [3]  # the default chunk holds a small batch whole


def test_predict_names_non_finite_samples_by_their_place_in_the_whole_batch(
    atto_onnx: ExportResult, settings: Settings
) -> None:
    features = generate(6, seed=7)[0]
    features[5, 0, 0, 0] = np.inf
    model = LocalizationModel.load(atto_onnx.path, settings=settings)

    with pytest.raises(InputError, match=r"sample\(s\) \[5\]"):
        model.predict(features, chunk_size=4)
    with pytest.raises(InputError, match="chunk_size must be at least 1"):
        model.predict(features, chunk_size=0)


def test_features_load_memory_mapped(tmp_path: Path, features: np.ndarray) -> None:
    path = tmp_path / "features.npy"
    np.save(path, features)

    loaded = load_features(path)

    assert isinstance(loaded, np.memmap)
    assert np.array_equal(np.asarray(loaded), features)


def _npy_claiming(path: Path, shape: tuple[int, ...], payload: bytes = b"") -> Path:
    """A .npy file whose header declares ``shape`` float32 but holds only ``payload``."""
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        fh.write(payload)
    return path


@pytest.mark.parametrize(
    "shape", [(10**8, 3, 128, 32), (2, 3, 128, 32), (2**62, 2**62, 3, 128, 32)]
)
def test_a_npy_header_that_claims_more_than_the_file_holds_is_refused_before_reading(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    path = _npy_claiming(tmp_path / "claims.npy", shape, b"\0" * 4)

    with pytest.raises(InputError) as refused:
        load_features(path)

    message = str(refused.value)
    assert "\n" not in message
    assert f"claims.npy: its header declares shape {shape} float32" in message
    assert "the file holds 4 bytes after its 128-byte header" in message


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (
            b"\x10\0\0\0\0\0\0\0" + b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            "safetensors",
        ),
        (b"PK\x03\x04" + b"\0" * 30, "zip archive (an .npz?)"),
        (b"lat,lon\n1,2\n", "not a .npy file"),
    ],
    ids=["safetensors", "npz", "csv"],
)
def test_a_features_file_that_is_not_npy_gets_our_own_line(
    tmp_path: Path, content: bytes, kind: str
) -> None:
    path = tmp_path / "features.bin"
    path.write_bytes(content)

    with pytest.raises(InputError) as refused:
        load_features(path)

    message = str(refused.value)
    assert kind in message and "allow_pickle" not in message and "\n" not in message
    assert "(B, 3, 128, 32) float32" in message and "numpy.save" in message


def test_a_registry_name_given_without_models_prefix_gets_the_hint(settings: Settings) -> None:
    with pytest.raises(InputError, match=r"did you mean models:/my-model@staging\?"):
        LocalizationModel.load("my-model@staging", settings=settings)


@pytest.mark.parametrize(
    ("uri", "advice"),
    [
        ("models:/m@staging", "heimdall rollback m --alias staging"),
        ("models:/m/3", "heimdall rollback m --alias ALIAS"),
    ],
)
def test_altered_bytes_advise_a_rollback_or_a_fresh_publish(uri: str, advice: str) -> None:
    message = str(altered_bytes_error(uri, "a" * 64, "b" * 64))

    assert advice in message and "publish the checkpoint again" in message
    assert "register the model again" not in message


def test_onnx_runtime_running_out_of_memory_is_one_resource_error_line(
    atto_onnx: ExportResult,
) -> None:
    session = _CountingSession(ort.InferenceSession(str(atto_onnx.path)))

    def bad_alloc(*_args: object) -> None:
        raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")

    session.run = bad_alloc  # type: ignore[method-assign,assignment]
    model = LocalizationModel(session, uri="m.onnx", sha256="0" * 64)  # type: ignore[arg-type]

    with pytest.raises(
        ResourceError, match=r"^ONNX Runtime on 3 samples ran out of memory.*chunk_size"
    ):
        model.predict(generate(3, seed=1)[0])


def _mapped_kib(path: Path) -> int:
    """KiB of ``path`` mapped into this process and resident now (/proc/self/smaps Rss)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line: address range first
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's smaps")
def test_predict_over_a_mapped_file_keeps_none_of_it_resident(
    atto_onnx: ExportResult, tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "features.npy"
    np.save(path, np.zeros((256, 3, 128, 32), np.float32))  # 12 MiB
    model = LocalizationModel.load(atto_onnx.path, settings=settings)
    features = load_features(path)

    model.predict(features, chunk_size=64)

    assert _mapped_kib(path) <= 64 * 49152 // 1024  # at most one chunk's pages, not 12 MiB


def test_a_registered_version_without_a_sha256_tag_is_refused_not_served_unchecked(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, tracking_uri=None, s3_endpoint_url=None)
    version = publish(atto_onnx.path, "untagged", settings, open_store(settings))
    bare = register_without_sha256(settings, "untagged", version)

    with pytest.raises(RegistryError) as refused:
        LocalizationModel.load(f"models:/untagged/{bare}", settings=settings)

    assert str(refused.value) == (
        f"version {bare} of untagged has no sha256 tag: it was not registered by heimdall; "
        "publish it with heimdall publish"
    )
