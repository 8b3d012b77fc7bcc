"""What the HTTP app needs from whoever hosts it: the served model and a way to run it.

The single-machine server (``heimdall.serving.server``) and each Ray Serve replica
(``heimdall.serving.ray``) are backends; the FastAPI app (``heimdall.serving.app``) reaches
the one hosting it through ``request.app.state.backend`` and knows nothing else about it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import SecretStr

from heimdall.errors import HeimdallError

if TYPE_CHECKING:
    from heimdall.inference import LocalizationModel
    from heimdall.serving.metrics import Metrics


@dataclass(frozen=True)
class Served:
    """A verified, warmed-up model and what every response says about it."""

    model: LocalizationModel
    name: str  # the registered model name (a file's stem for a path or s3:// URI)
    version: str  # the registered version ("" when the URI names no registered version)
    sha256: str  # of the bytes the session was opened from, checked against the registry
    alias: str | None  # the alias followed, if the URI is models:/NAME@ALIAS
    source: str  # the URI, credentials redacted

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and uncertainties of an already checked float32 (B, 3, 128, 32) batch.

        One ONNX Runtime call: the batcher already bounds the batch at ``max_batch`` samples.
        """
        prediction = self.model.predict(features, chunk_size=max(len(features), 1))
        return prediction.positions, prediction.uncertainties


@dataclass(frozen=True)
class Inferred:
    """One request's answer, from one model: never mixed across versions."""

    served: Served
    positions: np.ndarray
    uncertainties: np.ndarray


Outputs = tuple[np.ndarray, np.ndarray]


async def infer_pinned(
    served: Served | None,
    features: np.ndarray,
    run: Callable[[Served, np.ndarray], Awaitable[Outputs]],
) -> Inferred:
    """``run`` ``features`` on ``served``, the model current when the request came: the whole
    request runs on it, whatever swaps meanwhile, so one answer never mixes versions."""
    if served is None:
        raise HeimdallError("no verified model is loaded yet; retry when ready")
    positions, uncertainties = await run(served, features)
    return Inferred(served, positions, uncertainties)


@dataclass(frozen=True)
class Limits:
    max_request_samples: int = 1024  # a bigger request is refused (413) before it is decoded
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue_samples: int = 1024  # beyond it requests get 503 + Retry-After


class Backend(Protocol):
    """A host of the app: it holds the served model and runs requests on it."""

    metrics: Metrics
    limits: Limits
    webhook_secret: SecretStr | None  # None: the webhook route answers 404

    @property
    def current(self) -> Served | None:
        """The model served now; None until the first verified load."""

    async def infer(self, features: np.ndarray) -> Inferred:
        """Run a checked batch on the model current at the call, in order, one version."""

    def notify(self, name: str, alias: str) -> None:
        """A verified webhook says ``alias`` of ``name`` moved: check the registry soon."""
