"""The command line on the embedded default: JSON output, exit codes, registry commands."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from rich.progress import Progress
from typer.testing import CliRunner, Result

from heimdall.checkpoint import LoadedCheckpoint, save_checkpoint, sha256_file
from heimdall.cli import app, emit, epoch_progress
from heimdall.config import heimdall_version
from heimdall.data import generate
from heimdall.export import ExportResult
from heimdall.model import LocalizationNet, ModelConfig
from tests.fixtures.mlflow_server import GATES_OPEN_ENV

# Whatever the developer's shell exports must not point these tests at a real server.
_FOREIGN_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_ARTIFACT_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "HEIMDALL_S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_ACCESS_KEY_ID",
    "MLFLOW_S3_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "HEIMDALL_BUCKET",
    "HEIMDALL_LOG_LEVEL",
    "HEIMDALL_LOG_JSON",
)
_QUIET_LOGGERS = ("mlflow", "alembic", "botocore", "urllib3")


@contextmanager
def logging_restored() -> Iterator[None]:
    """Undo what the CLI's configure_logging does to this process's global logging state.

    The CLI binds structlog to the runner's captured stderr, which is gone after the call.
    """
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers = [(h, list(h.filters)) for h in root.handlers]
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    mlflow_level = os.environ.get("MLFLOW_LOGGING_LEVEL")
    try:
        yield
    finally:
        if mlflow_level is None:
            os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
        else:
            os.environ["MLFLOW_LOGGING_LEVEL"] = mlflow_level
        structlog.configure(**saved)
        root.handlers = [h for h, _ in handlers]
        for handler, filters in handlers:
            handler.filters = filters
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass(frozen=True)
class Home:
    """A data directory of its own and the environment that points the CLI at it."""

    data_dir: Path
    name: str

    def run(self, *args: str | Path, **extra_env: str) -> Result:
        env: dict[str, str | None] = dict.fromkeys(_FOREIGN_ENV)
        env.update(HEIMDALL_DATA_DIR=str(self.data_dir), HEIMDALL_MODEL_NAME=self.name)
        env.update(GATES_OPEN_ENV)
        env.update(extra_env)
        with logging_restored():
            return CliRunner().invoke(app, [str(a) for a in args], env=env)

    def json(self, *args: str | Path) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


def failed_cleanly(result: Result) -> str:
    """Exit code 1, no traceback anywhere; the error message for the caller to check."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())  # rich wraps long messages


@dataclass(frozen=True)
class Registry:
    """Two checkpoints published through the CLI: version 1 with alias staging, 2 without."""

    home: Home
    first: dict[str, Any]
    second: dict[str, Any]
    checkpoint: LoadedCheckpoint


@pytest.fixture(scope="module")
def registry(
    atto_checkpoint: LoadedCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    one_torch_thread: None,
) -> Registry:
    root = tmp_path_factory.mktemp("cli")
    home = Home(root / "data", f"heimdall-cli-{os.urandom(3).hex()}")
    torch.manual_seed(11)
    other = save_checkpoint(
        LocalizationNet(ModelConfig(backbone="atto")), root / "other.safetensors"
    )
    assert other != atto_checkpoint.sha256
    first = home.json("publish", atto_checkpoint.path, "--no-bench")
    second = home.json("publish", root / "other.safetensors", "--no-bench", "--alias", "")
    return Registry(home, first, second, atto_checkpoint)


def test_publish_json_names_the_published_version(registry: Registry) -> None:
    name = registry.home.name
    primary = registry.first["published"][0]

    assert registry.first["success"] is True
    assert registry.first["name"] == name
    assert registry.first["checkpoint_sha256"] == registry.checkpoint.sha256
    assert (primary["variant"], primary["version"], primary["alias"]) == ("fp32", "1", "staging")
    assert primary["model_uri"] == f"models:/{name}/1"
    assert primary["uploaded"] is True
    assert primary["uri"].startswith(f"file://{registry.home.data_dir}/objects/")
    assert Path(str(registry.first["report"])).is_file()


def test_publish_with_an_empty_alias_registers_without_moving_any_alias(
    registry: Registry,
) -> None:
    primary = registry.second["published"][0]
    steps = {s["step"]: s["status"] for s in registry.second["steps"]}

    assert (primary["version"], primary["alias"]) == ("2", None)
    assert steps["alias"] == "skipped"


