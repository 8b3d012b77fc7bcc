"""Tests for heimdall.model: ConvNeXt backbone, LocalizationNet heads, input contract."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from heimdall.errors import CheckpointError, InputError
from heimdall.model import (
    BATCH_AXIS,
    INPUT_NAME,
    IO_CONTRACT,
    OUTPUT_NAMES,
    ConvNeXt,
    LocalizationNet,
    ModelConfig,
    ParamsCount,
    load_exact,
)

# Two spinning PyTorch threads on a shared two-core machine are much slower than one.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Published stage widths and depths: ConvNeXt (Liu et al. 2022) for tiny..large and
# ConvNeXt-V2 (Woo et al. 2023) for atto..nano.
PUBLISHED = {
    "atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
}

# torchvision's published parameter totals for convnext_* minus the ImageNet head Linear(C, 1000).
TORCHVISION_BACKBONE_PARAMS = {
    "tiny": 28_589_128 - (768 * 1000 + 1000),
    "small": 50_223_688 - (768 * 1000 + 1000),
    "base": 88_591_464 - (1024 * 1000 + 1000),
    "large": 197_767_336 - (1536 * 1000 + 1000),
}

EXPECTED_SHAPE = "(B, 3, 128, 32)"


@pytest.fixture(scope="module")
def atto() -> LocalizationNet:
    torch.manual_seed(0)
    return LocalizationNet().eval()


def mel_batch(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 128, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_backbone_stages_have_published_widths_and_depths(size: str) -> None:
    widths, depths = PUBLISHED[size]
    with torch.device("meta"):
        backbone = ConvNeXt(size)
    stages = [backbone.features[i] for i in (1, 3, 5, 7)]
    assert [len(stage) for stage in stages] == list(depths)
    assert [stage[0].layer_scale.shape[0] for stage in stages] == list(widths)
    assert backbone.num_features == widths[-1]


@pytest.mark.parametrize("size", list(TORCHVISION_BACKBONE_PARAMS))
def test_backbone_parameter_count_matches_torchvision_without_imagenet_head(size: str) -> None:
    with torch.device("meta"):
        backbone = ConvNeXt(size)
    assert sum(p.numel() for p in backbone.parameters()) == TORCHVISION_BACKBONE_PARAMS[size]


def test_large_backbone_emits_1536_features_into_both_heads() -> None:
    with torch.device("meta"):
        model = LocalizationNet(ModelConfig(backbone="large")).eval()
        features = model.backbone(torch.empty(2, 3, 128, 32))
        positions, sigma = model(torch.empty(2, 3, 128, 32))
    assert features.shape == (2, 1536)
    assert model.position_head[0].in_features == 1536
    assert model.uncertainty_head[0].in_features == 1536
    assert positions.shape == (2, 2)
    assert sigma.shape == (2, 2)


@pytest.mark.parametrize("size", ["atto", "femto", "pico", "nano", "tiny", "small", "base"])
def test_forward_gives_two_positions_and_bounded_uncertainties_per_sample(size: str) -> None:
    torch.manual_seed(0)
    model = LocalizationNet(ModelConfig(backbone=size)).eval()
    with torch.inference_mode():
        positions, sigma = model(mel_batch(2))
    assert positions.shape == (2, 2)
    assert sigma.shape == (2, 2)
    assert positions.dtype == sigma.dtype == torch.float32
    assert torch.isfinite(positions).all()
    assert bool(((sigma >= 0.01) & (sigma <= 1.0)).all())


def test_unknown_backbone_size_is_an_input_error_naming_the_choices() -> None:
    with pytest.raises(InputError, match="atto"):
        ConvNeXt("huge")


@pytest.mark.parametrize("head", ["position_head", "uncertainty_head"])
def test_head_is_linear_batchnorm_relu_dropout_twice_then_linear_to_two(head: str) -> None:
    model = LocalizationNet()
    layers = list(getattr(model, head))
    block = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert [type(layer) for layer in layers] == [*block, *block, nn.Linear]
    assert layers[0].in_features == model.backbone.num_features
    assert layers[-1].out_features == 2


@pytest.mark.parametrize(("bias", "bound"), [(50.0, "max"), (-50.0, "min")])
def test_uncertainties_are_clamped_to_the_configured_bounds(bias: float, bound: str) -> None:
    config = ModelConfig(uncertainty_min=0.05, uncertainty_max=0.3)
    model = LocalizationNet(config).eval()
    last = model.uncertainty_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(bias)
    with torch.inference_mode():
        _, sigma = model(mel_batch(2))
    expected = config.uncertainty_max if bound == "max" else config.uncertainty_min
    torch.testing.assert_close(sigma, torch.full((2, 2), expected))


def test_positions_are_normalized_outputs_scaled_into_region_degrees() -> None:
    config = ModelConfig(center=(50.0, 10.0), scale=(2.0, 3.0))
    model = LocalizationNet(config).eval()
    x = mel_batch(3)
    with torch.inference_mode():
        positions, _ = model(x)
        normalized, _ = model.forward_normalized(x)
    torch.testing.assert_close(
        positions, normalized * torch.tensor([2.0, 3.0]) + torch.tensor([50.0, 10.0])
    )


def test_region_normalization_is_saved_as_buffers_not_trained() -> None:
    model = LocalizationNet(ModelConfig(center=(50.0, 10.0), scale=(2.0, 3.0)))
    buffers = dict(model.named_buffers())
    torch.testing.assert_close(buffers["coord_center"], torch.tensor([50.0, 10.0]))
    torch.testing.assert_close(buffers["coord_scale"], torch.tensor([2.0, 3.0]))
    assert {"coord_center", "coord_scale"} <= set(model.state_dict())
    assert not {"coord_center", "coord_scale"} & {name for name, _ in model.named_parameters()}


def test_io_contract_describes_what_forward_takes_and_returns(atto: LocalizationNet) -> None:
    x = mel_batch(3)
    with torch.inference_mode():
        outputs = atto(x)
    for name, tensor in zip((INPUT_NAME, *OUTPUT_NAMES), (x, *outputs), strict=True):
        dtype, (batch, *shape) = IO_CONTRACT[name]
        assert batch == BATCH_AXIS == "batch_size"
        assert (tensor.dtype, tuple(tensor.shape)) == (getattr(torch, dtype), (3, *shape))


@pytest.mark.parametrize(
    ("x", "detail"),
    [
        pytest.param(torch.zeros(3, 128, 32), "rank 3", id="rank-3"),
        pytest.param(torch.zeros(1, 2, 3, 128, 32), "rank 5", id="rank-5"),
        pytest.param(torch.zeros(2, 1, 128, 32), "(2, 1, 128, 32)", id="one-channel"),
        pytest.param(torch.zeros(2, 4, 128, 32), "(2, 4, 128, 32)", id="four-channels"),
        pytest.param(torch.zeros(2, 3, 64, 32), "(2, 3, 64, 32)", id="64-mel-bins"),
        pytest.param(torch.zeros(2, 3, 128, 16), "(2, 3, 128, 16)", id="16-frames"),
        pytest.param(torch.zeros(2, 3, 32, 128), "(2, 3, 32, 128)", id="transposed"),
        pytest.param(torch.zeros(2, 3, 128, 32, dtype=torch.float64), "float64", id="float64"),
        pytest.param(torch.zeros(2, 3, 128, 32, dtype=torch.float16), "float16", id="float16"),
        pytest.param(torch.zeros(2, 3, 128, 32, dtype=torch.int64), "int64", id="int64"),
        pytest.param(torch.zeros(2, 3, 128, 32, dtype=torch.int32), "int32", id="int32"),
        pytest.param(torch.zeros(0, 3, 128, 32), "empty", id="empty-batch"),
        pytest.param(np.zeros((2, 3, 128, 32), np.float32), "ndarray", id="numpy-array"),
    ],
)
def test_model_rejects_input_naming_the_expected_shape_and_what_it_got(
    atto: LocalizationNet, x: object, detail: str
) -> None:
    with pytest.raises(
        InputError, match=re.escape(f"float32 tensor of shape {EXPECTED_SHAPE}")
    ) as info:
        atto(x)
    assert detail in str(info.value)


def test_params_count_total_is_backbone_plus_two_heads() -> None:
    with torch.device("meta"):
        model = LocalizationNet(ModelConfig(backbone="atto", head_hidden=(256, 128)))
        backbone = sum(p.numel() for p in ConvNeXt("atto").parameters())
    features = PUBLISHED["atto"][0][-1]
    # Linear(F, 256) + BN(256) + Linear(256, 128) + BN(128) + Linear(128, 2)
    head = (features * 256 + 256) + 2 * 256 + (256 * 128 + 128) + 2 * 128 + (128 * 2 + 2)
    total = backbone + 2 * head
    assert model.get_params_count() == ParamsCount(total=total, trainable=total, frozen=0)


def test_params_count_reports_a_frozen_backbone_as_frozen() -> None:
    model = LocalizationNet()
    backbone = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    model.backbone.requires_grad_(False)
    assert model.get_params_count() == ParamsCount(
        total=total, trainable=total - backbone, frozen=backbone
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backbone": "huge"},
        {"uncertainty_min": 0.0},
        {"uncertainty_min": 0.5, "uncertainty_max": 0.5},
        {"uncertainty_min": 0.9, "uncertainty_max": 0.1},
        {"scale": (0.0, 1.0)},
        {"scale": (1.0, -1.0)},
    ],
)
def test_model_config_rejects_inconsistent_values(kwargs: dict) -> None:
    with pytest.raises(InputError):
        ModelConfig(**kwargs)


def test_model_config_survives_a_json_round_trip() -> None:
    config = ModelConfig(
        backbone="femto",
        head_hidden=(64, 32),
        dropout=0.1,
        uncertainty_min=0.02,
        uncertainty_max=0.5,
        center=(44.5, 9.25),
        scale=(0.75, 1.25),
        extra={"note": "x"},
    )
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(CheckpointError, match="mystery"):
        ModelConfig.from_dict({"backbone": "atto", "mystery": 1})


def test_load_exact_lists_every_mismatch_in_one_error_and_loads_nothing() -> None:
    module = nn.Sequential(nn.Linear(2, 3))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {"0.weight": torch.ones(3, 3), "0.extra": torch.ones(1)}
    with pytest.raises(CheckpointError) as info:
        load_exact(module, state, source="test-state")
    message = str(info.value)
    assert "missing keys (1): 0.bias" in message
    assert "unexpected keys (1): 0.extra" in message
    assert "0.weight: checkpoint (3, 3) vs model (3, 2)" in message
    assert "test-state" in message
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


def test_load_exact_loads_a_matching_state() -> None:
    module = nn.Sequential(nn.Linear(2, 3))
    state = {"0.weight": torch.full((3, 2), 0.5), "0.bias": torch.full((3,), -1.0)}
    load_exact(module, state, source="test-state")
    assert torch.equal(module[0].weight, state["0.weight"])
    assert torch.equal(module[0].bias, state["0.bias"])
