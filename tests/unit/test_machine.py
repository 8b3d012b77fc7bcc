"""The machine fingerprint: what a benchmark records about the computer it ran on."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import torch

from heimdall import machine


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


def test_importing_machine_does_not_import_torch() -> None:
    code = "import sys, heimdall.machine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
