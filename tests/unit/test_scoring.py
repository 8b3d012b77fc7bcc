"""Batch scoring in one process: results equal predict, one version per job, refuse, bad inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heimdall.config import Settings
from heimdall.data import generate
from heimdall.errors import InputError, StorageError
from heimdall.export import ExportResult
from heimdall.inference import LocalizationModel
from heimdall.registry import resolve_model_uri, set_alias
from heimdall.scoring import FEATURES_COLUMN, OUTPUT_SCHEMA, score
from tests.fixtures.mlflow_server import MlflowBackend
from tests.fixtures.registered import publish_random


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two .npy files of 5 and 3 samples."""
    folder = tmp_path_factory.mktemp("archive")
    features, _ = generate(8, seed=3)
    np.save(folder / "a.npy", features[:5])
    np.save(folder / "b.npy", features[5:])
    return folder


def features_of(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(folder.glob("*.npy"))])


def settings_for(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", tracking_uri=None)


def test_scoring_a_folder_equals_predict_row_by_row(
    atto_onnx: ExportResult, archive: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int, str]] = []
    result = score(
        str(atto_onnx.path),
        archive,
        tmp_path / "out.parquet",
        settings=settings_for(tmp_path),
        batch_size=2,
        progress=lambda done, total, source: seen.append((done, total, source)),
    )
    table = pq.read_table(result.output)
    model = LocalizationModel.load(atto_onnx.path)
    expected = model.predict(features_of(archive))
    assert table.schema == OUTPUT_SCHEMA
    assert (result.rows, result.files, result.sha256) == (8, 2, model.sha256)
    assert table.column("source").to_pylist() == ["a.npy"] * 5 + ["b.npy"] * 3
    assert table.column("row").to_pylist() == [0, 1, 2, 3, 4, 0, 1, 2]
    got = np.stack([table.column(c).to_numpy() for c in ("lat", "lon", "sigma_x", "sigma_y")], 1)
    np.testing.assert_allclose(
        got, np.hstack([expected.positions, expected.uncertainties]), rtol=1e-6, atol=1e-6
    )
    assert set(table.column("sha256").to_pylist()) == {model.sha256}
    assert seen[-1] == (8, 8, "b.npy") and [s[0] for s in seen] == [2, 4, 5, 7, 8]


def test_a_parquet_features_column_scores_like_the_npy_files(
    atto_onnx: ExportResult, archive: Path, tmp_path: Path
) -> None:
    features = features_of(archive)
    values = pa.array(list(features.reshape(len(features), -1)), pa.list_(pa.float32()))
    pq.write_table(pa.table({FEATURES_COLUMN: values}), tmp_path / "in.parquet", row_group_size=3)
    settings = settings_for(tmp_path)
    from_npy = score(str(atto_onnx.path), archive, tmp_path / "n.parquet", settings=settings)
    from_parquet = score(
        str(atto_onnx.path), tmp_path / "in.parquet", tmp_path / "p.parquet", settings=settings
    )
    a, b = pq.read_table(from_npy.output), pq.read_table(from_parquet.output)
    assert b.column("row").to_pylist() == list(range(8))
    assert set(b.column("source").to_pylist()) == {"in.parquet"}
    for column in ("lat", "lon", "sigma_x", "sigma_y"):
        # Row groups of 3 batch differently: equal to float32 rounding, not bit for bit.
        np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-6)


def test_an_existing_output_is_refused_then_replaced_with_overwrite(
    atto_onnx: ExportResult, archive: Path, tmp_path: Path
) -> None:
    output, settings = tmp_path / "out.parquet", settings_for(tmp_path)
    score(str(atto_onnx.path), archive, output, settings=settings)
    before = output.stat().st_mtime_ns
    with pytest.raises(InputError, match="already exists; pass --overwrite") as info:
        score(str(atto_onnx.path), archive, output, settings=settings)
    assert "\n" not in str(info.value) and output.stat().st_mtime_ns == before
    score(str(atto_onnx.path), archive, output, settings=settings, overwrite=True)
    assert pq.read_metadata(output).num_rows == 8  # replaced, never appended to


