"""Graph edits behind the optimized variants: the nodes int8 quantizes, the tail fp16 keeps.

Plain ONNX protobuf work, no ONNX Runtime: ``optimize.quantize_int8`` picks its nodes with
:func:`quantizable_nodes`; ``optimize.convert_fp16`` keeps :func:`output_tail` float32 and puts
the converter's nodes back in order with :func:`sort_topologically`.
"""

from __future__ import annotations

import onnx

from heimdall.errors import ExportError

# Ops whose fp32 → fp16 conversion would round the outputs (positions are ~45° where fp16's
# step is 0.03°, i.e. kilometres): kept float32 when they sit between the head and an output.
_OUTPUT_TAIL_OPS = {"Add", "Mul", "Sub", "Div", "Clip", "Softplus", "Where", "Greater"}


def quantizable_nodes(graph: onnx.GraphProto, scope: str) -> list[tuple[str, str]]:
    """(op type, name) of the nodes to quantize: MatMuls and depthwise Convs, or all matrix ops."""
    chosen = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        in_blocks = node.op_type == "MatMul" or (node.op_type == "Conv" and group > 1)
        if scope == "all" or in_blocks:
            chosen.append((node.op_type, node.name))
    if any(not name for _, name in chosen):
        raise ExportError("the graph has unnamed Conv/MatMul/Gemm nodes; cannot select them")
    return chosen


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each follows the producers of its inputs.

    The fp16 converter appends its input casts at the end, which the ONNX checker rejects.
    """
    ready = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    pending = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
    ordered: list[onnx.NodeProto] = []
    while pending:
        blocked = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(pending):
            raise ExportError(f"the graph has a cycle or a dangling input at {blocked[0].name!r}")
        pending = blocked
    del graph.node[:]
    graph.node.extend(ordered)


def output_tail(graph: onnx.GraphProto) -> set[str]:
    """Names of the elementwise nodes between the last matrix op and each graph output."""
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    kept: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.op_type not in _OUTPUT_TAIL_OPS or node.name in kept:
            continue
        kept.add(node.name)
        stack.extend(i for i in node.input if i and i not in initializers)
    return kept
