"""The held-out set every candidate is judged on, and what a model scored on it (no torch).

Synthetic samples named by (generator version, seed, size): the same arrays for the same
identity, so two models' numbers compare. :func:`score` turns predicted positions into a
:class:`HeldOut`; ``heimdall.inference.evaluate_heldout`` runs a model to get them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from heimdall.data import GENERATOR_VERSION, HELDOUT_SEED, RFScenario, haversine_km
from heimdall.errors import InputError

HELDOUT_SAMPLES = 256


@dataclass(frozen=True)
class HeldOutSet:
    """A reproducible synthetic held-out set: the same arrays for the same identity."""

    generator: int = GENERATOR_VERSION
    seed: int = HELDOUT_SEED
    size: int = HELDOUT_SAMPLES

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InputError(f"samples must be at least 1, got {self.size}")

    @property
    def identity(self) -> str:
        return f"synthetic-v{self.generator}/seed-{self.seed}/n-{self.size}"


@dataclass(frozen=True)
class HeldOut:
    """ONNX Runtime predictions of one model on a held-out set, and the centre baseline."""

    samples: int
    seed: int
    identity: str
    version: str | None
    sha256: str
    median_error_km: float
    p90_error_km: float
    baseline_median_error_km: float  # always predicting the region centre, same set
    true: list[list[float]] = field(repr=False)
    predicted: list[list[float]] = field(repr=False)

    @property
    def baseline_ratio(self) -> float:
        return self.median_error_km / self.baseline_median_error_km

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """What a version records of its evaluation, so users can filter on it."""
        return {
            "heldout.set": self.identity,
            "heldout.median_km": f"{self.median_error_km:.3f}",
            "heldout.p90_km": f"{self.p90_error_km:.3f}",
            "heldout.baseline_km": f"{self.baseline_median_error_km:.3f}",
        }

    def metrics(self) -> dict[str, float]:
        return {
            "heldout_median_km": self.median_error_km,
            "heldout_p90_km": self.p90_error_km,
            "heldout_baseline_km": self.baseline_median_error_km,
        }


def score(
    positions: np.ndarray,
    labels: np.ndarray,
    heldout: HeldOutSet,
    *,
    version: str | None,
    sha256: str,
) -> HeldOut:
    """Median and p90 localization error of ``positions`` against ``labels``, and the error of
    always predicting the region centre on the same samples."""
    truth = labels.astype(np.float64)
    errors = haversine_km(positions.astype(np.float64), truth)
    centre = np.broadcast_to(np.asarray(RFScenario().center), truth.shape)
    return HeldOut(
        samples=heldout.size,
        seed=heldout.seed,
        identity=heldout.identity,
        version=version,
        sha256=sha256,
        median_error_km=round(float(np.median(errors)), 3),
        p90_error_km=round(float(np.percentile(errors, 90)), 3),
        baseline_median_error_km=round(float(np.median(haversine_km(centre, truth))), 3),
        true=np.round(labels, 4).tolist(),
        predicted=np.round(positions, 4).tolist(),
    )