def test_a_job_failing_midway_leaves_neither_output_nor_temporary_file(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good, _ = generate(4, seed=1)
    bad = good.copy()
    bad[1, 0, 0, 0] = np.nan
    np.save(folder / "a.npy", good)
    np.save(folder / "b.npy", bad)  # a valid header: found only once its samples are read
    with pytest.raises(InputError, match=r"b\.npy: features hold NaN"):
        score(
            str(atto_onnx.path), folder, tmp_path / "out.parquet", settings=settings_for(tmp_path)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def write_npy(path: Path, array: np.ndarray, truncate: int = 0) -> Path:
    np.save(path, array)
    if truncate:
        os.truncate(path, path.stat().st_size - truncate)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing input", "input not found"),
        ("batch size 0", "batch size must be between 1 and"),
        ("csv output", "output must be a .parquet file"),
        ("no output folder", "is not a writable folder"),
        ("bad registry URI", "not a registry URI"),
        ("actors without ray", "needs Ray"),
        ("truncated npy", "its header declares 4 samples"),
        ("wrong shape npy", "expected a C-order float array of shape"),
        ("integer npy", "got dtype int32"),
        ("empty folder", "holds no .npy files"),
        ("no features column", "no 'features' column"),
        ("short feature rows", "holds a 'features' list of the wrong length"),
        ("not parquet", "nor a readable Parquet file"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_output(
    case: str, message: str, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    folder, output = tmp_path / "in", tmp_path / "out.parquet"
    folder.mkdir()
    features, _ = generate(4, seed=2)
    uri, source, kwargs = str(atto_onnx.path), folder, {}
    write_npy(folder / "a.npy", features)
    if case == "missing input":
        source = tmp_path / "nowhere"
    elif case == "batch size 0":
        kwargs = {"batch_size": 0}
    elif case == "csv output":
        output = tmp_path / "out.csv"
    elif case == "no output folder":
        output = tmp_path / "missing" / "out.parquet"
    elif case == "bad registry URI":
        uri = "models:/only-a-name"
    elif case == "actors without ray":
        kwargs = {"actors": 2}
    elif case == "truncated npy":
        write_npy(folder / "a.npy", features, truncate=100)
    elif case == "wrong shape npy":
        write_npy(folder / "a.npy", features[:, :, :64])
    elif case == "integer npy":
        write_npy(folder / "a.npy", features.astype(np.int32))
    elif case == "empty folder":
        (folder / "a.npy").unlink()
    elif case in ("no features column", "short feature rows", "not parquet"):
        source = tmp_path / "in.parquet"
        width = 100 if case == "short feature rows" else features[0].size
        rows = pa.array([[0.0] * width] * 2, pa.list_(pa.float32()))
        name = "other" if case == "no features column" else FEATURES_COLUMN
        pq.write_table(pa.table({name: rows}), source)
        if case == "not parquet":
            source.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=message) as info:
        score(uri, source, output, settings=settings_for(tmp_path), **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not output.exists() and not list(output.parent.glob(".*.partial"))


def traced_peak(uri: str, folder: Path, output: Path, settings: Settings) -> int:
    tracemalloc.start()
    try:
        score(uri, folder, output, settings=settings, batch_size=8)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_npy_files_are_read_a_chunk_at_a_time(atto_onnx: ExportResult, tmp_path: Path) -> None:
    features, _ = generate(8, seed=4)
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir(), big.mkdir()
    np.save(small / "x.npy", features)
    np.save(big / "x.npy", np.tile(features, (64, 1, 1, 1)))  # 512 samples, 25 MB
    settings, uri = settings_for(tmp_path), str(atto_onnx.path)
    # Loading the model costs the same in both; only reading the whole file would differ.
    baseline = traced_peak(uri, small, tmp_path / "small.parquet", settings)
    peak = traced_peak(uri, big, tmp_path / "big.parquet", settings)
    assert pq.read_metadata(tmp_path / "big.parquet").num_rows == 512
    assert peak - baseline < 2 * 2**20, f"{(peak - baseline) / 2**20:.1f} MiB more for 25 MB"


def test_one_job_scores_with_the_version_the_alias_named_when_it_started(
    embedded_mlflow: MlflowBackend, archive: Path, tmp_path: Path
) -> None:
    settings = embedded_mlflow.settings()
    name = f"scoring-{os.urandom(3).hex()}"
    store = embedded_mlflow.store()
    versions = [publish_random(tmp_path, name, settings, store, seed=s) for s in (1, 2)]
    set_alias(name, versions[0], "staging", settings=settings, store=embedded_mlflow.store())

    def move_alias(done: int, total: int, source: str) -> None:
        set_alias(name, versions[1], "staging", settings=settings, store=embedded_mlflow.store())

    result = score(
        f"models:/{name}@staging",
        archive,
        tmp_path / "out.parquet",
        settings=settings,
        batch_size=2,
        progress=move_alias,
    )
    table = pq.read_table(result.output)
    assert resolve_model_uri(f"models:/{name}@staging", settings=settings).version == versions[1]
    assert result.model_version == versions[0]
    assert set(table.column("model_version").to_pylist()) == {versions[0]}
    assert set(table.column("sha256").to_pylist()) == {result.sha256}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_nothing_is_scored_when_the_output_folder_refuses_new_files(
    atto_onnx: ExportResult, archive: Path, tmp_path: Path
) -> None:
    seen: list[int] = []
    with pytest.raises(InputError, match="not a writable folder"):
        score(
            str(atto_onnx.path),
            archive,
            Path("/proc/x.parquet"),
            settings=settings_for(tmp_path),
            progress=lambda done, *_: seen.append(done),
        )
    assert seen == []


def test_a_write_failing_midway_is_one_storage_error_and_leaves_nothing(
    atto_onnx: ExportResult, archive: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()

    def remove_the_folder(done: int, total: int, source: str) -> None:
        shutil.rmtree(
            folder, ignore_errors=True
        )  # the temporary file stays open; the rename then fails

    with pytest.raises(StorageError, match="could not write") as caught:
        score(
            str(atto_onnx.path),
            archive,
            folder / "out.parquet",
            settings=settings_for(tmp_path),
            progress=remove_the_folder,
        )
    assert "\n" not in str(caught.value) and not folder.exists()


def test_a_killed_jobs_partial_file_is_removed_and_a_running_jobs_is_kept(
    atto_onnx: ExportResult, archive: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.parquet"
    stale = tmp_path / f".out.parquet.{dead_pid()}.partial"
    running = tmp_path / f".out.parquet.{os.getppid()}.partial"
    other = tmp_path / f".other.parquet.{dead_pid()}.partial"
    for path in (stale, running, other):
        path.write_bytes(b"half a result")
    score(str(atto_onnx.path), archive, output, settings=settings_for(tmp_path))
    assert not stale.exists() and running.exists() and other.exists()
    assert pq.read_metadata(output).num_rows == 8
