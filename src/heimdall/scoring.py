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
in OUTPUT's folder and renamed at the end: a killed job leaves no half output. An existing OUTPUT
is refused unless ``overwrite=True`` (rows are never appended to, nor silently duplicated in, an
earlier result).

With ``use_ray=True`` the samples are cut into parts (a chunk of an ``.npy``, a Parquet row
group) that a Ray Data actor pool scores (``map_batches`` with a class: each actor loads the
verified bytes once); the results stream back to this process, which writes them. A part whose
actor dies is retried by Ray Data and only completed parts are written, so every sample is scored
exactly once; the row count is checked against the plan before OUTPUT appears. The input must be
readable at the same path on every node.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from heimdall import registry
from heimdall.config import Settings, redact_uri
from heimdall.contract import INPUT_SHAPE
from heimdall.errors import HeimdallError, InputError, RegistryError, StorageError
from heimdall.inference import LocalizationModel, check_features
from heimdall.registry.names import parse_models_uri

if TYPE_CHECKING:
    from heimdall.inference import Prediction

FEATURES_COLUMN = "features"
SAMPLE_VALUES = math.prod(INPUT_SHAPE)
MAX_BATCH_SIZE = 8192
OUTPUT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("lat", pa.float32()),
        ("lon", pa.float32()),
        ("sigma_x", pa.float32()),
        ("sigma_y", pa.float32()),
        ("model_version", pa.string()),
        ("sha256", pa.string()),
    ]
)

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


@dataclass(frozen=True)
class Pinned:
    """The one model a job scores with: what every worker loads, and what it must hash to."""

    uri: str  # models:/NAME/VERSION, or the path / s3:// URI as given
    version: str  # "" when the URI names no registered version
    sha256: str


@dataclass(frozen=True)
class Part:
    """Samples ``[start, stop)`` of one input file: a unit of work for one worker."""

    source: str  # the file's name, as written in OUTPUT
    path: str
    start: int
    stop: int
    row_group: int = -1  # the Parquet row group holding these rows; -1 for .npy


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
    try:
        with pq.ParquetWriter(temp, OUTPUT_SCHEMA) as writer:
            if model is not None:
                batches = _score_here(model, pinned, parts, batch_size)
            else:
                batches = _score_on_ray(
                    pinned, parts, batch_size, settings, providers, actors, ray_address
                )
            rows = _write(writer, batches, total, progress)
        if rows != total:
            raise StorageError(
                f"scored {rows} samples but {source} holds {total}; {target} was not written. "
                "Run the job again."
            )
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
    parent = target.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {target}: {parent} is not a writable folder")
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


