"""LocalizationNet's IO contract: names, shapes and dtypes every layer agrees on (no torch).

Export writes it into the ONNX graph, validate checks a file against it, inference checks
inputs with it, and the registry writes it into the MLflow signature. ``Progress`` is the
callback contract of the long library calls (verify, bench, optimize) with their callers;
``Reference`` is what an ONNX file is checked against: the model as a function on arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

INPUT_NAME = "mel_spectrogram"
OUTPUT_NAMES = ("positions", "uncertainties")
INPUT_SHAPE = (3, 128, 32)  # per sample: channels, mel bins, time frames
BATCH_AXIS = "batch_size"  # the symbolic first axis of every input and output
IO_CONTRACT: dict[str, tuple[str, tuple[int | str, ...]]] = {
    INPUT_NAME: ("float32", (BATCH_AXIS, *INPUT_SHAPE)),
    **{name: ("float32", (BATCH_AXIS, 2)) for name in OUTPUT_NAMES},
}

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each unit of work; ``total`` is fixed up front."""


def counter(progress: Progress | None, total: int) -> Callable[[], None]:
    """A ``tick()`` that reports one more unit of ``total`` done; a no-op without progress."""
    if progress is None:
        return lambda: None
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    return tick


def part(progress: Progress | None, start: int, total: int) -> Progress | None:
    """The progress of one part of a longer call: its ``done`` counts on from ``start``."""
    if progress is None:
        return None
    return lambda done, _: progress(start + done, total)


Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Positions in degrees, uncertainties, and positions in normalized region units."""


@dataclass(frozen=True)
class Reference:
    """The model a file must agree with: ``run`` on a float32 batch, and its de-normalisation."""

    run: Callable[[np.ndarray], Outputs]
    coord_center: np.ndarray
    coord_scale: np.ndarray


FP32 = "fp32"
"""The variant every publish registers; int8 and fp16 are optional."""


@dataclass(frozen=True)
class StepRecord:
    """One step of a publish run and how long it took."""

    name: str
    status: str  # ok | reused | skipped | failed
    seconds: float
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "step": self.name,
            "status": self.status,
            "seconds": self.seconds,
            "detail": self.detail,
        }