def test_publish_of_a_missing_checkpoint_exits_1_with_a_message(
    registry: Registry, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.safetensors"

    message = failed_cleanly(registry.home.run("publish", missing, "--no-bench"))

    assert "PublishError" in message and "step 'load'" in message
    assert "checkpoint not found" in message and "nowhere.safetensors" in message


def test_errors_as_json_are_one_object_on_stdout(registry: Registry, tmp_path: Path) -> None:
    result = registry.home.run("publish", tmp_path / "nowhere.safetensors", "--json")

    failed_cleanly(result)
    error = json.loads(result.stdout)
    assert error["error"] == "PublishError"
    assert "checkpoint not found" in error["message"]


def test_models_list_json_shows_the_model_with_its_latest_version_and_alias(
    registry: Registry,
) -> None:
    listed = registry.home.json("models", "list")

    mine = {m["name"]: m for m in listed}[registry.home.name]
    assert mine["latest_version"] == "2"
    assert mine["aliases"]["staging"] == "1"


def test_models_list_reads_the_registry_with_the_collector_paused_then_restores_it(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import heimdall.registry

    collecting: list[bool] = []
    list_models = heimdall.registry.list_models

    def spy(**kwargs: Any) -> Any:
        collecting.append(gc.isenabled())
        return list_models(**kwargs)

    monkeypatch.setattr(heimdall.registry, "list_models", spy)
    result = registry.home.run("models", "list")

    assert result.exit_code == 0, result.output
    assert collecting == [False]
    assert gc.isenabled()


@pytest.mark.parametrize("runs_a_command", [True, False])
def test_a_command_leaves_cyclic_garbage_to_the_os_at_exit(runs_a_command: bool) -> None:
    """Python's last collections would walk every object MLflow made: 0.3-0.5 s per command.

    A program that only imports the CLI module keeps Python's own exit.
    """
    code = (
        "import gc, heimdall.cli\n"
        "gc.disable()\n"
        "class Cycle:\n"
        "    def __del__(self): print('collected')\n"
        "cycle = Cycle(); cycle.me = cycle; del cycle\n"
        "if RUN:\n"
        "    try: heimdall.cli.app(['validate', 'absent.onnx'])\n"
        "    except SystemExit: pass\n"
    ).replace("RUN", str(runs_a_command))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ("" if runs_a_command else "collected\n")


def test_models_show_json_has_versions_and_alias_history(registry: Registry) -> None:
    shown = registry.home.json("models", "show", registry.home.name)

    assert [v["version"] for v in shown["versions"]] == ["2", "1"]
    assert {v["verification"] for v in shown["versions"]} == {"passed"}
    assert [(e["action"], e["version"]) for e in shown["alias_history"]["staging"]] == [
        ("publish", "1")
    ]


def test_models_show_of_an_unknown_model_exits_1(registry: Registry) -> None:
    message = failed_cleanly(registry.home.run("models", "show", "no-such-model"))

    assert "RegistryError" in message and "no-such-model" in message


def test_promote_then_rollback_moves_production_back_and_refuses_without_history(
    registry: Registry,
) -> None:
    home, name = registry.home, registry.home.name

    promoted = home.json("promote", name, "1", "--to", "production")
    refused = failed_cleanly(home.run("rollback", name, "--alias", "production"))
    second = home.json("promote", name, "2", "--to", "production")
    back = home.json("rollback", name, "--alias", "production")
    shown = home.json("models", "show", name)

    assert (promoted["version"], promoted["previous"], promoted["action"]) == ("1", None, "promote")
    assert {g["name"]: g["passed"] for g in promoted["gates"]} == {
        "ready": True,
        "verification": True,
        "sha256": True,
        "baseline": True,
        "champion": True,
    }
    assert "RegistryError" in refused and "no earlier holder" in refused
    assert (second["version"], second["previous"]) == ("2", "1")
    assert (back["version"], back["previous"], back["action"]) == ("1", "2", "rollback")
    assert shown["aliases"]["production"] == "1"
    assert [(e["action"], e["version"]) for e in shown["alias_history"]["production"]] == [
        ("promote", "1"),
        ("promote", "2"),
        ("rollback", "1"),
    ]


@pytest.mark.parametrize("alias", ["a b", "latest"])
def test_promote_to_an_invalid_alias_exits_1_before_writing_any_tag(
    registry: Registry, alias: str
) -> None:
    before = registry.home.json("models", "show", registry.home.name, "--version", "2")

    strict = {"HEIMDALL_GATE_BASELINE_FRACTION": "0.01"}  # random weights fail the gate
    promote = ("promote", registry.home.name, "2", "--to", alias)
    message = failed_cleanly(registry.home.run(*promote, **strict))

    assert f"invalid alias {alias!r}" in message
    after = registry.home.json("models", "show", registry.home.name, "--version", "2")
    assert after["versions"][0]["tags"] == before["versions"][0]["tags"]


def test_promote_of_a_missing_version_exits_1(registry: Registry) -> None:
    message = failed_cleanly(registry.home.run("promote", registry.home.name, "99"))

    assert "has no version 99" in message


def test_predict_json_gives_positions_of_the_alias_as_numbers(
    registry: Registry, tmp_path: Path
) -> None:
    features, _ = generate(3, seed=21)
    path = tmp_path / "features.npy"
    np.save(path, features)
    with torch.inference_mode():
        expected = registry.checkpoint.model(torch.from_numpy(features))[0].numpy()

    predicted = registry.home.json("predict", f"models:/{registry.home.name}@staging", path)

    positions = np.asarray(predicted["positions"], dtype=np.float64)
    assert positions.shape == (3, 2)
    assert np.abs(positions - expected).max() <= 1e-4


def test_export_writes_the_onnx_file_it_reports(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    home = Home(tmp_path / "data", "unused")
    target = tmp_path / "out" / "atto.onnx"

    exported = home.json("export", atto_checkpoint.path, "-o", target)

    assert exported["path"] == str(target)
    assert exported["sha256"] == sha256_file(target)
    assert exported["size_bytes"] == target.stat().st_size
    assert exported["opset_version"] >= 17


def test_export_of_a_checkpoint_that_is_not_one_exits_1(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")

    message = failed_cleanly(
        Home(tmp_path / "data", "unused").run("export", bogus, "-o", tmp_path / "x.onnx")
    )

    assert "CheckpointError" in message and "not a readable safetensors file" in message
    assert not (tmp_path / "x.onnx").exists()


def test_validate_reports_the_io_contract(atto_onnx: ExportResult, tmp_path: Path) -> None:
    checked = Home(tmp_path / "data", "unused").json("validate", atto_onnx.path)

    assert [i["name"] for i in checked["inputs"]] == ["mel_spectrogram"]
    assert checked["inputs"][0]["shape"][1:] == [3, 128, 32]
    assert [o["name"] for o in checked["outputs"]] == ["positions", "uncertainties"]
    assert checked["opset_version"] == atto_onnx.opset_version


def test_validate_of_a_file_that_is_not_onnx_exits_1(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00garbage")

    message = failed_cleanly(Home(tmp_path / "data", "unused").run("validate", bogus))

    assert "ValidationError" in message


def test_train_then_publish_as_json_is_one_document(tmp_path: Path, one_torch_thread: None) -> None:
    home = Home(tmp_path / "data", f"heimdall-cli-train-{os.urandom(3).hex()}")
    checkpoint = tmp_path / "trained.safetensors"

    document = home.json("train", "--epochs", "1", "--samples", "64", "-o", checkpoint, "--publish")

    assert document["training"]["checkpoint"] == str(checkpoint)
    published = document["publish"]["published"][0]
    assert document["publish"]["checkpoint_sha256"] == sha256_file(checkpoint)
    assert (published["version"], published["alias"]) == ("1", "staging")


def test_train_off_a_terminal_prints_one_line_an_epoch(
    tmp_path: Path, one_torch_thread: None
) -> None:
    home = Home(tmp_path / "data", "unused")

    result = home.run("train", "--epochs", "2", "--samples", "32", "-o", tmp_path / "t.safetensors")

    assert result.exit_code == 0, result.output
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("val median" in line and "km" in line for line in epochs)


def test_the_training_bar_names_the_epoch_it_runs() -> None:
    bar = Progress(disable=True)
    task = bar.add_task("training", total=3, info="")
    on_epoch = epoch_progress(bar, task, 3)
    assert bar.tasks[0].description == "epoch 1/3"

    on_epoch(1, 3, 0.5, 120.0)
    assert bar.tasks[0].description == "epoch 2/3"
    on_epoch(3, 3, 0.5, 120.0)
    assert bar.tasks[0].description == "epoch 3/3" and bar.tasks[0].completed == 3


def test_a_failed_publish_as_json_names_the_step_and_what_exists(tmp_path: Path) -> None:
    home = Home(tmp_path / "data", f"heimdall-cli-nan-{os.urandom(3).hex()}")
    model = LocalizationNet(ModelConfig(backbone="atto"))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(model, tmp_path / "nan.safetensors")

    result = home.run("publish", tmp_path / "nan.safetensors", "--no-bench", "--json")

    failed_cleanly(result)
    document = json.loads(result.stdout)
    assert (document["error"], document["step"]) == ("PublishError", "verify")
    assert set(document["existing"]) == {"onnx_file"}
    assert [s["step"] for s in document["steps"]][-1] == "verify"


def test_version_option_prints_the_package_version() -> None:
    with logging_restored():
        result = CliRunner().invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.stdout.strip() == f"heimdall {heimdall_version()}"


def test_help_shows_flags_as_flags_and_the_defaults() -> None:
    with logging_restored():  # the callback configures logging before --help exits
        result = CliRunner().invoke(app, ["publish", "--help"])

    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["--force"].split()[1] == "Move"  # no value placeholder after a flag
    assert "[default: staging]" in result.stdout
    assert "--bench / --no-bench" in result.stdout


def test_human_tables_show_brackets_and_symbols_as_written_and_round_floats(
    capsys: pytest.CaptureFixture[str],
) -> None:
    emit({"order": "[lat, lon]", "seconds": 12.3456789, "gain": {"speedup": "2.5×"}}, False, "t")

    shown = capsys.readouterr().out
    assert "[lat, lon]" in shown
    assert "12.35" in shown and "12.3456" not in shown
    assert "2.5×" in shown and "\\u00d7" not in shown


def test_models_list_folds_a_long_name_instead_of_cutting_it(registry: Registry) -> None:
    result = registry.home.run("models", "list")

    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    name_cells = [row.split("│")[1].strip() for row in rows]
    assert "".join(name_cells) == registry.home.name


def test_predict_names_the_served_version_its_sha256_and_the_units(
    registry: Registry, tmp_path: Path
) -> None:
    features, _ = generate(2, seed=5)
    np.save(tmp_path / "features.npy", features)

    result = registry.home.run(
        "predict", f"models:/{registry.home.name}@staging", tmp_path / "features.npy"
    )

    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"model: models:/{registry.home.name}@staging (version 1, sha256 ")
    assert registry.first["published"][0]["sha256"] in first
    assert result.stdout.splitlines()[-1].startswith(
        "lat, lon in degrees; σx, σy in normalized region units"
    )


def test_predict_json_names_the_served_version_and_its_sha256(
    registry: Registry, tmp_path: Path
) -> None:
    features, _ = generate(2, seed=5)
    np.save(tmp_path / "features.npy", features)

    predicted = registry.home.json(
        "predict", f"models:/{registry.home.name}@staging", tmp_path / "features.npy"
    )

    chunked = registry.home.json(
        "predict",
        f"models:/{registry.home.name}@staging",
        tmp_path / "features.npy",
        "--chunk-size",
        "1",
    )
    assert chunked["positions"] == predicted["positions"]
    assert predicted["model"] == f"models:/{registry.home.name}@staging"
    assert predicted["version"] == "1"
    assert predicted["sha256"] == registry.first["published"][0]["sha256"]
    assert np.asarray(predicted["positions"]).shape == (2, 2)


def test_validate_ends_with_its_verdict(atto_onnx: ExportResult, tmp_path: Path) -> None:
    result = Home(tmp_path / "data", "unused").run("validate", atto_onnx.path)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"valid: {atto_onnx.path} passes the ONNX checker and LocalizationNet's IO contract "
        f"(opset {atto_onnx.opset_version})"
    )


def test_verify_states_the_thresholds_it_passed(
    atto_checkpoint: LoadedCheckpoint, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    result = Home(tmp_path / "data", "unused").run(
        "verify", atto_onnx.path, "--checkpoint", atto_checkpoint.path, "--batch-sizes", "1"
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "parity passed: max abs ≤ 4e-06, MAE ≤ 1e-06 (normalized region units); "
        "held-out mean distance ≤ 1 m"
    )


def test_bench_prints_a_table_with_one_row_per_engine_not_markdown(
    atto_checkpoint: LoadedCheckpoint, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    result = Home(tmp_path / "data", "unused").run(
        "bench", atto_onnx.path, "--checkpoint", atto_checkpoint.path, "--batch-sizes", "1",
        "--budget", "0.3", "--threads", "1",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "|---" not in result.stdout
    rows = tables(result.stdout)["benchmark (all columns: --json)"]
    assert [row[0].replace("\n", "") for row in rows] == ["pytorch", "fp32"]
    assert all(row[1] == "1" for row in rows)


@pytest.mark.parametrize("command", ["bench", "optimize"])
def test_bench_and_optimize_refuse_a_checkpoint_the_model_was_not_exported_from(
    command: str, atto_onnx: ExportResult, tmp_path: Path
) -> None:
    torch.manual_seed(5)
    other = tmp_path / "other.safetensors"
    save_checkpoint(LocalizationNet(ModelConfig(backbone="atto")), other)
    extra = ["--fp16"] if command == "optimize" else ["--budget", "0.1"]

    result = Home(tmp_path / "data", "unused").run(
        command, atto_onnx.path, "--checkpoint", other, *extra
    )

    assert "exported from checkpoint sha256" in failed_cleanly(result)


def tables(output: str) -> dict[str, list[list[str]]]:
    """Each table's records under its title; a record folded over lines has its cells' lines
    joined with newlines (a name folded mid-word: remove them to read it whole)."""
    found: dict[str, list[list[str]]] = {}
    title = ""
    for line in output.splitlines():
        text = line.strip()
        if not text.startswith("│"):
            title = title if not text or text[0] in "┏┃┡┌└" else text
            continue
        cells = [cell.strip() for cell in text.strip("│").split("│")]
        records = found.setdefault(title, [])
        if cells[0] or not records:
            records.append(cells)
        else:
            records[-1] = [f"{a}\n{b}" if b else a for a, b in zip(records[-1], cells, strict=True)]
    return found


def test_human_tables_put_nested_fields_on_lines_and_lists_of_records_in_tables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    emit(
        {
            "name": "m",
            "recipe": {"keep_io_types": True, "calibration": {"samples": 256, "loss": 0.123456}},
            "float32_nodes": ["/Add", "/Clip"],
            "metadata": {"heimdall.normalization": '{"center": [45.0, 8.5]}'},  # JSON text
            "gates": [{"name": "ready", "passed": True, "detail": "status is READY"}],
        },
        False,
        "t",
    )

    shown = tables(capsys.readouterr().out)
    assert shown == {
        "t": [
            ["name", "m"],
            ["recipe", "keep_io_types: yes\ncalibration:\nsamples: 256\nloss: 0.1235"],
            ["float32_nodes", "/Add, /Clip"],
            ["metadata", "heimdall.normalization:\ncenter: 45, 8.5"],
        ],
        "gates": [["ready", "yes", "status is READY"]],
    }


def test_models_show_lists_each_versions_aliases_as_the_version_option_does(
    registry: Registry,
) -> None:
    name = registry.home.name
    shown = registry.home.json("models", "show", name)
    expected = {v["version"]: "\n".join(v["aliases"]) or "-" for v in shown["versions"]}

    every = tables(registry.home.run("models", "show", name).stdout)
    one = tables(registry.home.run("models", "show", name, "--version", "1").stdout)

    assert "staging" in expected["1"].split()
    assert {row[0]: row[1] for row in every["versions"]} == expected
    assert {row[0]: row[1] for row in one["versions"]} == {"1": expected["1"]}
    assert ["aliases", expected["1"].replace("\n", ", ")] in one["version 1"]


def test_promote_prints_its_gates_as_a_table(registry: Registry) -> None:
    result = registry.home.run("promote", registry.home.name, "1", "--to", "canary")

    assert result.exit_code == 0, result.output
    shown = tables(result.stdout)
    assert ["alias", "canary"] in shown["promote"] and ["version", "1"] in shown["promote"]
    gates = {gate: passed for gate, passed, _ in shown["gates"]}
    assert gates == dict.fromkeys(
        ("ready", "verification", "sha256", "baseline", "champion"), "yes"
    )
