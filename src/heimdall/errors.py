"""One error hierarchy: every failure a user can meet is a HeimdallError subclass."""

from __future__ import annotations


class HeimdallError(Exception):
    """Base class for all errors raised by heimdall."""


class ConfigError(HeimdallError):
    """Settings are missing or inconsistent."""


class InputError(HeimdallError, ValueError):
    """An argument or an input array does not match what the function expects."""


class ResourceError(HeimdallError):
    """The machine ran out of a resource; retrying later or asking for less may work."""


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
    """A publish step failed; says which, why, what already exists, and whether re-running
    can finish the job."""

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
        super().__init__(step, reason)

    @property
    def retryable(self) -> bool:
        """False when the cause lies in the inputs or a gate: the same command fails again."""
        return not isinstance(self.__cause__, _DETERMINISTIC)

    def __str__(self) -> str:
        # Composed when shown, not in __init__: ``raise ... from cause`` sets the cause after.
        done = "; ".join(f"{k}: {v}" for k, v in self.existing.items()) or "nothing"
        message = f"publish failed at step {self.step!r}: {self.reason.rstrip('. ')}. "
        message += f"Already done: {done}"
        if self.retryable:
            message += (
                ". Fix the cause and run the same command again: stored bytes and registered "
                "versions are found by sha256 and reused, never duplicated"
            )
        return message


# Causes that re-running the same command cannot get past.
_DETERMINISTIC = (
    GateError,
    InputError,
    CheckpointError,
    VerificationError,
    ValidationError,
    ExportError,
    ConfigError,
)
