"""What a model asks of the machine and what the machine can give (torch).

:func:`count_flops` counts a model's FLOPs per sample; :func:`estimate_peak` measures this
machine's fp32 GEMM rate and DRAM read bandwidth, and adds the theoretical peak from the CPU's
ISA and clock (``heimdall.machine``). Benchmarks report latency against both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from heimdall.contract import INPUT_SHAPE
from heimdall.machine import clock_mhz, flops_per_cycle, physical_cores
from heimdall.model import LocalizationNet
from heimdall.timing import seconds_of

PEAK_GEMM_SIZE = 2048
_PEAK_READ_BYTES = 512 * 2**20


@dataclass(frozen=True)
class PeakEstimate:
    """The machine's fp32 FLOP peak, measured and theoretical, and its memory bandwidth.

    ``measured_gflops``: best of repeated ``torch.mm`` on square fp32 matrices of side
    ``gemm_size`` with ``threads`` threads (the practical peak of a tuned BLAS).
    ``theoretical_gflops``: cores × clock × FLOPs per cycle, where FLOPs per cycle assumes two
    FMA pipes of the widest vector ISA (AVX2: 2 × 8 lanes × 2 = 32; AVX-512: 64). The clock is
    the maximum frequency the kernel reports, else the current one (a VM often shows only its
    base clock). ``memory_read_gbps``: best ``Tensor.sum`` over a buffer far larger than any
    cache, i.e. the rate at which weights stream from DRAM: at batch 1 every weight is read
    once per inference, so ``weight bytes / memory_read_gbps`` is a latency floor.
    """

    measured_gflops: float
    gemm_size: int
    theoretical_gflops: float | None
    clock_mhz: float | None
    clock_source: str
    flops_per_cycle_per_core: int | None
    cores: int
    memory_read_gbps: float
    threads: int


def count_flops(model: LocalizationNet) -> int:
    """FLOPs of one sample through ``model`` (see the module docstring for what counts)."""
    device = next(model.parameters()).device
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *INPUT_SHAPE, device=device))
    return int(counter.get_total_flops())


def estimate_peak(
    threads: int | None = None, *, repeats: int = 5, gemm_size: int = PEAK_GEMM_SIZE
) -> PeakEstimate:
    """Measure sgemm GFLOP/s and copy bandwidth with ``threads`` threads; add the theoretical."""
    n_threads = threads or physical_cores()
    n = gemm_size
    with torch_threads(n_threads), torch.inference_mode():
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        gemm = min(seconds_of(lambda: torch.mm(a, b)) for _ in range(repeats))
        buffer = torch.ones(_PEAK_READ_BYTES // 4)
        buffer.sum()
        read = min(seconds_of(buffer.sum) for _ in range(repeats))
    clock, source = clock_mhz()
    per_cycle = flops_per_cycle()
    cores = min(n_threads, physical_cores())
    return PeakEstimate(
        measured_gflops=2 * n**3 / gemm / 1e9,
        gemm_size=n,
        theoretical_gflops=cores * clock * per_cycle / 1e3 if clock and per_cycle else None,
        clock_mhz=clock,
        clock_source=source,
        flops_per_cycle_per_core=per_cycle,
        cores=cores,
        memory_read_gbps=_PEAK_READ_BYTES / read / 1e9,
        threads=n_threads,
    )


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch on ``threads`` threads inside the block; the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def eval_mode(model: LocalizationNet) -> Iterator[None]:
    """``model`` in eval mode without autograd inside the block; its mode and device after."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.to(device)
        model.train(was_training)
