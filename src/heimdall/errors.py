"""One error hierarchy: every failure a user can meet is a HeimdallError subclass."""

from __future__ import annotations


class HeimdallError(Exception):
    """Base class for all errors raised by heimdall."""


class ConfigError(HeimdallError):
    """Settings are missing or inconsistent."""


class InputError(HeimdallError, ValueError):
    """An argument or an input array does not match what the function expects."""


class CheckpointError(HeimdallError):
    """A checkpoint cannot be read, is unsafe, or does not fit the model."""


class ExportError(HeimdallError):
    """PyTorch → ONNX export failed."""


class ValidationError(HeimdallError):
    """An ONNX file is malformed or does not match LocalizationNet's contract."""


class VerificationError(HeimdallError):
    """ONNX outputs disagree with PyTorch beyond the configured gates."""


class StorageError(HeimdallError):
    """The object store refused, lost or altered an object."""


class RegistryError(HeimdallError):
    """The MLflow tracking server or model registry failed."""


class GateError(HeimdallError):
    """A model did not pass the quality gates of an alias or stage; it stays registered."""


class LockTimeoutError(HeimdallError):
    """Another process held a lock for longer than the caller would wait."""


class PublishError(HeimdallError):
    """A publish step failed; says which, why, and what already exists (re-running finishes)."""

    def __init__(
        self,
        step: str,
        reason: str,
        existing: dict[str, str] | None = None,
        steps: list[dict[str, object]] | None = None,
    ) -> None:
        self.step = step
        self.reason = reason
        self.existing = dict(existing or {})
        self.steps = list(steps or [])
        done = "; ".join(f"{k}: {v}" for k, v in self.existing.items()) or "nothing"
        super().__init__(
            f"publish failed at step {step!r}: {reason}. Already done: {done}. Fix the cause "
            "and run the same command again: stored bytes and registered versions are found "
            "by sha256 and reused, never duplicated"
        )
