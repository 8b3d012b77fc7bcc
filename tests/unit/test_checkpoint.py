"""Tests for heimdall.checkpoint: safe save/load, foreign layouts, refusal of code payloads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shlex
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from structlog.testing import capture_logs
from torch import nn

from heimdall.checkpoint import (
    DtypeWarning,
    check_archive_sizes,
    infer_backbone,
    load_checkpoint,
    load_torchvision_weights,
    read_state_dict,
    save_checkpoint,
    sha256_file,
)
from heimdall.errors import CheckpointError, ResourceError
from heimdall.model import BACKBONES, ConvNeXt, LocalizationNet, ModelConfig

# Two spinning PyTorch threads on a shared two-core machine are much slower than one.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    # Non-default normalization and clamp bounds, so a loader that ignored the config would show.
    return ModelConfig(
        backbone="atto",
        center=(46.0, 9.0),
        scale=(0.5, 0.75),
        uncertainty_min=0.02,
        uncertainty_max=0.9,
    )


@pytest.fixture(scope="module")
def model(config: ModelConfig) -> LocalizationNet:
    torch.manual_seed(0)
    net = LocalizationNet(config)
    # Non-default BatchNorm statistics and layer scales, so dropped buffers or blocks would show.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
        for name, param in net.named_parameters():
            if name.endswith("layer_scale"):
                param.uniform_(0.1, 1.0)
    return net.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 128, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(model: LocalizationNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module")
def saved(model: LocalizationNet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return path, save_checkpoint(model, path, training_run_id=RUN_ID)


def outputs(model: LocalizationNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model(x)


def assert_same_outputs(
    actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]
) -> None:
    assert torch.equal(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_round_trip_reproduces_outputs_exactly(
    saved: tuple[Path, str], x: torch.Tensor, expected: tuple[torch.Tensor, torch.Tensor]
) -> None:
    loaded = load_checkpoint(saved[0])
    assert_same_outputs(outputs(loaded.model, x), expected)


def test_safetensors_round_trip_restores_the_model_config(
    saved: tuple[Path, str], config: ModelConfig
) -> None:
    assert load_checkpoint(saved[0]).config == config


def test_loaded_model_is_in_eval_mode(saved: tuple[Path, str]) -> None:
    assert not load_checkpoint(saved[0]).model.training


def test_a_loaded_model_keeps_its_weights_when_the_file_is_rewritten_in_place(
    model: LocalizationNet, tmp_path: Path, x: torch.Tensor, expected: tuple[torch.Tensor, ...]
) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    size = path.stat().st_size
    with path.open("r+b") as fh:  # same inode: a memory map of the file would see this
        fh.seek(size // 2)
        fh.write(b"\x7f" * (size - size // 2))

    assert_same_outputs(outputs(loaded.model, x), (expected[0], expected[1]))
    assert all(not t.is_meta for t in loaded.model.state_dict().values())


def test_saved_file_metadata_holds_config_run_id_and_version(
    saved: tuple[Path, str], config: ModelConfig
) -> None:
    with safe_open(str(saved[0]), framework="pt") as fh:
        metadata = fh.metadata()
    assert ModelConfig.from_dict(json.loads(metadata["heimdall_config"])) == config
    assert metadata["training_run_id"] == RUN_ID
    assert metadata["heimdall_version"]


def test_save_returns_sha256_of_the_written_file(saved: tuple[Path, str]) -> None:
    path, digest = saved
    assert digest == file_sha256(path)


def test_loaded_checkpoint_carries_sha256_of_the_file(saved: tuple[Path, str]) -> None:
    path, _ = saved
    assert load_checkpoint(path).sha256 == file_sha256(path)


def test_training_run_id_round_trips(saved: tuple[Path, str]) -> None:
    assert load_checkpoint(saved[0]).training_run_id == RUN_ID


def test_checkpoint_saved_without_run_id_loads_with_none(
    model: LocalizationNet, tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    assert load_checkpoint(path).training_run_id is None


def test_save_refuses_a_path_that_is_not_safetensors(
    model: LocalizationNet, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_sha256_file_matches_hashlib_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * (9 * 4096 + 7))  # over 9 MiB: several 8 MiB chunks
    assert sha256_file(path) == file_sha256(path)


def seed_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"model_state_dict": state, "epoch": 7, "optimizer_state_dict": {"state": {}}}


def lightning_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"lr": 1e-3},
    }


def plain_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return dict(state)


def write_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights only, no heimdall config: a seed ``.pt`` or a bare safetensors file."""
    if path.suffix == ".pt":
        torch.save(seed_layout(state), path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize(
    ("suffix", "layout"),
    [
        pytest.param(".pt", seed_layout, id="seed-model_state_dict-pt"),
        pytest.param(".ckpt", lightning_layout, id="lightning-state_dict-ckpt"),
        pytest.param(".pth", plain_layout, id="plain-state-dict-pth"),
    ],
)
def test_torch_file_layouts_load_and_reproduce_outputs(
    model: LocalizationNet,
    config: ModelConfig,
    x: torch.Tensor,
    expected: tuple[torch.Tensor, torch.Tensor],
    tmp_path: Path,
    suffix: str,
    layout: Callable[[dict[str, torch.Tensor]], dict[str, Any]],
) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save(layout(model.state_dict()), path)
    loaded = load_checkpoint(path, config=config)
    assert_same_outputs(outputs(loaded.model, x), expected)
    assert loaded.sha256 == file_sha256(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_size_is_inferred_from_shapes_when_the_file_has_no_config(
    tmp_path: Path, x: torch.Tensor, suffix: str
) -> None:
    # femto, not the default atto, so a loader that fell back to the default would fail.
    torch.manual_seed(0)
    femto = LocalizationNet(ModelConfig(backbone="femto")).eval()
    path = tmp_path / f"femto{suffix}"
    write_state(femto.state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.config.backbone == "femto"
    assert_same_outputs(outputs(loaded.model, x), outputs(femto, x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_region_normalization_is_read_from_the_buffers_when_the_file_has_no_config(
    tmp_path: Path, x: torch.Tensor, suffix: str
) -> None:
    # Not the defaults, and not exact in float32, so a loader that fell back would show.
    torch.manual_seed(0)
    net = LocalizationNet(ModelConfig(center=(45.07, 8.61), scale=(0.35, 0.45))).eval()
    path = tmp_path / f"model{suffix}"
    write_state(net.state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.config.center == (45.07, 8.61)
    assert loaded.config.scale == (0.35, 0.45)
    assert_same_outputs(outputs(loaded.model, x), outputs(net, x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_config_that_contradicts_the_stored_region_normalization_is_rejected(
    model: LocalizationNet, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"model{suffix}"
    write_state(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"center \(45\.0, 8\.5\).*coord_center \(46\.0"):
        load_checkpoint(path, config=ModelConfig(backbone="atto"))


@pytest.mark.parametrize("size", list(BACKBONES))
def test_infer_backbone_names_every_size_from_its_state_dict(size: str) -> None:
    with torch.device("meta"):
        state = LocalizationNet(ModelConfig(backbone=size)).state_dict()
    assert infer_backbone(state) == size


def test_infer_backbone_rejects_a_state_dict_without_a_stem() -> None:
    with pytest.raises(CheckpointError, match=r"backbone\.features\.0\.0\.weight"):
        infer_backbone({"position_head.0.weight": torch.zeros(1)})


def test_infer_backbone_rejects_unknown_widths() -> None:
    with torch.device("meta"):
        state = LocalizationNet().state_dict()
    state["backbone.features.0.0.weight"] = torch.zeros(41, 3, 4, 4)
    with pytest.raises(CheckpointError, match="41"):
        infer_backbone(state)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mismatched_checkpoint_raises_one_error_listing_every_problem(
    model: LocalizationNet, config: ModelConfig, tmp_path: Path, suffix: str
) -> None:
    state = dict(model.state_dict())
    del state["position_head.0.weight"]
    state["position_head.9.weight"] = torch.zeros(4)
    state["uncertainty_head.8.bias"] = torch.zeros(3)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pt":
        torch.save(seed_layout(state), path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, config=config)
    message = str(info.value)
    assert "missing keys" in message
    assert "position_head.0.weight" in message
    assert "unexpected keys" in message
    assert "position_head.9.weight" in message
    assert "shape mismatches" in message
    assert "uncertainty_head.8.bias: checkpoint (3,) vs model (2,)" in message


def test_config_for_another_backbone_is_rejected_with_shape_mismatches(
    saved: tuple[Path, str],
) -> None:
    with pytest.raises(CheckpointError, match="shape mismatches") as info:
        load_checkpoint(saved[0], config=ModelConfig(backbone="femto"))
    assert "backbone.features.0.0.weight" in str(info.value)


def full_file(model: LocalizationNet, directory: Path, suffix: str) -> Path:
    path = directory / f"model{suffix}"
    if suffix == ".safetensors":
        save_checkpoint(model, path)
    else:
        torch.save(seed_layout(model.state_dict()), path)
    return path


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.999])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file_is_a_checkpoint_error_saying_so(
    model: LocalizationNet, tmp_path: Path, suffix: str, keep: float
) -> None:
    path = full_file(model, tmp_path, suffix)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"truncated|cannot read") as info:
        load_checkpoint(path)
    assert "refused" not in str(info.value)


class CodePayload:
    """Unpickles as a call to ``func(*args)``: what a malicious checkpoint does on load."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


PAYLOADS: dict[str, Callable[[Path], CodePayload]] = {
    "os.system": lambda sentinel: CodePayload(os.system, (f"touch {shlex.quote(str(sentinel))}",)),
    "Path.touch": lambda sentinel: CodePayload(pathlib.Path.touch, (sentinel,)),
    "open": lambda sentinel: CodePayload(open, (str(sentinel), "w")),
}


def write_payload_file(
    path: Path, payload: str, sentinel: Path, legacy_format: bool = False
) -> None:
    state = {"backbone.features.0.0.weight": torch.zeros(1), "evil": PAYLOADS[payload](sentinel)}
    torch.save({"model_state_dict": state}, path, _use_new_zipfile_serialization=not legacy_format)


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payload_files_do_run_code_when_unpickled_unsafely(tmp_path: Path, payload: str) -> None:
    # Control for the refusal tests below: these files really would run code.
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "evil.pt"
    write_payload_file(path, payload, sentinel)
    loaded = torch.load(path, weights_only=False)
    result = loaded["model_state_dict"]["evil"]
    if hasattr(result, "close"):
        result.close()
    assert sentinel.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_pickle_with_code_payload_is_refused_and_never_runs(
    tmp_path: Path, payload: str, suffix: str
) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / f"evil{suffix}"
    write_payload_file(path, payload, sentinel)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_legacy_format_pickle_with_code_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "evil.pt"
    write_payload_file(path, "os.system", sentinel, legacy_format=True)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(read_state_dict, id="read_state_dict"),
        pytest.param(
            lambda path: load_torchvision_weights(ConvNeXt("atto"), path), id="backbone-weights"
        ),
    ],
)
def test_every_torch_file_reader_refuses_code_payloads(
    tmp_path: Path, read: Callable[[Path], object]
) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "evil.pth"
    write_payload_file(path, "os.system", sentinel)
    with pytest.raises(CheckpointError, match="refused"):
        read(path)
    assert not sentinel.exists()


# torchvision's published parameter total for convnext_tiny (ImageNet head included).
TORCHVISION_CONVNEXT_TINY_TOTAL = 28_589_128


def torchvision_convnext_tiny_shapes() -> dict[str, tuple[int, ...]]:
    """Key → shape of torchvision's ``convnext_tiny().state_dict()``, written from its source."""
    widths, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    shapes: dict[str, tuple[int, ...]] = {
        "features.0.0.weight": (widths[0], 3, 4, 4),
        "features.0.0.bias": (widths[0],),
        "features.0.1.weight": (widths[0],),
        "features.0.1.bias": (widths[0],),
    }
    for stage, (dim, depth) in enumerate(zip(widths, depths, strict=True)):
        for block in range(depth):
            prefix = f"features.{2 * stage + 1}.{block}."
            shapes[prefix + "layer_scale"] = (dim, 1, 1)
            shapes[prefix + "block.0.weight"] = (dim, 1, 7, 7)
            shapes[prefix + "block.0.bias"] = (dim,)
            shapes[prefix + "block.2.weight"] = (dim,)
            shapes[prefix + "block.2.bias"] = (dim,)
            shapes[prefix + "block.3.weight"] = (4 * dim, dim)
            shapes[prefix + "block.3.bias"] = (4 * dim,)
            shapes[prefix + "block.5.weight"] = (dim, 4 * dim)
            shapes[prefix + "block.5.bias"] = (dim,)
        if stage + 1 < len(widths):
            prefix = f"features.{2 * stage + 2}."
            shapes[prefix + "0.weight"] = (dim,)
            shapes[prefix + "0.bias"] = (dim,)
            shapes[prefix + "1.weight"] = (widths[stage + 1], dim, 2, 2)
            shapes[prefix + "1.bias"] = (widths[stage + 1],)
    shapes["classifier.0.weight"] = (widths[-1],)
    shapes["classifier.0.bias"] = (widths[-1],)
    shapes["classifier.2.weight"] = (1000, widths[-1])
    shapes["classifier.2.bias"] = (1000,)
    return shapes


@pytest.fixture(scope="module")
def torchvision_tiny_file(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A .pth file holding a state dict with torchvision's convnext_tiny names and shapes."""
    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.randn(shape, generator=generator)
        for key, shape in torchvision_convnext_tiny_shapes().items()
    }
    path = tmp_path_factory.mktemp("torchvision") / "convnext_tiny.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_tiny_key_set_matches_published_parameter_total() -> None:
    # Guards the hand-written key set: it must describe exactly torchvision's convnext_tiny.
    shapes = torchvision_convnext_tiny_shapes()
    assert sum(math.prod(shape) for shape in shapes.values()) == TORCHVISION_CONVNEXT_TINY_TOTAL


def test_backbone_loads_a_state_dict_file_written_with_torchvision_names(
    torchvision_tiny_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = torchvision_tiny_file
    backbone = ConvNeXt("tiny")
    load_torchvision_weights(backbone, path)
    torch.testing.assert_close(backbone.features[0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(
        backbone.features[1][0].block[0].weight, state["features.1.0.block.0.weight"]
    )
    torch.testing.assert_close(
        backbone.features[5][8].block[3].bias, state["features.5.8.block.3.bias"]
    )
    torch.testing.assert_close(backbone.features[6][1].weight, state["features.6.1.weight"])
    torch.testing.assert_close(
        backbone.features[7][2].layer_scale, state["features.7.2.layer_scale"]
    )
    torch.testing.assert_close(backbone.classifier[0].bias, state["classifier.0.bias"])


def test_torchvision_file_for_another_size_is_rejected_with_the_mismatches(
    torchvision_tiny_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, _ = torchvision_tiny_file
    with pytest.raises(CheckpointError, match="shape mismatches") as info:
        load_torchvision_weights(ConvNeXt("nano"), path)
    assert "features.0.0.weight" in str(info.value)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_unknown_suffix_is_a_checkpoint_error_naming_supported_types(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"model_state_dict": {"w": 1}}, id="int-value"),
        pytest.param({"model_state_dict": [torch.zeros(1)]}, id="list-state"),
        pytest.param([torch.zeros(1)], id="list-payload"),
    ],
)
def test_torch_file_without_a_tensor_dict_is_a_checkpoint_error(
    tmp_path: Path, payload: object
) -> None:
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_invalid_config_json_in_metadata_is_a_checkpoint_error(
    model: LocalizationNet, tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"heimdall_config": "{not json"})
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("uncertainty_min", "abc"),
        ("dropout", True),
        ("head_hidden", [256]),
        ("center", ["45", 8.5]),
        ("backbone", 3),
        ("extra", {"note": 1}),
    ],
)
def test_config_value_of_the_wrong_type_is_a_checkpoint_error_naming_the_field(
    model: LocalizationNet, tmp_path: Path, field: str, value: object
) -> None:
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    stored = {**model.config.to_dict(), field: value}
    save_file(state, str(path), metadata={"heimdall_config": json.dumps(stored)})
    with pytest.raises(CheckpointError, match=f"m.safetensors: .*config field '{field}'"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(bytes((i * 7919 + 13) % 256 for i in range(4096)), id="random-bytes"),
        pytest.param(b"\x80\x02h\x05.", id="keyerror-pickle"),
        pytest.param(b"this is not a checkpoint\n", id="text"),
    ],
)
def test_bytes_that_are_no_torch_file_are_called_corrupt_not_unsafe(
    tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        load_checkpoint(path)
    assert "arbitrary code" not in str(info.value)


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_float_dtypes_load_with_a_warning_and_the_source_dtype_recorded(
    model: LocalizationNet, config: ModelConfig, tmp_path: Path, suffix: str, dtype: torch.dtype
) -> None:
    state = cast_floats(model.state_dict(), dtype)
    path = tmp_path / f"m{suffix}"
    write_state(state, path)
    name = str(dtype).removeprefix("torch.")

    with capture_logs() as logs, pytest.warns(DtypeWarning, match=f"stored as {name} were"):
        loaded = load_checkpoint(path, config=config)

    assert loaded.source_dtypes == (name,)
    converted = [e for e in logs if e["event"] == "checkpoint_dtype_converted"]
    assert [e["to"] for e in converted] == [["float32"]]
    weight = "position_head.0.weight"
    assert torch.equal(loaded.model.state_dict()[weight], state[weight].float())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64], ids=str)
def test_non_float_tensor_in_a_float_parameter_is_refused_naming_key_and_dtypes(
    model: LocalizationNet, config: ModelConfig, tmp_path: Path, suffix: str, dtype: torch.dtype
) -> None:
    state = dict(model.state_dict())
    key = "backbone.features.1.0.block.3.weight"
    state[key] = state[key].to(dtype)
    path = tmp_path / f"m{suffix}"
    write_state(state, path)
    name = str(dtype).removeprefix("torch.")

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path, config=config)

    assert f"{key} ({name} in the file, float32 in the model)" in str(refused.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_float32_checkpoint_loads_without_a_warning_and_keeps_int64_counters(
    model: LocalizationNet, tmp_path: Path, suffix: str, recwarn: pytest.WarningsRecorder
) -> None:
    path = tmp_path / f"m{suffix}"
    write_state(dict(model.state_dict()), path)

    loaded = load_checkpoint(path)

    assert loaded.source_dtypes == ("float32",)
    counter = "position_head.1.num_batches_tracked"
    assert loaded.model.state_dict()[counter].dtype == torch.int64
    assert not [w for w in recwarn if issubclass(w.category, DtypeWarning)]


def test_blanket_half_checkpoint_with_float_counters_loads_with_a_warning(
    model: LocalizationNet, config: ModelConfig, tmp_path: Path
) -> None:
    # ``{k: v.half() for k, v in state.items()}`` turns BatchNorm's counters into floats too.
    state = {k: v.half() for k, v in model.state_dict().items()}
    path = tmp_path / "m.safetensors"
    write_state(state, path)

    with pytest.warns(DtypeWarning, match="converted to the model's float32, int64"):
        loaded = load_checkpoint(path, config=config)

    assert loaded.model.state_dict()["position_head.1.num_batches_tracked"].dtype == torch.int64


def test_fractional_float_in_an_integer_buffer_is_refused(
    model: LocalizationNet, config: ModelConfig, tmp_path: Path
) -> None:
    state = dict(model.state_dict())
    counter = "position_head.1.num_batches_tracked"
    state[counter] = torch.tensor(2.5)
    path = tmp_path / "m.safetensors"
    write_state(state, path)

    with pytest.raises(CheckpointError, match=f"{counter} \\(float32 in the file, int64"):
        load_checkpoint(path, config=config)


def test_torchvision_weights_in_an_integer_dtype_are_refused(tmp_path: Path) -> None:
    backbone = ConvNeXt("atto")
    state = dict(backbone.state_dict())
    state["features.0.0.weight"] = state["features.0.0.weight"].to(torch.int32)
    path = tmp_path / "convnext.pth"
    torch.save(state, path)

    with pytest.raises(CheckpointError, match=r"features\.0\.0\.weight \(int32 in the file"):
        load_torchvision_weights(backbone, path)


def zip_bomb(path: Path, inflated: int) -> Path:
    """A torch-style ``.pt`` archive whose one data entry inflates to ``inflated`` zero bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with archive.open("archive/data/0", "w", force_zip64=True) as entry:
            block = bytes(2**20)
            for _ in range(inflated // 2**20):
                entry.write(block)
    return path


def test_an_archive_that_inflates_far_beyond_its_size_is_refused_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = zip_bomb(tmp_path / "bomb.pt", 256 * 2**20)
    assert bomb.stat().st_size < 2**20

    def unpack(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("torch.load ran on the archive")

    monkeypatch.setattr(torch, "load", unpack)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(bomb)

    message = str(refused.value)
    assert "\n" not in message
    assert "bomb.pt: its zip entries inflate to 256.0 MiB" in message
    assert "refused before unpacking" in message


def test_an_archive_that_declares_more_than_any_localizationnet_checkpoint_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "huge.pt"
    torch.save({"w": torch.zeros(4)}, path)

    with pytest.raises(CheckpointError, match="more than the largest LocalizationNet"):
        check_archive_sizes(path, limit=64)
    check_archive_sizes(path)  # a real torch.save file stores its entries as they are


def test_a_checkpoint_too_large_for_memory_is_said_to_be_so_not_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(4)}, path)

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(ResourceError, match=r"weights\.pt ran out of memory.*larger machine"):
        read_state_dict(path)
