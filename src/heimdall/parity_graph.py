"""The graph edits behind a parity check: its IO checked, its normalized positions exposed.

Plain ONNX protobuf work, no ONNX Runtime. ``parity.measure_parity`` compares in normalized
region units, so the graph gains an extra output (:data:`NORMALIZED_OUTPUT`): the positions
before its final ``× coord_scale + coord_center``. :func:`weights_apart` then serializes the
modified graph with its weights kept in files (the model's own, or a private copy), so ONNX
Runtime opens it without a large model sitting in memory three times.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import (
    convert_model_to_external_data,
    uses_external_data,
    write_external_data_tensors,
)

from heimdall.contract import BATCH_AXIS, INPUT_NAME, OUTPUT_NAMES, Reference
from heimdall.errors import VerificationError

# The extra graph output that carries the positions before the region de-normalisation.
NORMALIZED_OUTPUT = "heimdall_verify_normalized_positions"
_PASS_THROUGH_OPS = {"Cast", "Identity"}
# Embedded tensors above this size are moved to a private data file for ONNX Runtime.
_EMBEDDED_BYTES = 1024
_WEIGHTS = "weights.bin"


def check_io(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse a graph whose inputs and outputs are not the IO contract's, in its order."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise VerificationError(
            f"{path}: IO is {inputs} → {outputs}, expected [{INPUT_NAME!r}] → {list(OUTPUT_NAMES)}"
        )


def expose_normalized(proto: onnx.ModelProto, reference: Reference, path: Path) -> list[str]:
    """Add the positions before ``× coord_scale + coord_center`` as an extra graph output.

    Returns a failure for each de-normalisation constant that differs from the reference's.
    """
    graph = proto.graph
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {t.name: t for t in graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        if name in initializers and not uses_external_data(initializers[name]):
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else numpy_helper.to_array(value)
        return None

    def split(name: str, op: str) -> tuple[np.ndarray, str]:
        node = producers.get(name)
        while node is not None and node.op_type in _PASS_THROUGH_OPS:
            node = producers.get(node.input[0])
        values = [constant(i) for i in node.input] if node is not None else []
        known = [v is not None for v in values]
        if node is None or node.op_type != op or known not in ([True, False], [False, True]):
            raise VerificationError(
                f"{path}: {OUTPUT_NAMES[0]!r} is not computed as normalized × coord_scale + "
                "coord_center at the end of the graph, so its normalized positions cannot be "
                "compared; export it with heimdall.export"
            )
        index = known.index(True)
        return np.asarray(values[index]), node.input[1 - index]

    center, shifted = split(OUTPUT_NAMES[0], "Add")
    scale, normalized = split(shifted, "Mul")
    failures = []
    for label, stored, expected in (
        ("coord_center", center, reference.coord_center),
        ("coord_scale", scale, reference.coord_scale),
    ):
        if not np.array_equal(stored.astype(np.float32).ravel(), expected):
            failures.append(
                f"the graph's de-normalisation uses {label} {stored.ravel().tolist()}, the model "
                f"{expected.tolist()}"
            )
    graph.node.append(
        helper.make_node("Cast", [normalized], [NORMALIZED_OUTPUT], to=TensorProto.FLOAT)
    )
    graph.output.append(
        helper.make_tensor_value_info(NORMALIZED_OUTPUT, TensorProto.FLOAT, [BATCH_AXIS, 2])
    )
    return failures


def weights_apart(
    proto: onnx.ModelProto, path: Path, external: bool, tmp: Path
) -> tuple[bytes, Path]:
    """The modified graph as bytes, and the folder its external weights are read from.

    Embedded weights are written to ``tmp`` first: serialized with the graph they would sit in
    memory twice more (proto and bytes) while ONNX Runtime builds its own copy, 3x a large
    model. A file that keeps its weights in data files is read from its own folder.
    """
    if external:
        return proto.SerializeToString(), path.resolve().parent
    convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location=_WEIGHTS, size_threshold=_EMBEDDED_BYTES
    )
    write_external_data_tensors(proto, str(tmp))
    return proto.SerializeToString(), tmp
