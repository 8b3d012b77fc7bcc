"""Heimdall model publisher: LocalizationNet checkpoint → verified ONNX → object store → MLflow."""

from heimdall.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from heimdall.errors import (
    CheckpointError,
    ExportError,
    HeimdallError,
    InputError,
    RegistryError,
    StorageError,
    ValidationError,
    VerificationError,
)
from heimdall.model import LocalizationNet, ModelConfig

__all__ = [
    "CheckpointError",
    "ExportError",
    "HeimdallError",
    "InputError",
    "LoadedCheckpoint",
    "LocalizationNet",
    "ModelConfig",
    "RegistryError",
    "StorageError",
    "ValidationError",
    "VerificationError",
    "load_checkpoint",
    "save_checkpoint",
]