def read_part(part: Part, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, float32 features)`` of ``part``, ``batch_size`` samples at a time."""
    try:
        for start, raw in _raw_chunks(part, batch_size):
            yield start, check_features(raw)
    except InputError as exc:
        raise InputError(f"{part.source}: {exc}") from None


def _raw_chunks(part: Part, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    if part.row_group < 0:
        # A memory map: only the slice being scored is ever read into memory.
        array = np.load(part.path, mmap_mode="r", allow_pickle=False)
        for start in range(part.start, part.stop, batch_size):
            yield start, array[start : min(start + batch_size, part.stop)]
        return
    file = pq.ParquetFile(part.path)
    start = part.start
    for batch in file.iter_batches(
        batch_size=batch_size, row_groups=[part.row_group], columns=[FEATURES_COLUMN]
    ):
        yield start, _list_values(batch.column(0), start)
        start += batch.num_rows


def _list_values(column: pa.Array, start: int) -> np.ndarray:
    if column.null_count:
        raise InputError(f"rows from {start} hold a null {FEATURES_COLUMN!r}")
    lengths = pc.list_value_length(column)
    short = pc.not_equal(lengths, SAMPLE_VALUES)
    if pc.any(short).as_py():
        row = start + int(pc.index(short, True).as_py())
        raise InputError(
            f"row {row} holds a {FEATURES_COLUMN!r} list of the wrong length; "
            f"every row needs {SAMPLE_VALUES} values (3×128×32)"
        )
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, *INPUT_SHAPE)


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


def load_pinned(
    pinned: Pinned, settings: Settings, providers: Sequence[str] | None
) -> LocalizationModel:
    """The pinned model, refused unless its bytes hash to the pinned sha256."""
    model = LocalizationModel.load(pinned.uri, settings=settings, providers=providers)
    if model.sha256 != pinned.sha256:
        raise RegistryError(
            f"{redact_uri(pinned.uri)} now has sha256 {model.sha256}, but this job started with "
            f"{pinned.sha256}; one job never mixes models. Run it again."
        )
    return model


def result_batch(pinned: Pinned, source: str, start: int, prediction: Prediction) -> pa.RecordBatch:
    """The OUTPUT rows of one scored chunk."""
    positions, sigmas = prediction.positions, prediction.uncertainties
    count = len(positions)
    columns = [
        pa.array([source] * count, pa.string()),
        pa.array(np.arange(start, start + count, dtype=np.int64)),
        *(pa.array(np.asarray(a, dtype=np.float32)) for a in (*positions.T, *sigmas.T)),
        pa.array([pinned.version] * count, pa.string()),
        pa.array([pinned.sha256] * count, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=OUTPUT_SCHEMA)


def _score_here(
    model: LocalizationModel, pinned: Pinned, parts: list[Part], batch_size: int
) -> Iterator[pa.RecordBatch]:
    for part in parts:
        for start, features in read_part(part, batch_size):
            yield result_batch(pinned, part.source, start, model.predict(features))


def _write(
    writer: pq.ParquetWriter,
    batches: Iterator[pa.RecordBatch | pa.Table],
    total: int,
    progress: ScoreProgress | None,
) -> int:
    rows = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        writer.write_table(table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
        rows += batch.num_rows
        if progress is not None:
            progress(rows, total, str(table.column("source")[0]))
    return rows


class _Scorer:
    """A Ray Data actor: loads the pinned model once, then scores the parts it is given."""

    def __init__(
        self, pinned: Pinned, settings: Settings, batch_size: int, providers: Sequence[str] | None
    ) -> None:
        self.pinned = pinned
        self.batch_size = batch_size
        self.model = load_pinned(pinned, settings, providers)

    def __call__(self, parts: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for values in zip(*(parts[name] for name in Part.__dataclass_fields__), strict=True):
            part = Part(*(v.item() if isinstance(v, np.generic) else v for v in values))
            for start, features in read_part(part, self.batch_size):
                prediction = self.model.predict(features)
                yield pa.Table.from_batches(
                    [result_batch(self.pinned, part.source, start, prediction)]
                )


def _score_on_ray(
    pinned: Pinned,
    parts: list[Part],
    batch_size: int,
    settings: Settings,
    providers: Sequence[str] | None,
    actors: int | None,
    address: str | None,
) -> Iterator[pa.Table]:
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    try:
        if started_here:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        # Progress goes to the caller, and a failure reaches it as one HeimdallError: Ray Data's
        # own log lines (tracebacks included) would only repeat them.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # OUTPUT in the single-process order
        pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        dataset = ray.data.from_items(
            [asdict(p) for p in parts], override_num_blocks=len(parts)
        ).map_batches(
            _Scorer,
            batch_size=1,  # one part per call: a part is already a batch's worth of samples
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=1,
            batch_format="numpy",
            fn_constructor_kwargs={
                "pinned": pinned,
                "settings": settings,
                "batch_size": batch_size,
                "providers": providers,
            },
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    except Exception as exc:  # Ray wraps a worker's error in its own types
        cause = _heimdall_cause(exc)
        if cause is not None:
            raise _first_line(cause) from None
        raise StorageError(
            f"the Ray scoring job failed: {' '.join(str(exc).split())[:500]}"
        ) from exc
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()


def _first_line(error: HeimdallError) -> HeimdallError:
    """``error`` with its first line only: Ray appends its retry notes on lines of their own."""
    lines = str(error).splitlines()
    try:
        return type(error)(lines[0]) if len(lines) > 1 else error
    except TypeError:  # a subclass with arguments of its own: keep it whole
        return error


def _heimdall_cause(exc: BaseException) -> HeimdallError | None:
    """The HeimdallError a Ray worker raised, if that is what ``exc`` carries."""
    seen: BaseException | None = exc
    for _ in range(8):
        inner = getattr(seen, "cause", None)  # a RayTaskError carries the worker's exception
        if isinstance(inner, BaseException) and inner is not seen:
            seen = inner
            continue
        if seen is None or isinstance(seen, HeimdallError):
            return seen
        seen = seen.__cause__
    return None
