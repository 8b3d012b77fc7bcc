"""What every stage needs to know about an ONNX file: its IO specs, result and safe data (no torch).

Export stamps ``METADATA_PREFIX`` keys, validate and verify read them; validate, verify and
the registry share ``TensorSpec``/``ValidationResult``; ``check_external_data`` guards every
reader against unsafe external data locations before a byte of them is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from heimdall.errors import ValidationError

# onnx is imported where a file is read: reading the registry (`models list`) needs none of it.
if TYPE_CHECKING:
    import onnx

# Every metadata_props key heimdall writes into an exported file starts with this.
METADATA_PREFIX = "heimdall."


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: dims are ints, or the symbol's name when symbolic."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ValidationResult:
    """What a valid ONNX file holds, as far as serving it is concerned."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset_version: int
    ir_version: int
    producer_name: str
    producer_version: str
    file_size_bytes: int
    external_data_files: tuple[Path, ...]
    total_size_bytes: int
    metadata_props: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "opset_version": self.opset_version,
            "ir_version": self.ir_version,
            "producer_name": self.producer_name,
            "producer_version": self.producer_version,
            "file_size_bytes": self.file_size_bytes,
            "external_data_files": [str(p) for p in self.external_data_files],
            "total_size_bytes": self.total_size_bytes,
            "metadata_props": dict(self.metadata_props),
        }


def load_structure(path: Path) -> onnx.ModelProto:
    """The model proto without its external data: cheap, and reads nothing but the file."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ValidationError(f"ONNX file not found: {path}")
    advice = "Export it again or re-download it and compare its sha256."
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise ValidationError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc}); it is truncated "
            f"or corrupt. {advice}"
        ) from exc
    if not proto.HasField("graph"):
        raise ValidationError(
            f"{path}: holds no graph; it is empty, truncated or corrupt. {advice}"
        )
    return proto


def check_external_data(path: Path | str, proto: onnx.ModelProto | None = None) -> tuple[Path, ...]:
    """Refuse unsafe external data locations before any byte of them is read; list the files.

    A location must be relative, free of ``..``, and resolve (symlinks included) to a file
    inside the model's folder, large enough for every tensor's offset and length.
    """
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    proto = proto if proto is not None else load_structure(path)
    folder = path.resolve().parent
    files: dict[Path, int] = {}
    for tensor in _tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = info.location
        where = f"{path}: tensor {tensor.name!r} has external data at {location!r}"
        if not location or Path(location).is_absolute() or location.startswith(("/", "\\")):
            raise ValidationError(f"{where}: locations must be relative to the model's folder")
        if ".." in Path(location.replace("\\", "/")).parts:
            raise ValidationError(f"{where}: locations must not contain '..'")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise ValidationError(f"{where}: it resolves outside the model's folder to {target}")
        if not target.is_file():
            raise ValidationError(f"{where}: the data file is missing; copy it next to the model")
        end = (info.offset or 0) + (info.length or 0)
        size = files.setdefault(path.parent / location, target.stat().st_size)
        if end > size:
            raise ValidationError(
                f"{where}: needs bytes up to {end} but the file has {size}; it is truncated"
            )
    return tuple(sorted(files))


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor in the graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
