"""`heimdall score`: JSON result, a line per file off a terminal, one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner, Result

from heimdall.cli import app
from heimdall.data import generate
from heimdall.export import ExportResult
from tests.unit.test_cli import logging_restored


def heimdall(tmp_path: Path, *args: str | Path) -> Result:
    with logging_restored():
        return CliRunner().invoke(app, ["--data-dir", str(tmp_path / "data"), *map(str, args)])


def archive(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    features, _ = generate(6, seed=7)
    np.save(folder / "a.npy", features[:4])
    np.save(folder / "b.npy", features[4:])
    return folder


def test_score_prints_its_result_as_json(atto_onnx: ExportResult, tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    result = heimdall(tmp_path, "score", atto_onnx.path, archive(tmp_path), "-o", output, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["rows"], document["files"], document["ray"]) == (6, 2, False)
    assert document["output"] == str(output) and pq.read_metadata(output).num_rows == 6


def test_off_a_terminal_each_finished_file_gets_a_line(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    output = tmp_path / "out.parquet"
    args = ("score", atto_onnx.path, archive(tmp_path), "-o", output, "--batch-size", "2")
    result = heimdall(tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert (
        "scored a.npy: 4/6 samples" in result.stderr
        and "scored b.npy: 6/6 samples" in result.stderr
    )


def test_an_existing_output_is_refused_in_one_line(atto_onnx: ExportResult, tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    output.write_bytes(b"an earlier result")
    result = heimdall(tmp_path, "score", atto_onnx.path, archive(tmp_path), "-o", output)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and "pass --overwrite" in result.stderr
    assert output.read_bytes() == b"an earlier result"


def test_the_cli_and_single_process_scoring_never_import_ray(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    code = (
        "import sys; from heimdall.cli import app; import heimdall.scoring; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "[]"


def test_an_unwritable_output_folder_is_refused_in_one_line_before_scoring(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    # /proc refuses new files even to root, which os.access would not tell.
    args = ("score", atto_onnx.path, archive(tmp_path), "-o", "/proc/x.parquet", "--json")
    result = heimdall(tmp_path, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    document = json.loads(result.stdout)
    assert document["error"] == "InputError" and "/proc" in document["message"]


def test_a_folder_at_the_output_path_is_refused_in_one_line_even_with_overwrite(
    atto_onnx: ExportResult, tmp_path: Path
) -> None:
    output = tmp_path / "out.parquet"
    output.mkdir()
    args = ("score", atto_onnx.path, archive(tmp_path), "-o", output, "--overwrite")
    result = heimdall(tmp_path, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and "not a file" in result.stderr, result.output
    assert output.is_dir()
