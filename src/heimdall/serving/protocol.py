"""The Open Inference Protocol (KServe v2 REST) for LocalizationNet: request and response ↔ numpy.

Pure functions over bytes; no HTTP framework. A request carries its tensor either as JSON
(``inputs[0].data``, flat or nested) or with the binary tensor data extension: the JSON
object, ``Inference-Header-Content-Length`` bytes long, followed by the raw little-endian
tensor bytes whose size ``parameters.binary_data_size`` declares. Declared shapes and sizes are
checked against the limits and the body before anything is allocated for the tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from heimdall.contract import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES
from heimdall.errors import InputError
from heimdall.inference import check_features
from heimdall.serving.backend import Inferred, Served

DATATYPE = "FP32"
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "Inference-Header-Content-Length"
SAMPLE_BYTES = 4 * math.prod(INPUT_SHAPE)
# Room for the JSON object in front of the tensor bytes (or around JSON numbers' separators).
HEADER_ALLOWANCE = 64 * 1024
_INPUT_SHAPE = [-1, *INPUT_SHAPE]
_OUTPUT_SHAPE = [-1, 2]
_LITTLE_FP32 = np.dtype("<f4")


class ProtocolError(InputError):
    """A request the protocol or the model's contract refuses; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: checked float32 features and how to answer."""

    features: np.ndarray
    outputs: tuple[RequestedOutput, ...]
    id: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "samples": int(self.features.shape[0]),
            "outputs": [{"name": o.name, "binary": o.binary} for o in self.outputs],
            "id": self.id,
        }


@dataclass(frozen=True)
class Encoded:
    """A response body; ``header_length`` is set when binary tensor data follows the JSON."""

    body: bytes
    header_length: int | None

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


def max_body_bytes(max_request_samples: int) -> int:
    """The largest request body accepted: the biggest binary request plus its JSON header.

    JSON numbers take 2-3× the bytes of binary float32, so a JSON request holds fewer samples
    under the same cap; that keeps the memory of decoding JSON bounded too.
    """
    return HEADER_ALLOWANCE + max_request_samples * SAMPLE_BYTES


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number of bytes, or None."""
    if value is None:
        return None
    text = value.strip()
    if not re.fullmatch(r"[0-9]+", text):  # isdigit() takes '²', which int() refuses
        raise ProtocolError(f"{HEADER_LENGTH} must be a number of bytes, got {value[:40]!r}")
    return int(text)


def parse_infer_request(
    body: bytes, header_length: int | None, *, max_request_samples: int
) -> InferRequest:
    """Decode and check an infer request body; raise ProtocolError with one line."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(
            f"{HEADER_LENGTH} is {header_length} but the body holds {len(body)} bytes"
        )
    split = len(body) if header_length is None else header_length
    request = _load_json(body[:split])
    binary = memoryview(body)[split:]
    tensor = _single_input(request)
    samples = _declared_samples(tensor, max_request_samples)
    parameters = _parameters(tensor, f"input {INPUT_NAME!r}")
    if "binary_data_size" in parameters:
        array = _binary_tensor(tensor, parameters["binary_data_size"], binary, samples)
    else:
        if len(binary):
            raise ProtocolError(
                f"{len(binary)} bytes follow the JSON header but input {INPUT_NAME!r} declares "
                "no parameters.binary_data_size"
            )
        array = _json_tensor(tensor, samples)
    try:
        features = check_features(array)
    except InputError as exc:
        raise ProtocolError(f"input {INPUT_NAME!r}: {exc}") from None
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("the request's id must be a string")
    return InferRequest(features=features, outputs=_requested_outputs(request), id=request_id)


def encode_response(inferred: Inferred, request: InferRequest) -> Encoded:
    """The infer response for ``request``, stamped with the model that actually answered."""
    arrays = {"positions": inferred.positions, "uncertainties": inferred.uncertainties}
    outputs: list[dict[str, Any]] = []
    tails: list[bytes] = []
    for wanted in request.outputs:
        array = np.ascontiguousarray(arrays[wanted.name], dtype=_LITTLE_FP32)
        output: dict[str, Any] = {
            "name": wanted.name,
            "datatype": DATATYPE,
            "shape": list(array.shape),
        }
        if wanted.binary:
            tails.append(array.tobytes())
            output["parameters"] = {"binary_data_size": len(tails[-1])}
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    response: dict[str, Any] = {
        "model_name": inferred.served.name,
        "model_version": inferred.served.version,
    }
    if request.id is not None:
        response["id"] = request.id
    response["parameters"] = _served_parameters(inferred.served)
    response["outputs"] = outputs
    header = json.dumps(response, separators=(",", ":")).encode()
    if not tails:
        return Encoded(body=header, header_length=None)
    return Encoded(body=b"".join([header, *tails]), header_length=len(header))


