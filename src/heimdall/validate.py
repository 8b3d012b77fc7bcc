"""Structural checks of an ONNX file against LocalizationNet's contract, and its metadata record."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import onnx
import structlog

from heimdall.config import heimdall_version
from heimdall.contract import BATCH_AXIS, INPUT_NAME, IO_CONTRACT, OUTPUT_NAMES
from heimdall.errors import ValidationError
from heimdall.files import sha256_file
from heimdall.onnxfile import TensorSpec as TensorSpec
from heimdall.onnxfile import ValidationResult as ValidationResult
from heimdall.onnxfile import check_external_data as check_external_data
from heimdall.onnxfile import load_structure

if TYPE_CHECKING:
    from heimdall.model import LocalizationNet

log = structlog.get_logger(__name__)

METADATA_SCHEMA_VERSION = 1
# Initializers above this size give shape inference their dims and type, not their bytes.
_KEEP_BYTES = 1024
_FLOAT_SIZES = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
}


class SupportsToDict(Protocol):
    def to_dict(self) -> dict[str, object]: ...


def validate_onnx_model(path: Path | str) -> ValidationResult:
    """Check ``path`` fully (checker, shape inference, external data, IO contract) or raise.

    The file is parsed once here. Shape inference runs on a copy without the weights' bytes
    (it reads the data of small shape-like tensors only), and the proto is gone before the
    checker parses the file on its own: a large model is held once at a time, not four times.
    """
    path = Path(path)
    proto = load_structure(path)
    data_files = check_external_data(path, proto)
    inputs = tuple(_spec(v) for v in _graph_inputs(proto.graph))
    outputs = tuple(_spec(v) for v in proto.graph.output)
    opset = _default_opset(proto)
    header = (proto.ir_version, proto.producer_name, proto.producer_version)
    metadata_props = {p.key: p.value for p in proto.metadata_props}
    weightless = _without_weight_bytes(proto)
    del proto
    try:
        # On the path, not the proto: works past 2 GB and checks the data files too.
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(
            weightless, check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValidationError(f"{path}: the ONNX checker rejected the model: {exc}") from exc
    _check_contract(path, inputs, outputs, tuple(_spec(v) for v in inferred.graph.output))
    result = ValidationResult(
        path=path,
        inputs=inputs,
        outputs=outputs,
        opset_version=opset,
        ir_version=header[0],
        producer_name=header[1],
        producer_version=header[2],
        file_size_bytes=path.stat().st_size,
        external_data_files=data_files,
        total_size_bytes=sum(p.stat().st_size for p in (path, *data_files)),
        metadata_props=metadata_props,
    )
    log.info(
        "onnx_validated", path=str(path), opset=result.opset_version, data_files=len(data_files)
    )
    return result


def get_model_metadata(
    onnx_path: Path | str,
    model: LocalizationNet,
    run_id: str | None,
    *,
    checkpoint_sha256: str | None = None,
    parity: SupportsToDict | Mapping[str, object] | None = None,
    timings: SupportsToDict | Mapping[str, object] | None = None,
    validation: ValidationResult | None = None,
    sha256s: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """A JSON-serialisable record of a validated ONNX file and the model it came from.

    Keyword-only past ``run_id``: the original API's fourth argument is ``inference_metrics``
    (``heimdall.legacy.get_model_metadata``), which must never land in another field. A caller
    that already validated the file (``validation``) or hashed its files (``sha256s``, by file
    name) passes them in, so a large model is not read again.
    """
    result = validation or validate_onnx_model(onnx_path)
    params = model.get_params_count()
    files = [result.path, *result.external_data_files]
    known = dict(sha256s or {})
    digests = {p: known.get(p.name) or sha256_file(p) for p in files}  # each file read once
    return {
        "schema_version": METADATA_SCHEMA_VERSION,
        "heimdall_version": heimdall_version(),
        "model_type": type(model).__name__,
        "backbone": model.config.backbone,
        "model_config": model.config.to_dict(),
        "inputs": [t.to_dict() for t in result.inputs],
        "outputs": [t.to_dict() for t in result.outputs],
        "opset_version": result.opset_version,
        "ir_version": result.ir_version,
        "producer": f"{result.producer_name} {result.producer_version}".strip(),
        "file_size_bytes": result.file_size_bytes,
        "total_size_bytes": result.total_size_bytes,
        "sha256": digests[result.path],
        "files": [
            {"name": p.name, "size_bytes": p.stat().st_size, "sha256": digests[p]} for p in files
        ],
        "parameters": {
            "total": params.total,
            "trainable": params.trainable,
            "frozen": params.frozen,
        },
        "run_id": run_id,
        "checkpoint_sha256": checkpoint_sha256,
        "parity": _as_dict(parity),
        "timings": _as_dict(timings),
    }


def _as_dict(value: SupportsToDict | Mapping[str, object] | None) -> dict[str, object] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    return value.to_dict()


def _without_weight_bytes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose large floating-point initializers keep dims and type, no bytes.

    Shape inference reads the values of shape-like (integer, small) tensors only. A tensor left
    without its bytes that it did read would fail loudly ("data size mismatch"), never pass
    unchecked. ``proto``'s weights are cleared too: the caller drops it next.
    """
    for tensor in proto.graph.initializer:
        itemsize = _FLOAT_SIZES.get(tensor.data_type)
        if (
            itemsize
            and tensor.HasField("raw_data")
            and math.prod(tensor.dims) * itemsize > _KEEP_BYTES
        ):
            tensor.ClearField("raw_data")
    # Re-parsed: the cleared proto's memory goes when it does, not with this copy.
    return onnx.ModelProto.FromString(proto.SerializeToString())


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Old exporters list initializers as inputs too; those are weights, not inputs.
    weights = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in weights]


