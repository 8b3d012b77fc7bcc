"""Heimdall model publisher: LocalizationNet checkpoint → verified ONNX → object store → MLflow.

Names are imported on first use, so ``import heimdall.storage`` (or the CLI's ``--help``)
does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Importing config keeps heimdall's log events at WARNING until the host configures logging,
# whichever heimdall module is imported first.
from heimdall import config as _config  # noqa: F401
from heimdall.errors import (
    CheckpointError,
    ConfigError,
    ExportError,
    HeimdallError,
    InputError,
    PublishError,
    RegistryError,
    StorageError,
    ValidationError,
    VerificationError,
)

if TYPE_CHECKING:
    from heimdall.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
    from heimdall.inference import LocalizationModel
    from heimdall.legacy import ONNXExporter, export_and_register_model
    from heimdall.model import LocalizationNet, ModelConfig
    from heimdall.pipeline import publish

_LAZY = {
    "LoadedCheckpoint": "heimdall.checkpoint",
    "load_checkpoint": "heimdall.checkpoint",
    "save_checkpoint": "heimdall.checkpoint",
    "LocalizationModel": "heimdall.inference",
    "LocalizationNet": "heimdall.model",
    "ModelConfig": "heimdall.model",
    "ONNXExporter": "heimdall.legacy",
    "export_and_register_model": "heimdall.legacy",
    "publish": "heimdall.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'heimdall' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "HeimdallError",
    "InputError",
    "LoadedCheckpoint",
    "LocalizationModel",
    "LocalizationNet",
    "ModelConfig",
    "ONNXExporter",
    "PublishError",
    "RegistryError",
    "StorageError",
    "ValidationError",
    "VerificationError",
    "export_and_register_model",
    "load_checkpoint",
    "publish",
    "save_checkpoint",
]
