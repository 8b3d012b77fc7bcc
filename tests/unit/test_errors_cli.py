"""Every error the CLI meets is one line on stderr and exit code 1, never a traceback.

The CLI runs in a subprocess, as a user runs it: stderr is a pipe, not a terminal, 80 columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from heimdall.checkpoint import LoadedCheckpoint
from heimdall.errors import CheckpointError, GateError, PublishError, StorageError
from heimdall.export import ExportResult
from tests.unit.test_checkpoint import zip_bomb
from tests.unit.test_cli import _FOREIGN_ENV

# A pickle that reads memo slot 5, never written: torch's weights-only unpickler raises KeyError.
KEY_ERROR_PICKLE = b"\x80\x02h\x05."


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def heimdall(*args: str | Path, cwd: Path, **env: str) -> Outcome:
    """Run ``python -m heimdall.cli`` in ``cwd`` with its own data directory."""
    clean = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    clean.update(HEIMDALL_DATA_DIR=str(cwd / "data"), COLUMNS="80", **env)
    done = subprocess.run(
        [sys.executable, "-m", "heimdall.cli", *map(str, args)],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def one_line_error(outcome: Outcome) -> str:
    """Exit 1, no traceback, exactly one line on stderr: the error, which is returned."""
    assert outcome.returncode == 1, outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("error ("), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(
    atto_checkpoint: LoadedCheckpoint,
    atto_onnx: ExportResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A folder of broken inputs next to a good checkpoint and its export."""
    root = tmp_path_factory.mktemp("broken")
    with safe_open(str(atto_checkpoint.path), framework="pt") as fh:
        metadata = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    config = json.loads(metadata["heimdall_config"])
    metadata["heimdall_config"] = json.dumps({**config, "uncertainty_min": "abc"})
    save_file(tensors, str(root / "badconfig.safetensors"), metadata=metadata)
    (root / "good.safetensors").write_bytes(atto_checkpoint.path.read_bytes())
    (root / "invalid.onnx").write_bytes(b"\x08\x07garbage" + bytes(range(256)))
    (root / "text.onnx").write_text("this is not a model\n")
    (root / "model.onnx").write_bytes(atto_onnx.path.read_bytes())
    (root / "junk-weights.pth").write_bytes(KEY_ERROR_PICKLE)
    (root / "random.pt").write_bytes(bytes((i * 7919 + 13) % 256 for i in range(4096)))
    zip_bomb(root / "bomb.pt", 256 * 2**20)
    with (root / "claims.npy").open("wb") as fh:  # 132 bytes that claim 4.9 TB
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**8, 3, 128, 32)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(4))
    np.save(root / "features.npy", np.zeros((2, 3, 128, 32), np.float32))
    return root


