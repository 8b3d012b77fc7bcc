"""Batch scoring: every sample of a recording archive through one verified model version.

``score(uri, input, output)`` resolves the URI once (``models:/NAME@alias`` → the concrete
``models:/NAME/VERSION`` and its sha256), so one job never mixes versions: every worker loads
that version and checks the same sha256 before it scores a sample.

INPUT is a folder of ``.npy`` files, each ``(B, 3, 128, 32)`` floating point (headers are checked
against the file sizes up front, then the files are read memory-mapped, a chunk at a time), or a
Parquet file whose ``features`` column is a list (or fixed-size list) of 3×128×32 = 12288
float32/float64 values per row, in C order. A list column keeps the archive readable by any
Parquet tool and lets pyarrow check every row's length; a binary column would hide both.

OUTPUT is Parquet, one row per sample (``source``, ``row``, ``lat``, ``lon``, ``sigma_x``,
``sigma_y``, ``model_version``, ``sha256``), written row group by row group to a temporary name
in OUTPUT's folder (``.NAME.PID.partial``) and renamed at the end: a killed job leaves no half
output, and the next job for the same OUTPUT removes the partial files whose PID is no longer
alive on this host (a folder shared by several hosts may keep another host's). An existing OUTPUT
is refused unless ``overwrite=True`` (rows are never appended to, nor silently duplicated in, an
earlier result).

With ``use_ray=True`` the samples are cut into parts (a chunk of an ``.npy``, a Parquet row
group) that a Ray Data actor pool scores (``heimdall.scoring_workers``; each actor loads the
verified bytes once); the results stream back to this process, which writes them. A part whose
actor dies is retried by Ray Data and only completed parts are written, so every sample is scored
exactly once; the row count is checked against the plan before OUTPUT appears. The input must be
readable at the same path on every node.
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from heimdall import registry
from heimdall.config import Settings
from heimdall.contract import INPUT_SHAPE
from heimdall.errors import InputError, RegistryError, StorageError
from heimdall.inference import LocalizationModel
from heimdall.registry.names import parse_models_uri
from heimdall.scoring_workers import (
    FEATURES_COLUMN,
    OUTPUT_SCHEMA,
    SAMPLE_VALUES,
    Part,
    Pinned,
    load_pinned,
    read_part,
    result_batch,
    score_on_ray,
)

MAX_BATCH_SIZE = 8192

ScoreProgress = Callable[[int, int, str], None]
"""``progress(done, total, source)``: samples scored so far, of ``total``; ``source`` the file
the latest ones came from."""


@dataclass(frozen=True)
class ScoreResult:
    """What a scoring job wrote, and with which model."""

    rows: int
    files: int
    model_version: str
    sha256: str
    output: Path
    seconds: float
    ray: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output": str(self.output)}


def score(
    uri: str,
    input: Path | str,
    output: Path | str,
    *,
    settings: Settings,
    batch_size: int = 256,
    use_ray: bool = False,
    progress: ScoreProgress | None = None,
    actors: int | None = None,
    overwrite: bool = False,
    providers: Sequence[str] | None = None,
    ray_address: str | None = None,
) -> ScoreResult:
    """Score every sample of ``input`` with the model ``uri`` names; write Parquet to ``output``.

    ``ray_address`` None lets Ray choose (``RAY_ADDRESS`` when set, else a local Ray).
    """
    started = time.monotonic()
    source, target = Path(input), Path(output)
    _check_arguments(uri, source, target, batch_size, use_ray, actors, overwrite)
    parts = plan(source, batch_size)
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    pinned, model = pin(uri, settings, providers, load=not use_ray)
    total = sum(p.stop - p.start for p in parts)
    temp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    _remove_stale_partials(target)
    try:
        if model is not None:
            batches = _score_here(model, pinned, parts, batch_size)
        else:
            batches = score_on_ray(
                pinned, parts, batch_size, settings, providers, actors, ray_address
            )
        rows = _write(temp, target, batches, total, progress)
        if rows != total:
            raise StorageError(
                f"scored {rows} samples but {source} holds {total}; {target} was not written. "
                "Run the job again."
            )
        with _writing(target):
            os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    files = len({p.path for p in parts})
    return ScoreResult(
        rows=rows,
        files=files,
        model_version=pinned.version,
        sha256=pinned.sha256,
        output=target,
        seconds=time.monotonic() - started,
        ray=use_ray,
    )


def _check_arguments(
    uri: str,
    source: Path,
    target: Path,
    batch_size: int,
    use_ray: bool,
    actors: int | None,
    overwrite: bool,
) -> None:
    if not isinstance(uri, str) or not uri.strip():
        raise InputError(
            "the model URI is empty; use models:/NAME@alias, models:/NAME/VERSION, "
            "an s3:// URI or a path"
        )
    if uri.startswith("models:/"):
        parse_models_uri(uri)
    if isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"batch size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    if actors is not None and (not use_ray or not 1 <= actors <= 1024):
        raise InputError("actors is a number from 1 to 1024 and needs Ray (--ray)")
    if not source.exists():
        raise InputError(
            f"input not found: {source}; give a folder of .npy files or a Parquet file"
        )
    if target.suffix != ".parquet":
        raise InputError(f"output must be a .parquet file, got {target}")
    if target.resolve() == source.resolve():
        raise InputError(f"output {target} is the input; choose another path")
    if target.exists() and not target.is_file():
        raise InputError(f"{target} exists and is not a file; choose another path")
    _check_writable(target)
    if target.exists() and not overwrite:
        raise InputError(
            f"{target} already exists; pass --overwrite to replace it or choose a new path "
            "(rows are never appended to an earlier result)"
        )


def plan(source: Path, batch_size: int) -> list[Part]:
    """The parts of ``source``, every header and schema checked before anything is scored."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix == ".npy" and p.is_file())
        if not files:
            raise InputError(f"{source} holds no .npy files")
        parts = []
        for path in files:
            count = npy_samples(path)
            parts += [
                Part(path.name, str(path.resolve()), start, min(start + batch_size, count))
                for start in range(0, count, batch_size)
            ]
        return parts
    groups = _parquet_groups(source)
    location = str(source.resolve())
    offsets = np.cumsum([0, *groups]).tolist()
    return [
        Part(source.name, location, offsets[i], offsets[i + 1], row_group=i)
        for i, rows in enumerate(groups)
        if rows
    ]


