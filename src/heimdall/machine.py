"""The machine a measurement runs on: CPU, cores, ISA flags, memory, load and versions (no torch).

Benchmarks record :func:`fingerprint` next to their timings, and :func:`is_busy` says when other
processes compete for the cores (timings then are noisy and slow).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

from heimdall.errors import InputError, ResourceError

# ISA extensions that decide which MLAS/oneDNN kernels run (fp32 FMA width, int8 dot products).
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
)


@dataclass(frozen=True)
class Environment:
    """The machine and software a benchmark ran on."""

    cpu_model: str
    physical_cores: int
    logical_cpus: int
    isa_flags: tuple[str, ...]
    memory_gib: float
    threads: int
    platform: str
    python: str
    versions: dict[str, str]
    torch_backends: dict[str, bool]
    ort_providers: tuple[str, ...]
    load_average: tuple[float, float, float]  # 1, 5, 15 min, when the benchmark started


def fingerprint(threads: int) -> Environment:
    """CPU, ISA flags, cores, versions, threads and providers of this machine, now."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return Environment(
        cpu_model=info.get("model name") or platform.processor() or platform.machine(),
        physical_cores=physical_cores(),
        logical_cpus=os.cpu_count() or 1,
        isa_flags=tuple(f for f in ISA_FLAGS if f in flags),
        memory_gib=_memory_gib(),
        threads=threads,
        platform=platform.platform(),
        python=platform.python_version(),
        versions={
            name: _version(name) for name in ("heimdall", "torch", "onnxruntime", "onnx", "numpy")
        },
        torch_backends=_torch_backends(),
        ort_providers=tuple(ort.get_available_providers()),
        load_average=load_average(),
    )


# Packages whose versions decide what an exported or served model computes.
PACKAGES = ("heimdall", "torch", "onnx", "onnxruntime", "mlflow", "numpy")


@dataclass(frozen=True)
class Software:
    """The code a model was published with: package versions and, when known, the git commit."""

    packages: dict[str, str]
    git_commit: str | None = None  # of the repository the command ran in
    git_dirty: bool | None = None  # uncommitted changes to tracked files

    def tags(self) -> dict[str, str]:
        """Version/run tags; ``mlflow.source.git.commit`` is the tag MLflow's UI shows."""
        tags = {"heimdall.packages": ", ".join(f"{k}=={v}" for k, v in self.packages.items())}
        if self.git_commit:
            tags["mlflow.source.git.commit"] = self.git_commit
            tags["heimdall.git_commit"] = self.git_commit
        if self.git_commit and self.git_dirty is not None:
            tags["heimdall.git_dirty"] = str(self.git_dirty).lower()
        return tags


def software(git_commit: str | None = None, where: Path | None = None) -> Software:
    """Installed package versions, and the git commit given or found at ``where`` (the working
    directory by default); no commit where there is no repository or no git."""
    packages = {name: _version(name) for name in PACKAGES}
    packages = {k: v for k, v in packages.items() if v != "not installed"}
    if git_commit:
        return Software(packages, git_commit, None)
    commit = _git(where, "rev-parse", "HEAD")
    if commit is None:
        return Software(packages)
    dirty = _git(where, "status", "--porcelain", "--untracked-files=no")
    return Software(packages, commit, None if dirty is None else bool(dirty))


def _git(where: Path | None, *args: str) -> str | None:
    """``git ARGS`` output in ``where``; None if git, the repository or 5 seconds are missing."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def is_busy(environment: Environment | None = None) -> bool:
    """Whether other processes kept more than half the physical cores busy (1-minute load),
    as ``environment`` recorded it, or now."""
    if environment is None:
        return load_average()[0] > physical_cores() / 2
    return environment.load_average[0] > environment.physical_cores / 2


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not add fp32 FMA throughput)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    siblings = _cpuinfo_int("siblings")
    cores = _cpuinfo_int("cpu cores")
    per_core = siblings // cores if siblings and cores else 1
    return max(1, (logical or 1) // max(per_core, 1))


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)


def clock_mhz() -> tuple[float | None, str]:
    """The CPU's maximum clock if the kernel reports it, else its current one; and the source."""
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(cpufreq.read_text()) / 1e3, "cpufreq max"
    except (OSError, ValueError):
        pass
    mhz = _cpuinfo().get("cpu MHz")
    try:
        return (float(mhz), "/proc/cpuinfo cpu MHz") if mhz else (None, "unknown")
    except ValueError:
        return None, "unknown"


def flops_per_cycle() -> int | None:
    """fp32 FLOPs per cycle per core of two FMA pipes of the widest vector ISA, if known."""
    flags = set(_cpuinfo().get("flags", "").split())
    if "avx512f" in flags:
        return 64
    if {"avx2", "fma"} <= flags:
        return 32
    if "avx" in flags:
        return 16
    return None


def _torch_backends() -> dict[str, bool]:
    # Imported here: probing the machine must not pull torch into a serving process.
    try:
        import torch
    except ImportError:
        return {}
    return {
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "cuda": torch.cuda.is_available(),
    }


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpuinfo_int(key: str) -> int | None:
    value = _cpuinfo().get(key, "")
    return int(value) if value.isdigit() else None


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the kernel could hand out now without swapping (MemAvailable); None off Linux."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key == "MemAvailable" and value.split()[:1] and value.split()[0].isdigit():
            return int(value.split()[0]) * 1024
    return None


def check_memory(
    what: str, count: int, bytes_each: int, *, fix: str, available: int | None = None
) -> None:
    """Refuse in one line, before allocating, ``count`` items of about ``bytes_each`` bytes each
    that would not fit in the memory available now (or in ``available`` bytes).

    Nothing is refused where the amount available is unknown: a guess would block real work.
    """
    available = available_memory() if available is None else available
    needed = count * bytes_each
    if available is None or needed <= available:
        return
    raise InputError(
        f"{what} needs about {_bytes(needed)} ({_bytes(bytes_each)} a sample, estimated) but "
        f"{_bytes(available)} is available; {fix}"
    )


# How ONNX Runtime (Fail, RuntimeException) and PyTorch (RuntimeError) say an allocation failed.
_ALLOCATION = re.compile(r"bad_alloc|allocat|out of memory", re.IGNORECASE)


@contextmanager
def memory_errors(what: str, fix: str) -> Iterator[None]:
    """Turn running out of memory inside the block into one ResourceError line saying ``fix``.

    Python's MemoryError and the allocation failures ONNX Runtime and PyTorch raise as their
    own exception types would otherwise end a command in a traceback.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        available = available_memory()
        now = f"; {_bytes(available)} is available now" if available is not None else ""
        raise ResourceError(f"{what} ran out of memory{now}; {fix}") from exc


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (Python, ONNX Runtime or PyTorch)."""
    if isinstance(exc, MemoryError):
        return True
    failures = (Fail, RuntimeException, RuntimeError)
    return isinstance(exc, failures) and bool(_ALLOCATION.search(str(exc)))


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit in ("B", "KiB") else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _memory_gib() -> float:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return round(pages / 2**30, 1)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
