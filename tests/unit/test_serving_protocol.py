"""The Open Inference Protocol codec: JSON and binary requests decode to the same checked
float32 features, responses encode back exactly, and bad requests are refused in one line
before anything large is allocated."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import numpy as np
import pytest

from heimdall.data import generate
from heimdall.export import ExportResult
from heimdall.inference import LocalizationModel
from heimdall.serving.backend import Inferred, Served
from heimdall.serving.protocol import (
    HEADER_LENGTH,
    SAMPLE_BYTES,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    encode_response,
    max_body_bytes,
    model_metadata,
    parse_header_length,
    parse_infer_request,
)

LIMIT = 64


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return generate(3, seed=11)[0]


@pytest.fixture(scope="module")
def served(atto_onnx: ExportResult) -> Served:
    model = LocalizationModel.load(atto_onnx.path)
    return Served(model, "localization", "7", model.sha256, "production", str(atto_onnx.path))


def _tensor(features: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"name": "mel_spectrogram", "datatype": "FP32", "shape": list(features.shape), **extra}


def _json_body(features: np.ndarray, nested: bool = False, **request: Any) -> bytes:
    data = features.tolist() if nested else features.ravel().tolist()
    return json.dumps({"inputs": [_tensor(features, data=data)], **request}).encode()


def _binary_body(
    features: np.ndarray, size: int | None = None, **request: Any
) -> tuple[bytes, int]:
    raw = features.astype("<f4").tobytes()
    parameters = {"binary_data_size": len(raw) if size is None else size}
    header = json.dumps({"inputs": [_tensor(features, parameters=parameters)], **request})
    return header.encode() + raw, len(header.encode())


def _refused(body: bytes, header_length: int | None = None, status: int = 400) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse_infer_request(body, header_length, max_request_samples=LIMIT)
    assert caught.value.status == status
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_json_flat_nested_and_binary_requests_decode_to_the_same_float32(
    features: np.ndarray,
) -> None:
    flat = parse_infer_request(_json_body(features), None, max_request_samples=LIMIT)
    nested = parse_infer_request(_json_body(features, True), None, max_request_samples=LIMIT)
    body, length = _binary_body(features)
    binary = parse_infer_request(body, length, max_request_samples=LIMIT)
    for parsed in (flat, nested, binary):
        assert parsed.features.dtype == np.float32
        np.testing.assert_array_equal(parsed.features, features)
    assert [o.name for o in flat.outputs] == ["positions", "uncertainties"]
    assert not any(o.binary for o in flat.outputs)


def test_requested_outputs_and_binary_flags_are_honoured(features: np.ndarray) -> None:
    request: dict[str, Any] = {
        "id": "req-1",
        "parameters": {"binary_data_output": True},
        "outputs": [
            {"name": "uncertainties"},
            {"name": "positions", "parameters": {"binary_data": False}},
        ],
    }
    parsed = parse_infer_request(_json_body(features, **request), None, max_request_samples=LIMIT)
    assert parsed.outputs == (
        RequestedOutput("uncertainties", True),
        RequestedOutput("positions", False),
    )
    assert parsed.id == "req-1"
    everything = parse_infer_request(
        _json_body(features, parameters={"binary_data_output": True}),
        None,
        max_request_samples=LIMIT,
    )
    assert all(o.binary for o in everything.outputs)


def test_json_response_carries_the_answering_model_and_exact_float32(
    served: Served, features: np.ndarray
) -> None:
    prediction = served.model.predict(features)
    inferred = Inferred(served, prediction.positions, prediction.uncertainties)
    request = InferRequest(features, (RequestedOutput("positions", False),), id="abc")
    encoded = encode_response(inferred, request)
    assert encoded.header_length is None
    assert encoded.content_type == "application/json"
    response = json.loads(encoded.body)
    assert response["model_name"] == "localization"
    assert response["model_version"] == "7"
    assert response["id"] == "abc"
    assert response["parameters"] == {"sha256": served.model.sha256, "alias": "production"}
    (output,) = response["outputs"]
    assert output["shape"] == [3, 2] and output["datatype"] == "FP32"
    np.testing.assert_array_equal(
        np.asarray(output["data"], dtype=np.float32).reshape(3, 2), prediction.positions
    )


def test_binary_response_parses_back_in_output_order(served: Served, features: np.ndarray) -> None:
    prediction = served.model.predict(features)
    inferred = Inferred(served, prediction.positions, prediction.uncertainties)
    outputs = (RequestedOutput("uncertainties", True), RequestedOutput("positions", True))
    encoded = encode_response(inferred, InferRequest(features, outputs))
    assert encoded.header_length is not None
    assert encoded.content_type == "application/octet-stream"
    header = json.loads(encoded.body[: encoded.header_length])
    offset = encoded.header_length
    arrays = {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = encoded.body[offset : offset + size]
        arrays[output["name"]] = np.frombuffer(raw, "<f4").reshape(output["shape"])
        offset += size
    assert offset == len(encoded.body)
    np.testing.assert_array_equal(arrays["positions"], prediction.positions)
    np.testing.assert_array_equal(arrays["uncertainties"], prediction.uncertainties)


def test_model_metadata_names_the_contract_and_the_served_version(served: Served) -> None:
    metadata = model_metadata(served)
    assert metadata["name"] == "localization"
    assert metadata["versions"] == ["7"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "mel_spectrogram", "datatype": "FP32", "shape": [-1, 3, 128, 32]}
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["positions", "uncertainties"]  # type: ignore[attr-defined]
    assert metadata["parameters"] == {
        "sha256": served.sha256,
        "alias": "production",
        "source": served.source,
    }


def test_a_huge_declared_shape_is_refused_before_any_allocation() -> None:
    header = {
        "inputs": [
            {
                "name": "mel_spectrogram",
                "datatype": "FP32",
                "shape": [10**8, 3, 128, 32],
                "parameters": {"binary_data_size": 10**8 * SAMPLE_BYTES},
            }
        ]
    }
    body = json.dumps(header).encode() + b"\0" * 64
    tracemalloc.start()
    try:
        message = _refused(body, len(body) - 64, status=413)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "100000000 samples" in message and f"at most {LIMIT}" in message
    assert peak < 1 << 20


def test_binary_sizes_that_disagree_with_shape_or_body_are_refused(features: np.ndarray) -> None:
    body, length = _binary_body(features, size=100)
    assert "binary_data_size 100" in _refused(body, length)
    body, length = _binary_body(features)
    assert "follow the JSON header" in _refused(body[:-4], length)
    assert "follow the JSON header" in _refused(body + b"\0\0\0\0", length)
    assert "body holds" in _refused(body, len(body) + 1)
    json_only = _json_body(features)
    assert "declares no parameters.binary_data_size" in _refused(json_only + b"\0", len(json_only))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"shape": [3, 3, 128, 31]}, "expected [B, 3, 128, 32]"),
        ({"shape": [3, 3, 128, "32"]}, "a list of integers"),
        ({"shape": [0, 3, 128, 32]}, "expected [B, 3, 128, 32]"),
        ({"datatype": "FP64"}, "takes FP32"),
        ({"name": "audio"}, "unknown input 'audio'"),
        ({"data": None}, "needs data"),
        ({"data": [["a"]]}, "only numbers"),
        ({"data": [True, False]}, "only numbers"),
        ({"data": [[1.0], [1.0, 2.0]]}, "ragged"),
        ({"data": [1.0, 2.0]}, "data holds 2 numbers"),
    ],
)
def test_malformed_inputs_are_refused_in_one_line(
    features: np.ndarray, change: dict[str, Any], expected: str
) -> None:
    tensor = _tensor(features, data=features.ravel().tolist()) | change
    assert expected in _refused(json.dumps({"inputs": [tensor]}).encode())


def test_non_finite_values_are_refused_as_json_and_as_binary(features: np.ndarray) -> None:
    poisoned = features.copy()
    poisoned[1, 0, 0, 0] = np.nan
    assert "sample(s) [1]" in _refused(_json_body(poisoned))
    body, length = _binary_body(poisoned)
    assert "sample(s) [1]" in _refused(body, length)
    huge = json.dumps({"inputs": [_tensor(features[:1], data=[1e300] * (SAMPLE_BYTES // 4))]})
    assert "beyond float32" in _refused(huge.encode())


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"inputs": []}', "exactly one tensor"),
    ],
)
def test_bodies_that_are_not_requests_are_refused(body: bytes, expected: str) -> None:
    assert expected in _refused(body)


def test_bad_output_requests_are_refused(features: np.ndarray) -> None:
    assert "unknown output 'heatmap'" in _refused(
        _json_body(features, outputs=[{"name": "heatmap"}])
    )
    assert "requested twice" in _refused(
        _json_body(features, outputs=[{"name": "positions"}, {"name": "positions"}])
    )
    assert "binary_data_output" in _refused(
        _json_body(features, parameters={"binary_data_output": "yes"})
    )
    assert "must be a string" in _refused(_json_body(features, id=5))


def test_header_length_and_body_cap() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length(" 12 ") == 12
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        parse_header_length("-3")
    assert max_body_bytes(2) == max_body_bytes(1) + SAMPLE_BYTES