CASES = {
    "export-bad-config": (["export", "badconfig.safetensors", "-o", "out.onnx"], {}),
    "verify-bad-config": (["verify", "model.onnx", "--checkpoint", "badconfig.safetensors"], {}),
    "bench-bad-config": (["bench", "model.onnx", "--checkpoint", "badconfig.safetensors"], {}),
    "optimize-bad-config": (
        ["optimize", "model.onnx", "--checkpoint", "badconfig.safetensors", "--fp16"],
        {},
    ),
    "optimize-invalid-onnx": (
        ["optimize", "invalid.onnx", "--checkpoint", "good.safetensors", "--fp16"],
        {},
    ),
    "optimize-text-file": (
        ["optimize", "text.onnx", "--checkpoint", "good.safetensors", "--fp16"],
        {},
    ),
    "upload-long-key": (
        ["upload", "model.onnx", "--key", "k" * 300, "--create-bucket"],
        {},
    ),
    "log-level": (["models", "list"], {"HEIMDALL_LOG_LEVEL": "LOUD"}),
    "s3-endpoint": (["models", "list"], {"HEIMDALL_S3_ENDPOINT_URL": "not-a-url"}),
    "junk-backbone-weights": (
        ["train", "--backbone-weights", "junk-weights.pth", "--epochs", "1", "--samples", "8"],
        {},
    ),
    "random-bytes-pt": (["export", "random.pt", "-o", "out.onnx"], {}),
    "zip-bomb-pt": (["export", "bomb.pt", "-o", "out.onnx"], {}),
    "npy-header-claims-more": (["predict", "model.onnx", "claims.npy"], {}),
    "safetensors-as-features": (["predict", "model.onnx", "good.safetensors"], {}),
    "registry-name-without-prefix": (["predict", "my-model@staging", "features.npy"], {}),
    "train-samples-beyond-memory": (["train", "--samples", "100000000"], {}),
    "verify-batch-beyond-memory": (
        ["verify", "model.onnx", "--checkpoint", "good.safetensors", "--batch-sizes", "1,10000000"],
        {},
    ),
    "optimize-calibration-beyond-memory": (
        [
            "optimize",
            "model.onnx",
            "--checkpoint",
            "good.safetensors",
            "--int8",
            "--calibration",
            "100000000",
        ],
        {},
    ),
}
# What each message must name so the user knows what to fix.
EXPECTED = {
    "export-bad-config": "'uncertainty_min' must be a number, got 'abc'",
    "verify-bad-config": "'uncertainty_min' must be a number, got 'abc'",
    "bench-bad-config": "'uncertainty_min' must be a number, got 'abc'",
    "optimize-bad-config": "'uncertainty_min' must be a number, got 'abc'",
    "optimize-invalid-onnx": "invalid.onnx: not a readable ONNX file",
    "optimize-text-file": "text.onnx: not a readable ONNX file",
    "upload-long-key": "choose a shorter key (--key)",
    "log-level": "unknown log level 'LOUD'",
    "s3-endpoint": "'not-a-url' is not http(s)://host[:port]",
    "junk-backbone-weights": "junk-weights.pth: not a PyTorch checkpoint",
    "random-bytes-pt": "random.pt: not a PyTorch checkpoint",
    "zip-bomb-pt": "bomb.pt: its zip entries inflate to 256.0 MiB",
    "npy-header-claims-more": "claims.npy: its header declares shape (100000000, 3, 128, 32)",
    "safetensors-as-features": "a safetensors file, not a .npy array",
    "registry-name-without-prefix": "did you mean models:/my-model@staging?",
    "train-samples-beyond-memory": "training on 100000000 + 512 samples needs about",
    "verify-batch-beyond-memory": "verify at batch size 10000000 needs about",
    "optimize-calibration-beyond-memory": "--calibration 100000000 needs about",
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_known_failure_is_one_line_exit_1_and_no_traceback(files: Path, case: str) -> None:
    args, env = CASES[case]

    line = one_line_error(heimdall(*args, cwd=files, **env))

    assert EXPECTED[case] in line
    assert "arbitrary code" not in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", b"model\xff"], "not valid UTF-8"),
        (["--alias", "Production"], "moved only by promote"),
        (["--name", "n" * 600], "600 bytes long"),
    ],
    ids=["non-utf8-name", "alias-Production", "600-char-name"],
)
def test_publish_refuses_a_hostile_argument_in_one_line_and_writes_nothing(
    files: Path, tmp_path: Path, args: list[str | bytes], expected: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    clean.update(HEIMDALL_DATA_DIR=str(tmp_path / "data"), COLUMNS="80")
    done = subprocess.run(
        [sys.executable, "-m", "heimdall.cli", "publish", files / "good.safetensors", *args],
        env=clean,
        capture_output=True,
        timeout=300,
    )
    outcome = Outcome(done.returncode, done.stdout.decode(), done.stderr.decode(errors="replace"))

    assert expected in one_line_error(outcome)
    assert not (tmp_path / "data").exists()  # no object stored, no registry created


def test_a_failed_publish_says_why_once_on_its_last_line(files: Path) -> None:
    outcome = heimdall("publish", "badconfig.safetensors", "--no-bench", cwd=files)

    assert outcome.returncode == 1
    assert "Traceback" not in outcome.stdout + outcome.stderr
    lines = outcome.stderr.splitlines()
    failed = [line for line in lines if line.startswith("✗")]
    assert failed == ["✗ load       failed"]  # the reason follows once, in the error line
    error = lines[-1]
    assert error.startswith("error (PublishError): publish failed at step 'load'")
    assert "'uncertainty_min' must be a number" in error
    assert ".." not in error
    assert "run the same command again" not in error  # the same checkpoint fails the same way


def raised(cause: Exception, reason: str) -> PublishError:
    try:
        try:
            raise cause
        except Exception as exc:
            raise PublishError("step", reason, {"onnx_file": "m.onnx"}) from exc
    except PublishError as error:
        return error


@pytest.mark.parametrize(
    "cause", [GateError("gate"), CheckpointError("bad file")], ids=["gate", "checkpoint"]
)
def test_publish_error_whose_cause_repeats_does_not_advise_running_again(
    cause: Exception,
) -> None:
    message = str(raised(cause, "it failed."))

    assert message == "publish failed at step 'step': it failed. Already done: onnx_file: m.onnx"


def test_publish_error_after_a_storage_failure_advises_running_again() -> None:
    message = str(raised(StorageError("timed out."), "timed out."))

    assert "timed out. Already done: onnx_file: m.onnx. Fix the cause and run the same " in message
    assert "reused, never duplicated" in message