def npy_samples(path: Path) -> int:
    """Samples in an ``.npy`` of features, its header checked against its size (no data read)."""
    try:
        with path.open("rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(handle, max_header_size=10_000)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(
            f"{path}: not a readable .npy array ({exc}); save with numpy.save"
        ) from None
    expected = f"a C-order float array of shape (B, {', '.join(map(str, INPUT_SHAPE))})"
    if len(shape) != 4 or tuple(shape[1:]) != INPUT_SHAPE or fortran:
        raise InputError(f"{path}: expected {expected}, got shape {shape}")
    if dtype.kind != "f" or dtype.hasobject:
        raise InputError(f"{path}: expected {expected}, got dtype {dtype}")
    size = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual != size:
        raise InputError(
            f"{path}: its header declares {shape[0]} samples ({size} bytes) but the file holds "
            f"{actual} bytes; it is truncated or not one array"
        )
    return int(shape[0])


def _parquet_groups(path: Path) -> list[int]:
    """Rows per row group of a Parquet input, its ``features`` column checked."""
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"{path}: neither a folder of .npy files nor a readable Parquet file ({exc})"
        ) from None
    if FEATURES_COLUMN not in schema.names:
        raise InputError(f"{path}: no {FEATURES_COLUMN!r} column (columns: {schema.names})")
    kind = schema.field(FEATURES_COLUMN).type
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    fixed = pa.types.is_fixed_size_list(kind)
    if not (listed or fixed) or not pa.types.is_floating(kind.value_type):
        raise InputError(
            f"{path}: column {FEATURES_COLUMN!r} is {kind}; expected a list of "
            f"{SAMPLE_VALUES} float32 values per row"
        )
    if fixed and kind.list_size != SAMPLE_VALUES:
        raise InputError(
            f"{path}: column {FEATURES_COLUMN!r} holds {kind.list_size} values per row; "
            f"expected {SAMPLE_VALUES} (3×128×32)"
        )
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def pin(
    uri: str, settings: Settings, providers: Sequence[str] | None, *, load: bool
) -> tuple[Pinned, LocalizationModel | None]:
    """Resolve ``uri`` once; load it here when ``load`` (or when only loading tells its hash)."""
    if uri.startswith("models:/"):
        version = registry.resolve_model_uri(uri, settings=settings)
        if not version.sha256:
            raise RegistryError(
                f"{uri}: version {version.version} records no sha256; register it with heimdall"
            )
        pinned = Pinned(version.uri, version.version, version.sha256)
        return pinned, load_pinned(pinned, settings, providers) if load else None
    model = LocalizationModel.load(uri, settings=settings, providers=providers)
    return Pinned(uri, "", model.sha256), model


def _score_here(
    model: LocalizationModel, pinned: Pinned, parts: list[Part], batch_size: int
) -> Iterator[pa.RecordBatch]:
    for part in parts:
        for start, features in read_part(part, batch_size):
            yield result_batch(pinned, part.source, start, model.predict(features))


def _write(
    temp: Path,
    target: Path,
    batches: Iterator[pa.RecordBatch | pa.Table],
    total: int,
    progress: ScoreProgress | None,
) -> int:
    """Write ``batches`` to ``temp``; only the writes are storage errors (not the scoring)."""
    rows = 0
    with _writing(target):
        writer = pq.ParquetWriter(temp, OUTPUT_SCHEMA)
    try:
        for batch in batches:
            if not batch.num_rows:
                continue
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            with _writing(target):
                writer.write_table(table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
            rows += batch.num_rows
            if progress is not None:
                progress(rows, total, str(table.column("source")[0]))
    finally:
        with _writing(target):
            writer.close()
    return rows


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise StorageError(
            f"could not write {target}: {detail}; check the folder's space and permissions, "
            "then run the job again"
        ) from None


def _check_writable(target: Path) -> None:
    """Create a file where the output will go: os.access tells root nothing (/proc, ro mounts)."""
    folder = target.absolute().parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot write {target}: {folder} is not a writable folder ({exc.strerror})"
        ) from None


def _remove_stale_partials(target: Path) -> None:
    """Remove the partial files of killed jobs; a live PID's may be another job's, kept."""
    prefix, suffix = f".{target.name}.", ".partial"
    for path in target.absolute().parent.glob(f"{glob.escape(prefix)}*{suffix}"):
        pid = path.name[len(prefix) : -len(suffix)]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True
