"""What people see: tables that keep identifiers whole at 80 columns (issue 20, 6)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from heimdall import display

NAME = "heimdall-localization-onnx"


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """An 80-column terminal that the display prints to."""
    text = io.StringIO()
    monkeypatch.setattr(display, "out", Console(file=text, width=80, color_system=None))
    return text


def test_a_records_table_folds_only_words_too_long_for_the_terminal(
    screen: io.StringIO,
) -> None:
    long_uri = "s3://heimdall-models/models/localization/" + "x" * 80
    display.out.print(
        display.records_table("models", [{"name": NAME, "uri": long_uri, "note": "a b c " * 20}])
    )

    shown = screen.getvalue()
    assert NAME in shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    assert "x" * 20 in shown  # folded, never cut with an ellipsis
    assert "…" not in shown
