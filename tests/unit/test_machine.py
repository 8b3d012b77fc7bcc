"""The machine fingerprint: what a benchmark records about the computer it ran on."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

from heimdall import machine
from heimdall.errors import ResourceError


def test_fingerprint_names_cpu_versions_and_providers() -> None:
    env = machine.fingerprint(threads=1)
    assert env.physical_cores >= 1 and env.logical_cpus >= env.physical_cores
    assert set(env.isa_flags) <= set(machine.ISA_FLAGS)
    assert env.versions["torch"] == torch.__version__
    assert "CPUExecutionProvider" in env.ort_providers
    assert len(env.load_average) == 3


def test_a_machine_is_busy_when_load_exceeds_half_its_physical_cores() -> None:
    env = replace(machine.fingerprint(threads=1), physical_cores=4)
    assert not machine.is_busy(replace(env, load_average=(2.0, 0.0, 0.0)))
    assert machine.is_busy(replace(env, load_average=(2.1, 0.0, 0.0)))


@pytest.mark.parametrize(("load", "busy"), [(2.0, False), (2.1, True)])
def test_without_an_environment_is_busy_reads_the_load_now(
    load: float, busy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine, "physical_cores", lambda: 4)
    monkeypatch.setattr(machine, "load_average", lambda: (load, 0.0, 0.0))

    assert machine.is_busy() is busy


def test_importing_machine_does_not_import_torch() -> None:
    code = "import sys, heimdall.machine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_software_records_the_git_commit_of_the_repository_it_runs_in(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "v1")
    clean = machine.software(where=tmp_path)
    assert clean.git_commit == _git(tmp_path, "rev-parse", "HEAD")
    assert clean.git_dirty is False
    assert clean.tags()["mlflow.source.git.commit"] == clean.git_commit
    assert clean.tags()["heimdall.git_dirty"] == "false"
    (tmp_path / "train.py").write_text("print('v2')\n")
    assert machine.software(where=tmp_path).git_dirty is True


def test_software_outside_a_repository_records_packages_and_no_commit(tmp_path: Path) -> None:
    found = machine.software(where=tmp_path)
    assert found.git_commit is None
    assert "mlflow.source.git.commit" not in found.tags()
    assert {"heimdall", "onnxruntime", "mlflow"} <= set(found.packages)
    assert f"onnxruntime=={found.packages['onnxruntime']}" in found.tags()["heimdall.packages"]


def test_a_given_git_commit_wins_over_the_working_directory(tmp_path: Path) -> None:
    given = machine.software(git_commit="0123abc", where=tmp_path)
    assert given.tags()["heimdall.git_commit"] == "0123abc"
    assert "heimdall.git_dirty" not in given.tags()


def test_available_memory_reads_memavailable_from_proc_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    2048 kB\nCached: 1 kB\n")

    assert machine.available_memory(meminfo) == 2048 * 1024
    assert machine.available_memory(tmp_path / "missing") is None
    assert machine.available_memory() is None or machine.available_memory() > 0


def test_a_size_that_does_not_fit_in_memory_is_refused_in_one_line_naming_the_estimate() -> None:
    with pytest.raises(machine.InputError) as refused:
        machine.check_memory(
            "--samples 100000000", 100_000_000, 96 * 2**10, available=4 * 2**30, fix="use fewer"
        )

    message = str(refused.value)
    assert "\n" not in message
    assert "--samples 100000000 needs about 8.9 TiB" in message
    assert "96 KiB a sample" in message and "4.0 GiB is available" in message
    assert message.endswith("use fewer")


def test_a_size_that_fits_or_an_unknown_amount_of_memory_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine.check_memory("--samples 64", 64, 96 * 2**10, available=2**30, fix="-")
    monkeypatch.setattr(machine, "available_memory", lambda: None)  # not Linux

    machine.check_memory("--samples 10**12", 10**12, 96 * 2**10, fix="-")


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError(),
        RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc"),
        Fail("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 GB"),
    ],
    ids=["python", "ort-runtime-exception", "ort-fail", "torch"],
)
def test_running_out_of_memory_becomes_one_resource_error_line(failure: BaseException) -> None:
    with pytest.raises(ResourceError) as refused, machine.memory_errors("verify", "use less"):
        raise failure

    message = str(refused.value)
    assert message.startswith("verify ran out of memory") and message.endswith("; use less")
    assert "\n" not in message


def test_other_runtime_errors_pass_through_memory_errors() -> None:
    with pytest.raises(RuntimeError, match="shape mismatch"), machine.memory_errors("x", "y"):
        raise RuntimeError("shape mismatch")
