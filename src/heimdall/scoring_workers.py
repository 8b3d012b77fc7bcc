"""What one scoring worker does, and the Ray Data pool of such workers.

A worker reads a :class:`Part` (a chunk of an ``.npy``, a Parquet row group), scores it with the
:class:`Pinned` model (loaded once, its sha256 checked) and builds the OUTPUT rows. In one
process ``heimdall.scoring`` is that worker; with Ray each actor of :func:`score_on_ray` is one
(:class:`_Scorer`), and the results stream back in the single-process order to
``heimdall.scoring``, which writes them. Ray is imported only when a Ray job runs: the CLI and
single-process scoring never import it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from heimdall.config import Settings, redact_uri
from heimdall.contract import INPUT_SHAPE
from heimdall.errors import HeimdallError, InputError, RegistryError, StorageError
from heimdall.inference import LocalizationModel, check_features

if TYPE_CHECKING:
    from heimdall.inference import Prediction

FEATURES_COLUMN = "features"
SAMPLE_VALUES = math.prod(INPUT_SHAPE)
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


def score_on_ray(
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
