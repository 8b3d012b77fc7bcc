"""count_flops and estimate_peak: the FLOP count and the machine's measured peak."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from heimdall import roofline
from heimdall.checkpoint import LoadedCheckpoint
from heimdall.model import INPUT_SHAPE


def test_count_flops_matches_conv_and_linear_macs(atto_checkpoint: LoadedCheckpoint) -> None:
    model = atto_checkpoint.model.eval()
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.inference_mode():
        model(torch.zeros(1, *INPUT_SHAPE))
    for handle in handles:
        handle.remove()
    assert roofline.count_flops(model) == 2 * macs


def test_estimate_peak_reports_positive_rates() -> None:
    peak = roofline.estimate_peak(threads=1, repeats=1, gemm_size=256)
    assert peak.measured_gflops > 0 and peak.memory_read_gbps > 0
    assert peak.cores == 1 and peak.gemm_size == 256
    if peak.theoretical_gflops is not None:
        assert peak.clock_mhz and peak.flops_per_cycle_per_core
        expected = peak.clock_mhz * peak.flops_per_cycle_per_core / 1e3
        assert peak.theoretical_gflops == pytest.approx(expected)
