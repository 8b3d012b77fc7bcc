"""The publish steps on the local file (``heimdall.steps``); publish runs them in test_pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from heimdall.errors import VerificationError
from heimdall.parity import Gates, ParityResult
from heimdall.steps import heldout_of


def test_a_heldout_score_needs_a_task_check_on_the_heldout_samples() -> None:
    parity = ParityResult(Path("model.onnx"), Gates(), (), None, ())

    with pytest.raises(VerificationError, match="no task check on the first 256 samples"):
        heldout_of(parity, "0" * 64)