def _dtype_name(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape = tuple(
        d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?"
        for d in tensor.shape.dim
    )
    return TensorSpec(name=value.name, dtype=_dtype_name(tensor.elem_type), shape=shape)


def _default_opset(proto: onnx.ModelProto) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValidationError("the model imports no default (ai.onnx) opset")
    return versions[0]


def _check_contract(
    path: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    inferred: tuple[TensorSpec, ...],
) -> None:
    """Raise one ValidationError naming every way the IO differs from LocalizationNet's."""
    problems = []
    names = ([t.name for t in inputs], [t.name for t in outputs])
    if names != ([INPUT_NAME], list(OUTPUT_NAMES)):
        expected = f"[{INPUT_NAME!r}] → {list(OUTPUT_NAMES)}"
        problems.append(f"IO names are {names[0]} → {names[1]}, expected {expected}")
    for spec in (*inputs, *outputs):
        if spec.name not in IO_CONTRACT:
            continue
        dtype, shape = IO_CONTRACT[spec.name]
        if spec.dtype != dtype:
            problems.append(f"{spec.name!r} has dtype {spec.dtype}, expected {dtype}")
        if not spec.shape or not isinstance(spec.shape[0], str) or spec.shape[0] == "?":
            problems.append(
                f"{spec.name!r} has no symbolic batch axis (shape {_fmt(spec.shape)}); re-export "
                f"with a symbolic {BATCH_AXIS!r} axis"
            )
        elif spec.shape != shape:
            problems.append(f"{spec.name!r} has shape {_fmt(spec.shape)}, expected {_fmt(shape)}")
    declared = {spec.name: spec.shape[:1] for spec in outputs}
    for spec in inferred:
        batch = spec.shape[0] if spec.shape else None
        if declared.get(spec.name) == (BATCH_AXIS,) and isinstance(batch, int):
            problems.append(
                f"{spec.name!r} is declared with a symbolic batch axis but the graph computes "
                f"batch {batch}: the exporter specialized it inside the graph"
            )
    if problems:
        raise ValidationError(
            f"{path} does not match LocalizationNet's contract: " + "; ".join(problems)
        )


def _fmt(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