def model_metadata(served: Served) -> dict[str, object]:
    """The model metadata response: IO contract, the served version and where it came from."""
    tensor = {"name": INPUT_NAME, "datatype": DATATYPE, "shape": _INPUT_SHAPE}
    return {
        "name": served.name,
        "versions": [served.version] if served.version else [],
        "platform": PLATFORM,
        "inputs": [tensor],
        "outputs": [
            {"name": name, "datatype": DATATYPE, "shape": _OUTPUT_SHAPE} for name in OUTPUT_NAMES
        ],
        "parameters": {**_served_parameters(served), "source": served.source},
    }


def _served_parameters(served: Served) -> dict[str, str]:
    parameters = {"sha256": served.sha256}
    if served.alias is not None:
        parameters["alias"] = served.alias
    return parameters


def _load_json(raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError("the request's JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    return request


def _single_input(request: dict[str, Any]) -> dict[str, Any]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(
            f"the request must hold 'inputs' with exactly one tensor, {INPUT_NAME!r}"
        )
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise ProtocolError(f"unknown input {tensor.get('name')!r}: the model takes {INPUT_NAME!r}")
    if tensor.get("datatype") != DATATYPE:
        raise ProtocolError(
            f"input {INPUT_NAME!r} has datatype {tensor.get('datatype')!r}; the model takes "
            f"{DATATYPE}"
        )
    return tensor


def _declared_samples(tensor: dict[str, Any], max_request_samples: int) -> int:
    """The batch size the input's shape declares, checked before any allocation."""
    shape = tensor.get("shape")
    expected = f"[B, {', '.join(map(str, INPUT_SHAPE))}]"
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise ProtocolError(f"input {INPUT_NAME!r} needs a shape: a list of integers {expected}")
    if len(shape) != 1 + len(INPUT_SHAPE) or tuple(shape[1:]) != INPUT_SHAPE or shape[0] < 1:
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {shape[:8]}; expected {expected}")
    if shape[0] > max_request_samples:
        raise ProtocolError(
            f"input {INPUT_NAME!r} declares {shape[0]} samples; this server takes at most "
            f"{max_request_samples} a request: split it",
            status=413,
        )
    return int(shape[0])


def _parameters(entry: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{what}: parameters must be a JSON object")
    return parameters


def _binary_tensor(
    tensor: dict[str, Any], declared: object, binary: memoryview, samples: int
) -> np.ndarray:
    if "data" in tensor:
        raise ProtocolError(f"input {INPUT_NAME!r} has both data and binary_data_size")
    expected = samples * SAMPLE_BYTES
    if declared != expected or isinstance(declared, bool):
        raise ProtocolError(
            f"input {INPUT_NAME!r} declares binary_data_size {declared!r}; its shape needs "
            f"{expected} bytes of FP32"
        )
    if len(binary) != expected:
        raise ProtocolError(
            f"input {INPUT_NAME!r} declares {expected} bytes but {len(binary)} follow the JSON "
            f"header ({HEADER_LENGTH})"
        )
    shape = (samples, *INPUT_SHAPE)
    return np.frombuffer(binary, dtype=_LITTLE_FP32).reshape(shape)


def _json_tensor(tensor: dict[str, Any], samples: int) -> np.ndarray:
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ProtocolError(
            f"input {INPUT_NAME!r} needs data (a list of numbers) or "
            "parameters.binary_data_size (the binary tensor data extension)"
        )
    try:
        array = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"input {INPUT_NAME!r}: data is a ragged nested list") from None
    # Without a dtype numpy keeps strings and booleans as such, so they are refused, not cast.
    if array.dtype.kind not in "iuf":
        raise ProtocolError(f"input {INPUT_NAME!r}: data must hold only numbers")
    expected = samples * math.prod(INPUT_SHAPE)
    if array.size != expected:
        raise ProtocolError(
            f"input {INPUT_NAME!r}: data holds {array.size} numbers; its shape needs {expected}"
        )
    return array.reshape(samples, *INPUT_SHAPE).astype(np.float64, copy=False)


def _requested_outputs(request: dict[str, Any]) -> tuple[RequestedOutput, ...]:
    parameters = _parameters(request, "the request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    requested = request.get("outputs")
    if requested is None:
        return tuple(RequestedOutput(name, binary_default) for name in OUTPUT_NAMES)
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError("outputs must be a list of objects with a name")
    outputs = []
    for entry in requested:
        name = entry.get("name")
        if name not in OUTPUT_NAMES:
            raise ProtocolError(f"unknown output {name!r}: the model gives {list(OUTPUT_NAMES)}")
        own = _parameters(entry, f"output {name!r}")
        if "classification" in own:
            raise ProtocolError("the classification extension is not supported")
        binary = own.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: parameters.binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary))
    if len({o.name for o in outputs}) != len(outputs):
        raise ProtocolError("an output is requested twice")
    return tuple(outputs)
