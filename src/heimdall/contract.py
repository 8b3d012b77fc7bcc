"""LocalizationNet's IO contract: names, shapes and dtypes every layer agrees on (no torch).

Export writes it into the ONNX graph, validate checks a file against it, inference checks
inputs with it, and the registry writes it into the MLflow signature.
"""

from __future__ import annotations

INPUT_NAME = "mel_spectrogram"
OUTPUT_NAMES = ("positions", "uncertainties")
INPUT_SHAPE = (3, 128, 32)  # per sample: channels, mel bins, time frames
BATCH_AXIS = "batch_size"  # the symbolic first axis of every input and output
IO_CONTRACT: dict[str, tuple[str, tuple[int | str, ...]]] = {
    INPUT_NAME: ("float32", (BATCH_AXIS, *INPUT_SHAPE)),
    **{name: ("float32", (BATCH_AXIS, 2)) for name in OUTPUT_NAMES},
}
