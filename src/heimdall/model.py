"""ConvNeXt backbone (torchvision parameter names) and LocalizationNet with two heads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heimdall.contract import (
    BATCH_AXIS,
    INPUT_NAME,
    INPUT_SHAPE,
    IO_CONTRACT,
    OUTPUT_NAMES,
    Outputs,
    Reference,
)
from heimdall.errors import CheckpointError, InputError

__all__ = [
    "BACKBONES",
    "BATCH_AXIS",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "IO_CONTRACT",
    "OUTPUT_NAMES",
    "LocalizationNet",
    "ModelConfig",
    "torch_reference",
]

# (widths, depths) per size; atto..nano from the ConvNeXt-V2 family, tiny..large from ConvNeXt.
BACKBONES: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    """7×7 depthwise conv → LayerNorm → 4× MLP with GELU → layer scale, plus residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        # Indices 0, 2, 3, 5 carry torchvision's parameter names (block.0, block.2, ...).
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            Permute((0, 2, 3, 1)),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute((0, 3, 1, 2)),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor whose state-dict keys match torchvision's ``convnext_*``.

    ``features`` is the stem and stages; ``classifier.0`` is the final LayerNorm. The ImageNet
    ``classifier.2`` linear layer is not part of the backbone.
    """

    def __init__(self, size: str = "tiny") -> None:
        super().__init__()
        if size not in BACKBONES:
            raise InputError(f"unknown backbone {size!r}; choose one of {', '.join(BACKBONES)}")
        widths, depths = BACKBONES[size]
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(3, widths[0], kernel_size=4, stride=4), LayerNorm2d(widths[0], eps=1e-6)
            )
        ]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            layers.append(nn.Sequential(*(CNBlock(width) for _ in range(depth))))
            if i + 1 < len(widths):
                layers.append(
                    nn.Sequential(
                        LayerNorm2d(width, eps=1e-6),
                        nn.Conv2d(width, widths[i + 1], kernel_size=2, stride=2),
                    )
                )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(LayerNorm2d(widths[-1], eps=1e-6), nn.Flatten(1))
        self.num_features = widths[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.mean(dim=(2, 3), keepdim=True)
        return self.classifier(x)


def load_exact(
    module: nn.Module, state: dict[str, Tensor], source: str, *, assign: bool = False
) -> None:
    """Load ``state`` into ``module`` or raise one CheckpointError listing every mismatch.

    ``assign=True`` makes ``state``'s tensors the module's own (for a meta-device module: no
    random weights to overwrite, no second copy); they are cast to the module's dtypes first.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
        raise CheckpointError(
            f"{source} does not fit the model: "
            + " | ".join(parts)
            + ". Check the backbone size and that the file is a LocalizationNet checkpoint."
        )
    if assign:
        state = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a LocalizationNet besides its weights."""

    backbone: str = "atto"
    head_hidden: tuple[int, int] = (256, 128)
    dropout: float = 0.2
    uncertainty_min: float = 0.01
    uncertainty_max: float = 1.0
    # Region centre [lat, lon] and half-extent [lat, lon] in degrees: outputs are degrees.
    center: tuple[float, float] = (45.0, 8.5)
    scale: tuple[float, float] = (1.0, 1.5)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        if not 0 < self.uncertainty_min < self.uncertainty_max:
            raise InputError("uncertainty bounds must satisfy 0 < min < max")
        if min(self.scale) <= 0:
            raise InputError("scale must be positive")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown model config fields: {sorted(unknown)}")
        values = {key: _config_value(key, value) for key, value in data.items()}
        return cls(**values)  # type: ignore[arg-type]


def _is_number(value: object, kind: type) -> bool:
    """An int, or a float where ``kind`` is float (JSON's true/false are not numbers here)."""
    allowed = (int, float) if kind is float else (int,)
    return isinstance(value, allowed) and not isinstance(value, bool)


# What each ModelConfig field holds in its JSON form (see ModelConfig.to_dict).
_PAIRS = {"head_hidden": int, "center": float, "scale": float}
_NUMBERS = ("dropout", "uncertainty_min", "uncertainty_max")
_EXPECTED = {
    "backbone": "a string",
    "head_hidden": "two integers",
    "center": "two numbers",
    "scale": "two numbers",
    "extra": "an object of strings",
    **dict.fromkeys(_NUMBERS, "a number"),
}


def _config_value(key: str, value: object) -> object:
    """One field of a stored config, type-checked: a checkpoint's JSON is not trusted."""
    if key == "backbone" and isinstance(value, str):
        return value
    if key in _NUMBERS and _is_number(value, float):
        return float(value)  # type: ignore[arg-type]
    if key in _PAIRS and isinstance(value, list | tuple) and len(value) == 2:
        kind = _PAIRS[key]
        if all(_is_number(v, kind) for v in value):
            return tuple(kind(v) for v in value)
    strings = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
    if key == "extra" and strings:
        return dict(value)  # type: ignore[call-overload]
    raise CheckpointError(
        f"model config field {key!r} must be {_EXPECTED[key]}, got {value!r}; "
        "re-save the checkpoint with heimdall.checkpoint.save_checkpoint"
    )


@dataclass(frozen=True)
class ParamsCount:
    total: int
    trainable: int
    frozen: int


def _head(in_features: int, hidden: tuple[int, int], dropout: float) -> nn.Sequential:
    h1, h2 = hidden
    return nn.Sequential(
        nn.Linear(in_features, h1),
        nn.BatchNorm1d(h1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(h1, h2),
        nn.BatchNorm1d(h2),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(h2, 2),
    )


class LocalizationNet(nn.Module):
    """Mel-spectrogram batch ``(B, 3, 128, 32)`` → positions ``(B, 2)`` [lat, lon] in degrees
    and uncertainties ``(B, 2)`` [σx, σy] in normalized region units, clamped to [min, max]."""

    # Registered buffers: declared so type checkers see tensors, not ``Tensor | Module``.
    coord_center: Tensor
    coord_scale: Tensor

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.backbone = ConvNeXt(self.config.backbone)
        features = self.backbone.num_features
        self.position_head = _head(features, self.config.head_hidden, self.config.dropout)
        self.uncertainty_head = _head(features, self.config.head_hidden, self.config.dropout)
        self.register_buffer("coord_center", torch.tensor(self.config.center, dtype=torch.float32))
        self.register_buffer("coord_scale", torch.tensor(self.config.scale, dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling():
            check_input(x)
        positions, sigma = self.forward_normalized(x)
        return positions * self.coord_scale + self.coord_center, sigma

    def forward_normalized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Positions in normalized region units (what the loss sees) and clamped σ."""
        features = self.backbone(x)
        positions = self.position_head(features)
        sigma = F.softplus(self.uncertainty_head(features))
        return positions, sigma.clamp(self.config.uncertainty_min, self.config.uncertainty_max)

    def get_params_count(self) -> ParamsCount:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return ParamsCount(total=total, trainable=trainable, frozen=total - trainable)


def check_input(x: object) -> None:
    """Raise InputError unless ``x`` is a float32 tensor of shape ``(B, 3, 128, 32)``."""
    expected = f"expected a float32 tensor of shape (B, {', '.join(map(str, INPUT_SHAPE))})"
    if not isinstance(x, Tensor):
        raise InputError(f"{expected}, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{expected}, got rank {x.dim()} with shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != INPUT_SHAPE:
        raise InputError(f"{expected}, got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise InputError(f"{expected}, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise InputError(f"{expected}, got an empty batch")


@contextmanager
def torch_reference(model: LocalizationNet, threads: int = 0) -> Iterator[Reference]:
    """``model`` in eval mode without autograd, on numpy arrays, on ``threads`` threads (0:
    PyTorch's setting); its train mode and PyTorch's thread count are restored."""
    was_training, previous = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads or previous)

    def run(x: np.ndarray) -> Outputs:
        normalized, sigma = model.forward_normalized(torch.from_numpy(x))
        # What model(x) returns, without running the network a second time.
        positions = normalized * model.coord_scale + model.coord_center
        return positions.numpy(), sigma.numpy(), normalized.numpy()

    try:
        with torch.inference_mode():
            yield Reference(
                run=run,
                coord_center=model.coord_center.detach().cpu().numpy(),
                coord_scale=model.coord_scale.detach().cpu().numpy(),
            )
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)
